//! Tiny-model parity with segment-anything's `SamPredictor` (fixtures from tools/make_sam_fixtures.py):
//! image embeddings, low-res logits and IoU within 1e-4 relative L2, masks >= 99.9% equal pixels.

mod common;

use candle_core::Device;
use common::*;
use osprey_common::image::{ImageLimits, decode_image};
use sam_worker::dump::read_config;
use sam_worker::{SamPredictor, load_sam};

fn check_weights(file: &str) {
    let cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
    let model = load_sam(&fixture(file), &cfg, &Device::Cpu).unwrap();
    let mut predictor = SamPredictor::new(model, Device::Cpu);
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    let exp = expected();

    let (resized, nh, nw) = predictor.resize_image(&image).unwrap();
    assert_eq!(exp["input_image"].dims(), &[nh, nw, 3]);
    assert_eq!(resized, u8s(&exp["input_image"]), "ResizeLongestSide pixels differ from PIL");

    let emb = f32s(predictor.set_image(&image).unwrap());
    let e = rel_l2(&emb, &f32s(&exp["image_embeddings"]));
    eprintln!("[{file}] image_embeddings rel_l2={e:.3e}");
    assert!(e <= MAX_REL_L2, "image_embeddings rel_l2 {e}");

    let mut failures = Vec::new();
    for (i, entry) in prompts().into_iter().enumerate() {
        let mut prompt = entry.prompt;
        if entry.mask_input_from.is_some() {
            prompt.mask_input = Some(f32s(&exp[&format!("mask_input_{i}")]));
        }
        let p = predictor.predict(&prompt).unwrap();
        let want_masks = &exp[&format!("masks_{i}")];
        assert_eq!(want_masks.dims(), &[p.num_masks, p.height, p.width], "{}", prompt.name);
        let logits = rel_l2(&p.low_res_logits, &f32s(&exp[&format!("low_res_logits_{i}")]));
        let iou = rel_l2(&p.iou_predictions, &f32s(&exp[&format!("iou_predictions_{i}")]));
        let agree = agreement(&p.masks, &u8s(want_masks));
        eprintln!(
            "[{file}] {:18} K={} low_res_logits rel_l2={logits:.3e} iou rel_l2={iou:.3e} mask agreement={:.5}%",
            prompt.name,
            p.num_masks,
            agree * 100.0
        );
        if logits > MAX_REL_L2 || iou > MAX_REL_L2 || agree < MIN_AGREEMENT {
            failures.push(prompt.name.clone());
        }
    }
    assert!(failures.is_empty(), "outside tolerance: {failures:?}");
}

#[test]
fn tiny_pth_matches_reference() {
    check_weights("tiny_sam.pth");
}

#[test]
fn tiny_safetensors_matches_reference() {
    check_weights("tiny_sam.safetensors");
}

#[test]
fn predict_without_image_and_bad_prompt_are_errors() {
    let cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
    let model = load_sam(&fixture("tiny_sam.safetensors"), &cfg, &Device::Cpu).unwrap();
    let mut predictor = SamPredictor::new(model, Device::Cpu);
    let mut prompt = sam_worker::Prompt::named("click");
    prompt.point_coords = Some(vec![vec![10.0, 10.0]]);
    prompt.point_labels = Some(vec![1.0]);
    assert!(matches!(predictor.predict(&prompt), Err(sam_worker::SamError::NoImage)));
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    predictor.set_image(&image).unwrap();
    assert_eq!(predictor.predict(&prompt).unwrap().num_masks, 3);
    // A mask input of the wrong size (the tiny model's logits are 32x32).
    prompt.mask_input = Some(vec![0.0; 256 * 256]);
    let err = predictor.predict(&prompt).unwrap_err();
    assert!(matches!(err, sam_worker::SamError::InvalidPrompt { field: "mask_input", .. }), "{err}");
}

