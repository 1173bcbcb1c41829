//! COCO mask AP, as pycocotools' `COCOeval` with `iouType='segm'` computes it (evaluate,
//! accumulate, summarize), with its default parameters: IoU thresholds .50:.05:.95, 101 recall
//! points, at most 100 detections per image, area ranges all/small/medium/large.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// The pixels of a mask, as sorted indices (any fixed pixel order, the same for every mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PixelSet(Vec<u32>);

impl PixelSet {
    /// From 0/1 (or any zero/non-zero) values.
    pub fn from_values(values: &[u8]) -> Self {
        Self(values.iter().enumerate().filter(|(_, v)| **v != 0).map(|(i, _)| i as u32).collect())
    }

    pub fn area(&self) -> u64 {
        self.0.len() as u64
    }

    fn intersection(&self, other: &PixelSet) -> u64 {
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < self.0.len() && j < other.0.len() {
            match self.0[i].cmp(&other.0[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    n += 1;
                    i += 1;
                    j += 1;
                }
            }
        }
        n
    }
}

/// A ground-truth instance. `area` is the annotation's `area` field (used for the area ranges).
#[derive(Debug, Clone)]
pub struct GroundTruth {
    pub image_id: u64,
    pub category_id: u32,
    pub mask: PixelSet,
    pub area: f64,
    pub iscrowd: bool,
}

#[derive(Debug, Clone)]
pub struct Detection {
    pub image_id: u64,
    pub category_id: u32,
    pub mask: PixelSet,
    pub score: f64,
}

/// `COCOeval.stats[0..6]` (fractions; -1 where nothing was evaluable).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ApSummary {
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    pub ap_small: f64,
    pub ap_medium: f64,
    pub ap_large: f64,
}

const MAX_DETS: usize = 100;
const AREA_RANGES: [(f64, f64); 4] =
    [(0.0, 1e10), (0.0, 32.0 * 32.0), (32.0 * 32.0, 96.0 * 96.0), (96.0 * 96.0, 1e10)];

/// `np.linspace(start, stop, num)` with numpy's arithmetic (the thresholds must be bit-identical:
/// recall values land exactly on them).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.argsort(keys, kind='mergesort')`: a stable ascending sort.
fn stable_argsort(keys: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| keys[a].partial_cmp(&keys[b]).unwrap_or(std::cmp::Ordering::Equal));
    idx
}

/// One image and category at one area range (`COCOeval.evaluateImg`).
struct ImageEval {
    /// Scores of the kept detections, best first.
    scores: Vec<f64>,
    /// `[threshold][detection]`: matched to a ground truth.
    matched: Vec<Vec<bool>>,
    /// `[threshold][detection]`: ignored.
    ignored: Vec<Vec<bool>>,
    /// Per ground truth: ignored (crowd or outside the area range).
    gt_ignored: Vec<bool>,
}

