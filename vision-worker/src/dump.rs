//! `vision-worker dump`: every tensor of the vision side for one image and its masks, written to a
//! safetensors file, for comparing with the Python reference.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use osprey_common::image::{ImageLimits, decode_image};

use crate::error::VisionError;
use crate::models::VisionModel;
use crate::models::clip_convnext::Features;

/// Runs the model of `weights` on `image` and `masks` (a safetensors file with `masks`
/// `[N, H, W]` u8 or f32 at the image resolution) and writes `pixel_values` `[1, 3, S, S]`,
/// `res2`..`res5` `[1, C, h, w]`, `mask_tokens` and `pos_tokens` `[N, hidden]` (all f32) to `out`.
pub fn run(weights: &Path, image: &Path, masks: &Path, out: &Path) -> Result<(), VisionError> {
    let device = Device::Cpu;
    let model = VisionModel::from_dir(weights, &device)?;
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| VisionError::Io { path: path.into(), source });
    let image = decode_image(&read(image)?, &ImageLimits::default())?;
    let masks = read_masks(masks)?;

    let (pre, features) = model.encode(&image)?;
    let image_hw = (image.height() as usize, image.width() as usize);
    let tokens = model.regions(&features, &masks, image_hw)?;

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("pixel_values".into(), pre.pixel_values);
    for (name, level) in Features::NAMES.iter().zip(features.levels) {
        tensors.insert((*name).into(), level.to_dtype(DType::F32)?);
    }
    tensors.insert("mask_tokens".into(), tokens.mask_tokens);
    tensors.insert("pos_tokens".into(), tokens.pos_tokens);
    candle_core::safetensors::save(&tensors, out).map_err(|e| match e {
        candle_core::Error::Io(source) => VisionError::Io { path: out.into(), source },
        other => VisionError::from(other),
    })
}

/// Reads the `masks` tensor of a safetensors file.
pub fn read_masks(path: &Path) -> Result<Tensor, VisionError> {
    let bad = |msg: String| VisionError::InvalidInput(format!("{}: {msg}", path.display()));
    let bytes = std::fs::read(path).map_err(|source| VisionError::Io { path: path.into(), source })?;
    let mut tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let masks = tensors.remove("masks").ok_or_else(|| bad("no tensor named \"masks\"".into()))?;
    if masks.rank() != 3 || !matches!(masks.dtype(), DType::U8 | DType::F32) {
        return Err(bad(format!(
            "masks must be u8 or f32 [N, H, W], got {:?} {:?}",
            masks.dtype(),
            masks.dims()
        )));
    }
    Ok(masks)
}
