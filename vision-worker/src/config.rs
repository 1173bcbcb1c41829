//! The vision side of an Osprey `config.json`.
//!
//! Real checkpoints (`sunshine-lwt/Osprey-7b`, …) describe only the LLM and the projector; the
//! vision tower (OpenCLIP `convnext_large_d_320` at 512 px) and the mask extractor
//! (`MaskExtractor(mask_shape=112, embed_dim=1024)`) are hard-coded upstream
//! (docs/MODEL.md#checkpoints-and-weight-names). The optional fields below exist so that tests can
//! run reduced models; a real config has none of them and gets the upstream values.

use std::path::Path;

use serde::Deserialize;

use crate::error::VisionError;

/// ConvNeXt-L depths (timm `convnext_large`).
pub const DEFAULT_DEPTHS: [usize; 4] = [3, 3, 27, 3];
/// ConvNeXt-L widths of res2..res5.
pub const DEFAULT_DIMS: [usize; 4] = [192, 384, 768, 1536];
/// Square input side of the tower (`CLIPVisionTower(img_size=512)`).
pub const DEFAULT_IMAGE_SIZE: usize = 512;
/// `MaskExtractor(embed_dim=1024)`.
pub const DEFAULT_MASK_EMBED_DIM: usize = 1024;
/// `MaskExtractor(mask_shape=112)`: the `<pos>` input is the mask resized to 112x112.
pub const DEFAULT_MASK_SHAPE: usize = 112;

/// What the vision worker needs from `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionConfig {
    /// Blocks per ConvNeXt stage.
    pub depths: [usize; 4],
    /// Channels of res2..res5.
    pub dims: [usize; 4],
    /// Side of the square tower input.
    pub image_size: usize,
    /// Width of the mask extractor's per-level projections.
    pub mask_embed_dim: usize,
    /// Side of the `<pos>` mask input.
    pub mask_shape: usize,
    /// LLM width: the width of `<mask>` and `<pos>` tokens.
    pub hidden_size: usize,
    /// Projector input width (res4 channels).
    pub mm_hidden_size: usize,
    /// Open-CLIP weights file holding `visual.trunk.*`, relative to the checkpoint directory;
    /// read only when the checkpoint itself lacks the trunk.
    pub mm_vision_tower: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    hidden_size: usize,
    mm_hidden_size: Option<usize>,
    mm_vision_tower: Option<String>,
    vision_depths: Option<[usize; 4]>,
    vision_dims: Option<[usize; 4]>,
    image_size: Option<usize>,
    mask_embed_dim: Option<usize>,
    mask_shape: Option<usize>,
}

impl VisionConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let dims = raw.vision_dims.unwrap_or(DEFAULT_DIMS);
        Ok(Self {
            depths: raw.vision_depths.unwrap_or(DEFAULT_DEPTHS),
            dims,
            image_size: raw.image_size.unwrap_or(DEFAULT_IMAGE_SIZE),
            mask_embed_dim: raw.mask_embed_dim.unwrap_or(DEFAULT_MASK_EMBED_DIM),
            mask_shape: raw.mask_shape.unwrap_or(DEFAULT_MASK_SHAPE),
            hidden_size: raw.hidden_size,
            // builder.py: getattr(config, 'mm_hidden_size', 768), i.e. the res4 width.
            mm_hidden_size: raw.mm_hidden_size.unwrap_or(dims[2]),
            mm_vision_tower: raw.mm_vision_tower,
        })
    }

    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, VisionError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| VisionError::Io { path: path.clone(), source })?;
        let cfg = Self::from_json(&text)
            .map_err(|e| VisionError::Config { path: path.clone(), msg: e.to_string() })?;
        cfg.validate().map_err(|msg| VisionError::Config { path, msg })?;
        Ok(cfg)
    }

    /// The sizes the model code relies on; a config breaking them would fail deep inside candle.
    pub fn validate(&self) -> Result<(), String> {
        if self.dims.contains(&0) || self.depths.contains(&0) {
            return Err(format!(
                "vision_dims {:?} and vision_depths {:?} must be positive",
                self.dims, self.depths
            ));
        }
        // Stem stride 4, then three 2x2/2 downsamples: the input must split evenly into 32x32 cells.
        if self.image_size == 0 || !self.image_size.is_multiple_of(32) {
            return Err(format!("image_size {} must be a positive multiple of 32", self.image_size));
        }
        if self.mask_embed_dim == 0 || self.mask_shape == 0 || self.hidden_size == 0 {
            return Err("mask_embed_dim, mask_shape and hidden_size must be positive".into());
        }
        Ok(())
    }

    /// Spatial sizes of res2..res5 (strides 4, 8, 16, 32).
    pub fn level_sizes(&self) -> [usize; 4] {
        [4, 8, 16, 32].map(|stride| self.image_size / stride)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_config_gets_upstream_values() {
        let cfg = VisionConfig::from_json(
            r#"{"hidden_size": 4096, "mm_vision_tower": "open_clip_pytorch_model.bin",
                "mm_projector_type": "mlp2x_gelu", "vocab_size": 32000}"#,
        )
        .unwrap();
        assert_eq!(cfg.depths, [3, 3, 27, 3]);
        assert_eq!(cfg.dims, [192, 384, 768, 1536]);
        assert_eq!((cfg.image_size, cfg.mask_embed_dim, cfg.mask_shape), (512, 1024, 112));
        assert_eq!((cfg.hidden_size, cfg.mm_hidden_size), (4096, 768));
        assert_eq!(cfg.level_sizes(), [128, 64, 32, 16]);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn tiny_config_overrides() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision/tiny/tiny_st");
        let cfg = VisionConfig::from_dir(&dir).unwrap();
        assert_eq!(cfg.depths, [1, 1, 2, 1]);
        assert_eq!(cfg.dims, [8, 16, 24, 32]);
        assert_eq!((cfg.image_size, cfg.mask_embed_dim, cfg.mask_shape), (64, 16, 8));
        assert_eq!((cfg.hidden_size, cfg.mm_hidden_size), (32, 24));
        assert_eq!(cfg.mm_vision_tower.as_deref(), Some("open_clip_pytorch_model.bin"));
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(VisionConfig::from_json(r#"{"mm_vision_tower": "x"}"#).is_err());
        let cfg = VisionConfig::from_json(r#"{"hidden_size": 8, "image_size": 100}"#).unwrap();
        assert!(cfg.validate().is_err());
    }
}
