#!/usr/bin/env bash
# Quantized Osprey LLM at 7B width, ours side by side with llama.cpp, in one command (~10 min with the
# release build and llama.cpp already built; first-time builds take longer):
#
#   bash tools/bench_gguf.sh [OUTPUT_FILE]
#
# A model of Osprey-7B's width (vocab 32000, hidden 4096, intermediate 11008, 32 heads) with $LAYERS
# (default 2) decoder layers and random weights is quantized to q8_0 and q4_k by `llm-worker quantize`
# (plus a `--text-only` copy for llama.cpp); `cargo bench -p llm-worker --bench quantized` measures ours
# (file size, RSS of a serving llm-worker, prefill of 1100 tokens, decode at batch 1 and 16, logits),
# tools/bench_gguf.py runs llama.cpp (tools/setup_llamacpp.sh builds it) on the same files and prints
# the markdown tables, also written to OUTPUT_FILE (default: a markdown file in the target directory).
# 2 threads for both.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-2}
THREADS=${THREADS:-2}
VENV=${LLAMACPP_VENV:-$PWD/.venv-llamacpp}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${1:-$TARGET/bench_gguf.md}
DIR=$TARGET/bench-gguf
[ -x "$VENV/build/bin/llama-bench" ] || bash tools/setup_llamacpp.sh
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
mkdir -p "$DIR"
cargo build --release -q -p llm-worker --bin llm-worker
cargo bench -q -p llm-worker --bench quantized -- --layers "$LAYERS" --types f32,q8_0,q4_k --dir "$DIR" \
  --serve "$TARGET/release/llm-worker" --text-only --logits 64 --repeats 1 --decode 16 \
  --json "$DIR/rows-${LAYERS}l.json" >&2
LLAMA_CPP_LIB_PATH=$VENV/build/bin "$VENV/bin/python" tools/bench_gguf.py --rows "$DIR/rows-${LAYERS}l.json" \
  --dir "$DIR" --llama-bin "$VENV/build/bin" --threads "$THREADS" --logits 64 | tee "$OUT"
