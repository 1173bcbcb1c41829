#!/usr/bin/env python3
"""CPU reference timing of the official Osprey question loop with transformers (baseline for our benchmarks).

The official scripts (docs/MODEL.md, "Splicing" and "Generation and post-processing") answer one question per `generate` call: every
call splices the projected image tokens and the region tokens into the prompt and runs a full forward over the whole
prefix (no prefix/KV sharing between questions about the same image), then decodes.  This script times exactly that
loop on a reduced LLaMA that fits a CPU, with random weights:
    vocab 32000, hidden 512, intermediate 1376, 8 layers, 8 heads (head_dim 64), mm_projector 768 -> 512 -> 512,
    prompt = 1024 image tokens + ~70 text ids (one <mask><pos> region, see --prompt), greedy, exactly 32 new tokens.
For N = 1, 4, 16, 64 questions (one image, N different questions) it prints JSON to stdout with the median seconds
per question.  Ratios between our server and this baseline, not absolute numbers, are what transfer to the
real 7B model.

Prompt (--prompt): `osprey-short` (default) is the Osprey demo's short-description prompt in the osprey_v1 template,
"{system} USER: <image>\n\nThis provides an overview of the picture.\nPlease give me a short description of
<mask><pos>. Using a short phrase. ASSISTANT:", as ids of the real LLaMA-2 tokenizer (OSPREY_SHORT_IDS below: the
ids of transformers 4.31 LlamaTokenizerFast on tests/fixtures/llm/tokenizer through tokenizer_image_token, identical
to llm-worker's tokenizer): 70 ids = 1093 positions with the image; every question has the same ids and its own
region tokens, exactly what llm-worker/benches/llm.rs sends.  `random` is the original prompt: BOS, ~60 random ids,
the <mask><pos> pair at a per-question offset.
The loop is sequential, so the time per question does not depend on N: at most --max-questions questions are timed
per N (the JSON says how many: measured_questions).

Run (model venv, pins in tools/requirements-llm.txt):
    .venv-llm/bin/python tools/bench_llm_reference.py [--threads 1] [--budget-s 170] [--ns 1,4,16,64] \
        [--max-questions 16] [--prompt osprey-short|random] [--hidden 512 --intermediate 1376 --layers 8 \
        --heads 8] [--decode-batch 32] [--phases-only]
(--hidden/--intermediate/--layers/--heads change the model's size, e.g. the headline's 2048/5632/8/16;
--phases-only times only the prefill and the decode steps at batch 1 and --decode-batch, the phases
llm-worker/benches/llm.rs --phases-only compares against.)
(any venv with torch and transformers works, e.g. .venv-vision; tools/run_benchmarks.sh passes --threads 2,
the Rust bench's thread count.)
The run stops starting new questions once --budget-s seconds have passed (an N cut short reports the median of the
questions it timed; one with none is reported as skipped), so it stays within about 3 minutes on 2 cores.
One thread by default: on a shared 2-core machine with a cargo build running, 2 torch threads were 2-7x slower
per question than 1 (OpenMP threads wait for a busy core).  Measured here with 1 thread (other builds running,
`random` prompt): about 2.2 s (N=1), 2.3 s (N=4), 2.4 s (N=16) per question.
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
# tokenizer_image_token(osprey_v1 prompt of the demo's short-description question); -200 = the image.
OSPREY_SHORT_IDS = [
    1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076, 8444, 29892,
    13173, 29892, 322, 1248, 568, 6089, 304, 278, 5199, 29915, 29879, 5155, 29889, 3148, 1001, 29901, 29871,
    IMAGE_TOKEN_INDEX, 29871, 13, 13, 4013, 8128, 385, 975, 1493, 310, 278, 7623, 29889, 13, 12148, 2367, 592, 263,
    3273, 6139, 310, 29871, MASK_ID, POS_ID, 869, 5293, 263, 3273, 16549, 29889, 319, 1799, 9047, 13566, 29901]


def build(gen, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS):
    cfg = llama_config(heads, hidden=hidden, inter=inter, layers=layers, heads=heads, vocab=VOCAB, max_pos=4096)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float().eval()
    proj = make_projector(MM_HIDDEN, hidden).float().eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(proj.named_parameters()):
            if p.dim() == 1 and not name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, proj


def prompt_ids(gen, q, kind="random"):
    """`osprey-short`: OSPREY_SHORT_IDS.  `random`: BOS, ~10 system ids, -200, overview ids, question ids with one
    <mask><pos>, 'ASSISTANT:'-like tail."""
    if kind == "osprey-short":
        return list(OSPREY_SHORT_IDS)
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


@torch.no_grad()
def phases(model, proj, ids, image_features, mask_tok, pos_tok, reps=3, steps=8, batch=32):
    """Prefill of the whole spliced prompt (last-position logits only, as generate asks for), single-token
    decode steps on its KV cache, and decode steps of `batch` sequences continuing that prompt (its cache
    repeated `batch` times, as a batched `generate` would hold it) -- the cost split
    llm-worker/benches/llm.rs prints next to its own."""
    emb = splice(model, proj, ids, image_features, mask_tok, pos_tok, mask_id=MASK_ID, pos_id=POS_ID)[None]
    prefill = []
    for _ in range(reps):
        t = time.perf_counter()
        out = model(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
        prefill.append(time.perf_counter() - t)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=past, use_cache=True, logits_to_keep=1)
        decode.append(time.perf_counter() - t)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    result = {"prefill_s": round(statistics.median(prefill), 4), "prefill_positions": emb.shape[1],
              "decode_step_ms": round(1e3 * statistics.median(decode), 3), "prefill_runs": reps,
              "decode_steps": steps}
    if batch > 1:
        out = model(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        past.batch_repeat_interleave(batch)
        tok = out.logits[:, -1:].argmax(-1).repeat(batch, 1)
        batch_decode = []
        for step in range(5):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True, logits_to_keep=1)
            if step > 0:  # as the Rust bench: the first step is not timed
                batch_decode.append(time.perf_counter() - t)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        result["batch"] = batch
        result["batch_decode_step_ms"] = round(1e3 * statistics.median(batch_decode), 3)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=170.0)
    ap.add_argument("--ns", default="1,4,16,64")
    ap.add_argument("--max-questions", type=int, default=16, help="questions timed per N at most")
    ap.add_argument("--prompt", choices=["osprey-short", "random"], default="osprey-short")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--intermediate", type=int, default=INTER)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--decode-batch", type=int, default=32, help="sequences in the batched decode phase (1: skip)")
    ap.add_argument("--phases-only", action="store_true", help="time the phases only, not the question loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # make_llm_fixtures pins 1 thread and deterministic kernels on import
    torch.use_deterministic_algorithms(False)
    transformers.logging.set_verbosity_error()

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(SEED)
    model, proj = build(gen, args.hidden, args.intermediate, args.layers, args.heads)
    image_features = torch.randn(N_IMAGE_TOKENS, MM_HIDDEN, generator=gen)
    # One region per question; every question gets its own region tokens.
    regions = [(torch.randn(1, args.hidden, generator=gen) * 0.5, torch.randn(1, args.hidden, generator=gen) * 0.5)
               for _ in range(args.max_questions)]
    mask_tok, pos_tok = regions[0]

    t0 = time.perf_counter()
    prefix_len = answer(model, proj, prompt_ids(gen, 0, args.prompt), image_features, mask_tok, pos_tok)  # warm-up
    warmup_s = time.perf_counter() - t0

    phase_times = phases(model, proj, prompt_ids(gen, 0, args.prompt), image_features, mask_tok, pos_tok,
                         batch=args.decode_batch)

    results = {}
    for n in [] if args.phases_only else [int(x) for x in args.ns.split(",")]:
        times = []
        t_n = time.perf_counter()
        for q in range(min(n, args.max_questions)):
            if time.perf_counter() - start > args.budget_s:
                break
            ids = prompt_ids(gen, q, args.prompt)
            mask_tok, pos_tok = regions[q]
            t = time.perf_counter()
            answer(model, proj, ids, image_features, mask_tok, pos_tok)
            times.append(time.perf_counter() - t)
        if times:
            results[str(n)] = {"median_s_per_question": round(statistics.median(times), 4),
                               "measured_questions": len(times), "questions": n,
                               "total_s": round(time.perf_counter() - t_n, 3)}
        else:
            results[str(n)] = {"skipped": f"time budget reached before question 1 of {n}"}
    print(json.dumps({
        "what": "official one-question-per-generate loop (full prefix forward per question), transformers, CPU",
        "config": {"vocab": VOCAB, "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                   "heads": args.heads,
                   "mm_hidden": MM_HIDDEN, "attn": "sdpa", "dtype": "float32"},
        "prompt": args.prompt, "prefix_tokens": prefix_len, "image_tokens": N_IMAGE_TOKENS, "new_tokens": N_NEW,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "warmup_s": round(warmup_s, 3), "phases": phase_times, "results": results,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
