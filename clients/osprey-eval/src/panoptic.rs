//! Open-vocabulary segmentation with ground-truth masks (`eval_open_vocab_seg_detectron2.py`):
//! each ground-truth segment is classified by the sentence-embedding similarity of Osprey's answer to
//! the class names, then Mask2Former-style semantic / panoptic / instance inference turns the
//! classified masks into predictions, scored with PQ (panopticapi's `pq_compute`), mIoU (detectron2's
//! `SemSegEvaluator`) and mask AP ([`crate::coco_ap`]).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::coco_ap::{Detection, PixelSet};

/// The script's class-name template for the regions (`ADE150_CAT_TEMPL`).
pub const CLASS_TEMPLATE: &str = "There is a {} in the scene.";
/// The script's number of queries: at most this many ground-truth segments per image are asked about.
pub const NUM_QUERIES: usize = 300;
/// `log(p + 1e-8)` in the script.
const LOG_EPS: f64 = 1e-8;
/// Instances kept per image before the thing filter (`topk(100)`).
const TOP_K: usize = 100;

/// A panoptic label map: one segment id per pixel, row-major, 0 = void.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMap {
    pub height: u32,
    pub width: u32,
    pub ids: Vec<u32>,
}

impl SegmentMap {
    /// From an RGB panoptic PNG's pixels: `id = R + 256 G + 256² B` (panopticapi's `rgb2id`).
    pub fn from_rgb(height: u32, width: u32, rgb: &[u8]) -> Self {
        let ids =
            rgb.chunks_exact(3).map(|p| p[0] as u32 + 256 * p[1] as u32 + 65536 * p[2] as u32).collect();
        Self { height, width, ids }
    }

