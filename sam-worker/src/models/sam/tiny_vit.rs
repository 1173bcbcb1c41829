//! MobileSAM's image encoder: TinyViT (`mobile_sam/modeling/tiny_vit_sam.py`) with SAM's neck, weight
//! names as in the official `mobile_sam.pt` (`image_encoder.patch_embed.seq.*`, `layers.N.blocks.M.*`,
//! `layers.N.downsample.*`, `neck.*`).
//!
//! - Papers: "TinyViT", Wu et al. 2022, <https://arxiv.org/abs/2207.10666>; "Faster Segment Anything
//!   (MobileSAM)", Zhang et al. 2023, <https://arxiv.org/abs/2306.14289>.
//!
//! As in the reference: a conv stem (two stride-2 `Conv2d_BN`), a first stage of MBConv blocks, then
//! windowed-attention stages whose attention carries a learned bias per head and per |dy|,|dx| offset;
//! the merge into the last stage keeps the resolution (stride 1) so the output grid is `image_size / 16`,
//! and padded window tokens are zeros *before* the attention's LayerNorm (they take part as keys).
//! Every `Conv2d_BN` is folded into one convolution with bias at load time (eval-mode BatchNorm).
//! The classification head (`norm_head`, `head`) is in the checkpoint but unused.

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::segment_anything::LayerNorm2d;
use osprey_kernels::gelu_erf;
use serde::{Deserialize, Serialize};

use super::SamConfig;

/// TinyViT hyper-parameters; the defaults are MobileSAM's (`build_sam_vit_t`, TinyViT-5M at 1024).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TinyVitConfig {
    /// Channels of the four stages.
    pub embed_dims: Vec<usize>,
    /// Blocks per stage (the first stage's are MBConv blocks).
    pub depths: Vec<usize>,
    /// Attention heads per stage (the first entry is unused).
    pub num_heads: Vec<usize>,
    /// Attention window side per stage (the first entry is unused).
    pub window_sizes: Vec<usize>,
    pub mlp_ratio: f64,
    pub mbconv_expand_ratio: f64,
    pub local_conv_size: usize,
    /// `nn.LayerNorm` default in the attention and MLP.
    pub layer_norm_eps: f64,
    /// `nn.BatchNorm2d` default of every `Conv2d_BN`.
    pub batch_norm_eps: f64,
}

impl Default for TinyVitConfig {
    fn default() -> Self {
        Self {
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4.0,
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
            layer_norm_eps: 1e-5,
            batch_norm_eps: 1e-5,
        }
    }
}

impl TinyVitConfig {
    pub fn validate(&self, image_size: usize, patch: usize) -> std::result::Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(
            [self.depths.len(), self.num_heads.len(), self.window_sizes.len()] == [4; 3]
                && self.embed_dims.len() == 4,
            "tiny_vit: embed_dims, depths, num_heads and window_sizes need 4 entries (one per stage)",
        )?;
        check(
            patch == 16,
            "tiny_vit: vit_patch_size must be 16 (the TinyViT output grid is image_size / 16)",
        )?;
        check(image_size.is_multiple_of(16), "tiny_vit: image_size must be a multiple of 16")?;
        check(self.embed_dims.iter().all(|&d| d >= 2 && d % 2 == 0), "tiny_vit: embed_dims must be even")?;
        for s in 1..4 {
            check(
                self.num_heads[s] > 0 && self.embed_dims[s].is_multiple_of(self.num_heads[s]),
                "tiny_vit: embed_dims[s] must be a multiple of num_heads[s]",
            )?;
            check(self.window_sizes[s] > 0, "tiny_vit: window_sizes must be > 0")?;
        }
        check(self.local_conv_size % 2 == 1, "tiny_vit: local_conv_size must be odd")?;
        check(self.mlp_ratio > 0.0 && self.mbconv_expand_ratio > 0.0, "tiny_vit: ratios must be > 0")?;
        Ok(())
    }
}

/// `Conv2d_BN` folded into a convolution with bias: `w * g / sqrt(var + eps)`, `b - mean * g / sqrt(var + eps)`.
#[derive(Debug)]
struct ConvBn {
    /// `[out, in / groups, k, k]`.
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let w = vb.get((cout, cin / groups, k, k), "c.weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(cout, "weight")?;
        let beta = bn.get(cout, "bias")?;
        let mean = bn.get(cout, "running_mean")?;
        let var = bn.get(cout, "running_var")?;
        // Fold in double precision so the folded weights round once.
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        let scale = f64s(&gamma)?.broadcast_div(&(f64s(&var)? + eps)?.sqrt()?)?;
        let weight = f64s(&w)?.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?.to_dtype(DType::F32)?;
        let bias = (f64s(&beta)? - f64s(&mean)?.mul(&scale)?)?.to_dtype(DType::F32)?;
        Ok(Self { weight, bias, stride, padding, groups })
    }

