//! Parity with the PyTorch reference (tools/make_vision_fixtures.py) on tiny checkpoints in the
//! three layouts the loader accepts, plus the full-size key manifest.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use osprey_common::image::{ImageLimits, decode_image};
use vision_worker::models::clip_convnext::Features;
use vision_worker::models::{VisionModel, osprey_var_builder};
use vision_worker::weights::WeightsError;
use vision_worker::{VisionConfig, VisionError};

use common::{LAYOUTS, check, fixture, load_safetensors};

/// Relative L2 tolerance of every compared tensor.
const TOL: f64 = 1e-4;

/// Osprey's `mm_projector` (`Linear`, exact GELU, `Linear`). It belongs to the LLM worker; built
/// here only to check that its keys load and that res4 flattens in the right order.
fn projector(vb: VarBuilder, cfg: &VisionConfig) -> candle_core::Result<impl Module> {
    let fc1 = candle_nn::linear(cfg.mm_hidden_size, cfg.hidden_size, vb.pp("0"))?;
    let fc2 = candle_nn::linear(cfg.hidden_size, cfg.hidden_size, vb.pp("2"))?;
    Ok(candle_nn::seq().add(fc1).add(ExactGelu).add(fc2))
}

/// `nn.GELU()`: the exact erf form.
struct ExactGelu;
impl Module for ExactGelu {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.gelu_erf()
    }
}

fn run_layout(layout: &str, expected: &str) {
    let dir = fixture("tiny").join(layout);
    let want = load_safetensors(&fixture(expected));
    let dev = Device::Cpu;

    let cfg = VisionConfig::from_dir(&dir).unwrap();
    let (vb, errors) = osprey_var_builder(&dir, &cfg, &dev).unwrap();
    let model = VisionModel::load(vb.clone(), &cfg).map_err(|e| errors.explain(e)).unwrap();
    let proj = projector(vb.pp("model.mm_projector"), &cfg).map_err(|e| errors.explain(e)).unwrap();

    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    let masks = load_safetensors(&fixture("masks.safetensors")).remove("masks").unwrap();
    let (pre, features) = model.encode(&image).unwrap();
    let image_hw = (image.height() as usize, image.width() as usize);
    let tokens = model.regions(&features, &masks, image_hw).unwrap();

    // The 8-bit resize must be bit-exact with Pillow.
    let resized_want = want["resized_u8"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(want["resized_u8"].dims(), [pre.resized_height, pre.resized_width, 3]);
    assert!(pre.resized == resized_want, "{layout}: PIL bicubic resize differs");

    let image_tokens = features.image_tokens().unwrap();
    let projected = proj.forward(&image_tokens).unwrap();
    let mut got: Vec<(String, Tensor)> = vec![
        ("pixel_values".into(), pre.pixel_values.clone()),
        ("image_tokens".into(), image_tokens),
        ("projected_image_tokens".into(), projected),
        ("mask_tokens".into(), tokens.mask_tokens.clone()),
        ("pos_tokens".into(), tokens.pos_tokens.clone()),
        ("mask_acc".into(), tokens.mask_acc.clone()),
        ("pos_input".into(), tokens.pos_input.clone()),
    ];
    for (i, name) in Features::NAMES.iter().enumerate() {
        got.push(((*name).into(), features.levels[i].clone()));
        got.push((format!("pooled_{name}"), tokens.pooled[i].clone()));
    }
    let mut ok = true;
    for (name, tensor) in &got {
        ok &= check(layout, name, tensor, &want, TOL);
    }
    // Every expected tensor is compared.
    let compared: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).chain(["resized_u8"]).collect();
    for name in want.keys() {
        assert!(compared.contains(&name.as_str()), "{name} is not compared");
    }
    assert!(ok, "{layout}: some tensors differ from the reference by more than {TOL}");

    // The empty mask (index 0) pools to exactly zero at every level.
    for pooled in &tokens.pooled {
        let first = pooled.get(0).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(first, 0.0);
    }
}

#[test]
fn parity_tiny_st() {
    run_layout(LAYOUTS[0].0, LAYOUTS[0].1);
}

#[test]
fn parity_tiny_split() {
    run_layout(LAYOUTS[1].0, LAYOUTS[1].1);
}

#[test]
fn parity_tiny_bin() {
    run_layout(LAYOUTS[2].0, LAYOUTS[2].1);
}

/// A backend that records every requested name and shape and hands out zeros without allocating.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<Requested>>>);

