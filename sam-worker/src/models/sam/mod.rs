//! Segment Anything (SAM) with the ViT image encoder: ViT-B/L/H from the official checkpoints.
//!
//! - Paper: "Segment Anything", Kirillov et al. 2023, <https://arxiv.org/abs/2304.02643>
//! - Upstream: <https://github.com/facebookresearch/segment-anything> (`segment_anything/modeling/*`,
//!   `build_sam.py`); weight names follow `sam_vit_b_01ec64.pth` exactly.
//!
//! Built on `candle_transformers::models::segment_anything` where it is faithful (its `LayerNorm2d`,
//! `MlpBlock` and `linear`), with our own encoder/prompt encoder/decoder/transformer because the
//! upstream candle versions hard-code the sizes (patch 16, image 1024, window 14, MLP ratio 4, decoder
//! depth/heads/MLP, every LayerNorm eps), use the tanh approximation of GELU where SAM uses the exact
//! erf form (mask down-scaling and output up-scaling), panic (`todo!`) on rel-pos size mismatches and
//! do not expose box or mask prompts on `Sam`.

pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod transformer;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use image_encoder::ImageEncoderViT;
use mask_decoder::MaskDecoder;
use prompt_encoder::PromptEncoder;
use tiny_vit::{TinyVit, TinyVitConfig};

/// Hyper-parameters of a SAM model. Defaults are the official ViT-B (`build_sam_vit_b`); reduced test
/// models override fields in a JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamConfig {
    pub encoder_embed_dim: usize,
    pub encoder_depth: usize,
    pub encoder_num_heads: usize,
    pub encoder_global_attn_indexes: Vec<usize>,
    pub encoder_mlp_ratio: f64,
    pub window_size: usize,
    pub image_size: usize,
    pub vit_patch_size: usize,
    pub prompt_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub decoder_mlp_dim: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
    pub mask_in_chans: usize,
    pub num_multimask_outputs: usize,
    /// `norm_layer=partial(nn.LayerNorm, eps=1e-6)` of the encoder blocks.
    pub image_encoder_layer_norm_eps: f64,
    /// Every `LayerNorm2d` (encoder neck, mask down-scaling, output up-scaling).
    pub layernorm2d_eps: f64,
    /// The decoder transformer's `nn.LayerNorm`s (PyTorch default 1e-5).
    pub decoder_layer_norm_eps: f64,
    pub pixel_mean: [f64; 3],
    pub pixel_std: [f64; 3],
    pub mask_threshold: f64,
    /// MobileSAM: a TinyViT image encoder instead of the ViT (whose `encoder_*`, `window_size` and
    /// `image_encoder_layer_norm_eps` fields are then unused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiny_vit: Option<TinyVitConfig>,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self::vit_b()
    }
}

impl SamConfig {
    /// `build_sam_vit_b` (`sam_vit_b_01ec64.pth`).
    pub fn vit_b() -> Self {
        Self {
            encoder_embed_dim: 768,
            encoder_depth: 12,
            encoder_num_heads: 12,
            encoder_global_attn_indexes: vec![2, 5, 8, 11],
            encoder_mlp_ratio: 4.0,
            window_size: 14,
            image_size: 1024,
            vit_patch_size: 16,
            prompt_embed_dim: 256,
            decoder_depth: 2,
            decoder_num_heads: 8,
            decoder_mlp_dim: 2048,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            mask_in_chans: 16,
            num_multimask_outputs: 3,
            image_encoder_layer_norm_eps: 1e-6,
            layernorm2d_eps: 1e-6,
            decoder_layer_norm_eps: 1e-5,
            pixel_mean: [123.675, 116.28, 103.53],
            pixel_std: [58.395, 57.12, 57.375],
            mask_threshold: 0.0,
            tiny_vit: None,
        }
    }

    /// MobileSAM (`build_sam_vit_t`, `mobile_sam.pt`): TinyViT-5M encoder, ViT-B's prompt encoder and decoder.
    pub fn mobile_sam() -> Self {
        Self { tiny_vit: Some(TinyVitConfig::default()), ..Self::vit_b() }
    }

    /// `build_sam_vit_l` (`sam_vit_l_0b3195.pth`).
    pub fn vit_l() -> Self {
        Self {
            encoder_embed_dim: 1024,
            encoder_depth: 24,
            encoder_num_heads: 16,
            encoder_global_attn_indexes: vec![5, 11, 17, 23],
            ..Self::vit_b()
        }
    }