    /// `[B, Cin, H, W]` → `[B, Cout, H', W']`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (cout, _, k, _) = self.weight.dims4()?;
        let ys = if k == 1 && self.groups == 1 && self.stride == 1 {
            // A 1x1 convolution is a matmul over channels.
            let (b, c, h, w) = xs.dims4()?;
            let w2 = self.weight.reshape((cout, c))?;
            w2.broadcast_matmul(&xs.reshape((b, c, h * w))?)?.reshape((b, cout, h, w))?
        } else if self.groups == cout && self.groups > 1 && xs.device().is_cpu() {
            depthwise_cpu(xs, &self.weight, self.stride, self.padding)?
        } else {
            let conv = Conv2d::new(
                self.weight.clone(),
                None,
                Conv2dConfig {
                    padding: self.padding,
                    stride: self.stride,
                    groups: self.groups,
                    ..Default::default()
                },
            );
            conv.forward(xs)?
        };
        ys.broadcast_add(&self.bias.reshape((1, cout, 1, 1))?)
    }
}

/// Depthwise convolution on the CPU (candle runs grouped convolutions one group at a time, which is
/// slow with hundreds of single-channel groups): `[B, C, H, W]`, weight `[C, 1, k, k]`, zero padding.
fn depthwise_cpu(xs: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let k = weight.dim(3)?;
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (w + 2 * pad - k) / stride + 1;
    let input = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let kernel = weight.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; b * c * oh * ow];
    let plane = |p: usize, dst: &mut [f32]| {
        let src = &input[p * h * w..(p + 1) * h * w];
        let kw = &kernel[(p % c) * k * k..(p % c + 1) * k * k];
        for oy in 0..oh {
            let row = &mut dst[oy * ow..(oy + 1) * ow];
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let src_row = &src[iy as usize * w..(iy as usize + 1) * w];
                for kx in 0..k {
                    let wv = kw[ky * k + kx];
                    // Output columns whose input column ox * stride + kx - pad is inside the row.
                    let first = pad.saturating_sub(kx).div_ceil(stride);
                    let last = ((w + pad - kx - 1) / stride + 1).min(ow);
                    for ox in first..last {
                        row[ox] += wv * src_row[ox * stride + kx - pad];
                    }
                }
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(b * c);
    let per = (b * c).div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per * oh * ow).enumerate() {
            let plane = &plane;
            s.spawn(move || {
                for (i, dst) in chunk.chunks_mut(oh * ow).enumerate() {
                    plane(t * per + i, dst);
                }
            });
        }
    });
    Tensor::from_vec(out, (b, c, oh, ow), &Device::Cpu)?.to_device(xs.device())
}

/// Inverted residual block of the first stage: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU.
#[derive(Debug)]
struct MbConv {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl MbConv {
    fn load(vb: VarBuilder, dim: usize, expand: f64, eps: f64) -> Result<Self> {
        let hidden = (dim as f64 * expand) as usize;
        Ok(Self {
            conv1: ConvBn::load(vb.pp("conv1"), dim, hidden, 1, 1, 0, 1, eps)?,
            conv2: ConvBn::load(vb.pp("conv2"), hidden, hidden, 3, 1, 1, hidden, eps)?,
            conv3: ConvBn::load(vb.pp("conv3"), hidden, dim, 1, 1, 0, 1, eps)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = gelu_erf(self.conv1.forward(xs)?)?;
        let ys = gelu_erf(self.conv2.forward(&ys)?)?;
        let ys = self.conv3.forward(&ys)?;
        gelu_erf((ys + xs)?)
    }
}

/// `PatchMerging`: 1x1, GELU, 3x3 depthwise (stride 2, or 1 into the last stage), GELU, 1x1.
#[derive(Debug)]
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl PatchMerging {
    fn load(vb: VarBuilder, dim: usize, out: usize, stride: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            conv1: ConvBn::load(vb.pp("conv1"), dim, out, 1, 1, 0, 1, eps)?,
            conv2: ConvBn::load(vb.pp("conv2"), out, out, 3, stride, 1, out, eps)?,
            conv3: ConvBn::load(vb.pp("conv3"), out, out, 1, 1, 0, 1, eps)?,
        })
    }

