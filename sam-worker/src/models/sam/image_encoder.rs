//! SAM's ViT image encoder (`segment_anything/modeling/image_encoder.py`: `ImageEncoderViT`, `Block`,
//! `Attention`, windowing and decomposed relative positions), after ViTDet (<https://arxiv.org/abs/2203.16527>).
//!
//! Differences from `candle_transformers::models::segment_anything::image_encoder`: sizes, MLP ratio,
//! window and eps come from [`SamConfig`]; a rel-pos table of the wrong length is an error instead of a
//! panic in an unimplemented branch (the reference interpolates, which never happens with checkpoint-consistent configs).

use candle_core::{D, DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::segment_anything::LayerNorm2d;

use super::SamConfig;

#[derive(Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, num_heads: usize, input_size: (usize, usize)) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            // `head_dim**-0.5`
            scale: (head_dim as f64).powf(-0.5),
            rel_pos_h: vb.get((2 * input_size.0 - 1, head_dim), "rel_pos_h")?,
            rel_pos_w: vb.get((2 * input_size.1 - 1, head_dim), "rel_pos_w")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let nh = self.num_heads;
        let hd = c / nh;
        // (3, B * nHead, H * W, C)
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, h * w, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?
            .reshape((3, b * nh, h * w, hd))?;
        let q = qkv.i(0)?;
        let k = qkv.i(1)?;
        let v = qkv.i(2)?;
        let attn = (&q * self.scale)?.matmul(&k.t()?)?;
        let (rel_h, rel_w) = self.decomposed_rel_pos(&q, (h, w))?;
        let attn = osprey_kernels::softmax_with_rel_pos(attn, &rel_h, &rel_w)?;
        let xs = attn
            .matmul(&v)?
            .reshape((b, nh, h, w, hd))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, h, w, c))?;
        self.proj.forward(&xs)
    }

    /// `add_decomposed_rel_pos`'s two terms, for q and k of the same spatial size (always the case
    /// in SAM): `rel_h` `[B, qh * qw, kh]` and `rel_w` `[B, qh * qw, kw]`, which the softmax adds to
    /// `attn.view(B, qh, qw, kh, kw)` as `rel_h[..., None]` and `rel_w[..., None, :]`.
    fn decomposed_rel_pos(&self, q: &Tensor, (qh, qw): (usize, usize)) -> Result<(Tensor, Tensor)> {
        let r_h = get_rel_pos(qh, qh, &self.rel_pos_h)?; // (qh, kh, C)
        let r_w = get_rel_pos(qw, qw, &self.rel_pos_w)?; // (qw, kw, C)
        let (b, _, dim) = q.dims3()?;
        let r_q = q.reshape((b, qh, qw, dim))?;
        // einsum("bhwc,hkc->bhwk"): per row h, (w, c) x (c, k).
        let rel_h =
            r_q.matmul(&r_h.t()?.contiguous()?.unsqueeze(0)?.broadcast_as((b, qh, dim, qh))?.contiguous()?)?;
        // einsum("bhwc,wkc->bhwk"): per column w, (h, c) x (c, k).
        let rel_w = r_q
            .transpose(1, 2)?
            .contiguous()?
            .matmul(&r_w.t()?.contiguous()?.unsqueeze(0)?.broadcast_as((b, qw, dim, qw))?.contiguous()?)?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((rel_h.reshape((b, qh * qw, qh))?, rel_w.reshape((b, qh * qw, qw))?))
    }
}

/// `get_rel_pos`: rows of `rel_pos` indexed by `q - k + (k_size - 1)` (with SAM's scaling for unequal sizes).
fn get_rel_pos(q_size: usize, k_size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let max_rel_dist = 2 * q_size.max(k_size) - 1;
    let len = rel_pos.dim(0)?;
    if len != max_rel_dist {
        candle_core::bail!("rel_pos has {len} rows but {q_size}x{k_size} attention needs {max_rel_dist}")
    }
    let q_scale = (k_size as f64 / q_size as f64).max(1.0);
    let k_scale = (q_size as f64 / k_size as f64).max(1.0);
    let mut idx = Vec::with_capacity(q_size * k_size);
    for qi in 0..q_size {
        for ki in 0..k_size {
            let rel = qi as f64 * q_scale - ki as f64 * k_scale + (k_size as f64 - 1.0) * k_scale;
            idx.push(rel as u32);
        }
    }
    let idx = Tensor::from_vec(idx, q_size * k_size, rel_pos.device())?;
    rel_pos.index_select(&idx, 0)?.reshape((q_size, k_size, ()))
}

