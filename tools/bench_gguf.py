#!/usr/bin/env python3
"""Quantized Osprey LLM at 7B width, ours side by side with llama.cpp (run by tools/bench_gguf.sh).

Reads the rows `cargo bench -p llm-worker --bench quantized -- --json FILE` wrote (a model of Osprey-7B's
width with `--layers` decoder layers, random weights, quantized by `llm-worker quantize`), runs llama.cpp's
own `llama-bench` (prefill, decode at batch 1), `llama-batched-bench` (decode at batch 16) and its Python
binding (logits) on the text-only GGUF of the same weights (`quantize --text-only`), and prints markdown:

1. measured at the model's real depth, ours and llama.cpp's, with the ratio;
2. fidelity: relative L2 gap of every position's logits to our f32 model, and top-1 agreement, for our
   quantized kernels and for llama.cpp's on the same file;
3. the same figures scaled to Osprey-7B's 32 layers (how, in the table's note);
4. for q8_0, whether every quantized linear tensor's bytes equal those PyPI `gguf.quants` (llama.cpp's own
   quantizer) gives for the f32 checkpoint's weights, after llama.cpp's Q/K row order.

Memory: ours is the resident set of a serving `llm-worker` (loaded and warmed up); llama.cpp's is the peak
resident set of its `llama-bench` run (weights mmapped, so the touched file pages count, plus its KV cache).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

N_LAYERS_7B = 32


def run_timed(cmd):
    """Runs cmd; returns (stdout, stderr, peak RSS in MB) via GNU time."""
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M"] + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    rss = re.findall(r"MAXRSS_KB (\d+)", proc.stderr)
    return proc.stdout, proc.stderr, (int(rss[-1]) / 1024 if rss else float("nan"))


def llama_bench(bin_dir, gguf, threads, prompt, decode):
    out, _, rss = run_timed([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(prompt),
                          "-n", str(decode), "-r", "3", "-o", "json"])
    results = json.loads(out)
    pp = next(r["avg_ts"] for r in results if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in results if r["n_gen"] == decode and r["n_prompt"] == 0)
    return pp, tg, rss


def batched_bench(bin_dir, gguf, threads, decode, batch):
    """Decode tokens/s with `batch` sequences (each first prefills 16 tokens), from llama-batched-bench."""
    ctx = batch * (16 + decode) + 64
    out, err, _ = run_timed([os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-t", str(threads),
                        "-c", str(ctx), "-b", "512", "-ub", "512", "-npp", "16", "-ntg", str(decode),
                        "-npl", str(batch), "--output-format", "jsonl"])
    for line in (out + err).splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            if row["pl"] == batch:
                return row["speed_tg"]
    raise SystemExit(f"no row for batch {batch} in llama-batched-bench's output:\n{out}")


def llama_logits(gguf, ids, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids) + 16, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
                logits_all=True, verbose=False)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    del llm
    return scores


def prompt_ids(n):
    """The benchmark's prompt (llm-worker/benches/quantized.rs `prompt_ids`)."""
    return [100 + (k * 7919 % 31000) for k in range(n)]


