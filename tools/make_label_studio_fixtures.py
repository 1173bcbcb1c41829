"""Brush RLE cases made by Label Studio's own encoder, for the gateway's Rust encoder to match
byte for byte (gateway/src/integrations/brush_rle.rs).

Run with the Label Studio SDK installed (tools/setup_test_env.sh puts it in .venv-labelstudio):
    .venv-labelstudio/bin/python tools/make_label_studio_fixtures.py
"""

import json
import pathlib

import numpy as np
from label_studio_sdk.converter import brush

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/integrations/label_studio_brush_rle.json"


def case(name, mask):
    # mask2rle wants 0/255 values (Label Studio's SAM examples multiply 0/1 masks by 255).
    rle = brush.mask2rle((mask > 0).astype(np.uint8) * 255)
    assert (brush.decode_rle(bytes(rle)).reshape(*mask.shape, 4)[:, :, 3] > 0).tolist() == (mask > 0).tolist()
    return {
        "name": name,
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "mask": [int(v) for v in (mask > 0).ravel()],
        "rle": [int(v) for v in rle],
    }


def main():
    rng = np.random.default_rng(17)
    cases = []
    # Asymmetric: 7 rows, 11 columns, a box off-centre (row-major order must be kept).
    box = np.zeros((7, 11), np.uint8)
    box[1:4, 2:9] = 1
    cases.append(case("box 7x11", box))
    cases.append(case("empty 5x3", np.zeros((5, 3), np.uint8)))
    cases.append(case("full 4x6", np.ones((4, 6), np.uint8)))
    # Single pixels: runs of 4 values, the shortest the mask encoder makes.
    cases.append(case("speckle 9x13", (rng.random((9, 13)) < 0.3).astype(np.uint8)))
    # Long runs: 0-runs over 256 and over 65,536 values (the 16-bit field and its split).
    big = np.zeros((200, 150), np.uint8)
    big[120:130, 40:41] = 1
    cases.append(case("long runs 200x150", big))
    disc = np.fromfunction(lambda y, x: (x - 20) ** 2 + (y - 12) ** 2 < 90, (30, 45)).astype(np.uint8)
    cases.append(case("disc 30x45", disc))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(cases, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