    /// `build_sam_vit_h` (`sam_vit_h_4b8939.pth`).
    pub fn vit_h() -> Self {
        Self {
            encoder_embed_dim: 1280,
            encoder_depth: 32,
            encoder_num_heads: 16,
            encoder_global_attn_indexes: vec![7, 15, 23, 31],
            ..Self::vit_b()
        }
    }

    /// The configuration a checkpoint with the official key names was saved from, read off its tensor
    /// shapes: ViT (any size, window, global blocks) or TinyViT, decoder depth, MLP and head sizes.
    /// Not visible in shapes, so kept at the official values: the decoder's head count, every eps,
    /// pixel mean/std and the mask threshold.
    pub fn from_shapes(shape: impl Fn(&str) -> Option<Vec<usize>>) -> std::result::Result<Self, String> {
        let dim = |key: &str, i: usize| -> std::result::Result<usize, String> {
            let s = shape(key).ok_or_else(|| format!("the checkpoint has no tensor {key}"))?;
            s.get(i)
                .copied()
                .ok_or_else(|| format!("{key} has shape {s:?}, expected at least {} dims", i + 1))
        };
        let count = |prefix: &str, suffix: &str| {
            (0..).take_while(|i| shape(&format!("{prefix}.{i}.{suffix}")).is_some()).count()
        };
        let mut cfg = Self::vit_b();
        let enc = "image_encoder";
        if shape(&format!("{enc}.layers.0.blocks.0.conv1.c.weight")).is_some() {
            let mut tv = TinyVitConfig::default();
            tv.embed_dims[0] = dim(&format!("{enc}.patch_embed.seq.2.c.weight"), 0)?;
            tv.depths[0] = count(&format!("{enc}.layers.0.blocks"), "conv1.c.weight");
            tv.mbconv_expand_ratio =
                dim(&format!("{enc}.layers.0.blocks.0.conv1.c.weight"), 0)? as f64 / tv.embed_dims[0] as f64;
            for s in 1..4 {
                let block = format!("{enc}.layers.{s}.blocks.0");
                let d = dim(&format!("{block}.attn.norm.weight"), 0)?;
                tv.embed_dims[s] = d;
                tv.depths[s] = count(&format!("{enc}.layers.{s}.blocks"), "attn.norm.weight");
                tv.num_heads[s] = dim(&format!("{block}.attn.attention_biases"), 0)?;
                // One bias per (|dy|, |dx|) offset in a w x w window: w^2 of them.
                let offsets = dim(&format!("{block}.attn.attention_biases"), 1)?;
                tv.window_sizes[s] = (offsets as f64).sqrt().round() as usize;
                tv.mlp_ratio = dim(&format!("{block}.mlp.fc1.weight"), 0)? as f64 / d as f64;
                tv.local_conv_size = dim(&format!("{block}.local_conv.c.weight"), 2)?;
            }
            cfg.tiny_vit = Some(tv);
        } else {
            let d = dim(&format!("{enc}.patch_embed.proj.weight"), 0)?;
            cfg.encoder_embed_dim = d;
            cfg.vit_patch_size = dim(&format!("{enc}.patch_embed.proj.weight"), 2)?;
            let grid = dim(&format!("{enc}.pos_embed"), 1)?;
            cfg.image_size = grid * cfg.vit_patch_size;
            cfg.encoder_depth = count(&format!("{enc}.blocks"), "attn.rel_pos_h");
            let rel = |i: usize| dim(&format!("{enc}.blocks.{i}.attn.rel_pos_h"), 0);
            cfg.encoder_global_attn_indexes = Vec::new();
            for i in 0..cfg.encoder_depth {
                // Global blocks attend over the whole grid: 2 * grid - 1 relative positions.
                if rel(i)? == 2 * grid - 1 {
                    cfg.encoder_global_attn_indexes.push(i);
                } else {
                    cfg.window_size = rel(i)?.div_ceil(2);
                }
            }
            let head_dim = dim(&format!("{enc}.blocks.0.attn.rel_pos_h"), 1)?;
            cfg.encoder_num_heads = d / head_dim.max(1);
            cfg.encoder_mlp_ratio = dim(&format!("{enc}.blocks.0.mlp.lin1.weight"), 0)? as f64 / d as f64;
        }
        cfg.prompt_embed_dim = dim(&format!("{enc}.neck.0.weight"), 0)?;
        let dec = "mask_decoder";
        cfg.decoder_depth = count(&format!("{dec}.transformer.layers"), "mlp.lin1.weight");
        cfg.decoder_mlp_dim = dim(&format!("{dec}.transformer.layers.0.mlp.lin1.weight"), 0)?;
        cfg.iou_head_depth = count(&format!("{dec}.iou_prediction_head.layers"), "weight");
        cfg.iou_head_hidden_dim = dim(&format!("{dec}.iou_prediction_head.layers.0.weight"), 0)?;
        cfg.num_multimask_outputs = dim(&format!("{dec}.mask_tokens.weight"), 0)?.saturating_sub(1);
        cfg.mask_in_chans = dim("prompt_encoder.mask_downscaling.3.weight", 0)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Side of the image-embedding grid (64 for the official models).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.vit_patch_size
    }