    /// `[B, C, H, W]` → `[B, C', H', W']`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = gelu_erf(self.conv1.forward(xs)?)?;
        let ys = gelu_erf(self.conv2.forward(&ys)?)?;
        self.conv3.forward(&ys)
    }
}

/// Window attention with a LayerNorm in front and a learned bias per head and |offset| (LeViT style).
#[derive(Debug)]
struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    /// `attention_biases[:, attention_bias_idxs]`: `[heads, N, N]`.
    bias: Tensor,
}

/// `attention_bias_idxs`: offsets `(|dy|, |dx|)` numbered in order of first appearance over all pairs.
fn attention_bias_idxs(res: usize) -> (Vec<u32>, usize) {
    let points: Vec<(usize, usize)> = (0..res).flat_map(|y| (0..res).map(move |x| (y, x))).collect();
    let mut offsets = std::collections::HashMap::new();
    let mut idxs = Vec::with_capacity(points.len() * points.len());
    for p1 in &points {
        for p2 in &points {
            let off = (p1.0.abs_diff(p2.0), p1.1.abs_diff(p2.1));
            let next = offsets.len() as u32;
            idxs.push(*offsets.entry(off).or_insert(next));
        }
    }
    (idxs, offsets.len())
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, num_heads: usize, window: usize, eps: f64) -> Result<Self> {
        let head_dim = dim / num_heads;
        let (idxs, n_offsets) = attention_bias_idxs(window);
        let n = window * window;
        let biases = vb.get((num_heads, n_offsets), "attention_biases")?;
        let idxs = Tensor::from_vec(idxs, n * n, biases.device())?;
        let bias = biases.index_select(&idxs, 1)?.reshape((num_heads, n, n))?;
        Ok(Self {
            norm: candle_nn::layer_norm(dim, eps, vb.pp("norm"))?,
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
            bias,
        })
    }

    /// `[B, N, C]` → `[B, N, C]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        // Per head the projection holds [q | k | v] (view(B, N, heads, -1).split([kd, kd, d])).
        let qkv = self
            .qkv
            .forward(&self.norm.forward(xs)?)?
            .reshape((b, n, nh, 3, hd))?
            .permute((3, 0, 2, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let attn = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.bias)?;
        let attn = osprey_kernels::softmax_last_dim(attn)?;
        let ys = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&ys)
    }
}

#[derive(Debug)]
struct Mlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, dim: usize, hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: candle_nn::layer_norm(dim, eps, vb.pp("norm"))?,
            fc1: candle_nn::linear(dim, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&gelu_erf(self.fc1.forward(&self.norm.forward(xs)?)?)?)
    }
}

#[derive(Debug)]
struct TinyVitBlock {
    attn: Attention,
    local_conv: ConvBn,
    mlp: Mlp,
    window: usize,
}

impl TinyVitBlock {
    fn load(vb: VarBuilder, cfg: &TinyVitConfig, stage: usize) -> Result<Self> {
        let dim = cfg.embed_dims[stage];
        let window = cfg.window_sizes[stage];
        let eps = cfg.layer_norm_eps;
        let (k, bn_eps) = (cfg.local_conv_size, cfg.batch_norm_eps);
        Ok(Self {
            attn: Attention::load(vb.pp("attn"), dim, cfg.num_heads[stage], window, eps)?,
            local_conv: ConvBn::load(vb.pp("local_conv"), dim, dim, k, 1, k / 2, dim, bn_eps)?,
            mlp: Mlp::load(vb.pp("mlp"), dim, (dim as f64 * cfg.mlp_ratio) as usize, eps)?,
            window,
        })
    }