#[test]
fn mask_input_feedback_matches_fixture() {
    // prompts.json feeds back the best low-res logits of `point_multi`: the same tensor as mask_input_i.
    let cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
    let model = load_sam(&fixture("tiny_sam.safetensors"), &cfg, &Device::Cpu).unwrap();
    let mut predictor = SamPredictor::new(model, Device::Cpu);
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    predictor.set_image(&image).unwrap();
    let exp = expected();
    let entries = prompts();
    let (src_i, src) = entries.iter().enumerate().find(|(_, e)| e.prompt.name == "point_multi").unwrap();
    let p = predictor.predict(&src.prompt).unwrap();
    assert_eq!(p.best(), {
        let iou = f32s(&exp[&format!("iou_predictions_{src_i}")]);
        (0..iou.len()).max_by(|a, b| iou[*a].total_cmp(&iou[*b])).unwrap()
    });
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.mask_input_from.is_some()) {
        let fed = p.low_res(p.best()).unwrap();
        let err = rel_l2(fed, &f32s(&exp[&format!("mask_input_{i}")]));
        assert!(err <= MAX_REL_L2, "{}: {err}", e.prompt.name);
    }
}

#[test]
fn preprocess_shape_rounds_like_reference() {
    use sam_worker::predictor::preprocess_shape;
    assert_eq!(preprocess_shape(87, 118, 64), (47, 64));
    assert_eq!(preprocess_shape(480, 640, 1024), (768, 1024));
    // 1024 * 333 / 500 = 681.98 -> 682 (int(x + 0.5)).
    assert_eq!(preprocess_shape(333, 500, 1024), (682, 1024));
    assert_eq!(preprocess_shape(1000, 10, 1024), (1024, 10));
}

/// Prompts of one request decoded together (grouped by sparse-token count and multimask output) give
/// what decoding them one at a time gives, in input order.
#[test]
fn batched_prompts_equal_one_at_a_time() {
    let cfg = read_config(Some(&fixture("tiny_config.json"))).unwrap();
    let model = load_sam(&fixture("tiny_sam.safetensors"), &cfg, &Device::Cpu).unwrap();
    let predictor = SamPredictor::new(model, Device::Cpu);
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    let embedding = predictor.embed(&image).unwrap();
    let exp = expected();
    let mut batch = Vec::new();
    for (i, entry) in prompts().into_iter().enumerate() {
        let mut prompt = entry.prompt;
        if entry.mask_input_from.is_some() {
            prompt.mask_input = Some(f32s(&exp[&format!("mask_input_{i}")]));
        }
        // A shifted copy of each fixture prompt, so that every group holds several prompts.
        let mut shifted = prompt.clone();
        shifted.name.push_str("_shifted");
        if let Some(points) = shifted.point_coords.as_mut() {
            points.iter_mut().for_each(|p| p[0] = (p[0] - 9.0).max(0.0));
        }
        if let Some(b) = shifted.box_xyxy.as_mut() {
            b[2] -= 7.0;
        }
        batch.push(prompt);
        batch.push(shifted);
    }
    let batched = predictor.predict_batch(&embedding, &batch).unwrap();
    assert_eq!(batched.len(), batch.len());
    let (mut max_logit_err, mut max_iou_err, mut min_agree) = (0.0f32, 0.0f32, 1.0f64);
    for (prompt, got) in batch.iter().zip(&batched) {
        let want = predictor.predict_with(&embedding, prompt).unwrap();
        assert_eq!(got.num_masks, want.num_masks, "{}", prompt.name);
        assert_eq!((got.height, got.width), (want.height, want.width));
        let err = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        max_logit_err = max_logit_err.max(err(&got.low_res_logits, &want.low_res_logits));
        max_iou_err = max_iou_err.max(err(&got.iou_predictions, &want.iou_predictions));
        min_agree = min_agree.min(agreement(&got.masks, &want.masks));
    }
    eprintln!(
        "{} prompts batched: max |logit diff| {max_logit_err:.2e}, max |iou diff| {max_iou_err:.2e}, min mask agreement {min_agree}",
        batch.len()
    );
    assert!(max_logit_err <= 1e-5 && max_iou_err <= 1e-6 && min_agree >= 0.9999);
}
