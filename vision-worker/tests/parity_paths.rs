//! Two serving paths against the PyTorch reference and against each other: features kept in f16
//! (the worker's default `--feature-dtype`, the form it caches and ships) and several images
//! encoded in one batch.

mod common;

use candle_core::{DType, Device, Tensor};
use osprey_common::image::{ImageLimits, RgbImage, decode_image};
use vision_worker::VisionModel;
use vision_worker::models::clip_convnext::Features;
use vision_worker::preprocess::preprocess;

use common::{check, fixture, load_safetensors, rel_l2};

/// Relative L2 tolerance of f16-stored features and everything computed from them. Rounding to
/// f16 (11 significant bits) changes each value by at most 2^-12 = 2.4e-4 relative, which bounds
/// the features' relative L2 error; the pooled averages and linear maps stay near it (2.1e-4 at
/// most on the fixture, printed by the test).
const F16_TOL: f64 = 5e-4;
/// Relative L2 tolerance between an image encoded in a batch and alone: only the matmuls' blocking
/// may differ, so this is float rounding.
const BATCH_TOL: f64 = 1e-6;

fn photo(name: &str) -> RgbImage {
    decode_image(&std::fs::read(fixture(name)).unwrap(), &ImageLimits::default()).unwrap()
}

fn model() -> VisionModel {
    VisionModel::from_dir(&fixture("tiny/tiny_st"), &Device::Cpu).unwrap()
}

/// As the worker keeps features: each level rounded to f16, then widened back to f32 to pool.
#[test]
fn f16_features_match_the_reference() {
    let model = model();
    let want = load_safetensors(&fixture("expected_f32.safetensors"));
    let image = photo("photo.png");
    let masks = load_safetensors(&fixture("masks.safetensors")).remove("masks").unwrap();
    let (_, features) = model.encode(&image).unwrap();
    let stored: Vec<Tensor> = features
        .levels
        .iter()
        .map(|l| l.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap())
        .collect();
    let stored = Features { levels: stored.try_into().unwrap() };
    let hw = (image.height() as usize, image.width() as usize);
    let tokens = model.regions(&stored, &masks, hw).unwrap();

    let mut got: Vec<(String, Tensor)> = vec![
        ("image_tokens".into(), stored.image_tokens().unwrap()),
        ("mask_tokens".into(), tokens.mask_tokens.clone()),
        ("mask_acc".into(), tokens.mask_acc.clone()),
        // Not from the features: unchanged by their storage.
        ("pos_tokens".into(), tokens.pos_tokens.clone()),
    ];
    for (i, name) in Features::NAMES.iter().enumerate() {
        got.push(((*name).into(), stored.levels[i].clone()));
        got.push((format!("pooled_{name}"), tokens.pooled[i].clone()));
    }
    let mut ok = true;
    let mut worst = 0.0_f64;
    for (name, tensor) in &got {
        ok &= check("f16", name, tensor, &want, F16_TOL);
        worst = worst.max(rel_l2(tensor, &want[name.as_str()]));
    }
    println!("largest relative L2 error with f16 features: {worst:.2e}");
    assert!(ok, "f16-stored features differ from the reference by more than {F16_TOL}");
    // f16 storage must actually round (a test that would pass on f32 features proves nothing).
    assert!(worst > 1e-6, "f16 storage changed nothing: {worst:e}");
}

/// Three images of different sizes and contents in one forward pass equal each encoded alone, and
/// the batch's first image still matches the reference.
#[test]
fn batch_encoding_equals_one_at_a_time() {
    let model = model();
    let png = photo("photo.png");
    let jpg = photo("photo.jpg");
    // A third image: the PNG mirrored left-right and cropped to a portrait shape.
    let (w, h) = (png.width() as usize, png.height() as usize);
    let crop_w = h / 2;
    let mut pixels = Vec::with_capacity(crop_w * h * 3);
    for y in 0..h {
        for x in (w - crop_w..w).rev() {
            pixels.extend_from_slice(&png.pixels()[(y * w + x) * 3..][..3]);
        }
    }
    let mirrored = RgbImage::from_raw(crop_w as u32, h as u32, pixels).unwrap();
    let images = [&png, &jpg, &mirrored];

    let size = model.config.image_size;
    let inputs: Vec<Tensor> = images
        .iter()
        .map(|im| {
            preprocess(im.pixels(), im.width() as usize, im.height() as usize, size, &Device::Cpu)
                .unwrap()
                .pixel_values
        })
        .collect();
    let batched = model.trunk.forward(&Tensor::cat(&inputs, 0).unwrap()).unwrap();
    let mut worst = 0.0_f64;
    for (i, input) in inputs.iter().enumerate() {
        let alone = model.trunk.forward(input).unwrap();
        for (level, name) in Features::NAMES.iter().enumerate() {
            let from_batch = batched.levels[level].narrow(0, i, 1).unwrap();
            let err = rel_l2(&from_batch, &alone.levels[level]);
            println!("image {i} {name}: batch vs alone rel L2 {err:.2e}");
            worst = worst.max(err);
        }
    }
    assert!(worst <= BATCH_TOL, "batched encoding differs from one at a time: {worst:e}");

    let want = load_safetensors(&fixture("expected_f32.safetensors"));
    let first = Features { levels: std::array::from_fn(|l| batched.levels[l].narrow(0, 0, 1).unwrap()) };
    for (l, name) in Features::NAMES.iter().enumerate() {
        assert!(check("batch", name, &first.levels[l], &want, 1e-4), "{name}");
    }
}
