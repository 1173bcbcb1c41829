//! Automatic mask generation ("everything"), as segment-anything's `SamAutomaticMaskGenerator`
//! (`segment_anything/automatic_mask_generator.py`, `segment_anything/utils/amg.py`).
//!
//! Per crop (the whole image, then `crop_n_layers` layers of overlapping crops): embed the crop, decode a
//! regular grid of single foreground points in batches with three masks each, keep masks whose
//! predicted IoU is above `pred_iou_thresh`, upsample each kept mask's low-res logits to the crop size
//! (`Sam.postprocess_masks`), keep those whose stability score (IoU of the masks thresholded at
//! `mask_threshold ± offset`, on the full-resolution logits) reaches `stability_score_thresh`, threshold,
//! drop masks whose box touches a crop edge that is not an image edge, run box NMS within the crop,
//! map to the image frame, and finally run box NMS across crops preferring smaller crops.
//!
//! Numerics follow the reference: thresholds are compared in float32 like PyTorch compares a float32
//! tensor with a Python scalar; NMS is torchvision's (descending stable sort of scores, IoU over
//! inclusive-pixel boxes without +1, suppress when IoU > threshold in double precision).
//! Boxes are SAM's `[x0, y0, x1, y1]` with inclusive `x1, y1`, so the XYWH `bbox_xywh` of a record is
//! `[x0, y0, x1 - x0, y1 - y0]` exactly as the reference writes it (one less than pycocotools'
//! `toBbox` width and height).
//!
//! With `min_mask_region_area > 0`, every kept mask then has its small holes filled and small islands
//! removed (`postprocess_small_regions`, with our own 8-connected component labelling in place of
//! OpenCV's), and a box NMS preferring unchanged masks removes new duplicates.
//!
//! Left out: explicit `point_grids` are not exposed.

use std::cmp::Ordering;

use candle_core::{DType, Tensor};
use osprey_common::image::RgbImage;
use osprey_common::mask::{Mask, Rle};

use crate::error::SamError;
use crate::models::sam::prompt_encoder::PointLabel;
use crate::predictor::{ImageEmbedding, SamPredictor, postprocess_logits};

/// `SamAutomaticMaskGenerator`'s parameters; [`Default`] gives the reference defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmgParams {
    pub points_per_side: usize,
    pub points_per_batch: usize,
    pub pred_iou_thresh: f64,
    pub stability_score_thresh: f64,
    pub stability_score_offset: f64,
    pub box_nms_thresh: f64,
    pub crop_n_layers: usize,
    pub crop_nms_thresh: f64,
    pub crop_overlap_ratio: f64,
    pub crop_n_points_downscale_factor: usize,
    /// Fill holes and remove islands smaller than this many pixels (0: off).
    pub min_mask_region_area: usize,
    /// Keep at most this many masks, highest predicted IoU first (not in the reference).
    pub max_masks: Option<usize>,
}

impl Default for AmgParams {
    fn default() -> Self {
        Self {
            points_per_side: 32,
            points_per_batch: 64,
            pred_iou_thresh: 0.88,
            stability_score_thresh: 0.95,
            stability_score_offset: 1.0,
            box_nms_thresh: 0.7,
            crop_n_layers: 0,
            crop_nms_thresh: 0.7,
            crop_overlap_ratio: 512.0 / 1500.0,
            crop_n_points_downscale_factor: 1,
            min_mask_region_area: 0,
            max_masks: None,
        }
    }
}

/// Largest accepted `points_per_side` (128² = 16384 points per crop).
pub const MAX_POINTS_PER_SIDE: usize = 128;
/// Largest accepted `crop_n_layers` (1 + 4 + 16 + 64 = 85 crops, each a full image embedding).
pub const MAX_CROP_LAYERS: usize = 3;

