//! Osprey's vision models and the loader that builds them from a checkpoint directory.

pub mod clip_convnext;
pub mod kernels;
pub mod mask_extractor;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use osprey_common::image::RgbImage;

use crate::config::VisionConfig;
use crate::error::VisionError;
use crate::preprocess::{Preprocessed, preprocess};
use crate::weights::{LoadErrors, OspreyVisionResolver, var_builder};
use clip_convnext::{ConvNeXt, Features};
use mask_extractor::{MaskExtractor, RegionTokens};

/// Where the trunk sits in an Osprey checkpoint (no trailing dot, for `vb.pp`).
pub const TRUNK_PATH: &str = "model.vision_tower.vision_tower.visual.trunk";
/// Where the mask extractor sits (top level of `OspreyLlamaForCausalLM`).
pub const MASK_EXTRACTOR_PATH: &str = "mask_extractor";

/// A `VarBuilder` over an Osprey checkpoint directory, with Osprey's names (the trunk possibly
/// read from the Open-CLIP file), every tensor as f32 on `device`.
pub fn osprey_var_builder(
    dir: &Path,
    cfg: &VisionConfig,
    device: &Device,
) -> Result<(VarBuilder<'static>, LoadErrors), VisionError> {
    let resolver = OspreyVisionResolver::open(dir, cfg.mm_vision_tower.as_deref())?;
    Ok(var_builder(resolver, DType::F32, device))
}

/// The vision side of Osprey: the ConvNeXt trunk and the mask extractor.
#[derive(Debug, Clone)]
pub struct VisionModel {
    pub config: VisionConfig,
    pub trunk: ConvNeXt,
    pub extractor: MaskExtractor,
    device: Device,
}

impl VisionModel {
    /// Builds the model from a `VarBuilder` with Osprey's names.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> candle_core::Result<Self> {
        Ok(Self {
            config: cfg.clone(),
            trunk: ConvNeXt::load(vb.pp(TRUNK_PATH), cfg)?,
            extractor: MaskExtractor::load(vb.pp(MASK_EXTRACTOR_PATH), cfg)?,
            device: vb.device().clone(),
        })
    }

    /// Reads `DIR/config.json` and the weights of `DIR` (see [`crate::weights`]).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self, VisionError> {
        let cfg = VisionConfig::from_dir(dir)?;
        let (vb, errors) = osprey_var_builder(dir, &cfg, device)?;
        Self::load(vb, &cfg).map_err(|e| VisionError::Weights(errors.explain(e)))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Preprocesses an image and runs the trunk.
    pub fn encode(&self, image: &RgbImage) -> Result<(Preprocessed, Features), VisionError> {
        let pre = preprocess(
            image.pixels(),
            image.width() as usize,
            image.height() as usize,
            self.config.image_size,
            &self.device,
        )?;
        let features = self.trunk.forward(&pre.pixel_values)?;
        Ok((pre, features))
    }

    /// Region tokens for masks `[N, H, W]` (u8 or f32, 0/1) of an image of `image_hw` (H, W).
    pub fn regions(
        &self,
        features: &Features,
        masks: &Tensor,
        image_hw: (usize, usize),
    ) -> Result<RegionTokens, VisionError> {
        let (n, mh, mw) = masks.dims3().map_err(|_| {
            VisionError::InvalidInput(format!("masks must be [N, H, W], got {:?}", masks.dims()))
        })?;
        if n > 0 && (mh, mw) != image_hw {
            return Err(VisionError::MaskSize {
                index: 0,
                mask_height: mh,
                mask_width: mw,
                image_height: image_hw.0,
                image_width: image_hw.1,
            });
        }
        check_binary(masks)?;
        Ok(self.extractor.forward(features, &masks.to_device(&self.device)?)?)
    }
}

/// Masks must hold 0/1 (upstream passes 0/1 floats; a 0/255 mask would scale the `<pos>` input).
fn check_binary(masks: &Tensor) -> Result<(), VisionError> {
    let dtype = masks.dtype();
    if !matches!(dtype, DType::U8 | DType::F32) {
        return Err(VisionError::InvalidInput(format!("masks must be u8 or f32, got {dtype:?}")));
    }
    if masks.dim(0)? == 0 {
        return Ok(());
    }
    let m = masks.flatten_from(1)?;
    // Per mask: whether some value is neither 0 nor 1 (for u8, whether the maximum exceeds 1,
    // which needs no f32 copy of the masks).
    let bad: Vec<u8> = if dtype == DType::U8 {
        m.max(1)?.gt(1.0)?.to_vec1()?
    } else {
        m.ne(0.0)?.mul(&m.ne(1.0)?)?.max(1)?.to_vec1()?
    };
    match bad.iter().position(|&b| b > 0) {
        Some(index) => {
            Err(VisionError::InvalidInput(format!("mask {index} holds values other than 0 and 1")))
        }
        None => Ok(()),
    }
}