    /// `[B, H, W, C]` → `[B, H, W, C]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let ws = self.window;
        let attended = if h == ws && w == ws {
            self.attn.forward(&xs.reshape((b, h * w, c))?)?.reshape((b, h, w, c))?
        } else {
            let (pad_b, pad_r) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
            let padded = xs.pad_with_zeros(1, 0, pad_b)?.pad_with_zeros(2, 0, pad_r)?;
            let (ph, pw) = (h + pad_b, w + pad_r);
            let (nh, nw) = (ph / ws, pw / ws);
            let windows = padded
                .reshape((b, nh, ws, nw, ws, c))?
                .transpose(2, 3)?
                .contiguous()?
                .reshape((b * nh * nw, ws * ws, c))?;
            let ys = self.attn.forward(&windows)?;
            let ys =
                ys.reshape((b, nh, nw, ws, ws, c))?.transpose(2, 3)?.contiguous()?.reshape((b, ph, pw, c))?;
            ys.narrow(1, 0, h)?.narrow(2, 0, w)?
        };
        let xs = (xs + attended)?;
        let conv = self.local_conv.forward(&xs.permute((0, 3, 1, 2))?.contiguous()?)?;
        let xs = conv.permute((0, 2, 3, 1))?.contiguous()?;
        let mlp = self.mlp.forward(&xs)?;
        xs + mlp
    }
}

/// TinyViT with SAM's neck: `[B, 3, S, S]` normalised pixels → `[B, prompt_embed_dim, S/16, S/16]`.
#[derive(Debug)]
pub struct TinyVit {
    stem1: ConvBn,
    stem2: ConvBn,
    mbconv: Vec<MbConv>,
    /// Stages 1..: their blocks.
    stages: Vec<Vec<TinyVitBlock>>,
    /// Merges after stages 0, 1, 2.
    merges: Vec<PatchMerging>,
    neck_conv1: Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: Conv2d,
    neck_ln2: LayerNorm2d,
}

impl TinyVit {
    pub fn load(vb: VarBuilder, cfg: &SamConfig, tv: &TinyVitConfig) -> Result<Self> {
        let bn = tv.batch_norm_eps;
        let dims = &tv.embed_dims;
        let stem = vb.pp("patch_embed.seq");
        let stem1 = ConvBn::load(stem.pp(0), 3, dims[0] / 2, 3, 2, 1, 1, bn)?;
        let stem2 = ConvBn::load(stem.pp(2), dims[0] / 2, dims[0], 3, 2, 1, 1, bn)?;
        let layers = vb.pp("layers");
        let mbconv = (0..tv.depths[0])
            .map(|i| MbConv::load(layers.pp(0).pp("blocks").pp(i), dims[0], tv.mbconv_expand_ratio, bn))
            .collect::<Result<Vec<_>>>()?;
        let stages = (1..4)
            .map(|s| {
                (0..tv.depths[s])
                    .map(|i| TinyVitBlock::load(layers.pp(s).pp("blocks").pp(i), tv, s))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = (0..3)
            .map(|s| {
                let stride = if s == 2 { 1 } else { 2 };
                PatchMerging::load(layers.pp(s).pp("downsample"), dims[s], dims[s + 1], stride, bn)
            })
            .collect::<Result<Vec<_>>>()?;
        let (last, out, eps) = (dims[3], cfg.prompt_embed_dim, cfg.layernorm2d_eps);
        let neck_conv1 = candle_nn::conv2d_no_bias(last, out, 1, Default::default(), vb.pp("neck.0"))?;
        let neck_ln1 = LayerNorm2d::new(out, eps, vb.pp("neck.1"))?;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let neck_conv2 = candle_nn::conv2d_no_bias(out, out, 3, pad1, vb.pp("neck.2"))?;
        let neck_ln2 = LayerNorm2d::new(out, eps, vb.pp("neck.3"))?;
        Ok(Self { stem1, stem2, mbconv, stages, merges, neck_conv1, neck_ln1, neck_conv2, neck_ln2 })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = gelu_erf(self.stem1.forward(&xs.to_dtype(DType::F32)?)?)?;
        let mut xs = self.stem2.forward(&xs)?;
        for block in &self.mbconv {
            xs = block.forward(&xs)?;
        }
        // NCHW between stages, NHWC inside the attention stages.
        for (merge, blocks) in self.merges.iter().zip(&self.stages) {
            let mut ys = merge.forward(&xs)?.permute((0, 2, 3, 1))?.contiguous()?;
            for block in blocks {
                ys = block.forward(&ys)?;
            }
            xs = ys.permute((0, 3, 1, 2))?.contiguous()?;
        }
        debug_assert_eq!(xs.dim(D::Minus1)?, xs.dim(D::Minus2)?);
        xs.apply(&self.neck_conv1)?.apply(&self.neck_ln1)?.apply(&self.neck_conv2)?.apply(&self.neck_ln2)
    }
}
