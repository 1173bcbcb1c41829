#!/usr/bin/env python3
"""CPU reference timing of the ConvNeXt-L trunk with torch + timm (baseline for vision-worker/benches/vision.rs).

The trunk Osprey runs (docs/MODEL.md#clip-convnext-l-trunk): open_clip `convnext_large_d_320` builds its vision tower as
`timm.create_model('convnext_large')` (open_clip TimmModel.trunk), depths [3,3,27,3], dims [192,384,768,1536]; Osprey
calls stem then stages[0..3] (res2..res5) and never the head.  This script times exactly that forward, f32, batch 1,
random weights initialised like the Rust bench (layer-norm weights 1, biases 0, layer scale gamma 0.1, conv and linear
weights N(0, 1/fan_in)), at each --sizes input, under torch.inference_mode(), with --threads intra-op threads (use the
Rust run's thread count).  It also times one block per stage at 512 split into the depthwise 7x7 conv and the rest
(NHWC permute, LayerNorm, fc1, GELU, fc2, layer scale, residual), the breakdown the Rust bench prints.

Run (vision venv, .venv-vision: torch, timm, open_clip):
    .venv-vision/bin/python tools/bench_vision_reference.py [--threads 2] [--sizes 512,800,1024] \
        [--budget-s 60] > vision_reference.json
Each size runs a warm-up, then 3-5 timed forwards at 512 and 1-3 above, stopping once --budget-s seconds are spent at
that size (after the first).  Prints JSON: median seconds per image and per-block milliseconds.
"""

import argparse
import json
import statistics
import time

import torch
import timm


def median_runs(fn, min_runs, max_runs, budget_s):
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def init_like_rust(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if name.endswith("gamma"):
                    p.fill_(0.1)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)


def trunk_forward(model, x):
    """open_clip/Osprey CLIP.extract_features: stem then the four stages (res2..res5)."""
    x = model.stem(x)
    outs = []
    for stage in model.stages:
        x = stage(x)
        outs.append(x)
    return outs


def block_parts(block):
    """timm ConvNeXtBlock (conv_mlp=False) split into the depthwise conv and the rest."""
    def dw(x):
        return block.conv_dw(x)

    def rest(shortcut, y):
        y = y.permute(0, 2, 3, 1)
        y = block.norm(y)
        y = block.mlp(y)
        y = y.permute(0, 3, 1, 2)
        y = y.mul(block.gamma.reshape(1, -1, 1, 1))
        return shortcut + y
    return dw, rest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="512,800,1024")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--no-blocks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    gen = torch.Generator().manual_seed(0)
    model = timm.create_model("convnext_large", pretrained=False, num_classes=0).float().eval()
    init_like_rust(model, gen)
    # timm >= 0.9 names the layer scale `gamma` on ConvNeXtBlock; check the structure the split relies on.
    blk = model.stages[0].blocks[0]
    assert hasattr(blk, "gamma") and blk.gamma is not None and blk.conv_dw.groups == blk.conv_dw.in_channels

    trunk = {}
    with torch.inference_mode():
        sizes = [int(s) for s in args.sizes.split(",") if s]
        for i, size in enumerate(sizes):
            x = torch.randn(1, 3, size, size, generator=gen)
            t = time.perf_counter()
            outs = trunk_forward(model, x)  # warm-up (oneDNN primitive creation per shape)
            warm = time.perf_counter() - t
            assert [o.shape[1] for o in outs] == [192, 384, 768, 1536]
            assert outs[2].shape[-1] == size // 16
            lo, hi = (3, 5) if size <= 512 else (1, 3)
            times = median_runs(lambda: trunk_forward(model, x), lo, hi, args.budget_s)
            trunk[str(size)] = {"median_s": round(statistics.median(times), 4), "runs": len(times),
                                "times_s": [round(t, 4) for t in times], "warmup_s": round(warm, 3)}
            print(f"trunk {size}: {times}", file=__import__("sys").stderr)

        blocks = {}
        if not args.no_blocks:
            for s, stage in enumerate(model.stages):
                c = stage.blocks[0].conv_dw.in_channels
                hw = 512 // (4 << s)
                x = torch.randn(1, c, hw, hw, generator=gen)
                dw, rest = block_parts(stage.blocks[0])
                y = dw(x)
                rest(x, y)
                t_dw = median_runs(lambda: dw(x), 3, 20, 3.0)
                t_rest = median_runs(lambda: rest(x, y), 3, 20, 3.0)
                blocks[str(s)] = {"channels": c, "hw": hw, "dwconv_ms": round(1e3 * statistics.median(t_dw), 3),
                                  "rest_ms": round(1e3 * statistics.median(t_rest), 3)}

    print(json.dumps({
        "what": "ConvNeXt-L trunk (timm convnext_large = open_clip convnext_large_d_320 trunk), stem + 4 stages, "
                "random weights, f32, batch 1, torch CPU",
        "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "trunk": trunk, "blocks": blocks, "total_wall_s": round(time.perf_counter() - start, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
