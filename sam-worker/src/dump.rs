//! `sam-worker dump`: run the predictor on one image and a list of prompts and write every output to
//! safetensors, for comparing with the Python reference.
//!
//! PROMPTS is a JSON list of `{"name", "point_coords": [[x, y], ...] | null, "point_labels": [1 | 0, ...]
//! | null, "box": [x0, y0, x1, y1] | null, "multimask_output": bool}`; an entry may also carry
//! `"mask_input_from": "<name of an earlier prompt>"` to feed that prediction's best low-res logits
//! (highest IoU) back as `mask_input`. OUT holds `image_embeddings` (f32) and, for prompt `i`,
//! `masks_i` (u8 `[K, H, W]`), `iou_predictions_i` (f32 `[K]`) and `low_res_logits_i` (f32 `[K, L, L]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use osprey_common::image::{ImageLimits, decode_image};
use serde::Deserialize;

use crate::error::SamError;
use crate::models::sam::SamConfig;
use crate::predictor::{SamPredictor, load_sam};
use crate::prompt::Prompt;

/// One entry of the PROMPTS file.
#[derive(Debug, Clone, Deserialize)]
pub struct DumpPrompt {
    #[serde(flatten)]
    pub prompt: Prompt,
    #[serde(default)]
    pub mask_input_from: Option<String>,
}

/// Inputs of one `dump` run.
#[derive(Debug, Clone)]
pub struct DumpArgs {
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
    pub image: PathBuf,
    pub prompts: PathBuf,
    pub out: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, SamError> {
    std::fs::read(path).map_err(|source| SamError::Io { path: path.to_path_buf(), source })
}

/// Reads a JSON config; fields left out keep their ViT-B values. No file means ViT-B.
pub fn read_config(path: Option<&Path>) -> Result<SamConfig, SamError> {
    let Some(path) = path else { return Ok(SamConfig::vit_b()) };
    let cfg: SamConfig = serde_json::from_slice(&read(path)?)
        .map_err(|e| SamError::Config(format!("{}: {e}", path.display())))?;
    cfg.validate().map_err(SamError::Config)?;
    Ok(cfg)
}

/// The model config: the JSON file when given, else read off the checkpoint's tensor shapes
/// ([`SamConfig::from_shapes`]: ViT-B/L/H, MobileSAM or a reduced model).
pub fn resolve_config(config: Option<&Path>, weights: &Path) -> Result<SamConfig, SamError> {
    if config.is_some() {
        return read_config(config);
    }
    let checkpoint = osprey_checkpoint::Checkpoint::open_files(&[weights.to_path_buf()])
        .map_err(|e| SamError::Config(format!("{}: {e}", weights.display())))?;
    SamConfig::from_shapes(|key| checkpoint.shape(key))
        .map_err(|e| SamError::Config(format!("inferring the model from {}: {e}", weights.display())))
}

/// Runs the whole dump on `device`.
pub fn run_dump(args: &DumpArgs, device: &Device) -> Result<(), SamError> {
    let cfg = resolve_config(args.config.as_deref(), &args.weights)?;
    let prompts: Vec<DumpPrompt> =
        serde_json::from_slice(&read(&args.prompts)?).map_err(|e| SamError::InvalidPrompt {
            prompt: "<file>".into(),
            field: "prompts",
            problem: format!("{}: {e}", args.prompts.display()),
        })?;
    let image = decode_image(&read(&args.image)?, &ImageLimits::default())?;
    let model = load_sam(&args.weights, &cfg, device)?;
    let mut predictor = SamPredictor::new(model, device.clone());
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("image_embeddings".into(), predictor.set_image(&image)?.to_device(&Device::Cpu)?);

    let mut done: HashMap<String, crate::Prediction> = HashMap::new();
    for (i, entry) in prompts.iter().enumerate() {
        let mut prompt = entry.prompt.clone();
        if let Some(from) = &entry.mask_input_from {
            let src = done.get(from).ok_or_else(|| {
                SamError::prompt(
                    &prompt.name,
                    "mask_input_from",
                    format!("no earlier prompt is named {from:?}"),
                )
            })?;
            prompt.mask_input = src.low_res(src.best()).map(<[f32]>::to_vec);
        }
        let p = predictor.predict(&prompt)?;
        let (k, lr) = (p.num_masks, p.low_res_size);
        out.insert(
            format!("masks_{i}"),
            Tensor::from_vec(p.masks.clone(), (k, p.height, p.width), &Device::Cpu)?,
        );
        out.insert(
            format!("iou_predictions_{i}"),
            Tensor::from_vec(p.iou_predictions.clone(), k, &Device::Cpu)?,
        );
        out.insert(
            format!("low_res_logits_{i}"),
            Tensor::from_vec(p.low_res_logits.clone(), (k, lr, lr), &Device::Cpu)?,
        );
        tracing::info!(prompt = %prompt.name, masks = k, iou = ?p.iou_predictions, "predicted");
        done.insert(prompt.name.clone(), p);
    }
    candle_core::safetensors::save(&out, &args.out)?;
    Ok(())
}
