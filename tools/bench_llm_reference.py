#!/usr/bin/env python3
"""CPU reference timing of the official Osprey question loop with transformers (baseline for our benchmarks).

The official scripts (docs/osprey-model.md sections 4.3, 4.5, 6) answer one question per `generate` call: every
call splices the projected image tokens and the region tokens into the prompt and runs a full forward over the whole
prefix (no prefix/KV sharing between questions about the same image), then decodes.  This script times exactly that
loop on a reduced LLaMA that fits a CPU, with random weights:
    vocab 32000, hidden 512, intermediate 1376, 8 layers, 8 heads (head_dim 64), mm_projector 768 -> 512 -> 512,
    prefix = 1024 image tokens + ~60 text tokens (one <mask><pos> region), greedy, exactly 32 new tokens.
For N = 1, 4, 16 questions (one image, N different questions) it prints JSON to stdout with the median seconds
per question.  Ratios between our server and this baseline, not absolute numbers, are what transfer to the
real 7B model.

Run (model venv, pins in tools/requirements-llm.txt):
    /work/.venv-llm/bin/python tools/bench_llm_reference.py [--threads 1] [--budget-s 170] [--ns 1,4,16]
The run stops starting new questions once --budget-s seconds have passed (N values not reached are reported as
skipped), so it stays within about 3 minutes on 2 cores.  One thread by default: on a shared 2-core machine with a
cargo build running, 2 torch threads were 2-7x slower per question than 1 (OpenMP threads wait for a busy core).
Measured here with 1 thread (other builds running): about 2.2 s (N=1), 2.3 s (N=4), 2.4 s (N=16) per question.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformers  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from make_llm_fixtures import llama_config, make_projector, splice  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 32000, 512, 1376, 8, 8
MM_HIDDEN = 768
N_IMAGE_TOKENS = 1024
N_TEXT = 60
N_NEW = 32
MASK_ID, POS_ID = 32000, 32001      # placeholders, never embedded (as in the real vocabulary)
IMAGE_TOKEN_INDEX = -200
SEED = 1234


def build(gen):
    cfg = llama_config(HEADS, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, vocab=VOCAB, max_pos=4096)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float().eval()
    proj = make_projector(MM_HIDDEN, HIDDEN).float().eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(proj.named_parameters()):
            if p.dim() == 1 and not name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, proj


def prompt_ids(gen, q):
    """BOS, ~10 system ids, -200, overview ids, question ids with one <mask><pos>, 'ASSISTANT:'-like tail."""
    body = torch.randint(3, VOCAB, (N_TEXT,), generator=gen).tolist()
    cut = 12 + q % 5
    ids = [1] + body[:10] + [IMAGE_TOKEN_INDEX] + body[10:cut] + [MASK_ID, POS_ID] + body[cut:]
    return ids


@torch.no_grad()
def answer(model, proj, ids, image_features, mask_tok, pos_tok):
    emb = splice(model, proj, ids, image_features, mask_tok, pos_tok, mask_id=MASK_ID, pos_id=POS_ID)
    out = model.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                         max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, num_beams=1, use_cache=True)
    assert out.shape[1] == N_NEW
    return emb.shape[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=170.0)
    ap.add_argument("--ns", default="1,4,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # make_llm_fixtures pins 1 thread and deterministic kernels on import
    torch.use_deterministic_algorithms(False)
    transformers.logging.set_verbosity_error()

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(SEED)
    model, proj = build(gen)
    image_features = torch.randn(N_IMAGE_TOKENS, MM_HIDDEN, generator=gen)
    mask_tok = torch.randn(1, HIDDEN, generator=gen) * 0.5
    pos_tok = torch.randn(1, HIDDEN, generator=gen) * 0.5

    t0 = time.perf_counter()
    prefix_len = answer(model, proj, prompt_ids(gen, 0), image_features, mask_tok, pos_tok)  # warm-up
    warmup_s = time.perf_counter() - t0

    results = {}
    for n in [int(x) for x in args.ns.split(",")]:
        times = []
        t_n = time.perf_counter()
        for q in range(n):
            if time.perf_counter() - start > args.budget_s:
                break
            ids = prompt_ids(gen, q)
            t = time.perf_counter()
            answer(model, proj, ids, image_features, mask_tok, pos_tok)
            times.append(time.perf_counter() - t)
        if len(times) == n:
            results[str(n)] = {"median_s_per_question": round(statistics.median(times), 4),
                               "total_s": round(time.perf_counter() - t_n, 3)}
        else:
            results[str(n)] = {"skipped": f"time budget reached after {len(times)} of {n} questions",
                               "median_s_per_question_so_far": (round(statistics.median(times), 4) if times
                                                                else None)}
    print(json.dumps({
        "what": "official one-question-per-generate loop (full prefix forward per question), transformers, CPU",
        "config": {"vocab": VOCAB, "hidden": HIDDEN, "intermediate": INTER, "layers": LAYERS, "heads": HEADS,
                   "mm_hidden": MM_HIDDEN, "attn": "sdpa", "dtype": "float32"},
        "prefix_tokens": prefix_len, "image_tokens": N_IMAGE_TOKENS, "new_tokens": N_NEW,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "warmup_s": round(warmup_s, 3), "results": results,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