fn evaluate_image(
    gts: &[&GroundTruth],
    dts: &[&Detection],
    area_range: (f64, f64),
    iou_thresholds: &[f64],
) -> Option<ImageEval> {
    if gts.is_empty() && dts.is_empty() {
        return None;
    }
    let outside = |area: f64| area < area_range.0 || area > area_range.1;
    let gt_ignore_flags: Vec<f64> =
        gts.iter().map(|g| if g.iscrowd || outside(g.area) { 1.0 } else { 0.0 }).collect();
    let gt_order = stable_argsort(&gt_ignore_flags);
    let gts: Vec<&GroundTruth> = gt_order.iter().map(|&i| gts[i]).collect();
    let gt_ignored: Vec<bool> = gt_order.iter().map(|&i| gt_ignore_flags[i] == 1.0).collect();
    let neg_scores: Vec<f64> = dts.iter().map(|d| -d.score).collect();
    let dts: Vec<&Detection> =
        stable_argsort(&neg_scores).into_iter().take(MAX_DETS).map(|i| dts[i]).collect();

    // maskUtils.iou: intersection over union, or over the detection's area for a crowd.
    let ious: Vec<Vec<f64>> = dts
        .iter()
        .map(|d| {
            gts.iter()
                .map(|g| {
                    let inter = d.mask.intersection(&g.mask) as f64;
                    let union = if g.iscrowd {
                        d.mask.area() as f64
                    } else {
                        (d.mask.area() + g.mask.area()) as f64 - inter
                    };
                    if union > 0.0 { inter / union } else { 0.0 }
                })
                .collect()
        })
        .collect();

    let t = iou_thresholds.len();
    let mut matched = vec![vec![false; dts.len()]; t];
    let mut ignored = vec![vec![false; dts.len()]; t];
    for (ti, &threshold) in iou_thresholds.iter().enumerate() {
        let mut gt_taken = vec![false; gts.len()];
        for (di, _) in dts.iter().enumerate() {
            let mut best_iou = threshold.min(1.0 - 1e-10);
            let mut best: Option<usize> = None;
            for (gi, g) in gts.iter().enumerate() {
                if gt_taken[gi] && !g.iscrowd {
                    continue;
                }
                // Matched a regular ground truth already: ignored ones (sorted last) cannot beat it.
                if let Some(m) = best
                    && !gt_ignored[m]
                    && gt_ignored[gi]
                {
                    break;
                }
                if ious[di][gi] < best_iou {
                    continue;
                }
                best_iou = ious[di][gi];
                best = Some(gi);
            }
            if let Some(m) = best {
                ignored[ti][di] = gt_ignored[m];
                matched[ti][di] = true;
                gt_taken[m] = true;
            }
        }
    }
    for (di, d) in dts.iter().enumerate() {
        if outside(d.mask.area() as f64) {
            for ti in 0..t {
                ignored[ti][di] |= !matched[ti][di];
            }
        }
    }
    Some(ImageEval { scores: dts.iter().map(|d| d.score).collect(), matched, ignored, gt_ignored })
}