impl AmgParams {
    /// Checks ranges, naming the field; refuses what this implementation does not support.
    pub fn validate(&self) -> Result<(), SamError> {
        let err = |field: &'static str, problem: String| Err(SamError::InvalidParams { field, problem });
        if self.points_per_side == 0 || self.points_per_side > MAX_POINTS_PER_SIDE {
            return err(
                "points_per_side",
                format!("{} is not in 1..={MAX_POINTS_PER_SIDE}", self.points_per_side),
            );
        }
        if self.points_per_batch == 0 {
            return err("points_per_batch", "must be at least 1".into());
        }
        if self.crop_n_layers > MAX_CROP_LAYERS {
            return err(
                "crop_n_layers",
                format!("{} is over the limit of {MAX_CROP_LAYERS}", self.crop_n_layers),
            );
        }
        if self.crop_n_points_downscale_factor == 0 {
            return err("crop_n_points_downscale_factor", "must be at least 1".into());
        }
        for (layer, n) in layer_points_per_side(self).into_iter().enumerate() {
            if n == 0 {
                return err(
                    "crop_n_points_downscale_factor",
                    format!(
                        "leaves no points in crop layer {layer} (points_per_side {})",
                        self.points_per_side
                    ),
                );
            }
        }
        let unit = [
            ("pred_iou_thresh", self.pred_iou_thresh),
            ("stability_score_thresh", self.stability_score_thresh),
            ("box_nms_thresh", self.box_nms_thresh),
            ("crop_nms_thresh", self.crop_nms_thresh),
        ];
        for (field, v) in unit {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return err(field, format!("{v} is not in [0, 1]"));
            }
        }
        if !self.stability_score_offset.is_finite() || self.stability_score_offset < 0.0 {
            return err(
                "stability_score_offset",
                format!("{} is not a finite value >= 0", self.stability_score_offset),
            );
        }
        if !self.crop_overlap_ratio.is_finite() || !(0.0..1.0).contains(&self.crop_overlap_ratio) {
            return err("crop_overlap_ratio", format!("{} is not in [0, 1)", self.crop_overlap_ratio));
        }
        if self.max_masks == Some(0) {
            return err("max_masks", "must be at least 1 when set".into());
        }
        Ok(())
    }
}

/// One mask of the automatic generator, in the image frame.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedMask {
    pub rle: Rle,
    pub area: u64,
    /// `[x, y, w, h]` as the reference writes it (see the module docs).
    pub bbox_xywh: [f64; 4],
    pub predicted_iou: f32,
    pub stability_score: f32,
    /// The grid point `(x, y)` that produced the mask, in image pixels.
    pub point: [f64; 2],
    /// `[x, y, w, h]` of the crop the mask came from.
    pub crop_box_xywh: [f64; 4],
}

/// Points per side in each crop layer (`build_all_layer_point_grids`).
fn layer_points_per_side(params: &AmgParams) -> Vec<usize> {
    (0..=params.crop_n_layers)
        .map(|i| {
            let scale = (params.crop_n_points_downscale_factor as f64).powi(i as i32);
            (params.points_per_side as f64 / scale) as usize
        })
        .collect()
}

/// `np.linspace(start, stop, n)`: `start + i * step`, the last value exactly `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// `build_point_grid`: `n x n` points in `[0, 1]²`, row by row (x varies fastest).
pub fn build_point_grid(n: usize) -> Vec<[f64; 2]> {
    let offset = 1.0 / (2 * n) as f64;
    let side = linspace(offset, 1.0 - offset, n);
    side.iter().flat_map(|&y| side.iter().map(move |&x| [x, y])).collect()
}

