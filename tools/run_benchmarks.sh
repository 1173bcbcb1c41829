#!/usr/bin/env bash
# Runs every CPU benchmark and writes docs/BENCHMARKS.md, in one command:
#   - sets up the Python references' environment .venv-bench/ inside the checkout (git-ignored; pins in
#     tools/requirements-bench.txt; reinstalled only when that file changes) and the headline checkpoint
#     .cache/headline/ (tools/bench_headline.py checkpoint, about 3 GB, made once);
#   - builds the bench binaries and the release services first, so no compile overlaps a measurement;
#   - runs each step's Python reference right before our side (same threads, same minutes of load):
#       vision    torch + timm ConvNeXt-L trunk | cargo bench -p vision-worker --bench vision
#       llm       transformers' question loop   | cargo bench -p llm-worker --bench llm
#       sam       segment-anything + MobileSAM  | cargo bench -p sam-worker --bench sam
#       e2e       (own baseline)                | cargo bench -p osprey-e2e --bench e2e (demo weights)
#       headline  the official per-mask loop    | cargo bench -p osprey-e2e --bench headline (full size)
#       bytes     (none)                        | tools/bench_bytes.py (bytes per request at full width)
#   - writes docs/BENCHMARKS.md: CPU model and SIMD flags, load, exact commands, every table.
#
# Usage: tools/run_benchmarks.sh             (from anywhere; about 40 minutes on 2 idle cores)
#        tools/run_benchmarks.sh --doc-only  (rewrite the report from the outputs of the last run in $BENCH_OUT)
# Environment:
#   BENCH_STEPS      steps to run (default vision,llm,sam,e2e,headline,bytes); the report shows the others' last
#                    outputs from $BENCH_OUT when present, marked with their own date
#   BENCH_VENV       Python environment of the references (default .venv-bench, created when missing)
#   BENCH_THREADS    threads for candle (RAYON_NUM_THREADS) and torch (default 2)
#   BENCH_SIZES      trunk input sizes (default 512,800,1024); BENCH_MASKS mask counts of the pooling bench
#                    (default 1,16,128,1024); BENCH_NS question counts of the LLM bench (default 1,4,16,64)
#   BENCH_HEADLINE_NS  regions per image of the headline (default 1,16,64,256)
#   BENCH_OUT        raw outputs (default target/bench-results); BENCH_DOC: the report (default docs/BENCHMARKS.md)
#   BENCH_NOTE       optional text for the report's header (e.g. about discarded runs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BENCH_VENV:-.venv-bench}"
STEPS=",${BENCH_STEPS:-vision,llm,sam,e2e,headline,bytes},"
THREADS="${BENCH_THREADS:-2}"
SIZES="${BENCH_SIZES:-512,800,1024}"
MASKS="${BENCH_MASKS:-1,16,128,1024}"
NS="${BENCH_NS:-1,4,16,64}"
HEADLINE_NS="${BENCH_HEADLINE_NS:-1,16,64,256}"
OUT="${BENCH_OUT:-target/bench-results}"
DOC="${BENCH_DOC:-docs/BENCHMARKS.md}"
HEADLINE_CKPT=.cache/headline
FULL_WIDTH_CKPT=.cache/full-width
mkdir -p "$OUT" "$(dirname "$DOC")"
# cargo bench runs the binaries in the package directory: pass absolute paths.
OUT_ABS="$(cd "$OUT" && pwd)"
export RAYON_NUM_THREADS="$THREADS"