    /// Side of the low-resolution mask logits (256 for the official models).
    pub fn low_res_size(&self) -> usize {
        4 * self.grid_size()
    }

    /// Hidden size of the encoder MLP (`int(dim * mlp_ratio)` as in timm/SAM).
    pub fn encoder_mlp_dim(&self) -> usize {
        (self.encoder_embed_dim as f64 * self.encoder_mlp_ratio) as usize
    }

    /// Rejects configurations the model cannot be built from, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(self.vit_patch_size > 0 && self.image_size > 0, "image_size and vit_patch_size must be > 0")?;
        check(
            self.image_size.is_multiple_of(self.vit_patch_size),
            "image_size must be a multiple of vit_patch_size",
        )?;
        check(
            self.encoder_num_heads > 0 && self.encoder_embed_dim.is_multiple_of(self.encoder_num_heads),
            "encoder_embed_dim must be a multiple of encoder_num_heads",
        )?;
        check(self.encoder_depth > 0, "encoder_depth must be > 0")?;
        check(
            self.encoder_global_attn_indexes.iter().all(|&i| i < self.encoder_depth),
            "encoder_global_attn_indexes must be < encoder_depth",
        )?;
        check(self.encoder_mlp_dim() > 0, "encoder_mlp_ratio is too small")?;
        check(
            self.prompt_embed_dim >= 8 && self.prompt_embed_dim.is_multiple_of(8),
            "prompt_embed_dim must be a positive multiple of 8",
        )?;
        check(
            self.decoder_num_heads > 0 && (self.prompt_embed_dim / 2).is_multiple_of(self.decoder_num_heads),
            "prompt_embed_dim / 2 must be a multiple of decoder_num_heads",
        )?;
        check(
            self.mask_in_chans >= 4 && self.mask_in_chans.is_multiple_of(4),
            "mask_in_chans must be a positive multiple of 4",
        )?;
        check(self.num_multimask_outputs > 0, "num_multimask_outputs must be > 0")?;
        check(self.iou_head_depth > 0, "iou_head_depth must be > 0")?;
        check(
            self.pixel_std.iter().all(|&s| s != 0.0 && s.is_finite()),
            "pixel_std must be finite and non-zero",
        )?;
        check(self.pixel_mean.iter().all(|m| m.is_finite()), "pixel_mean must be finite")?;
        if let Some(tv) = &self.tiny_vit {
            tv.validate(self.image_size, self.vit_patch_size)?;
        }
        Ok(())
    }
}

/// The image encoder: SAM's ViT or MobileSAM's TinyViT, both under `image_encoder.`.
#[derive(Debug)]
pub enum ImageEncoder {
    Vit(ImageEncoderViT),
    TinyVit(TinyVit),
}

impl ImageEncoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        Ok(match &cfg.tiny_vit {
            Some(tv) => Self::TinyVit(TinyVit::load(vb, cfg, tv)?),
            None => Self::Vit(ImageEncoderViT::load(vb, cfg)?),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(e) => e.forward(xs),
            Self::TinyVit(e) => e.forward(xs),
        }
    }
}

/// The three SAM parts under their official prefixes (`image_encoder.`, `prompt_encoder.`,
/// `mask_decoder.`). `pixel_mean`/`pixel_std` are buffers outside the state dict: they come from the config.
#[derive(Debug)]
pub struct Sam {
    pub image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    pub config: SamConfig,
}

impl Sam {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("invalid SAM config: {e}")
        }
        let image_encoder = ImageEncoder::load(vb.pp("image_encoder"), cfg)?;
        let prompt_encoder = PromptEncoder::load(vb.pp("prompt_encoder"), cfg)?;
        let mask_decoder = MaskDecoder::load(vb.pp("mask_decoder"), cfg)?;
        Ok(Self { image_encoder, prompt_encoder, mask_decoder, config: cfg.clone() })
    }

    /// Image embeddings `[1, prompt_embed_dim, grid, grid]` of a normalised, padded `[1, 3, S, S]` input.
    pub fn embed_image(&self, input: &Tensor) -> Result<Tensor> {
        self.image_encoder.forward(input)
    }
}