/// A tensor name and shape a model asked for.
type Requested = (String, Vec<usize>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The names and shapes our model code asks for at full size equal the used keys of the real
/// checkpoint (manifest_full.json, made from open_clip's convnext_large_d_320 and the Osprey
/// modules), one for one.
#[test]
fn full_size_keys_match_the_manifest() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("manifest_full.json")).unwrap()).unwrap();
    let mut want = BTreeMap::new();
    for t in manifest["tensors"].as_array().unwrap() {
        if t["used"].as_bool().unwrap() {
            let shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            want.insert(t["key"].as_str().unwrap().to_string(), shape);
        }
    }
    assert_eq!(want.len(), 340 + 4 + 16);

    // A real config.json: none of the reduced-model fields.
    let cfg =
        VisionConfig::from_json(r#"{"hidden_size": 4096, "mm_vision_tower": "open_clip_pytorch_model.bin"}"#)
            .unwrap();
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    VisionModel::load(vb.clone(), &cfg).unwrap();
    projector(vb.pp("model.mm_projector"), &cfg).unwrap();

    let requested = recorder.0.lock().unwrap().clone();
    let got: BTreeMap<String, Vec<usize>> = requested.iter().cloned().collect();
    assert_eq!(got.len(), requested.len(), "a tensor was requested twice");
    for (key, shape) in &want {
        assert_eq!(got.get(key), Some(shape), "{key}");
    }
    for key in got.keys() {
        assert!(want.contains_key(key), "{key} is requested but not in the manifest");
    }
}

/// A temporary copy of a fixture layout, edited by `edit`.
fn edited_layout(name: &str, edit: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-vision-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny/tiny_st").join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn missing_key_names_key_and_file() {
    let dir = edited_layout("missing", |dir| {
        let path = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        tensors.remove("model.vision_tower.vision_tower.visual.trunk.stages.2.blocks.1.gamma").unwrap();
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    let err = VisionModel::from_dir(&dir, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, VisionError::Weights(WeightsError::MissingKey { .. })), "{err:?}");
    assert!(msg.contains("stages.2.blocks.1.gamma") && msg.contains("model.safetensors"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mis_shaped_key_names_key_and_file() {
    let dir = edited_layout("shape", |dir| {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"mask_embed_dim\": 16", "\"mask_embed_dim\": 17");
        std::fs::write(path, text).unwrap();
    });
    let err = VisionModel::from_dir(&dir, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, VisionError::Weights(WeightsError::Shape { .. })), "{err:?}");
    assert!(msg.contains("mask_extractor.res2.weight") && msg.contains("model.safetensors"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_masks_are_errors_not_panics() {
    let model = VisionModel::from_dir(&fixture("tiny/tiny_st"), &Device::Cpu).unwrap();
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    let (_, features) = model.encode(&image).unwrap();
    let hw = (image.height() as usize, image.width() as usize);

    let wrong_size = Tensor::zeros((2, 50, 60), DType::U8, &Device::Cpu).unwrap();
    let err = model.regions(&features, &wrong_size, hw).unwrap_err();
    assert!(
        matches!(err, VisionError::MaskSize { index: 0, mask_height: 50, mask_width: 60, .. }),
        "{err:?}"
    );
    println!("{err}");

    let not_binary = (Tensor::ones((3, hw.0, hw.1), DType::U8, &Device::Cpu).unwrap() * 255.0).unwrap();
    let err = model.regions(&features, &not_binary, hw).unwrap_err();
    assert!(err.to_string().contains("mask 0"), "{err}");

    let half = Tensor::full(0.5_f32, (2, hw.0, hw.1), &Device::Cpu).unwrap();
    let half = Tensor::cat(&[half.zeros_like().unwrap(), half], 0).unwrap();
    let err = model.regions(&features, &half, hw).unwrap_err();
    assert!(err.to_string().contains("mask 2"), "{err}");
    let wrong_dtype = Tensor::zeros((0, hw.0, hw.1), DType::I64, &Device::Cpu).unwrap();
    assert!(matches!(model.regions(&features, &wrong_dtype, hw), Err(VisionError::InvalidInput(_))));

    let flat = Tensor::zeros((hw.0, hw.1), DType::U8, &Device::Cpu).unwrap();
    assert!(matches!(model.regions(&features, &flat, hw), Err(VisionError::InvalidInput(_))));

    let none = Tensor::zeros((0, hw.0, hw.1), DType::U8, &Device::Cpu).unwrap();
    let tokens = model.regions(&features, &none, hw).unwrap();
    assert_eq!(tokens.mask_tokens.dims(), [0, 32]);
    assert_eq!(tokens.pos_tokens.dims(), [0, 32]);
}