def rel_l2(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def top1(got, want):
    return int((got.argmax(-1) == want.argmax(-1)).sum())


def layer_bytes(gguf_path):
    """(bytes of one decoder layer, bytes of the LM head, all tensor bytes) of a GGUF, from PyPI gguf's reader."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    layer = sum(v for k, v in sizes.items() if k.startswith("blk.0."))
    return layer, sizes.get("output.weight", 0), sum(sizes.values()), reader


def q8_0_bytes_equal(gguf_path, checkpoint_dir):
    """(tensors whose bytes equal gguf.quants' q8_0 of the checkpoint's weights, q8_0 tensors checked)."""
    import gguf
    from gguf import GGMLQuantizationType, quants
    from safetensors import safe_open

    from make_gguf_fixtures import linear_names, llama_cpp_permute

    cfg = json.load(open(os.path.join(checkpoint_dir, "config.json")))
    names = {gname: (name, heads) for name, (gname, heads) in linear_names(cfg).items()}
    equal = checked = 0
    with safe_open(os.path.join(checkpoint_dir, "model.safetensors"), "numpy") as source:
        for t in gguf.GGUFReader(gguf_path).tensors:
            if t.tensor_type != GGMLQuantizationType.Q8_0 or t.name not in names:
                continue
            name, heads = names[t.name]
            w = source.get_tensor(name).astype(np.float32)
            w = llama_cpp_permute(w, heads) if heads else w
            want = quants.quantize(w, GGMLQuantizationType.Q8_0)
            checked += 1
            equal += int(np.array_equal(np.asarray(t.data).reshape(-1), want.reshape(-1)))
    return equal, checked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="JSON written by the quantized bench (--json)")
    ap.add_argument("--dir", required=True, help="the bench's --dir (GGUFs and logits)")
    ap.add_argument("--llama-bin", required=True, help="folder with llama-bench and llama-batched-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--logits", type=int, default=64)
    args = ap.parse_args()

    doc = json.load(open(args.rows))
    layers, prompt, decode = doc["layers"], doc["prompt"], doc["decode"]
    rows = {r["weights"]: r for r in doc["rows"]}
    ids = prompt_ids(args.logits)
    ref_path = os.path.join(args.dir, f"logits-f32-{layers}l.f32")
    ref = np.fromfile(ref_path, dtype="<f4").reshape(args.logits, -1) if os.path.exists(ref_path) else None

    measured, fidelity, scaled, byte_checks = [], [], [], []
    for ty, r in rows.items():
        if ty == "f32":
            measured.append(f"| f32 (ours) | {r['file_bytes'] / 1e6:.0f} | {r['serving_rss_mb']:.0f} | "
                            f"{r['prefill_tok_s']:.1f} | | {r['decode1_tok_s']:.2f} | | {r['decode16_tok_s']:.1f} | |")
            continue
        text = os.path.join(args.dir, f"{ty}-{layers}l-text.gguf")
        t0 = time.time()
        pp, tg, rss = llama_bench(args.llama_bin, text, args.threads, prompt, decode)
        tg16 = batched_bench(args.llama_bin, text, args.threads, decode, 16)
        print(f"llama.cpp {ty}: {time.time() - t0:.0f} s", file=sys.stderr)
        ratio = lambda ours, theirs: f"{ours / theirs:.2f}x"
        measured.append(f"| {ty} ours | {r['file_bytes'] / 1e6:.0f} | {r['serving_rss_mb']:.0f} | "
                        f"{r['prefill_tok_s']:.1f} | {ratio(r['prefill_tok_s'], pp)} | {r['decode1_tok_s']:.2f} | "
                        f"{ratio(r['decode1_tok_s'], tg)} | {r['decode16_tok_s']:.1f} | "
                        f"{ratio(r['decode16_tok_s'], tg16)} |")
        measured.append(f"| {ty} llama.cpp | {os.path.getsize(text) / 1e6:.0f} (text only) | {rss:.0f} (peak) | "
                        f"{pp:.1f} | | {tg:.2f} | | {tg16:.1f} | |")

        if ref is not None:
            ours = np.fromfile(os.path.join(args.dir, f"logits-{ty}-{layers}l.f32"), dtype="<f4").reshape(ref.shape)
            theirs = llama_logits(text, ids, args.threads)
            fidelity.append(f"| {ty} | {rel_l2(ours, ref):.2e} | {top1(ours, ref)}/{len(ids)} | "
                            f"{rel_l2(theirs, ref):.2e} | {top1(theirs, ref)}/{len(ids)} | "
                            f"{rel_l2(ours, theirs):.2e} |")

        if ty == "q8_0":
            equal, checked = q8_0_bytes_equal(text, os.path.join(args.dir, f"f32-{layers}l"))
            byte_checks.append(f"q8_0: {equal} of {checked} quantized linear tensors byte-equal to `gguf.quants`.")

        # 32 layers: memory adds 32 - layers decoder layers' weights; decode time per token scales with the
        # weight bytes read per token (LM head + layers, decode is memory-bound); prefill time with the layers
        # (the LM head runs for the last position only).
        layer, head, total, _ = layer_bytes(r["path"])
        extra = (N_LAYERS_7B - layers) * layer
        bytes_ratio = (head + layers * layer) / (head + N_LAYERS_7B * layer)
        depth_ratio = layers / N_LAYERS_7B
        scaled.append(f"| {ty} ours | {(total + extra) / 1e9:.2f} | {(r['serving_rss_mb'] * 1e6 + extra) / 1e9:.2f} | "
                      f"{r['prefill_tok_s'] * depth_ratio:.2f} | {r['decode1_tok_s'] * bytes_ratio:.2f} | "
                      f"{r['decode16_tok_s'] * bytes_ratio:.2f} |")
        scaled.append(f"| {ty} llama.cpp | | {(rss * 1e6 + extra) / 1e9:.2f} | {pp * depth_ratio:.2f} | "
                      f"{tg * bytes_ratio:.2f} | {tg16 * bytes_ratio:.2f} |")

    load = open("/proc/loadavg").read().split()[:3]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"7B width (vocab 32000, hidden 4096, intermediate 11008, 32 heads), **{layers} decoder layers**, random "
          f"weights; {cpu}, {args.threads} threads, load average at the end {' '.join(load)}; prefill "
          f"{prompt} tokens, decode {decode} steps (batch 16: each sequence first prefills 16 tokens).\n")
    print("| weights | file MB | RSS MB (ours: serving worker) | prefill tok/s | vs llama.cpp | decode b1 tok/s | "
          "vs llama.cpp | decode b16 tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(measured))
    if fidelity:
        print(f"\nFidelity against our f32 model, all {len(ids)} positions of a {len(ids)}-token prompt:\n")
        print("| type | ours: rel. L2 gap | ours: top-1 agree | llama.cpp: rel. L2 gap | llama.cpp: top-1 agree | "
              "ours vs llama.cpp |")
        print("|---|---|---|---|---|---|")
        print("\n".join(fidelity))
    if byte_checks:
        print("\n" + "\n".join(byte_checks))
    print(f"\nScaled to Osprey-7B's {N_LAYERS_7B} layers (not measured: memory + {N_LAYERS_7B - layers} layers' "
          f"weight bytes; decode x (LM head + {layers} layers' bytes) / (LM head + {N_LAYERS_7B} layers' bytes); "
          f"prefill x {layers}/{N_LAYERS_7B}):\n")
    print("| weights | file GB | RSS GB | prefill tok/s | decode b1 tok/s | decode b16 tok/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(scaled))


if __name__ == "__main__":
    main()