/// `generate_crop_boxes`: `[x0, y0, x1, y1]` crop boxes and their layer, the whole image first.
pub fn generate_crop_boxes(
    (im_h, im_w): (usize, usize),
    n_layers: usize,
    overlap_ratio: f64,
) -> Vec<([usize; 4], usize)> {
    let mut boxes = vec![([0, 0, im_w, im_h], 0)];
    let short_side = im_h.min(im_w) as f64;
    let crop_len = |orig: usize, n: usize, overlap: i64| -> i64 {
        ((overlap as f64 * (n - 1) as f64 + orig as f64) / n as f64).ceil() as i64
    };
    for layer in 0..n_layers {
        let n = 1usize << (layer + 1);
        let overlap = (overlap_ratio * short_side * (2.0 / n as f64)) as i64;
        let crop_w = crop_len(im_w, n, overlap);
        let crop_h = crop_len(im_h, n, overlap);
        let x0s: Vec<i64> = (0..n).map(|i| (crop_w - overlap) * i as i64).collect();
        let y0s: Vec<i64> = (0..n).map(|i| (crop_h - overlap) * i as i64).collect();
        for &x0 in &x0s {
            for &y0 in &y0s {
                let x1 = (x0 + crop_w).min(im_w as i64);
                let y1 = (y0 + crop_h).min(im_h as i64);
                let clamp = |v: i64| v.max(0) as usize;
                boxes.push(([clamp(x0), clamp(y0), clamp(x1), clamp(y1)], layer + 1));
            }
        }
    }
    boxes
}

/// Stability score of one logit map: `#(l > t + o) / #(l > t - o)` in float32 (0/0 is NaN, which
/// no threshold keeps).
pub fn stability_score(logits: &[f32], mask_threshold: f64, offset: f64) -> f32 {
    let hi = (mask_threshold + offset) as f32;
    let lo = (mask_threshold - offset) as f32;
    let inter = logits.iter().filter(|&&v| v > hi).count();
    let union = logits.iter().filter(|&&v| v > lo).count();
    inter as f32 / union as f32
}

