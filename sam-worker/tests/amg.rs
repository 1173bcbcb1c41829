//! Automatic mask generation against segment-anything's `SamAutomaticMaskGenerator` on the tiny model
//! (fixture `amg.json` from tools/make_sam_fixtures.py, which records the relaxed thresholds it used; two
//! cases set `min_mask_region_area` so that small holes and islands change masks).
//! Every reference mask must pair one-to-one with a generated mask at mask IoU >= 0.99, with the same
//! crop box and point and close scores.

mod common;

use candle_core::Device;
use common::fixture;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::Rle;
use sam_worker::amg::{AmgParams, generate};
use sam_worker::dump::read_config;
use sam_worker::{SamPredictor, load_sam};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    mask_threshold: f64,
    params: AmgParams,
    masks: Vec<RefMask>,
}

#[derive(Deserialize)]
struct RefMask {
    size: [u32; 2],
    counts: Vec<u32>,
    area: u64,
    bbox: [f64; 4],
    predicted_iou: f64,
    stability_score: f64,
    point_coords: Vec<[f64; 2]>,
    crop_box: [f64; 4],
}

fn mask_iou(a: &Rle, b: &Rle) -> f64 {
    let (a, b) = (a.to_mask(), b.to_mask());
    let inter = a.data().iter().zip(b.data()).filter(|(x, y)| **x != 0 && **y != 0).count();
    let union = a.data().iter().zip(b.data()).filter(|(x, y)| **x != 0 || **y != 0).count();
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

#[test]
fn automatic_masks_match_reference() {
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(fixture("amg.json")).unwrap()).unwrap();
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    for case in cases {
        let mut cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
        cfg.mask_threshold = case.mask_threshold;
        let model = load_sam(&fixture("tiny_sam.safetensors"), &cfg, &Device::Cpu).unwrap();
        let predictor = SamPredictor::new(model, Device::Cpu);
        let got = generate(&predictor, Some(&image), None, &case.params).unwrap();
        assert!(got.windows(2).all(|w| w[0].area <= w[1].area), "{}: not sorted by area", case.name);
        assert_eq!(got.len(), case.masks.len(), "{}: mask count", case.name);

        let mut used = vec![false; got.len()];
        let (mut min_iou, mut max_score_err, mut max_stab_err) = (1.0f64, 0.0f64, 0.0f64);
        for (r, want) in case.masks.iter().enumerate() {
            let want_rle = Rle::from_counts(want.size[0], want.size[1], want.counts.clone()).unwrap();
            let (best, iou) = got
                .iter()
                .enumerate()
                .filter(|(i, _)| !used[*i])
                .map(|(i, g)| (i, mask_iou(&g.rle, &want_rle)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or_else(|| panic!("{}: nothing left to pair with reference mask {r}", case.name));
            used[best] = true;
            let g = &got[best];
            min_iou = min_iou.min(iou);
            max_score_err = max_score_err.max((g.predicted_iou as f64 - want.predicted_iou).abs());
            max_stab_err = max_stab_err.max((g.stability_score as f64 - want.stability_score).abs());
            assert!(iou >= 0.99, "{}: reference mask {r} pairs at IoU {iou}", case.name);
            assert_eq!(g.crop_box_xywh, want.crop_box, "{}: mask {r} crop box", case.name);
            assert_eq!(g.point, want.point_coords[0], "{}: mask {r} point", case.name);
            if iou == 1.0 {
                assert_eq!(g.area, want.area, "{}: mask {r} area", case.name);
                assert_eq!(g.bbox_xywh, want.bbox, "{}: mask {r} bbox", case.name);
            }
        }
        eprintln!(
            "[{}] {} masks paired one-to-one; min mask IoU {min_iou:.5}, max |predicted_iou err| {max_score_err:.2e}, max |stability err| {max_stab_err:.2e}",
            case.name,
            got.len()
        );
        assert!(max_score_err <= 1e-4 && max_stab_err <= 1e-2, "{}: scores differ", case.name);
    }
}

#[test]
fn resident_whole_image_embedding_gives_the_same_masks() {
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(fixture("amg.json")).unwrap()).unwrap();
    let case = cases.iter().find(|c| c.params.crop_n_layers == 0).unwrap();
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    let mut cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
    cfg.mask_threshold = case.mask_threshold;
    let predictor =
        SamPredictor::new(load_sam(&fixture("tiny_sam.pth"), &cfg, &Device::Cpu).unwrap(), Device::Cpu);
    let embedding = predictor.embed(&image).unwrap();
    let a = generate(&predictor, Some(&image), Some(&embedding), &case.params).unwrap();
    let b = generate(&predictor, Some(&image), None, &case.params).unwrap();
    assert_eq!(a, b);
    assert_eq!(generate(&predictor, None, Some(&embedding), &case.params).unwrap(), a);
    let capped = generate(
        &predictor,
        Some(&image),
        Some(&embedding),
        &AmgParams { max_masks: Some(3), ..case.params.clone() },
    )
    .unwrap();
    assert_eq!(capped.len(), 3);
    let mut best: Vec<f32> = a.iter().map(|m| m.predicted_iou).collect();
    best.sort_by(|x, y| y.total_cmp(x));
    assert!(capped.iter().all(|m| m.predicted_iou >= best[2]));
}