    /// The non-void segment ids present, ascending (`np.unique` without 0).
    pub fn segment_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.ids.iter().copied().filter(|&i| i != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u32,
    pub category_id: u32,
    pub iscrowd: bool,
    /// The annotation's `area` (ground truth); `None` means count the pixels.
    pub area: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category {
    pub id: u32,
    pub isthing: bool,
}

/// One image's annotation or prediction.
#[derive(Debug, Clone)]
pub struct Panoptic {
    pub map: SegmentMap,
    pub segments: Vec<SegmentInfo>,
}

/// A ground-truth segment and the class similarities of Osprey's answer about it: for class `c`
/// the best cosine over its synonyms filled into [`CLASS_TEMPLATE`].
#[derive(Debug, Clone)]
pub struct ClassifiedSegment {
    pub segment_id: u32,
    pub cosines: Vec<f64>,
}

/// The per-class probabilities after the script's `log(softmax(cos)·(1-void) + 1e-8)` and the
/// second softmax (`F.softmax(mask_cls)`): `(p_c + ε) / (1 + (K+1) ε)`, void column dropped.
pub fn class_probabilities(cosines: &[f64]) -> Vec<f64> {
    let max = cosines.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = cosines.iter().map(|c| (c - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let denominator = 1.0 + (cosines.len() + 1) as f64 * LOG_EPS;
    exp.iter().map(|e| (e / sum + LOG_EPS) / denominator).collect()
}

/// The first index of the largest value (torch's argmax on CPU).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// The predictions of one image from its classified ground-truth segments.
pub struct OpenVocabPrediction {
    pub panoptic: Panoptic,
    /// Contiguous class index per pixel (0 where no segment covers the pixel, as the script's argmax
    /// over all-zero scores).
    pub semantic: Vec<u32>,
    pub instances: Vec<Detection>,
}

/// `semantic_inference`, `panoptic_inference` and `instance_inference` of the script, with the
/// ground-truth masks as mask predictions. The masks of one panoptic map are disjoint, which makes
/// the per-pixel argmax over queries the segment that covers the pixel.
///
/// `categories[c]` is the dataset category of contiguous class `c`. The script also carries up to
/// 300 "void" queries with empty masks; they can only add empty, lowest-scored instances, which
/// change no COCO AP, so they are left out.
pub fn open_vocab_inference(
    image_id: u64,
    gt: &SegmentMap,
    segments: &[ClassifiedSegment],
    categories: &[Category],
) -> OpenVocabPrediction {
    let pixels = gt.ids.len();
    let probabilities: Vec<Vec<f64>> = segments.iter().map(|s| class_probabilities(&s.cosines)).collect();
    let query_of: HashMap<u32, usize> = segments.iter().enumerate().map(|(q, s)| (s.segment_id, q)).collect();
    let pixel_query: Vec<Option<usize>> = gt.ids.iter().map(|id| query_of.get(id).copied()).collect();

    // Semantic: argmax class of the covering query.
    let best: Vec<usize> = probabilities.iter().map(|p| argmax(p)).collect();
    let semantic = pixel_query.iter().map(|q| q.map_or(0, |q| best[q] as u32)).collect();

    // Panoptic: every query keeps its mask (the argmax class beats void by far); stuff queries of
    // one class share a segment id, each thing query gets its own.
    let mut query_segment = vec![0u32; segments.len()];
    let mut stuff_segment: HashMap<usize, u32> = HashMap::new();
    let mut infos = Vec::new();
    for (q, &class) in best.iter().enumerate() {
        let isthing = categories[class].isthing;
        if !isthing && let Some(&id) = stuff_segment.get(&class) {
            query_segment[q] = id;
            continue;
        }
        let id = infos.len() as u32 + 1;
        if !isthing {
            stuff_segment.insert(class, id);
        }
        query_segment[q] = id;
        infos.push(SegmentInfo { id, category_id: categories[class].id, iscrowd: false, area: None });
    }
    let map = SegmentMap {
        height: gt.height,
        width: gt.width,
        ids: pixel_query.iter().map(|q| q.map_or(0, |q| query_segment[q])).collect(),
    };

    // Instances: the 100 best (query, class) scores, thing classes only, times the mean mask
    // sigmoid (σ(1) over the mask's pixels, `/ (n + 1e-6)`).
    let mut candidates: Vec<(f64, usize, usize)> = probabilities
        .iter()
        .enumerate()
        .flat_map(|(q, p)| p.iter().enumerate().map(move |(c, &s)| (s, q, c)))
        .collect();
    candidates.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    candidates.truncate(TOP_K);
    let masks: Vec<PixelSet> = (0..segments.len())
        .map(|q| {
            let values: Vec<u8> = pixel_query.iter().map(|p| (*p == Some(q)) as u8).collect();
            PixelSet::from_values(&values)
        })
        .collect();
    let sigmoid_one = 1.0 / (1.0 + (-1.0f64).exp());
    let instances = candidates
        .into_iter()
        .filter(|&(_, _, c)| categories[c].isthing)
        .map(|(score, q, c)| {
            let n = masks[q].area() as f64;
            Detection {
                image_id,
                category_id: categories[c].id,
                mask: masks[q].clone(),
                score: score * sigmoid_one * n / (n + 1e-6),
            }
        })
        .collect();
    debug_assert_eq!(pixels, gt.ids.len());
    OpenVocabPrediction { panoptic: Panoptic { map, segments: infos }, semantic, instances }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PqStat {
    pub iou: f64,
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
}

/// PQ / SQ / RQ (fractions) over `n` categories.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PqSummary {
    pub pq: f64,
    pub sq: f64,
    pub rq: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PqResult {
    pub all: PqSummary,
    pub things: PqSummary,
    pub stuff: PqSummary,
}

const VOID: u32 = 0;

/// Adds one image to the per-category statistics (`pq_compute_single_core`).
pub fn pq_accumulate(
    stats: &mut BTreeMap<u32, PqStat>,
    gt: &Panoptic,
    pred: &Panoptic,
    categories: &[Category],
) -> anyhow::Result<()> {
    anyhow::ensure!(gt.map.ids.len() == pred.map.ids.len(), "prediction and ground truth differ in size");
    let count = |map: &SegmentMap| {
        let mut areas: HashMap<u32, u64> = HashMap::new();
        for &id in &map.ids {
            *areas.entry(id).or_default() += 1;
        }
        areas
    };
    let gt_counted = count(&gt.map);
    let pred_areas = count(&pred.map);
    let gt_segments: HashMap<u32, &SegmentInfo> = gt.segments.iter().map(|s| (s.id, s)).collect();
    let pred_segments: HashMap<u32, &SegmentInfo> = pred.segments.iter().map(|s| (s.id, s)).collect();
    for (&id, _) in pred_areas.iter().filter(|(id, _)| **id != VOID) {
        anyhow::ensure!(
            pred_segments.contains_key(&id),
            "segment {id} is in the PNG but not in segments_info"
        );
    }
    for s in &pred.segments {
        anyhow::ensure!(
            pred_areas.contains_key(&s.id),
            "segment {} is in segments_info but not in the PNG",
            s.id
        );
        anyhow::ensure!(
            categories.iter().any(|c| c.id == s.category_id),
            "unknown category {}",
            s.category_id
        );
    }
    let gt_area = |s: &SegmentInfo| s.area.unwrap_or_else(|| gt_counted.get(&s.id).copied().unwrap_or(0));

    let mut intersections: HashMap<(u32, u32), u64> = HashMap::new();
    for (&g, &p) in gt.map.ids.iter().zip(&pred.map.ids) {
        *intersections.entry((g, p)).or_default() += 1;
    }
    let mut gt_matched = std::collections::HashSet::new();
    let mut pred_matched = std::collections::HashSet::new();
    for (&(g, p), &intersection) in &intersections {
        let (Some(gs), Some(ps)) = (gt_segments.get(&g), pred_segments.get(&p)) else { continue };
        if gs.iscrowd || gs.category_id != ps.category_id {
            continue;
        }
        let union = pred_areas[&p] + gt_area(gs) - intersection - intersections.get(&(VOID, p)).unwrap_or(&0);
        let iou = intersection as f64 / union as f64;
        if iou > 0.5 {
            let stat = stats.entry(gs.category_id).or_default();
            stat.tp += 1;
            stat.iou += iou;
            gt_matched.insert(g);
            pred_matched.insert(p);
        }
    }
    let mut crowd_of_category: HashMap<u32, u32> = HashMap::new();
    for s in &gt.segments {
        if gt_matched.contains(&s.id) {
            continue;
        }
        if s.iscrowd {
            crowd_of_category.insert(s.category_id, s.id);
            continue;
        }
        stats.entry(s.category_id).or_default().fn_ += 1;
    }
    for s in &pred.segments {
        if pred_matched.contains(&s.id) {
            continue;
        }
        let mut ignored = *intersections.get(&(VOID, s.id)).unwrap_or(&0);
        if let Some(crowd) = crowd_of_category.get(&s.category_id) {
            ignored += intersections.get(&(*crowd, s.id)).unwrap_or(&0);
        }
        if ignored as f64 / pred_areas[&s.id] as f64 > 0.5 {
            continue;
        }
        stats.entry(s.category_id).or_default().fp += 1;
    }
    Ok(())
}

/// `PQStat.pq_average` for all categories, things and stuff.
pub fn pq_summary(stats: &BTreeMap<u32, PqStat>, categories: &[Category]) -> PqResult {
    let average = |filter: &dyn Fn(&Category) -> bool| {
        let (mut pq, mut sq, mut rq, mut n) = (0.0, 0.0, 0.0, 0);
        for c in categories.iter().filter(|c| filter(c)) {
            let s = stats.get(&c.id).copied().unwrap_or_default();
            if s.tp + s.fp + s.fn_ == 0 {
                continue;
            }
            n += 1;
            let denominator = s.tp as f64 + 0.5 * s.fp as f64 + 0.5 * s.fn_ as f64;
            pq += s.iou / denominator;
            sq += if s.tp == 0 { 0.0 } else { s.iou / s.tp as f64 };
            rq += s.tp as f64 / denominator;
        }
        let d = if n == 0 { 1.0 } else { n as f64 };
        PqSummary { pq: pq / d, sq: sq / d, rq: rq / d, n }
    };
    PqResult { all: average(&|_| true), things: average(&|c| c.isthing), stuff: average(&|c| !c.isthing) }
}

/// detectron2's `SemSegEvaluator` confusion matrix: `num_classes` classes plus one row/column for
/// ignored ground truth.
#[derive(Debug, Clone)]
pub struct Confusion {
    classes: usize,
    /// `[pred][gt]`, `(classes + 1)²`.
    counts: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SemSegSummary {
    pub miou: f64,
    pub fwiou: f64,
    pub macc: f64,
    pub pacc: f64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self { classes, counts: vec![0; (classes + 1) * (classes + 1)] }
    }

    /// Adds one image: `gt` values equal to `ignore` (or out of range) are ignored; `pred` values must
    /// be class indices.
    pub fn add(&mut self, pred: &[u32], gt: &[u32], ignore: u32) -> anyhow::Result<()> {
        anyhow::ensure!(pred.len() == gt.len(), "prediction and ground truth differ in size");
        let k = self.classes;
        for (&p, &g) in pred.iter().zip(gt) {
            anyhow::ensure!((p as usize) < k, "predicted class {p} is out of range");
            let g = if g == ignore || g as usize >= k { k } else { g as usize };
            self.counts[p as usize * (k + 1) + g] += 1;
        }
        Ok(())
    }

    /// mIoU and friends (fractions), over the classes present in the ground truth.
    pub fn summary(&self) -> SemSegSummary {
        let k = self.classes;
        let at = |p: usize, g: usize| self.counts[p * (k + 1) + g] as f64;
        let tp: Vec<f64> = (0..k).map(|c| at(c, c)).collect();
        let pos_gt: Vec<f64> = (0..k).map(|g| (0..k).map(|p| at(p, g)).sum()).collect();
        let pos_pred: Vec<f64> = (0..k).map(|p| (0..k).map(|g| at(p, g)).sum()).collect();
        let total_gt: f64 = pos_gt.iter().sum();
        let (mut acc_sum, mut acc_n, mut iou_sum, mut iou_n, mut fwiou) = (0.0, 0, 0.0, 0, 0.0);
        for c in 0..k {
            if pos_gt[c] > 0.0 {
                acc_sum += tp[c] / pos_gt[c];
                acc_n += 1;
                let union = pos_gt[c] + pos_pred[c] - tp[c];
                if union > 0.0 {
                    let iou = tp[c] / union;
                    iou_sum += iou;
                    iou_n += 1;
                    fwiou += iou * pos_gt[c] / total_gt;
                }
            }
        }
        let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
        SemSegSummary {
            miou: ratio(iou_sum, iou_n as f64),
            fwiou,
            macc: ratio(acc_sum, acc_n as f64),
            pacc: ratio(tp.iter().sum(), total_gt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(ids: &[u32]) -> SegmentMap {
        SegmentMap { height: 1, width: ids.len() as u32, ids: ids.to_vec() }
    }

    fn seg(id: u32, category_id: u32) -> SegmentInfo {
        SegmentInfo { id, category_id, iscrowd: false, area: None }
    }

    #[test]
    fn pq_by_hand() {
        let categories = [Category { id: 1, isthing: true }, Category { id: 2, isthing: false }];
        // GT: thing 1 on 4 pixels, stuff 2 on 4 pixels, 2 void pixels.
        let gt = Panoptic { map: map(&[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]), segments: vec![seg(1, 1), seg(2, 2)] };
        // Pred: thing matches with IoU 3/4 (one pixel lost to stuff); the stuff segment also covers
        // the two void pixels, which the union leaves out: IoU 4/5.
        let pred =
            Panoptic { map: map(&[7, 7, 7, 9, 9, 9, 9, 9, 9, 9]), segments: vec![seg(7, 1), seg(9, 2)] };
        let mut stats = BTreeMap::new();
        pq_accumulate(&mut stats, &gt, &pred, &categories).unwrap();
        assert_eq!(stats[&1], PqStat { iou: 0.75, tp: 1, fp: 0, fn_: 0 });
        assert_eq!(stats[&2], PqStat { iou: 0.8, tp: 1, fp: 0, fn_: 0 });
        let r = pq_summary(&stats, &categories);
        assert!((r.all.pq - 0.775).abs() < 1e-12);
        assert_eq!((r.things.n, r.stuff.n), (1, 1));
    }

    #[test]
    fn pq_unmatched_segments_by_hand() {
        let categories = [Category { id: 1, isthing: true }];
        let gt = Panoptic { map: map(&[1, 1, 0, 0]), segments: vec![seg(1, 1)] };
        // Segment 5 overlaps the GT with IoU 1/2 (the void pixel leaves the union), which is not
        // > 0.5: one FN, and 5 is a FP (its void share 1/2 is not > 0.5). Segment 6 lies on void only:
        // ignored.
        let pred = Panoptic { map: map(&[0, 5, 5, 6]), segments: vec![seg(5, 1), seg(6, 1)] };
        let mut stats = BTreeMap::new();
        pq_accumulate(&mut stats, &gt, &pred, &categories).unwrap();
        assert_eq!(stats[&1], PqStat { iou: 0.0, tp: 0, fp: 1, fn_: 1 });
    }

    #[test]
    fn miou_by_hand() {
        let mut c = Confusion::new(3);
        // Class 0: tp 2, gt 3, pred 2 → 2/3. Class 1: tp 1, gt 1, pred 2 → 1/2. Class 2 is predicted
        // only on the ignored pixel (255) and absent from the GT: left out.
        c.add(&[0, 0, 1, 1, 2], &[0, 0, 0, 1, 255], 255).unwrap();
        let s = c.summary();
        assert!((s.miou - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12, "{s:?}");
        assert!((s.pacc - 0.75).abs() < 1e-12);
    }

    #[test]
    fn probabilities_follow_the_double_softmax() {
        let p = class_probabilities(&[0.0, 0.0]);
        assert!((p[0] - (0.5 + 1e-8) / (1.0 + 3e-8)).abs() < 1e-15);
    }
}