/// `batched_mask_to_box` of one `h x w` mask: inclusive `[x0, y0, x1, y1]`, zeros when empty.
pub fn mask_to_box(mask: &[bool], h: usize, w: usize) -> [i64; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..h {
        for (x, &m) in mask[y * w..(y + 1) * w].iter().enumerate() {
            if m {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
    }
    if x0 == usize::MAX {
        return [0; 4];
    }
    [x0 as i64, y0 as i64, x1 as i64, y1 as i64]
}

/// `is_box_near_crop_edge` (atol 20) for a box in crop coordinates.
fn near_crop_edge(bx: [i64; 4], crop: [usize; 4], orig: [usize; 4]) -> bool {
    let offset = [crop[0], crop[1], crop[0], crop[1]];
    (0..4).any(|i| {
        let b = (bx[i] + offset[i] as i64) as f32;
        let near_crop = (b - crop[i] as f32).abs() <= 20.0;
        let near_image = (b - orig[i] as f32).abs() <= 20.0;
        near_crop && !near_image
    })
}

/// torchvision `nms` (and `batched_nms` with one category): kept indices, highest score first.
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(Ordering::Equal));
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = &boxes[i];
        let area_i = area(bi);
        for &j in &order[pos + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = &boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let iou = inter / (area_i + area(bj) - inter);
            if iou as f64 > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// A mask that survived the per-batch filters, boxes and points still in crop coordinates.
struct Candidate {
    rle: Rle,
    bx: [i64; 4],
    predicted_iou: f32,
    stability_score: f32,
    point: [f64; 2],
}

/// Runs the automatic generator over `image`. `whole` may carry the already computed embedding of
/// the whole image (crop 0), which then skips one encoder pass; with it and no crop layers the
/// pixels are not needed (`image` may be `None`).
pub fn generate(
    predictor: &SamPredictor,
    image: Option<&RgbImage>,
    whole: Option<&ImageEmbedding>,
    params: &AmgParams,
) -> Result<Vec<GeneratedMask>, SamError> {
    params.validate()?;
    let (h, w) = match (image, whole) {
        (Some(image), _) => (image.height() as usize, image.width() as usize),
        (None, Some(e)) => e.original,
        (None, None) => return Err(SamError::NoImage),
    };
    if let (Some(e), Some(image)) = (whole, image)
        && e.original != (h, w)
    {
        return Err(SamError::Config(format!(
            "the embedding is of a {}x{} image, the image is {}x{}",
            e.original.0,
            e.original.1,
            image.height(),
            image.width()
        )));
    }
    let grids: Vec<Vec<[f64; 2]>> = layer_points_per_side(params).into_iter().map(build_point_grid).collect();
    let crops = generate_crop_boxes((h, w), params.crop_n_layers, params.crop_overlap_ratio);
    if crops.iter().any(|(c, _)| c[2] <= c[0] || c[3] <= c[1]) {
        return Err(SamError::InvalidParams {
            field: "crop_n_layers",
            problem: format!("the {w}x{h} image is too small for {} crop layers", params.crop_n_layers),
        });
    }
    let mut all: Vec<(Candidate, [usize; 4])> = Vec::new();
    for (crop, layer) in &crops {
        let owned;
        let embedding = match whole {
            Some(e) if *crop == [0, 0, w, h] => e,
            _ => {
                let image = image.ok_or(SamError::NoImage)?;
                owned = predictor.embed(&crop_image(image, *crop)?)?;
                &owned
            }
        };
        for c in process_crop(predictor, embedding, *crop, &grids[*layer], (h, w), params)? {
            all.push((c, *crop));
        }
    }
    if crops.len() > 1 {
        let boxes: Vec<[f32; 4]> = all.iter().map(|(c, _)| c.bx.map(|v| v as f32)).collect();
        let scores: Vec<f32> =
            all.iter().map(|(_, k)| 1.0 / (((k[2] - k[0]) * (k[3] - k[1])) as i64) as f32).collect();
        let keep = nms(&boxes, &scores, params.crop_nms_thresh);
        let mut slots: Vec<Option<(Candidate, [usize; 4])>> = all.into_iter().map(Some).collect();
        all = keep.into_iter().filter_map(|i| slots[i].take()).collect();
    }
    if params.min_mask_region_area > 0 {
        let nms_thresh = params.box_nms_thresh.max(params.crop_nms_thresh);
        all = postprocess_small_regions(all, params.min_mask_region_area, nms_thresh);
    }
    let mut out: Vec<GeneratedMask> = all
        .into_iter()
        .map(|(c, k)| {
            let area = c.rle.area();
            GeneratedMask {
                rle: c.rle,
                area,
                bbox_xywh: [
                    c.bx[0] as f64,
                    c.bx[1] as f64,
                    (c.bx[2] - c.bx[0]) as f64,
                    (c.bx[3] - c.bx[1]) as f64,
                ],
                predicted_iou: c.predicted_iou,
                stability_score: c.stability_score,
                point: c.point,
                crop_box_xywh: [k[0] as f64, k[1] as f64, (k[2] - k[0]) as f64, (k[3] - k[1]) as f64],
            }
        })
        .collect();
    if let Some(max) = params.max_masks {
        out.sort_by(|a, b| b.predicted_iou.total_cmp(&a.predicted_iou));
        out.truncate(max);
    }
    out.sort_by_key(|m| m.area);
    Ok(out)
}

/// `postprocess_small_regions`: fills small holes and removes small islands of each mask, then runs box
/// NMS on the new boxes with unchanged masks scored 1 and changed ones 0; kept changed masks get their
/// new RLE and box.
fn postprocess_small_regions(
    all: Vec<(Candidate, [usize; 4])>,
    min_area: usize,
    nms_thresh: f64,
) -> Vec<(Candidate, [usize; 4])> {
    let mut changed_masks: Vec<Option<Mask>> = Vec::with_capacity(all.len());
    let mut boxes = Vec::with_capacity(all.len());
    let mut scores = Vec::with_capacity(all.len());
    for (c, _) in &all {
        let mask = c.rle.to_mask();
        let (h, w) = (mask.height() as usize, mask.width() as usize);
        let bits: Vec<bool> = mask.data().iter().map(|&v| v != 0).collect();
        let (bits, holes_changed) = remove_small_regions(&bits, h, w, min_area, RegionMode::Holes);
        let (bits, islands_changed) = remove_small_regions(&bits, h, w, min_area, RegionMode::Islands);
        let changed = holes_changed || islands_changed;
        let bx = mask_to_box(&bits, h, w);
        boxes.push(bx.map(|v| v as f32));
        scores.push(if changed { 0.0 } else { 1.0 });
        changed_masks.push(changed.then(|| {
            let bytes: Vec<u8> = bits.iter().map(|&b| u8::from(b)).collect();
            Mask::from_row_major(h as u32, w as u32, &bytes)
                .expect("the buffer has the mask's size. This is a bug.")
        }));
    }
    let keep = nms(&boxes, &scores, nms_thresh);
    let mut slots: Vec<Option<(Candidate, [usize; 4])>> = all.into_iter().map(Some).collect();
    keep.into_iter()
        .filter_map(|i| {
            let (mut c, crop) = slots[i].take()?;
            if let Some(mask) = changed_masks[i].take() {
                c.rle = mask.to_rle();
                c.bx = boxes[i].map(|v| v as i64);
            }
            Some((c, crop))
        })
        .collect()
}

/// Which regions [`remove_small_regions`] works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionMode {
    /// Background components smaller than the area are filled.
    Holes,
    /// Foreground components smaller than the area are removed (the largest stays if all are small).
    Islands,
}

/// 8-connected components of the `true` pixels of an `h x w` mask: a label per pixel (0 for `false`
/// pixels, components numbered from 1 in raster order of their first pixel) and each component's size
/// (index 0 unused).
pub fn connected_components(mask: &[bool], h: usize, w: usize) -> (Vec<u32>, Vec<usize>) {
    let mut labels = vec![0u32; h * w];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32;
        let mut size = 0;
        labels[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let (y, x) = (i / w, i % w);
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = label;
                        stack.push(j);
                    }
                }
            }
        }
        sizes.push(size);
    }
    (labels, sizes)
}

