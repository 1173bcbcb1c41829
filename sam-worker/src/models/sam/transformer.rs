//! SAM's two-way transformer (`segment_anything/modeling/transformer.py`: `TwoWayTransformer`,
//! `TwoWayAttentionBlock`, `Attention`).
//!
//! Same maths as `candle_transformers::models::segment_anything::transformer`, but depth, heads, MLP
//! size and LayerNorm eps come from [`SamConfig`] (candle hard-codes 2/8/2048/1e-5 inside the decoder),
//! and the attention divides by `sqrt(c_per_head)` like the reference instead of multiplying by its inverse.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::segment_anything::MlpBlock;

use super::SamConfig;

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, num_heads: usize, downsample_rate: usize) -> Result<Self> {
        let internal = dim / downsample_rate;
        Ok(Self {
            q_proj: candle_nn::linear(dim, internal, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(dim, internal, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(dim, internal, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(internal, dim, vb.pp("out_proj"))?,
            num_heads,
        })
    }

    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.num_heads, c / self.num_heads))?.transpose(1, 2)?.contiguous()
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.separate_heads(&self.q_proj.forward(q)?)?;
        let k = self.separate_heads(&self.k_proj.forward(k)?)?;
        let v = self.separate_heads(&self.v_proj.forward(v)?)?;
        let (b, nh, n, c_per_head) = q.dims4()?;
        let denom = Tensor::new((c_per_head as f64).sqrt() as f32, q.device())?;
        let attn = q.matmul(&k.t()?)?.broadcast_div(&denom)?;
        let attn = osprey_kernels::softmax_last_dim(attn)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, n, nh * c_per_head))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct TwoWayAttentionBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: LayerNorm,
    mlp: MlpBlock,
    norm3: LayerNorm,
    cross_attn_image_to_token: Attention,
    norm4: LayerNorm,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn load(vb: VarBuilder, cfg: &SamConfig, skip_first_layer_pe: bool) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let heads = cfg.decoder_num_heads;
        let eps = cfg.decoder_layer_norm_eps;
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), dim, heads, 1)?,
            norm1: candle_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            cross_attn_token_to_image: Attention::load(vb.pp("cross_attn_token_to_image"), dim, heads, 2)?,
            norm2: candle_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            mlp: MlpBlock::new(dim, cfg.decoder_mlp_dim, candle_nn::Activation::Relu, vb.pp("mlp"))?,
            norm3: candle_nn::layer_norm(dim, eps, vb.pp("norm3"))?,
            cross_attn_image_to_token: Attention::load(vb.pp("cross_attn_image_to_token"), dim, heads, 2)?,
            norm4: candle_nn::layer_norm(dim, eps, vb.pp("norm4"))?,
            skip_first_layer_pe,
        })
    }

    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // Self attention (the first layer has no residual and no positional encoding).
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;

        // Tokens attending to the image.
        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)?)?;
        let queries = self.norm2.forward(&queries)?;

        // MLP.
        let queries = (&queries + self.mlp.forward(&queries)?)?;
        let queries = self.norm3.forward(&queries)?;

        // Image attending to the tokens.
        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let keys = (keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)?)?;
        let keys = self.norm4.forward(&keys)?;
        Ok((queries, keys))
    }
}

#[derive(Debug)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayAttentionBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let vb_l = vb.pp("layers");
        let layers = (0..cfg.decoder_depth)
            .map(|i| TwoWayAttentionBlock::load(vb_l.pp(i), cfg, i == 0))
            .collect::<Result<Vec<_>>>()?;
        let dim = cfg.prompt_embed_dim;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::load(
                vb.pp("final_attn_token_to_image"),
                dim,
                cfg.decoder_num_heads,
                /* downsample_rate */ 2,
            )?,
            norm_final_attn: candle_nn::layer_norm(
                dim,
                cfg.decoder_layer_norm_eps,
                vb.pp("norm_final_attn"),
            )?,
        })
    }

    /// `image_embedding`/`image_pe`: `[B, C, h, w]`; `point_embedding`: `[B, N, C]`.
    /// Returns the processed tokens `[B, N, C]` and image keys `[B, h*w, C]`.
    pub fn forward(
        &self,
        image_embedding: &Tensor,
        image_pe: &Tensor,
        point_embedding: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let image_embedding = image_embedding.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let image_pe = image_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut queries = point_embedding.clone();
        let mut keys = image_embedding;
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, point_embedding, &image_pe)?;
        }
        let q = (&queries + point_embedding)?;
        let k = (&keys + &image_pe)?;
        let attn_out = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn_out)?)?;
        Ok((queries, keys))
    }
}
