//! SAM's prompt encoder (`segment_anything/modeling/prompt_encoder.py`: `PromptEncoder`,
//! `PositionEmbeddingRandom`).
//!
//! Differences from `candle_transformers::models::segment_anything::prompt_encoder`: the mask
//! down-scaling uses the exact (erf) GELU like `nn.GELU()` (candle uses the tanh approximation), eps and
//! sizes come from [`SamConfig`], and points/boxes/masks are taken as plain values.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use candle_transformers::models::segment_anything::LayerNorm2d;
use osprey_kernels::gelu_erf;

use super::SamConfig;

/// Point labels as the model sees them: 1 foreground, 0 background, -1 padding ("not a point").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointLabel {
    Background,
    Foreground,
    Padding,
}

#[derive(Debug)]
struct PositionEmbeddingRandom {
    gaussian: Tensor,
}

impl PositionEmbeddingRandom {
    /// `coords` in `[0, 1]`, shape `[..., 2]` → `[..., 2 * num_pos_feats]` (sin then cos).
    fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let coords = ((coords * 2.0)? - 1.0)?;
        let coords = coords.broadcast_matmul(&self.gaussian)?;
        let coords = (coords * (2.0 * std::f64::consts::PI))?;
        Tensor::cat(&[coords.sin()?, coords.cos()?], D::Minus1)
    }

    /// Dense positional encoding of a `h x w` grid: `[2 * num_pos_feats, h, w]`.
    fn grid(&self, h: usize, w: usize) -> Result<Tensor> {
        let dev = self.gaussian.device();
        let xs: Vec<f32> = (0..w).map(|x| (x as f32 + 1.0 - 0.5) / w as f32).collect();
        let ys: Vec<f32> = (0..h).map(|y| (y as f32 + 1.0 - 0.5) / h as f32).collect();
        let x = Tensor::from_vec(xs, (1, w), dev)?.broadcast_as((h, w))?;
        let y = Tensor::from_vec(ys, (h, 1), dev)?.broadcast_as((h, w))?;
        let coords = Tensor::stack(&[&x, &y], D::Minus1)?;
        self.pe_encoding(&coords)?.permute((2, 0, 1))
    }
}

#[derive(Debug)]
pub struct PromptEncoder {
    pe_layer: PositionEmbeddingRandom,
    /// `point_embeddings.{0..3}`: background, foreground, box top-left, box bottom-right.
    point_embeddings: Vec<Tensor>,
    not_a_point_embed: Tensor,
    no_mask_embed: Tensor,
    mask_conv1: Conv2d,
    mask_ln1: LayerNorm2d,
    mask_conv2: Conv2d,
    mask_ln2: LayerNorm2d,
    mask_conv3: Conv2d,
    embed_dim: usize,
    grid: usize,
    input_size: usize,
}