/// Mask AP over `image_ids` (every evaluated image, including those without ground truth: their
/// detections are false positives), as `COCOeval` summarises it.
pub fn evaluate_segm(image_ids: &[u64], gts: &[GroundTruth], dts: &[Detection]) -> ApSummary {
    let iou_thresholds = linspace(0.5, 0.95, 10);
    let recall_thresholds = linspace(0.0, 1.0, 101);
    let images: BTreeSet<u64> = image_ids.iter().copied().collect();
    let categories: BTreeSet<u32> = gts.iter().map(|g| g.category_id).collect();
    let mut gt_by: BTreeMap<(u64, u32), Vec<&GroundTruth>> = BTreeMap::new();
    for g in gts.iter().filter(|g| images.contains(&g.image_id)) {
        gt_by.entry((g.image_id, g.category_id)).or_default().push(g);
    }
    let mut dt_by: BTreeMap<(u64, u32), Vec<&Detection>> = BTreeMap::new();
    for d in dts.iter().filter(|d| images.contains(&d.image_id)) {
        dt_by.entry((d.image_id, d.category_id)).or_default().push(d);
    }

    // precision[area][threshold] holds one 101-point curve per category that had ground truth.
    let mut precision: Vec<Vec<Vec<Vec<f64>>>> =
        vec![vec![Vec::new(); iou_thresholds.len()]; AREA_RANGES.len()];
    for &category in &categories {
        for (ai, &area_range) in AREA_RANGES.iter().enumerate() {
            let evals: Vec<ImageEval> = images
                .iter()
                .filter_map(|&image| {
                    let g = gt_by.get(&(image, category)).map(Vec::as_slice).unwrap_or(&[]);
                    let d = dt_by.get(&(image, category)).map(Vec::as_slice).unwrap_or(&[]);
                    evaluate_image(g, d, area_range, &iou_thresholds)
                })
                .collect();
            let positives = evals.iter().flat_map(|e| &e.gt_ignored).filter(|&&ig| !ig).count();
            if positives == 0 {
                continue;
            }
            let neg_scores: Vec<f64> = evals.iter().flat_map(|e| e.scores.iter().map(|s| -s)).collect();
            let order = stable_argsort(&neg_scores);
            for (ti, curves) in precision[ai].iter_mut().enumerate() {
                let matched: Vec<bool> = evals.iter().flat_map(|e| e.matched[ti].iter().copied()).collect();
                let ignored: Vec<bool> = evals.iter().flat_map(|e| e.ignored[ti].iter().copied()).collect();
                let (mut tp, mut fp) = (0.0f64, 0.0f64);
                let mut recall = Vec::with_capacity(order.len());
                let mut prec = Vec::with_capacity(order.len());
                for &i in &order {
                    if ignored[i] {
                        // Neither a true nor a false positive; the cumulative sums repeat.
                    } else if matched[i] {
                        tp += 1.0;
                    } else {
                        fp += 1.0;
                    }
                    recall.push(tp / positives as f64);
                    prec.push(tp / (fp + tp + f64::EPSILON));
                }
                for i in (1..prec.len()).rev() {
                    if prec[i] > prec[i - 1] {
                        prec[i - 1] = prec[i];
                    }
                }
                let mut curve = vec![0.0; recall_thresholds.len()];
                for (ri, &r) in recall_thresholds.iter().enumerate() {
                    // np.searchsorted(recall, r, side='left'): the first index with recall >= r.
                    let pi = recall.partition_point(|&x| x < r);
                    if pi >= prec.len() {
                        break;
                    }
                    curve[ri] = prec[pi];
                }
                curves.push(curve);
            }
        }
    }
    let mean = |curves: &[&Vec<f64>]| {
        let values: Vec<f64> = curves.iter().flat_map(|c| c.iter().copied()).collect();
        if values.is_empty() { -1.0 } else { values.iter().sum::<f64>() / values.len() as f64 }
    };
    let at = |area: usize, threshold: Option<usize>| {
        let curves: Vec<&Vec<f64>> = precision[area]
            .iter()
            .enumerate()
            .filter(|(ti, _)| threshold.is_none_or(|t| t == *ti))
            .flat_map(|(_, c)| c.iter())
            .collect();
        mean(&curves)
    };
    ApSummary {
        ap: at(0, None),
        ap50: at(0, Some(0)),
        ap75: at(0, Some(5)),
        ap_small: at(1, None),
        ap_medium: at(2, None),
        ap_large: at(3, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pixels: std::ops::Range<u32>) -> PixelSet {
        PixelSet(pixels.collect())
    }

    #[test]
    fn numpy_linspace() {
        let r = linspace(0.0, 1.0, 101);
        assert_eq!(r[7], 7.0 * 0.01);
        assert_eq!(r[100], 1.0);
        assert_eq!(linspace(0.5, 0.95, 10)[9], 0.95);
    }

    #[test]
    fn one_perfect_and_one_false_positive_by_hand() {
        let gt = GroundTruth { image_id: 1, category_id: 1, mask: set(0..100), area: 100.0, iscrowd: false };
        let perfect = Detection { image_id: 1, category_id: 1, mask: set(0..100), score: 0.9 };
        let wrong = Detection { image_id: 1, category_id: 1, mask: set(200..300), score: 0.95 };
        // Alone, the perfect detection gives AP 1 (less the `tp / (tp + fp + eps)` rounding).
        let alone = evaluate_segm(&[1], std::slice::from_ref(&gt), std::slice::from_ref(&perfect));
        assert!((alone.ap - 1.0).abs() < 1e-12, "{alone:?}");
        // Ranked after a false positive, precision is 1/2 at every recall point.
        let s = evaluate_segm(&[1], &[gt], &[wrong, perfect]);
        assert!((s.ap - 0.5).abs() < 1e-12, "{s:?}");
        // 100 pixels is "small" (< 32²); there are no medium or large objects.
        assert_eq!((s.ap_medium, s.ap_large), (-1.0, -1.0));
    }

    #[test]
    fn iou_just_under_a_threshold_fails_it() {
        // IoU 0.72: matched at thresholds .50 .. .70 (5 of 10).
        let gt = GroundTruth { image_id: 1, category_id: 1, mask: set(0..100), area: 100.0, iscrowd: false };
        let det = Detection { image_id: 1, category_id: 1, mask: set(28..100), score: 0.5 };
        let s = evaluate_segm(&[1], &[gt], &[det]);
        assert!((s.ap - 0.5).abs() < 1e-12, "{s:?}");
    }
}