load() { cut -d' ' -f1-3 /proc/loadavg; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
wants() { case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
PY="$VENV/bin/python"

# The commands, as the report prints them.
CMD_VREF="$PY tools/bench_vision_reference.py --threads $THREADS --sizes $SIZES"
CMD_VIS="cargo bench -p vision-worker --bench vision -- --reference $OUT_ABS/vision_reference.json --sizes $SIZES --masks $MASKS"
CMD_LREF="$PY tools/bench_llm_reference.py --threads $THREADS --ns $NS --max-questions 8 --budget-s 240"
CMD_LLM="cargo bench -p llm-worker --bench llm -- --reference $OUT_ABS/llm_reference.json --ns $NS --seq-cap 8 --batched-max-n 64"
CMD_SREF="$PY tools/bench_sam_reference.py --threads $THREADS --iters 3"
CMD_SAM="cargo bench -p sam-worker --bench sam -- --reference $OUT_ABS/sam_reference.json --iters 3"
CMD_E2E="cargo bench -p osprey-e2e --bench e2e -- --ns 1,16,64 --runs 5"
CMD_HREF="$PY tools/bench_headline.py reference --checkpoint $HEADLINE_CKPT --threads $THREADS --masks 3"
CMD_HEAD="cargo bench -p osprey-e2e --bench headline -- --weights $ROOT/$HEADLINE_CKPT --reference $OUT_ABS/headline_reference.json --ns $HEADLINE_NS --runs 2"
# The release binaries cargo built above (it honours CARGO_TARGET_DIR).
CMD_BYTES="$PY tools/bench_bytes.py --checkpoint $FULL_WIDTH_CKPT --bin-dir \${CARGO_TARGET_DIR:-target}/release"

# One measured command: stdout to $OUT/<name>, stderr to $OUT/<name>.log, wall seconds and load to $OUT/<name>.meta.
measure() {
    local name="$1"; shift
    log "$name (load $(load))"
    local t0; t0=$(date +%s)
    local before; before="$(load)"
    if ! bash -c "$*" > "$OUT/$name" 2> "$OUT/$name.log"; then
        tail -20 "$OUT/$name.log" >&2
        echo "$name failed: $*" >&2
        exit 1
    fi
    printf 'when=%q\nseconds=%q\nload_before=%q\nload_after=%q\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" \
        "$(( $(date +%s) - t0 ))" "$before" "$(load)" > "$OUT/$name.meta"
}

if [ "${1:-}" != "--doc-only" ]; then
    log "Python environment $VENV"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    if ! cmp -s tools/requirements-bench.txt "$VENV/.requirements-bench.txt"; then
        (cd tools && "$ROOT/$PY" -m pip install -q --disable-pip-version-check -r requirements-bench.txt)
        cp tools/requirements-bench.txt "$VENV/.requirements-bench.txt"
    fi
    if wants sam; then bash tools/fetch_mobile_sam.sh > /dev/null; fi
    if wants headline && [ ! -f "$HEADLINE_CKPT/model.safetensors" ]; then
        log "headline checkpoint $HEADLINE_CKPT"
        "$PY" tools/bench_headline.py checkpoint "$HEADLINE_CKPT"
    fi
    if wants bytes && [ ! -f "$FULL_WIDTH_CKPT/model.safetensors" ]; then
        log "full-width checkpoint $FULL_WIDTH_CKPT"
        "$PY" tools/make_full_width_checkpoint.py "$FULL_WIDTH_CKPT"
    fi

    log "building (release)"
    : > "$OUT/build.log"
    {
        cargo build --release --bins
        cargo bench --no-run -p vision-worker --bench vision
        cargo bench --no-run -p llm-worker --bench llm
        cargo bench --no-run -p sam-worker --bench sam
        cargo bench --no-run -p osprey-e2e --bench e2e --bench headline
    } 2>> "$OUT/build.log" || { tail -30 "$OUT/build.log" >&2; exit 1; }

    UPTIME_START="$(uptime)"
    START=$(date +%s)
    if wants vision; then measure vision_reference.json "$CMD_VREF"; measure vision.out "$CMD_VIS"; fi
    if wants llm; then measure llm_reference.json "$CMD_LREF"; measure llm.out "$CMD_LLM"; fi
    if wants sam; then measure sam_reference.json "$CMD_SREF"; measure sam.out "$CMD_SAM"; fi
    if wants e2e; then measure e2e.out "$CMD_E2E"; fi
    if wants headline; then measure headline_reference.json "$CMD_HREF"; measure headline.out "$CMD_HEAD"; fi
    if wants bytes; then measure bytes.out "$CMD_BYTES"; fi
    UPTIME_END="$(uptime)"
    TOTAL=$(( $(date +%s) - START ))
    RUN_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
    COMMIT="$(git rev-parse --short HEAD 2> /dev/null || echo '?')"
    DIRTY="$(git status --porcelain 2> /dev/null | wc -l | tr -d ' ')"
    for v in RUN_DATE COMMIT DIRTY UPTIME_START UPTIME_END TOTAL STEPS; do printf '%s=%q\n' "$v" "${!v}"; done \
        > "$OUT/meta.env"
    log "done in ${TOTAL} s; writing $DOC"
fi
# shellcheck disable=SC1091
source "$OUT/meta.env"

CPU_MODEL="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
CORES="$(nproc)"
MEM="$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -x -E 'avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile' | sort | paste -sd' ' -)"
RUSTC="$(rustc --version)"
CANDLE="$(sed -n 's/^candle-core = .*"=\{0,1\}\([0-9][0-9.]*\)".*/\1/p' Cargo.toml | head -1)"
ref_field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1" 2> /dev/null || echo '?'; }
# A step's section: its output, marked when it is from an earlier run than this one.
section() {
    local name="$1" step="$2" title="$3" intro="${4:-}"
    if [ ! -s "$OUT/$name" ]; then
        printf '## %s\n\nNot run (no output in %s/).\n\n' "$title" "$OUT"
        return
    fi
    case "$STEPS" in *",$step,"*) ;; *)
        # shellcheck disable=SC1090
        (source "$OUT/$name.meta"; printf '> From an earlier run (%s), not this one.\n\n' "$when") ;;
    esac
    # Outputs that do not open with their own heading get the step's title.
    head -1 "$OUT/$name" | grep -q '^## ' || printf '## %s\n\n' "$title"
    [ -z "$intro" ] || printf '%s\n\n' "$intro"
    grep -v '^{' "$OUT/$name"
    echo
}
# A command as the report prints it: paths inside the checkout relative to it.
show() { echo "${1//$ROOT/\$PWD}"; }
meta_field() { (source "$OUT/$1.meta" 2> /dev/null && echo "${!2}") || echo '?'; }

