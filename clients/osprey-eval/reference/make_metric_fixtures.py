"""Reference values for osprey-eval's metrics, on synthetic predictions.

Writes tests/fixtures/eval/metrics_reference.json with:
- pope: answers and labels, scored by the logic of Osprey's `osprey/eval/pope/evaluate.py`;
- category: raw answers and names, cleaned and scored (Semantic IoU) as `lvis_paco_eval.py` does;
- ap: COCO mask AP from pycocotools' COCOeval (iouType='segm') on random instances and detections;
- panoptic: PQ recomputed with panopticapi's `pq_compute_single_core` / `pq_average` logic on random
  panoptic maps (panopticapi itself is not on PyPI);
- semseg: mIoU with detectron2 SemSegEvaluator's formula;
- cider: pycocoevalcap's Cider (CIDEr-D) on pre-tokenised random captions;
- openvocab: ground-truth segments with random class cosines, run through the literal (torch)
  semantic / panoptic / instance inference of `eval_open_vocab_seg_detectron2.py` with its 300
  queries, then scored as above.

Run with the venv of tools/requirements-eval.txt:
  python clients/osprey-eval/reference/make_metric_fixtures.py
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "tests/fixtures/eval/metrics_reference.json"
rng = np.random.default_rng(8)


# ---------------------------------------------------------------- POPE and category text
def pope_reference():
    starts = ["Yes", "No", "yes", "no", "Not really", "There is", "There is no", "I see a", "nope",
              "No, there is", "Yes, there is", "It is not", "Maybe", "no.", "The image does not show"]
    ends = [" a dog.", " a cat in the image. No more.", ", not visible", "", ". Yes it is", " none",
            " no\ncat", " nothing", ", no."]
    answers, labels = [], []
    for _ in range(300):
        answers.append((rng.choice(starts) + rng.choice(ends)).lower())
        labels.append(str(rng.choice(["yes", "no"])))
    parsed = []
    for text in answers:
        if text.find('.') != -1:
            text = text.split('.')[0]
        text = text.replace(',', '')
        words = text.split(' ')
        parsed.append('no' if ('No' in words or 'not' in words or 'no' in words) else 'yes')
    pred = [0 if a == 'no' else 1 for a in parsed]
    lab = [0 if l == 'no' else 1 for l in labels]
    tp = sum(p == 1 and l == 1 for p, l in zip(pred, lab))
    fp = sum(p == 1 and l == 0 for p, l in zip(pred, lab))
    tn = sum(p == 0 and l == 0 for p, l in zip(pred, lab))
    fn = sum(p == 0 and l == 1 for p, l in zip(pred, lab))
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return {
        "answers": answers, "labels": labels, "parsed": parsed,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall), "yes_ratio": pred.count(1) / len(pred),
    }


def category_reference():
    raws = ["cat", " Category: Dog.</s>", "a red car, parked", "teddy bear.", "x:y:z", "mug handle",
            "The answer: Wine Glass", "knife.blade", "  ", "Bottle cap</s>", "a dog and a dog", "CHAIR LEG"]
    names = ["cat", "dog", "car_(automobile)", "teddy_bear", "mug:handle", "mug:handle", "wine_glass",
             "knife:blade", "person", "bottle:cap", "dog", "chair:leg"]
    rows = []
    for raw, name in zip(raws, names):
        out = raw.strip()
        if out.endswith('</s>'):
            out = out[:-len('</s>')]
        out = out.strip()
        if ':' in out:
            out = out.split(':')[1]
        out = out.replace('.', ' ').replace(':', ' ').replace(',', ' ')
        gt = name.replace('_', ' ').replace(':', ' ')
        value, target = out.lower(), gt.lower()
        union = len(set(value.split()) | set(target.split()))
        s_iou = len(set(value.split()) & set(target.split())) / union
        rows.append({"raw": raw, "name": name, "prediction": out, "ground_truth": gt, "s_iou": s_iou})
    return rows


# ---------------------------------------------------------------- COCO mask AP
def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return r["counts"].decode()


def random_shape(h, w, size):
    m = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h - size[0]), rng.integers(0, w - size[1])
    if rng.random() < 0.5:
        m[y0:y0 + size[0], x0:x0 + size[1]] = 1
    else:
        yy, xx = np.mgrid[:h, :w]
        cy, cx = y0 + size[0] / 2, x0 + size[1] / 2
        m[((yy - cy) / (size[0] / 2)) ** 2 + ((xx - cx) / (size[1] / 2)) ** 2 <= 1] = 1
    return m


def perturb(m):
    dy, dx = rng.integers(-3, 4, size=2)
    out = np.roll(np.roll(m, dy, 0), dx, 1)
    if rng.random() < 0.3:
        out = out | random_shape(*m.shape, (rng.integers(3, 20), rng.integers(3, 20)))
    return out


def ap_reference():
    h, w = 160, 200
    images = [{"id": i + 1, "height": h, "width": w, "file_name": f"{i}.png"} for i in range(6)]
    categories = [{"id": c} for c in (1, 3, 4)]
    gts, dts = [], []
    for image in images[:5]:  # image 6 has detections only
        for _ in range(rng.integers(2, 9)):
            size = (int(rng.integers(4, 150)), int(rng.integers(4, 190)))
            m = random_shape(h, w, size)
            crowd = int(rng.random() < 0.1)
            gts.append({"id": len(gts) + 1, "image_id": image["id"], "category_id": int(rng.choice([1, 3, 4])),
                        "segmentation": {"size": [h, w], "counts": rle(m)}, "area": float(m.sum()),
                        "iscrowd": crowd, "_mask": m})
    for g in gts:
        for _ in range(rng.integers(0, 3)):
            cat = g["category_id"] if rng.random() < 0.8 else int(rng.choice([1, 3, 4]))
            dts.append((g["image_id"], cat, perturb(g["_mask"]), float(rng.random())))
    for image in images:
        for _ in range(rng.integers(1, 5)):
            m = random_shape(h, w, (int(rng.integers(4, 60)), int(rng.integers(4, 60))))
            dts.append((image["id"], int(rng.choice([1, 3, 4])), m, float(rng.random())))
    # More than 100 detections on one image: the cap applies.
    g0 = next(g for g in gts if g["image_id"] == 1)
    for _ in range(110):
        dts.append((1, g0["category_id"], perturb(g0["_mask"]), float(rng.random()) * 0.5))
    # Tied scores keep their order (stable sort).
    dts.append((2, 1, random_shape(h, w, (30, 30)), 0.5))
    dts.append((2, 1, random_shape(h, w, (30, 30)), 0.5))
    for g in gts:
        del g["_mask"]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": gts, "categories": categories}
    coco.createIndex()
    results = [{"image_id": i, "category_id": c, "segmentation": {"size": [h, w], "counts": rle(m)}, "score": s}
               for i, c, m, s in dts]
    evaluator = COCOeval(coco, coco.loadRes(results), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"height": h, "width": w, "image_ids": [i["id"] for i in images], "ground_truth": gts,
            "detections": results, "stats": evaluator.stats[:6].tolist()}


# ---------------------------------------------------------------- PQ (panopticapi logic) and mIoU
OFFSET = 256 * 256 * 256
VOID = 0


def pq_single(gt_map, gt_segments, pred_map, pred_segments, categories, stats):
    gt_segms = {el["id"]: dict(el) for el in gt_segments}
    pred_segms = {el["id"]: dict(el) for el in pred_segments}
    pred_labels_set = set(el["id"] for el in pred_segments)
    labels, labels_cnt = np.unique(pred_map, return_counts=True)
    for label, label_cnt in zip(labels, labels_cnt):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(label)
        pred_segms[label]["area"] = label_cnt
        pred_labels_set.remove(label)
        assert pred_segms[label]["category_id"] in categories
    assert not pred_labels_set
    pan_gt_pred = gt_map.astype(np.uint64) * OFFSET + pred_map.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels, labels_cnt):
        gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = intersection / union
        if iou > 0.5:
            s = stats.setdefault(gt_segms[gt_label]["category_id"], [0.0, 0, 0, 0])
            s[0] += iou
            s[1] += 1
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_labels = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels[gt_info["category_id"]] = gt_label
            continue
        stats.setdefault(gt_info["category_id"], [0.0, 0, 0, 0])[3] += 1
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_labels:
            intersection += gt_pred_map.get((crowd_labels[pred_info["category_id"]], pred_label), 0)
        if intersection / pred_info["area"] > 0.5:
            continue
        stats.setdefault(pred_info["category_id"], [0.0, 0, 0, 0])[2] += 1


def pq_average(stats, categories, isthing):
    pq = sq = rq = n = 0
    for cid, thing in categories.items():
        if isthing is not None and thing != isthing:
            continue
        iou, tp, fp, fn = stats.get(cid, [0.0, 0, 0, 0])
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp != 0 else 0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": pq / max(n, 1), "sq": sq / max(n, 1), "rq": rq / max(n, 1), "n": n}


def pq_summary(stats, categories):
    return {"all": pq_average(stats, categories, None), "things": pq_average(stats, categories, True),
            "stuff": pq_average(stats, categories, False)}


def semseg(pairs, num_classes, ignore=255):
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in pairs:
        gt = gt.copy()
        gt[gt == ignore] = num_classes
        conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    return {"miou": float(np.sum(iou[iou_valid]) / np.sum(iou_valid)),
            "fwiou": float(np.sum(iou[iou_valid] * class_weights[iou_valid])),
            "macc": float(np.sum(acc[acc_valid]) / np.sum(acc_valid)),
            "pacc": float(np.sum(tp) / np.sum(pos_gt))}


CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 0},
              {"id": 7, "isthing": 0}, {"id": 9, "isthing": 1}]


def random_panoptic(h, w, n_segments, first_id):
    """Rectangles painted over each other: a label map and its segments (some crowd), some void."""
    m = np.zeros((h, w), np.int64)
    segments = []
    for k in range(n_segments):
        sid = first_id + k
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = rng.integers(y0 + 2, h + 1), rng.integers(x0 + 2, w + 1)
        m[y0:y1, x0:x1] = sid
        segments.append({"id": int(sid), "category_id": int(rng.choice([c["id"] for c in CATEGORIES])),
                         "iscrowd": int(rng.random() < 0.1)})
    present = set(np.unique(m).tolist())
    segments = [s for s in segments if s["id"] in present]
    for s in segments:
        s["area"] = int((m == s["id"]).sum())
    return m, segments


def panoptic_reference():
    h, w = 24, 32
    cats = {c["id"]: bool(c["isthing"]) for c in CATEGORIES}
    images, stats = [], {}
    for _ in range(8):
        gt_map, gt_segments = random_panoptic(h, w, int(rng.integers(3, 9)), 1)
        if rng.random() < 0.5:
            # A prediction close to the ground truth: shifted, some categories changed.
            pred_map = np.roll(gt_map, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2))) * 10
            pred_segments = [{"id": s["id"] * 10, "category_id": s["category_id"] if rng.random() < 0.8
                              else int(rng.choice(list(cats)))} for s in gt_segments]
            present = set(np.unique(pred_map).tolist())
            pred_segments = [s for s in pred_segments if s["id"] in present]
        else:
            pred_map, pred_segments = random_panoptic(h, w, int(rng.integers(2, 9)), 50)
            for s in pred_segments:
                del s["iscrowd"], s["area"]
        pq_single(gt_map, gt_segments, pred_map, pred_segments, cats, stats)
        images.append({"gt": gt_map.reshape(-1).tolist(), "gt_segments": gt_segments,
                       "pred": pred_map.reshape(-1).tolist(), "pred_segments": pred_segments})
    class_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    pairs, sem_images = [], []
    for _ in range(4):
        gt = rng.integers(0, len(CATEGORIES), size=(h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 4, size=(h, w)))
        pairs.append((pred, gt))
        sem_images.append({"pred": pred.reshape(-1).tolist(), "gt": gt.reshape(-1).tolist()})
    del class_of
    return ({"height": h, "width": w, "categories": CATEGORIES, "images": images,
             "stats": {str(k): v for k, v in stats.items()}, "summary": pq_summary(stats, cats)},
            {"classes": len(CATEGORIES), "images": sem_images, "summary": semseg(pairs, len(CATEGORIES))})


# ---------------------------------------------------------------- open-vocabulary inference, literally
NUM_QUERIES = 300


def openvocab_reference():
    h, w = 40, 48
    cats = {c["id"]: bool(c["isthing"]) for c in CATEGORIES}
    thing_ids = [i for i, c in enumerate(CATEGORIES) if c["isthing"]]  # contiguous ids of things
    K = len(CATEGORIES)
    stats, sem_pairs, images = {}, [], []
    coco_gt, coco_dt, image_ids = [], [], []
    for n in range(5):
        gt_map, gt_segments = random_panoptic(h, w, int(rng.integers(3, 25)), 1)
        gt_ids = np.unique(gt_map)
        masks = torch.zeros(1, NUM_QUERIES, h, w)
        is_void = torch.ones(1, NUM_QUERIES, 1)
        masks[0, 0] = torch.from_numpy(gt_map == 0).float()
        cnt, segment_ids = 0, []
        for i, sid in enumerate(gt_ids):
            if i >= NUM_QUERIES:
                break
            if sid == 0:
                continue
            masks[0, cnt] = torch.from_numpy(gt_map == sid).float()
            is_void[0, cnt, 0] = 0
            segment_ids.append(int(sid))
            cnt += 1
        cosines = torch.from_numpy(rng.uniform(-0.2, 0.9, size=(cnt, K))).float()
        logits = torch.zeros(NUM_QUERIES, K)
        logits[:cnt] = cosines
        probs = torch.cat([logits.unsqueeze(0).softmax(-1) * (1.0 - is_void), is_void], dim=-1)
        mask_cls = torch.log(probs + 1e-8)[0]
        mask_pred = masks[0]
        # semantic_inference
        sem = torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred).argmax(0).numpy()
        # panoptic_inference
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        keep = labels.ne(K) & (scores > 0)
        cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
        cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
        pan = torch.zeros((h, w), dtype=torch.int32)
        segments_info, current = [], 0
        if cur_masks.shape[0] > 0:
            cur_mask_ids = cur_prob_masks.argmax(0)
            stuff_memory = {}
            for k in range(cur_classes.shape[0]):
                pred_class = cur_classes[k].item()
                isthing = pred_class in thing_ids
                mask_area = (cur_mask_ids == k).sum().item()
                original_area = (cur_masks[k] >= 0.5).sum().item()
                mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
                if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
                    if mask_area / original_area < 0.8:
                        continue
                    if not isthing:
                        if int(pred_class) in stuff_memory:
                            pan[mask] = stuff_memory[int(pred_class)]
                            continue
                        stuff_memory[int(pred_class)] = current + 1
                    current += 1
                    pan[mask] = current
                    segments_info.append({"id": current, "category_id": CATEGORIES[int(pred_class)]["id"]})
        pq_single(gt_map, gt_segments, pan.numpy().astype(np.int64), segments_info, cats, stats)
        # semantic GT from the panoptic annotation
        info = {s["id"]: s for s in gt_segments}
        class_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
        sem_gt = np.vectorize(lambda i: class_of[info[i]["category_id"]] if i in info else 255)(gt_map)
        sem_pairs.append((sem, sem_gt))
        # instance_inference
        sc = F.softmax(mask_cls, dim=-1)[:, :-1]
        lab = torch.arange(K).unsqueeze(0).repeat(NUM_QUERIES, 1).flatten(0, 1)
        spi, topk = sc.flatten(0, 1).topk(100, sorted=False)
        lpi = lab[topk]
        mp = mask_pred[topk // K]
        keep = torch.tensor([int(l) in thing_ids for l in lpi], dtype=torch.bool)
        spi, lpi, mp = spi[keep], lpi[keep], mp[keep]
        pm = (mp > 0).float()
        mscore = (mp.sigmoid().flatten(1) * pm.flatten(1)).sum(1) / (pm.flatten(1).sum(1) + 1e-6)
        final = spi * mscore
        image_id = n + 1
        image_ids.append(image_id)
        for s, l, m in zip(final.tolist(), lpi.tolist(), pm.numpy().astype(np.uint8)):
            coco_dt.append({"image_id": image_id, "category_id": CATEGORIES[l]["id"],
                            "segmentation": mask_utils.encode(np.asfortranarray(m)), "score": s})
        for s in gt_segments:
            if cats[s["category_id"]]:
                m = (gt_map == s["id"]).astype(np.uint8)
                coco_gt.append({"id": len(coco_gt) + 1, "image_id": image_id, "category_id": s["category_id"],
                                "segmentation": mask_utils.encode(np.asfortranarray(m)), "area": float(s["area"]),
                                "iscrowd": s["iscrowd"]})
        images.append({"gt": gt_map.reshape(-1).tolist(), "gt_segments": gt_segments, "segment_ids": segment_ids,
                       "cosines": cosines.double().tolist()})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": h, "width": w} for i in image_ids], "annotations": coco_gt,
                    "categories": [{"id": c["id"]} for c in CATEGORIES]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(coco_dt), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"height": h, "width": w, "categories": CATEGORIES, "images": images,
            "pq": pq_summary(stats, cats), "semseg": semseg(sem_pairs, K), "ap": evaluator.stats[:6].tolist()}


# ---------------------------------------------------------------- CIDEr-D (pycocoevalcap)
def cider_reference():
    from pycocoevalcap.cider.cider import Cider

    words = ["a", "the", "man", "woman", "dog", "red", "car", "on", "table", "sitting", "left", "bottle",
             "green", "chair", "of", "in", "front", "person", "two", "small"]

    def caption():
        return " ".join(rng.choice(words, size=int(rng.integers(1, 12))))

    gts, res = {}, {}
    for i in range(40):
        gts[i] = [caption() for _ in range(int(rng.integers(1, 6)))]
        # Some hypotheses copy a reference, some are random.
        res[i] = [gts[i][0] if rng.random() < 0.3 else caption()]
    score, scores = Cider().compute_score(gts, res)
    return {"references": [gts[i] for i in range(40)], "hypotheses": [res[i][0] for i in range(40)],
            "score": float(score), "scores": [float(x) for x in scores]}


def to_json(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, bytes):
        return o.decode()
    raise TypeError(type(o))


def main():
    panoptic, sem = panoptic_reference()
    out = {"pope": pope_reference(), "category": category_reference(), "ap": ap_reference(),
           "panoptic": panoptic, "semseg": sem, "openvocab": openvocab_reference(),
           "cider": cider_reference()}
    OUT.write_text(json.dumps(out, default=to_json) + "\n")
    print(f"-> {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