/// segment-anything's `remove_small_regions`: the new mask and whether any component was below
/// `min_area` (then the mask counts as changed even when, for islands, the only small component is kept
/// as the largest).
pub fn remove_small_regions(
    mask: &[bool],
    h: usize,
    w: usize,
    min_area: usize,
    mode: RegionMode,
) -> (Vec<bool>, bool) {
    let holes = mode == RegionMode::Holes;
    let working: Vec<bool> = mask.iter().map(|&m| m != holes).collect();
    let (labels, sizes) = connected_components(&working, h, w);
    let small: Vec<bool> = sizes.iter().enumerate().map(|(i, &s)| i > 0 && s < min_area).collect();
    if !small.contains(&true) {
        return (mask.to_vec(), false);
    }
    // Labels that end up set: holes keep the mask (label 0) and the small background components;
    // islands keep the large components, or the first largest when every component is small.
    let mut fill: Vec<bool> = if holes {
        small.iter().enumerate().map(|(i, &s)| i == 0 || s).collect()
    } else {
        small.iter().enumerate().map(|(i, &s)| i > 0 && !s).collect()
    };
    if !holes && !fill.contains(&true) {
        let largest = (1..sizes.len()).fold(1, |best, i| if sizes[i] > sizes[best] { i } else { best });
        fill[largest] = true;
    }
    (labels.iter().map(|&l| fill[l as usize]).collect(), true)
}

fn crop_image(image: &RgbImage, [x0, y0, x1, y1]: [usize; 4]) -> Result<RgbImage, SamError> {
    let w = image.width() as usize;
    let mut pixels = Vec::with_capacity((x1 - x0) * (y1 - y0) * 3);
    for y in y0..y1 {
        pixels.extend_from_slice(&image.pixels()[(y * w + x0) * 3..(y * w + x1) * 3]);
    }
    Ok(RgbImage::from_raw((x1 - x0) as u32, (y1 - y0) as u32, pixels)?)
}

