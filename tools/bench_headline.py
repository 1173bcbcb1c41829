#!/usr/bin/env python3
"""The full-size end-to-end headline (docs/BENCHMARKS.md "Headline"): a checkpoint at real width and the
official per-mask loop in PyTorch on it, the baseline of `cargo bench -p osprey-e2e --bench e2e -- --weights DIR`.

    checkpoint OUT    writes an Osprey checkpoint directory with random weights in the official key layout:
                      the ConvNeXt-L trunk at full size (depths 3/3/27/3, widths 192..1536, 512 px), the mask
                      extractor (embed 1024, mask shape 112), the mlp2x_gelu projector, and a LLaMA of hidden 2048,
                      8 layers, 16 heads, intermediate 5632 with the real LLaMA-2 tokenizer (32000 ids + <mask>,
                      <pos> = 32002 rows), f32 safetensors (about 3 GB; write it under a git-ignored folder).
    reference         times the Osprey demo's way of describing N regions: for every mask, encode the image,
                      pool the mask, splice, prefill and generate (greedy, --new-tokens), with torch + timm +
                      transformers on that checkpoint.  The loop does the same work for every mask, so it times
                      --masks of them and reports the median seconds per mask (JSON on stdout); N regions cost
                      N times that.

Run (a venv with torch, timm, open_clip, transformers: tools/requirements-vision.txt):
    .venv-vision/bin/python tools/bench_headline.py checkpoint .cache/headline
    .venv-vision/bin/python tools/bench_headline.py reference --checkpoint .cache/headline --threads 2 > ref.json
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_vision_fixtures as vf  # noqa: E402
from make_llm_fixtures import llama_config, splice  # noqa: E402
from bench_llm_reference import OSPREY_SHORT_IDS  # noqa: E402

import timm  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "llm" / "tokenizer"
IMAGE = ROOT / "tests" / "fixtures" / "vision" / "photo.png"

DEPTHS, DIMS = [3, 3, 27, 3], [192, 384, 768, 1536]
HIDDEN, INTER, LAYERS, HEADS = 2048, 5632, 8, 16
VOCAB = 32002  # LLaMA-2's 32000 + <mask>, <pos>
MASK_ID, POS_ID = 32000, 32001
MASK_EMBED, MASK_SHAPE = 1024, 112
IMAGE_SIZE = 512
TRUNK = "model.vision_tower.vision_tower.visual.trunk."


def init_(named_params, gen):
    """Finite activations through 27 blocks and 8 layers: norms 1, biases 0, layer scale 0.1,
    matrices N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, p in named_params:
            if p.dim() == 1:
                p.fill_(0.1 if name.endswith("gamma") else 0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)


def build_modules(gen=None):
    trunk = timm.create_model("convnext_large", pretrained=False, num_classes=0).float().eval()
    extractor = vf.MaskExtractor(DIMS, MASK_EMBED, HIDDEN, MASK_SHAPE).float().eval()
    projector = vf.make_projector(DIMS[2], HIDDEN).float().eval()
    cfg = llama_config(HEADS, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, vocab=VOCAB, max_pos=4096)
    cfg._attn_implementation = "sdpa"
    llm = LlamaForCausalLM(cfg).float().eval()
    if gen is not None:
        for module in (trunk, extractor, projector, llm):
            init_(module.named_parameters(), gen)
    return trunk, extractor, projector, llm


def state_dict(trunk, extractor, projector, llm):
    sd = {}
    for k, v in trunk.state_dict().items():
        if k.startswith(("stem.", "stages.")):
            sd[TRUNK + k] = v
    sd.update({f"mask_extractor.{k}": v for k, v in extractor.state_dict().items()})
    sd.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    sd.update(llm.state_dict())
    return {k: v.contiguous() for k, v in sd.items()}


def config_json():
    return {
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "mask_token_id": MASK_ID,
        "pos_token_id": POS_ID,
        "tie_word_embeddings": False,
        "mm_hidden_size": DIMS[2],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "open_clip_pytorch_model.bin",
        "vision_depths": DEPTHS,
        "vision_dims": DIMS,
        "image_size": IMAGE_SIZE,
        "mask_embed_dim": MASK_EMBED,
        "mask_shape": MASK_SHAPE,
        "torch_dtype": "float32",
    }