impl PromptEncoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let mic = cfg.mask_in_chans;
        let gaussian = vb.get((2, dim / 2), "pe_layer.positional_encoding_gaussian_matrix")?;
        let point_embeddings = (0..4)
            .map(|i| vb.get((1, dim), &format!("point_embeddings.{i}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let s2 = Conv2dConfig { stride: 2, ..Default::default() };
        let eps = cfg.layernorm2d_eps;
        Ok(Self {
            pe_layer: PositionEmbeddingRandom { gaussian },
            point_embeddings,
            not_a_point_embed: vb.get((1, dim), "not_a_point_embed.weight")?,
            no_mask_embed: vb.get((1, dim), "no_mask_embed.weight")?,
            mask_conv1: candle_nn::conv2d(1, mic / 4, 2, s2, vb.pp("mask_downscaling.0"))?,
            mask_ln1: LayerNorm2d::new(mic / 4, eps, vb.pp("mask_downscaling.1"))?,
            mask_conv2: candle_nn::conv2d(mic / 4, mic, 2, s2, vb.pp("mask_downscaling.3"))?,
            mask_ln2: LayerNorm2d::new(mic, eps, vb.pp("mask_downscaling.4"))?,
            mask_conv3: candle_nn::conv2d(mic, dim, 1, Default::default(), vb.pp("mask_downscaling.6"))?,
            embed_dim: dim,
            grid: cfg.grid_size(),
            input_size: cfg.image_size,
        })
    }

    fn device(&self) -> &Device {
        self.no_mask_embed.device()
    }

    /// `get_dense_pe()`: `[1, embed_dim, grid, grid]`.
    pub fn dense_pe(&self) -> Result<Tensor> {
        self.pe_layer.grid(self.grid, self.grid)?.unsqueeze(0)
    }

    /// `forward_with_coords` for model-input pixel coordinates (before the +0.5), `[1, N, 2]`.
    fn embed_coords(&self, coords: &[[f32; 2]]) -> Result<Tensor> {
        let flat: Vec<f32> = coords.iter().flat_map(|c| [c[0], c[1]]).collect();
        let t = Tensor::from_vec(flat, (1, coords.len(), 2), self.device())?;
        // Pixel centres, then normalised by the (square) model input size.
        let t = ((t + 0.5)? / self.input_size as f64)?;
        self.pe_layer.pe_encoding(&t)
    }

    fn embed_points(&self, coords: &[[f32; 2]], labels: &[PointLabel]) -> Result<Tensor> {
        let pe = self.embed_coords(coords)?;
        // Padding points get not_a_point_embed instead of their positional encoding; others add the label row.
        let keep: Vec<f32> =
            labels.iter().map(|l| if *l == PointLabel::Padding { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (1, labels.len(), 1), self.device())?;
        let rows = labels
            .iter()
            .map(|l| match l {
                PointLabel::Background => &self.point_embeddings[0],
                PointLabel::Foreground => &self.point_embeddings[1],
                PointLabel::Padding => &self.not_a_point_embed,
            })
            .collect::<Vec<_>>();
        let add = Tensor::cat(&rows, 0)?.unsqueeze(0)?;
        pe.broadcast_mul(&keep)? + add
    }

    fn embed_box(&self, bx: [f32; 4]) -> Result<Tensor> {
        let pe = self.embed_coords(&[[bx[0], bx[1]], [bx[2], bx[3]]])?; // [1, 2, C]
        let corners =
            Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0)?.unsqueeze(0)?;
        pe + corners
    }

    fn embed_mask(&self, mask: &Tensor) -> Result<Tensor> {
        let x = gelu_erf(mask.apply(&self.mask_conv1)?.apply(&self.mask_ln1)?)?;
        gelu_erf(x.apply(&self.mask_conv2)?.apply(&self.mask_ln2)?)?.apply(&self.mask_conv3)
    }

    /// Sparse `[1, N, C]` and dense `[1, C, grid, grid]` embeddings for one prompt. Coordinates are in
    /// model-input pixels (already scaled by ResizeLongestSide); `mask` is `[1, 1, 4*grid, 4*grid]` logits.
    pub fn forward(
        &self,
        points: Option<(&[[f32; 2]], &[PointLabel])>,
        bx: Option<[f32; 4]>,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let mut sparse = Vec::new();
        if let Some((coords, labels)) = points {
            let (mut coords, mut labels) = (coords.to_vec(), labels.to_vec());
            if bx.is_none() {
                coords.push([0.0, 0.0]);
                labels.push(PointLabel::Padding);
            }
            sparse.push(self.embed_points(&coords, &labels)?);
        }
        if let Some(bx) = bx {
            sparse.push(self.embed_box(bx)?);
        }
        let sparse = if sparse.is_empty() {
            Tensor::zeros((1, 0, self.embed_dim), DType::F32, self.device())?
        } else {
            Tensor::cat(&sparse, 1)?
        };
        let dense = match mask {
            Some(mask) => self.embed_mask(mask)?,
            None => self
                .no_mask_embed
                .reshape((1, self.embed_dim, 1, 1))?
                .broadcast_as((1, self.embed_dim, self.grid, self.grid))?
                .contiguous()?,
        };
        Ok((sparse, dense))
    }
}