/// `_process_crop` + `_process_batch`; boxes and points are mapped to the image frame on return.
fn process_crop(
    predictor: &SamPredictor,
    embedding: &ImageEmbedding,
    crop: [usize; 4],
    grid: &[[f64; 2]],
    (orig_h, orig_w): (usize, usize),
    params: &AmgParams,
) -> Result<Vec<Candidate>, SamError> {
    let cfg = &predictor.model().config;
    let (ch, cw) = embedding.original;
    let lr = cfg.low_res_size();
    let points: Vec<[f64; 2]> = grid.iter().map(|p| [p[0] * cw as f64, p[1] * ch as f64]).collect();
    let mut candidates = Vec::new();
    for batch in points.chunks(params.points_per_batch) {
        let (low_res, iou, k) = decode_points(predictor, embedding, batch)?;
        for (j, &predicted_iou) in iou.iter().enumerate() {
            // `iou > thresh` in float32; NaN is never kept.
            let above =
                predicted_iou.partial_cmp(&(params.pred_iou_thresh as f32)) == Some(Ordering::Greater);
            if params.pred_iou_thresh > 0.0 && !above {
                continue;
            }
            let plane = &low_res[j * lr * lr..(j + 1) * lr * lr];
            let logits = postprocess_logits(plane, 1, lr, cfg.image_size, embedding.input, (ch, cw))?;
            let stability = stability_score(&logits, cfg.mask_threshold, params.stability_score_offset);
            let stable = matches!(
                stability.partial_cmp(&(params.stability_score_thresh as f32)),
                Some(Ordering::Greater | Ordering::Equal)
            );
            if params.stability_score_thresh > 0.0 && !stable {
                continue;
            }
            let t = cfg.mask_threshold as f32;
            let mask: Vec<bool> = logits.iter().map(|&v| v > t).collect();
            let bx = mask_to_box(&mask, ch, cw);
            if near_crop_edge(bx, crop, [0, 0, orig_w, orig_h]) {
                continue;
            }
            let mut full = vec![0u8; orig_h * orig_w];
            for y in 0..ch {
                let row = &mask[y * cw..(y + 1) * cw];
                let dst = &mut full[(y + crop[1]) * orig_w + crop[0]..][..cw];
                for (d, &m) in dst.iter_mut().zip(row) {
                    *d = u8::from(m);
                }
            }
            let rle = Mask::from_row_major(orig_h as u32, orig_w as u32, &full)
                .expect("the buffer has the image's size. This is a bug.")
                .to_rle();
            candidates.push(Candidate {
                rle,
                bx,
                predicted_iou,
                stability_score: stability,
                point: batch[j / k],
            });
        }
    }
    let boxes: Vec<[f32; 4]> = candidates.iter().map(|c| c.bx.map(|v| v as f32)).collect();
    let scores: Vec<f32> = candidates.iter().map(|c| c.predicted_iou).collect();
    let keep = nms(&boxes, &scores, params.box_nms_thresh);
    let mut slots: Vec<Option<Candidate>> = candidates.into_iter().map(Some).collect();
    let (dx, dy) = (crop[0] as i64, crop[1] as i64);
    Ok(keep
        .into_iter()
        .filter_map(|i| slots[i].take())
        .map(|mut c| {
            c.bx = [c.bx[0] + dx, c.bx[1] + dy, c.bx[2] + dx, c.bx[3] + dy];
            c.point = [c.point[0] + crop[0] as f64, c.point[1] + crop[1] as f64];
            c
        })
        .collect())
}