/// The block's MLP, `lin2(gelu(lin1(x)))` (`MLPBlock`); nn.GELU() is the exact erf form, computed
/// in place on the CPU.
#[derive(Debug)]
struct Mlp {
    lin1: Linear,
    lin2: Linear,
}

impl Mlp {
    fn load(dim: usize, mlp_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: candle_nn::linear(dim, mlp_dim, vb.pp("lin1"))?,
            lin2: candle_nn::linear(mlp_dim, dim, vb.pp("lin2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&osprey_kernels::gelu_erf(self.lin1.forward(xs)?)?)
    }
}

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    /// 0 for global attention.
    window_size: usize,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &SamConfig, window_size: usize) -> Result<Self> {
        let dim = cfg.encoder_embed_dim;
        let eps = cfg.image_encoder_layer_norm_eps;
        let grid = cfg.grid_size();
        let input_size = if window_size == 0 { (grid, grid) } else { (window_size, window_size) };
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            attn: Attention::load(vb.pp("attn"), dim, cfg.encoder_num_heads, input_size)?,
            norm2: candle_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            mlp: Mlp::load(dim, cfg.encoder_mlp_dim(), vb.pp("mlp"))?,
            window_size,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let shortcut = xs;
        let x = self.norm1.forward(xs)?;
        let x = if self.window_size > 0 {
            let (_, h, w, _) = x.dims4()?;
            let (windows, pad_hw) = window_partition(&x, self.window_size)?;
            let y = self.attn.forward(&windows)?;
            window_unpartition(&y, self.window_size, pad_hw, (h, w))?
        } else {
            self.attn.forward(&x)?
        };
        let x = (shortcut + x)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + mlp
    }
}

/// `[B, H, W, C]` → `[B * nW, ws, ws, C]` after zero-padding H and W up to multiples of `ws`.
fn window_partition(xs: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = xs.dims4()?;
    let pad_h = (ws - h % ws) % ws;
    let pad_w = (ws - w % ws) % ws;
    let xs = xs.pad_with_zeros(1, 0, pad_h)?.pad_with_zeros(2, 0, pad_w)?;
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = xs
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape(((), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// Inverse of [`window_partition`], dropping the padding.
fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let b = windows.dim(0)? / (hp * wp / ws / ws);
    let c = windows.dim(D::Minus1)?;
    let xs = windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, hp, wp, c))?;
    xs.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()
}

/// `ImageEncoderViT` with `use_abs_pos=True`, `use_rel_pos=True`, `qkv_bias=True` (all official models).
#[derive(Debug)]
pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck_conv1: Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: Conv2d,
    neck_ln2: LayerNorm2d,
}

impl ImageEncoderViT {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let dim = cfg.encoder_embed_dim;
        let out = cfg.prompt_embed_dim;
        let grid = cfg.grid_size();
        let patch_cfg = Conv2dConfig { stride: cfg.vit_patch_size, ..Default::default() };
        let patch_embed =
            candle_nn::conv2d(3, dim, cfg.vit_patch_size, patch_cfg, vb.pp("patch_embed.proj"))?;
        let pos_embed = vb.get((1, grid, grid, dim), "pos_embed")?;
        let vb_b = vb.pp("blocks");
        let blocks = (0..cfg.encoder_depth)
            .map(|i| {
                let ws = if cfg.encoder_global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                Block::load(vb_b.pp(i), cfg, ws)
            })
            .collect::<Result<Vec<_>>>()?;
        let eps = cfg.layernorm2d_eps;
        let neck_conv1 = candle_nn::conv2d_no_bias(dim, out, 1, Default::default(), vb.pp("neck.0"))?;
        let neck_ln1 = LayerNorm2d::new(out, eps, vb.pp("neck.1"))?;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let neck_conv2 = candle_nn::conv2d_no_bias(out, out, 3, pad1, vb.pp("neck.2"))?;
        let neck_ln2 = LayerNorm2d::new(out, eps, vb.pp("neck.3"))?;
        Ok(Self { patch_embed, pos_embed, blocks, neck_conv1, neck_ln1, neck_conv2, neck_ln2 })
    }

    /// `[B, 3, S, S]` normalised pixels → `[B, prompt_embed_dim, S/patch, S/patch]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.patch_embed.forward(&xs.to_dtype(DType::F32)?)?.permute((0, 2, 3, 1))?;
        let mut xs = xs.broadcast_add(&self.pos_embed)?.contiguous()?;
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        xs.permute((0, 3, 1, 2))?
            .contiguous()?
            .apply(&self.neck_conv1)?
            .apply(&self.neck_ln1)?
            .apply(&self.neck_conv2)?
            .apply(&self.neck_ln2)
    }
}