{
    cat << HEADER
# Osprey serving benchmarks (CPU)

Generated by \`tools/run_benchmarks.sh\` (steps: $(echo ${STEPS//,/ })) from a run ending $RUN_DATE at commit \`$COMMIT\`
($DIRTY uncommitted paths in the checkout). Numbers are medians of the runs stated; every ratio is against a baseline
measured in the same run, right before ours, with the same thread count. Random weights everywhere (speed does not
depend on the values; they are initialised to keep activations finite). Dated measurements of single changes, before
and after, are in [BENCHMARK_HISTORY.md](BENCHMARK_HISTORY.md).
${BENCH_NOTE:+
$BENCH_NOTE
}
## Machine

- CPU: $CPU_MODEL, $CORES cores, $MEM memory; SIMD flags: $FLAGS. A ratio measured on one kind of CPU does not
  carry to another (AVX-512 Xeons with AMX, AVX-512 EPYCs, AVX2-only EPYCs all occur here): rerun there.
- Threads: $THREADS for candle (\`RAYON_NUM_THREADS\`) and for torch (\`torch.set_num_threads\`).
- \`uptime\` before: \`$UPTIME_START\`; after: \`$UPTIME_END\`. A shared virtual machine: under load torch's OpenMP
  threads lose far more than candle's (rayon) ones, so only runs on an idle machine give fair ratios.
- Toolchain: $RUSTC, candle $CANDLE (CPU backend, no MKL; the \`gemm\` crate with its AVX-512 kernels);
  torch $(ref_field "$OUT/vision_reference.json" '["torch"]'), timm $(ref_field "$OUT/vision_reference.json" '["timm"]'),
  transformers $(ref_field "$OUT/llm_reference.json" '["transformers"]').
- Wall seconds per step (reference + ours): vision $(meta_field vision_reference.json seconds) + $(meta_field vision.out seconds),
  LLM $(meta_field llm_reference.json seconds) + $(meta_field llm.out seconds), SAM $(meta_field sam_reference.json seconds) + $(meta_field sam.out seconds),
  end to end $(meta_field e2e.out seconds), headline $(meta_field headline_reference.json seconds) + $(meta_field headline.out seconds),
  bytes $(meta_field bytes.out seconds); $TOTAL s in all (setup and build excluded).

## Commands

\`\`\`sh
tools/run_benchmarks.sh        # all of the below (after setting up $VENV and the checkpoints), then this file
$(show "$CMD_VREF") > vision_reference.json
RAYON_NUM_THREADS=$THREADS $(show "$CMD_VIS")
$(show "$CMD_LREF") > llm_reference.json
RAYON_NUM_THREADS=$THREADS $(show "$CMD_LLM")
$(show "$CMD_SREF") > sam_reference.json
RAYON_NUM_THREADS=$THREADS $(show "$CMD_SAM")
RAYON_NUM_THREADS=$THREADS $(show "$CMD_E2E")
$(show "$CMD_HREF") > headline_reference.json
RAYON_NUM_THREADS=$THREADS $(show "$CMD_HEAD")
RAYON_NUM_THREADS=$THREADS $(show "$CMD_BYTES")
\`\`\`

Raw outputs (the references' JSON, every run's time in the logs) are in \`$OUT/\`, not committed.

HEADER
    section headline.out headline "Headline: full size, end to end"
    section vision.out vision "Vision worker"
    section llm.out llm "LLM worker"
    section sam.out sam "SAM worker (\`cargo bench -p sam-worker --bench sam\`)"
    section e2e.out e2e "End to end with the demo weights"
    section bytes.out bytes "Bytes per request at full width (\`tools/bench_bytes.py\`)" \
        "The released widths (ConvNeXt-L at 512, LLM hidden 4096; one block per stage and one layer, since
depth does not change what crosses the wire: \`tools/make_full_width_checkpoint.py\`), the real binaries,
the gateway's \`osprey_gateway_worker_bytes_total\` read before and after each request. Bytes:"
    cat << 'NOTES'
## Measured outside this script

- Click to mask in the annotation page (MobileSAM, release binaries, the browser test
  `cargo test -p gateway --test annotation_page`): medians 172 / 156 / 166 ms over three runs on 2026-12-07 (target
  300 ms); see [BENCHMARK_HISTORY.md](BENCHMARK_HISTORY.md), "Annotation page".
- Quantized LLM weights (`cargo bench -p llm-worker --bench quantized`): [BENCHMARK_HISTORY.md](BENCHMARK_HISTORY.md),
  "Quantized LLM".
- Quantized LLM (GGUF) at 7B width beside llama.cpp (`bash tools/bench_gguf.sh`, about 10 minutes):
  [BENCHMARK_HISTORY.md](BENCHMARK_HISTORY.md), "Quantized LLM (GGUF) at 7B width, beside llama.cpp".

## GPU (CUDA)

Not measured: no GPU has been available to this project so far. The CUDA paths (`--features cuda`: candle's CUDA
backend, the mask-pooling kernels in `vision-worker/kernels/`) are compile-checked in CI only. `tools/run_benchmarks.sh`
has no GPU rows yet; nothing here is an estimate of them.
NOTES
} > "$DOC"
log "wrote $DOC"