/// Decodes one foreground point per prompt (crop pixels) in a single decoder pass with multimask
/// output: `([B * K * L * L] low-res logits, [B * K] IoU, K)`.
pub fn decode_points(
    predictor: &SamPredictor,
    embedding: &ImageEmbedding,
    points: &[[f64; 2]],
) -> Result<(Vec<f32>, Vec<f32>, usize), SamError> {
    let model = predictor.model();
    let (oh, ow) = embedding.original;
    let (ih, iw) = embedding.input;
    let (sx, sy) = (iw as f64 / ow as f64, ih as f64 / oh as f64);
    let pe = &model.prompt_encoder;
    let mut sparse = Vec::with_capacity(points.len());
    let mut dense = Vec::with_capacity(points.len());
    for p in points {
        let xy = [(p[0] * sx) as f32, (p[1] * sy) as f32];
        let (s, d) = pe.forward(Some((&[xy], &[PointLabel::Foreground])), None, None)?;
        sparse.push(s);
        dense.push(d);
    }
    let sparse = Tensor::cat(&sparse, 0)?;
    let dense = Tensor::cat(&dense, 0)?;
    let (low_res, iou) =
        model.mask_decoder.forward(&embedding.embeddings, &pe.dense_pe()?, &sparse, &dense, true)?;
    let k = low_res.dim(1)?;
    let low_res = low_res.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let iou = iou.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok((low_res, iou, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_grid_matches_numpy() {
        let g = build_point_grid(4);
        assert_eq!(g.len(), 16);
        assert_eq!(g[0], [0.125, 0.125]);
        assert_eq!(g[1], [0.375, 0.125]);
        assert_eq!(g[15], [0.875, 0.875]);
        assert_eq!(build_point_grid(1), vec![[0.5, 0.5]]);
    }

    #[test]
    fn crop_boxes_match_reference() {
        // generate_crop_boxes((87, 118), 1, 512 / 1500) in segment-anything.
        let boxes = generate_crop_boxes((87, 118), 1, 512.0 / 1500.0);
        let want = [[0, 0, 118, 87], [0, 0, 74, 58], [0, 29, 74, 87], [45, 0, 118, 58], [45, 29, 118, 87]];
        assert_eq!(boxes.iter().map(|b| b.0).collect::<Vec<_>>(), want);
        assert_eq!(boxes.iter().map(|b| b.1).collect::<Vec<_>>(), [0, 1, 1, 1, 1]);
    }

    #[test]
    fn nms_is_torchvision_nms() {
        let boxes =
            [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0]];
        // Box 1 overlaps box 0 with IoU 0.81; the degenerate box 3 has area 0 (IoU NaN: never suppressed).
        assert_eq!(nms(&boxes, &[0.5, 0.9, 0.7, 0.1], 0.7), vec![1, 2, 3]);
        assert_eq!(nms(&boxes, &[0.5, 0.9, 0.7, 0.1], 0.9), vec![1, 2, 0, 3]);
        // Ties keep input order (stable sort).
        assert_eq!(nms(&boxes[2..3].repeat(2), &[0.5, 0.5], 1.0), vec![0, 1]);
    }

    #[test]
    fn stability_and_boxes() {
        assert_eq!(stability_score(&[2.0, 0.5, -2.0, -2.0], 0.0, 1.0), 0.5);
        assert!(stability_score(&[-2.0], 0.0, 1.0).is_nan());
        let m = [false, false, false, false, true, true, false, true, false];
        assert_eq!(mask_to_box(&m, 3, 3), [1, 1, 2, 2]);
        assert_eq!(mask_to_box(&[false; 4], 2, 2), [0; 4]);
    }

    #[test]
    fn params_are_validated() {
        assert!(AmgParams::default().validate().is_ok());
        let bad = |p: AmgParams| match p.validate() {
            Err(SamError::InvalidParams { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(AmgParams { min_mask_region_area: 100, ..Default::default() }.validate().is_ok());
        assert_eq!(bad(AmgParams { points_per_side: 0, ..Default::default() }), "points_per_side");
        assert_eq!(bad(AmgParams { pred_iou_thresh: f64::NAN, ..Default::default() }), "pred_iou_thresh");
        assert_eq!(
            bad(AmgParams {
                crop_n_layers: 2,
                crop_n_points_downscale_factor: 8,
                points_per_side: 32,
                ..Default::default()
            }),
            "crop_n_points_downscale_factor"
        );
    }

    /// A mask from rows of `#` (inside) and `.` (outside).
    fn grid(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let bits = rows.iter().flat_map(|r| r.chars().map(|c| c == '#')).collect();
        (bits, rows.len(), rows[0].len())
    }

    #[test]
    fn small_holes_are_filled() {
        let (m, h, w) = grid(&["#####", "#.###", "#####", "##..#", "##..#", "#####"]);
        // The one-pixel hole is filled; the four-pixel hole stays at min_area 4 (sizes below it only).
        let (got, changed) = remove_small_regions(&m, h, w, 4, RegionMode::Holes);
        assert!(changed);
        assert_eq!(got, grid(&["#####", "#####", "#####", "##..#", "##..#", "#####"]).0);
        let (got, changed) = remove_small_regions(&m, h, w, 5, RegionMode::Holes);
        assert!(changed);
        assert!(got.iter().all(|&b| b));
        // No hole below the area: unchanged, and islands mode leaves a single large component alone.
        assert_eq!(remove_small_regions(&m, h, w, 1, RegionMode::Holes), (m.clone(), false));
        assert_eq!(remove_small_regions(&m, h, w, 5, RegionMode::Islands), (m.clone(), false));
    }

    #[test]
    fn small_islands_are_removed() {
        let (m, h, w) = grid(&["##....", "##....", "......", "....##", "....#.", "#....."]);
        let (got, changed) = remove_small_regions(&m, h, w, 2, RegionMode::Islands);
        assert!(changed);
        assert_eq!(got, grid(&["##....", "##....", "......", "....##", "....#.", "......"]).0);
        let (got, _) = remove_small_regions(&m, h, w, 4, RegionMode::Islands);
        assert_eq!(got, grid(&["##....", "##....", "......", "......", "......", "......"]).0);
    }

    #[test]
    fn all_small_islands_keep_the_first_largest() {
        let (m, h, w) = grid(&["#..##", ".....", "##..#", "##..."]);
        let (got, changed) = remove_small_regions(&m, h, w, 10, RegionMode::Islands);
        assert!(changed);
        assert_eq!(got, grid(&[".....", ".....", "##...", "##..."]).0);
        // Ties go to the component met first in raster order.
        let (m, h, w) = grid(&["....##", "......", "##...."]);
        let (got, changed) = remove_small_regions(&m, h, w, 3, RegionMode::Islands);
        assert!(changed);
        assert_eq!(got, grid(&["....##", "......", "......"]).0);
        // A lone small component is kept but still counts as changed, as in the reference.
        let (m, h, w) = grid(&["#..", "..."]);
        assert_eq!(remove_small_regions(&m, h, w, 5, RegionMode::Islands), (m.clone(), true));
    }

    #[test]
    fn components_are_eight_connected() {
        // Diagonal neighbours join: one island of three pixels, not three islands of one.
        let (m, h, w) = grid(&["#...", ".#..", "..#.", "...."]);
        let (labels, sizes) = connected_components(&m, h, w);
        assert_eq!(sizes, vec![0, 3]);
        assert_eq!(labels.iter().filter(|&&l| l == 1).count(), 3);
        assert_eq!(remove_small_regions(&m, h, w, 3, RegionMode::Islands), (m.clone(), false));
        // The background is 8-connected too: a diagonal gap in a ring lets the inside reach the outside.
        let (m, h, w) = grid(&["....", ".##.", "#..#", ".##.", "...."]);
        let (got, changed) = remove_small_regions(&m, h, w, 3, RegionMode::Holes);
        assert!(!changed);
        assert_eq!(got, m);
        let (_, sizes) = connected_components(&m.iter().map(|b| !b).collect::<Vec<_>>(), h, w);
        assert_eq!(sizes, vec![0, 14]);
    }
}
