//! Osprey's mask-aware visual extractor: one `<mask>` token and one `<pos>` token per region.
//!
//! - Paper: "Osprey: Pixel Understanding with Visual Instruction Tuning",
//!   <https://arxiv.org/abs/2312.10032>.
//! - Upstream: `osprey/model/layer.py` (`MaskExtractor`, `MaskPooling`, `MLP`) in CircleRadon/Osprey.
//! - Spec: docs/MODEL.md#mask-extractor (keys `mask_extractor.*`), docs/MODEL.md#mask-pooling.
//!
//! `<mask>`: each level res2..res5 is mask-pooled ([`crate::pooling::mask_pool_levels`]), projected to
//! `mask_embed_dim` by its own linear, the four are summed and `feat_linear` maps the sum to the LLM
//! width. `<pos>`: the mask resized to `mask_shape²` (not binarised) through a 3-layer ReLU MLP.
//! Everything runs in f32, as upstream does whatever the checkpoint dtype.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::clip_convnext::Features;
use crate::config::VisionConfig;
use crate::pooling::{mask_pool_levels, mask_resize};

/// The two tokens of N regions, with the intermediates the parity tests compare.
#[derive(Debug, Clone)]
pub struct RegionTokens {
    /// `<mask>` tokens `[N, hidden]`.
    pub mask_tokens: Tensor,
    /// `<pos>` tokens `[N, hidden]`.
    pub pos_tokens: Tensor,
    /// Pooled features per level, `[N, C_level]`.
    pub pooled: [Tensor; 4],
    /// Sum of the projected levels, `[N, mask_embed_dim]`.
    pub mask_acc: Tensor,
    /// Resized masks, `[N, mask_shape²]`.
    pub pos_input: Tensor,
}

#[derive(Debug, Clone)]
pub struct MaskExtractor {
    /// `res2`..`res5`: per-level projections `C_level -> mask_embed_dim`.
    levels: [Linear; 4],
    feat_linear: Linear,
    /// `mask_linear.layers.{0,1,2}`.
    mask_linear: [Linear; 3],
    mask_shape: usize,
}

impl MaskExtractor {
    /// `vb` points at `mask_extractor`.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let embed = cfg.mask_embed_dim;
        let level = |i: usize| candle_nn::linear(cfg.dims[i], embed, vb.pp(format!("res{}", i + 2)));
        let mlp = vb.pp("mask_linear.layers");
        let pos_in = cfg.mask_shape * cfg.mask_shape;
        Ok(Self {
            levels: [level(0)?, level(1)?, level(2)?, level(3)?],
            feat_linear: candle_nn::linear(embed, cfg.hidden_size, vb.pp("feat_linear"))?,
            mask_linear: [
                candle_nn::linear(pos_in, embed, mlp.pp("0"))?,
                candle_nn::linear(embed, embed, mlp.pp("1"))?,
                candle_nn::linear(embed, cfg.hidden_size, mlp.pp("2"))?,
            ],
            mask_shape: cfg.mask_shape,
        })
    }

    /// Tokens for masks `[N, H, W]` (u8 or f32, values 0/1, at the original image resolution) over
    /// the features of one image (batch 1).
    pub fn forward(&self, features: &Features, masks: &Tensor) -> Result<RegionTokens> {
        masks.dims3()?;
        let levels_f32: Vec<Tensor> =
            features.levels.iter().map(|f| f.get(0)?.to_dtype(DType::F32)).collect::<Result<_>>()?;
        // All four levels in one call: each mask is read once.
        let pooled = mask_pool_levels(masks, &levels_f32)?;
        let mut acc: Option<Tensor> = None;
        for ((feat, proj), p) in features.levels.iter().zip(&self.levels).zip(&pooled) {
            let feat_dtype = feat.dtype();
            let mut y = forward_rows(proj, p)?;
            // Upstream casts each projection back to the feature dtype before summing in f32; a
            // no-op for f32 features, a rounding for f16/bf16 ones.
            if feat_dtype != DType::F32 {
                y = y.to_dtype(feat_dtype)?.to_dtype(DType::F32)?;
            }
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let mask_acc = acc.expect("four levels. This is a bug.");
        let mask_tokens = forward_rows(&self.feat_linear, &mask_acc)?;

        let pos_input = mask_resize(masks, self.mask_shape, self.mask_shape)?;
        let mut x = pos_input.clone();
        for (i, layer) in self.mask_linear.iter().enumerate() {
            x = forward_rows(layer, &x)?;
            if i < 2 {
                x = x.relu()?;
            }
        }
        let pos_tokens = x;
        let pooled: [Tensor; 4] = pooled.try_into().expect("four levels. This is a bug.");
        Ok(RegionTokens { mask_tokens, pos_tokens, pooled, mask_acc, pos_input })
    }
}

/// `layer(x)` for `x` `[N, in]`, also when N is 0 (no regions), which matmul kernels may refuse.
fn forward_rows(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n > 0 {
        return layer.forward(x);
    }
    let out = layer.weight().dim(0)?;
    Tensor::zeros((0, out), DType::F32, x.device())
}