def write_checkpoint(out: pathlib.Path, seed: int):
    out.mkdir(parents=True, exist_ok=True)
    modules = build_modules(torch.Generator().manual_seed(seed))
    sd = state_dict(*modules)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    for name in ["tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]:
        shutil.copy(TOKENIZER / name, out / name)
    n = sum(v.numel() for v in sd.values())
    print(f"{out}: {len(sd)} tensors, {n / 1e6:.0f} M parameters, {4 * n / 1e9:.2f} GB f32", file=sys.stderr)


def load_checkpoint(path: pathlib.Path):
    trunk, extractor, projector, llm = build_modules()
    sd = load_file(str(path / "model.safetensors"))
    take = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    trunk.load_state_dict(take(TRUNK), strict=False)
    extractor.load_state_dict(take("mask_extractor."))
    projector.load_state_dict(take("model.mm_projector."))
    llm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                       "model.norm", "lm_head"))})
    llm.generation_config.eos_token_id = None
    llm.generation_config.pad_token_id = 0
    return trunk, extractor, projector, llm


def box_mask(h, w, i):
    """A box covering a different part of the image for every i (the work does not depend on it)."""
    m = np.zeros((h, w), dtype=np.float32)
    y0, x0 = (i * 7) % (h // 2), (i * 11) % (w // 2)
    m[y0:y0 + h // 2, x0:x0 + w // 2] = 1.0
    return torch.from_numpy(m)


@torch.no_grad()
def describe_one(modules, image, mask, new_tokens):
    """The demo's per-mask path: encode, pool, splice, generate. Returns (token ids, stage seconds)."""
    trunk, extractor, projector, llm = modules
    t0 = time.perf_counter()
    pixel, _, _ = vf.preprocess(image)
    x = trunk.stem(pixel)
    feats = {}
    for name, stage in zip(("res2", "res3", "res4", "res5"), trunk.stages):
        x = stage(x)
        feats[name] = x
    t1 = time.perf_counter()
    mask_tok, pos_tok, _ = extractor(feats, mask[None])
    image_tokens = feats["res4"].flatten(2).transpose(1, 2)[0]  # [1024, 768]
    embeds = splice(llm, projector, OSPREY_SHORT_IDS, image_tokens, mask_tok, pos_tok, mask_id=MASK_ID,
                    pos_id=POS_ID)
    t2 = time.perf_counter()
    out = llm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                       use_cache=True)
    t3 = time.perf_counter()
    return out[0].tolist(), {"encode_s": t1 - t0, "pool_splice_s": t2 - t1, "llm_s": t3 - t2, "total_s": t3 - t0,
                             "positions": int(embeds.shape[0])}


def reference(args):
    torch.set_num_threads(args.threads)
    vf.IMAGE_SIZE = IMAGE_SIZE
    start = time.perf_counter()
    modules = load_checkpoint(pathlib.Path(args.checkpoint))
    load_s = time.perf_counter() - start
    image = Image.open(args.image).convert("RGB")
    w, h = image.size
    describe_one(modules, image, box_mask(h, w, 0), args.new_tokens)  # warm-up
    runs = []
    for i in range(args.masks):
        tokens, times = describe_one(modules, image, box_mask(h, w, i + 1), args.new_tokens)
        runs.append(dict(times, tokens=tokens))
        print(f"mask {i + 1}/{args.masks}: {times['total_s']:.2f} s", file=sys.stderr)
    med = lambda key: round(statistics.median(r[key] for r in runs), 4)
    json.dump({
        "what": "official per-mask loop (encode, pool, splice, generate for every mask), torch CPU",
        "torch": torch.__version__, "timm": timm.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": args.threads, "new_tokens": args.new_tokens, "image": os.path.basename(args.image),
        "load_s": round(load_s, 2), "masks_timed": len(runs),
        "per_mask_s": med("total_s"), "encode_s": med("encode_s"), "pool_splice_s": med("pool_splice_s"),
        "llm_s": med("llm_s"), "positions": runs[0]["positions"],
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
    }, sys.stdout, indent=1)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("out", type=pathlib.Path)
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("reference")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--image", default=str(IMAGE))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--masks", type=int, default=3, help="masks timed (after one warm-up)")
    r.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    if args.command == "checkpoint":
        write_checkpoint(args.out, args.seed)
    else:
        reference(args)


if __name__ == "__main__":
    main()
