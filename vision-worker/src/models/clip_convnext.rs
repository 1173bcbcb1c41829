//! The ConvNeXt trunk of OpenCLIP `convnext_large_d_320` as Osprey uses it: the four stage
//! outputs res2..res5, no pooling, no head.
//!
//! - Paper: "A ConvNet for the 2020s", <https://arxiv.org/abs/2201.03545>.
//! - Upstream: timm `timm/models/convnext.py` (`ConvNeXt`, `ConvNeXtStage`, `ConvNeXtBlock` with
//!   `conv_mlp=False`), wrapped by OpenCLIP `src/open_clip/timm_model.py`; Osprey's forward is
//!   `osprey/model/multimodal_encoder/clip.py::CLIP.extract_features` (CircleRadon/Osprey).
//! - Spec: docs/MODEL.md#clip-convnext-l-trunk, key names in docs/MODEL.md#checkpoints-and-weight-names
//!   (timm names relative to `visual.trunk.`).
//!
//! candle-transformers has a timm ConvNeXt, but its forward returns only pooled features and its
//! stage builders are private, so the trunk is written here.
//!
//! Between the stem and each stage output the activations are channels-last (`[B, H, W, C]`), so
//! the block's LayerNorm, MLP and depthwise convolution all run over contiguous channels. On the
//! CPU (f32) a block is one fused kernel (see [`super::kernels::block`]); on other devices the
//! same math runs as candle ops ([`Block::forward_ops`], also the CPU kernels' test oracle). The stage outputs are returned channels-first, as upstream's.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::kernels::{self, DW_KERNEL, DwParams, MlpParams, NormParams};
use crate::config::VisionConfig;

/// timm's `LayerNorm2d` and block norms use eps 1e-6 (not PyTorch's 1e-5 default).
const LN_EPS: f64 = 1e-6;

/// `[B, C, H, W]` to `[B, H, W, C]` (contiguous).
fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}

/// `[B, H, W, C]` to `[B, C, H, W]` (contiguous).
fn to_channels_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

/// A convolution whose stride equals its kernel (the patch stem, the downsamples), kept both as
/// candle's `Conv2d` (the ops path) and as one matmul over channels-last patches: no im2col and no
/// permutes to channels-first and back, so it costs what the matmul costs.
#[derive(Debug, Clone)]
struct Patchify {
    conv: Conv2d,
    /// `[k * k * C_in, C_out]`, rows in the patches' (kernel row, kernel column, channel) order.
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
}

impl Patchify {
    fn load(in_dim: usize, out_dim: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let conv_weight = vb.get((out_dim, in_dim, kernel, kernel), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        let weight = conv_weight
            .permute((0, 2, 3, 1))?
            .reshape((out_dim, kernel * kernel * in_dim))?
            .t()?
            .contiguous()?;
        let config = Conv2dConfig { stride: kernel, ..Default::default() };
        let conv = Conv2d::new(conv_weight, Some(bias.clone()), config);
        Ok(Self { conv, weight, bias, kernel })
    }

    /// Channels-last `[B, H, W, C_in]` to channels-last `[B, H / k, W / k, C_out]` (a remainder
    /// of rows or columns is dropped, as the convolution does).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let k = self.kernel;
        let (ho, wo) = (h / k, w / k);
        let x =
            if h % k != 0 || w % k != 0 { x.narrow(1, 0, ho * k)?.narrow(2, 0, wo * k)? } else { x.clone() };
        let patches = x
            .reshape((b, ho, k, wo, k, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * ho * wo, k * k * c))?;
        let y = patches.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        y.reshape((b, ho, wo, self.weight.dim(1)?))
    }

    /// The same with candle's convolution, channels-last in and out.
    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        to_channels_last(&to_channels_first(x)?.apply(&self.conv)?)
    }
}

/// A layer norm over the last axis, with its parameters also as CPU vectors for the kernels.
#[derive(Debug, Clone)]
struct Norm {
    ops: LayerNorm,
    cpu: Option<NormParams>,
}

impl Norm {
    fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let cpu = if kernels::is_cpu_f32(&weight) {
            Some(NormParams { weight: weight.to_vec1()?, bias: bias.to_vec1()?, eps: LN_EPS as f32 })
        } else {
            None
        };
        Ok(Self { ops: LayerNorm::new(weight, bias, LN_EPS), cpu })
    }

    /// Over the last axis of a channels-last tensor.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.cpu {
            Some(p) if kernels::is_cpu_f32(x) => kernels::layer_norm_last(x, p),
            _ => x.contiguous()?.apply(&self.ops),
        }
    }
}

/// Depthwise 7x7 convolution (`Conv2d(C, C, 7, padding=3, groups=C)`) weights: tap-major CPU
/// vectors for the kernel, and `[49, C]` for the candle-ops path. candle's grouped `conv2d` runs
/// one convolution per channel, 6-7x slower than even 49 shifted multiply-adds.
#[derive(Debug, Clone)]
struct DepthwiseConv {
    /// `[49, C]`: row t holds every channel's weight at kernel position t (row-major 7x7).
    taps: Tensor,
    bias: Tensor,
    cpu: Option<DwParams>,
}

impl DepthwiseConv {
    fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get((channels, 1, DW_KERNEL, DW_KERNEL), "weight")?;
        let bias = vb.get(channels, "bias")?;
        let taps = weight.reshape((channels, DW_KERNEL * DW_KERNEL))?.t()?.contiguous()?;
        let cpu = if kernels::is_cpu_f32(&weight) {
            Some(DwParams::from_torch(&weight.flatten_all()?.to_vec1()?, &bias.to_vec1()?)?)
        } else {
            None
        };
        Ok(Self { taps, bias, cpu })
    }

    /// The convolution of a channels-last `[B, H, W, C]` tensor as 49 shifted multiply-adds over
    /// the zero-padded input (the candle-ops path).
    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let pad = DW_KERNEL / 2;
        let padded = x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
        let mut acc = self.bias.clone();
        for t in 0..DW_KERNEL * DW_KERNEL {
            let (dy, dx) = (t / DW_KERNEL, t % DW_KERNEL);
            let window = padded.narrow(1, dy, h)?.narrow(2, dx, w)?;
            acc = acc.broadcast_add(&window.broadcast_mul(&self.taps.get(t)?)?)?;
        }
        Ok(acc)
    }
}

/// `ConvNeXtBlock`: `x + gamma * fc2(gelu(fc1(norm(dwconv7x7(x)))))`, channels-last.
#[derive(Debug, Clone)]
pub struct Block {
    conv_dw: DepthwiseConv,
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
    gamma: Tensor,
    /// fc1's bias, fc2's bias and gamma as CPU vectors, for the fused kernels.
    cpu: Option<BlockVectors>,
}

#[derive(Debug, Clone)]
struct BlockVectors {
    fc1_bias: Vec<f32>,
    fc2_bias: Vec<f32>,
    gamma: Vec<f32>,
}

impl Block {
    /// `vb` points at the block (`stages.N.blocks.M`).
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let fc1 = candle_nn::linear(dim, 4 * dim, vb.pp("mlp.fc1"))?;
        let fc2 = candle_nn::linear(4 * dim, dim, vb.pp("mlp.fc2"))?;
        // The loader also finds this under `weight` (Hugging Face's rename of `gamma`).
        let gamma = vb.get(dim, "gamma")?;
        let cpu = match (fc1.bias(), fc2.bias()) {
            (Some(b1), Some(b2)) if kernels::is_cpu_f32(&gamma) => Some(BlockVectors {
                fc1_bias: b1.to_vec1()?,
                fc2_bias: b2.to_vec1()?,
                gamma: gamma.to_vec1()?,
            }),
            _ => None,
        };
        Ok(Self {
            conv_dw: DepthwiseConv::load(vb.pp("conv_dw"), dim)?,
            norm: Norm::load(vb.pp("norm"), dim)?,
            fc1,
            fc2,
            gamma,
            cpu,
        })
    }

    /// The block on a channels-last `[B, H, W, C]` tensor: the CPU kernels where they apply.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.cpu, &self.conv_dw.cpu, &self.norm.cpu) {
            (Some(v), Some(dw), Some(norm))
                if kernels::is_cpu_f32(x)
                    && self.fc1.weight().is_contiguous()
                    && self.fc2.weight().is_contiguous() =>
            {
                let mlp = MlpParams {
                    fc1: self.fc1.weight(),
                    fc1_bias: &v.fc1_bias,
                    fc2: self.fc2.weight(),
                    fc2_bias: &v.fc2_bias,
                    gamma: &v.gamma,
                };
                kernels::block(x, dw, norm, &mlp)
            }
            _ => self.forward_ops(x),
        }
    }

    /// `norm(dwconv7x7(x))` alone (the fused kernel on the CPU), channels-last.
    pub fn dwconv_norm(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.conv_dw.cpu, &self.norm.cpu) {
            (Some(dw), Some(norm)) if kernels::is_cpu_f32(x) => kernels::dwconv_norm(x, dw, norm),
            _ => self.conv_dw.forward_ops(x)?.apply(&self.norm.ops),
        }
    }

    /// The block as candle ops (any device).
    pub fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let y = self.conv_dw.forward_ops(x)?.reshape((b * h * w, c))?;
        let y = y.apply(&self.norm.ops)?;
        let y = self.fc1.forward(&y)?.gelu_erf()?;
        let y = self.fc2.forward(&y)?.broadcast_mul(&self.gamma)?;
        x + y.reshape((b, h, w, c))?
    }
}

/// `ConvNeXtStage`: an optional downsample (LayerNorm2d + 2x2 stride-2 conv) then the blocks.
#[derive(Debug, Clone)]
struct Stage {
    downsample: Option<(Norm, Patchify)>,
    blocks: Vec<Block>,
}

impl Stage {
    fn load(vb: VarBuilder, in_dim: Option<usize>, dim: usize, depth: usize) -> Result<Self> {
        let downsample = match in_dim {
            None => None,
            Some(in_dim) => {
                let vb = vb.pp("downsample");
                Some((
                    Norm::load(vb.pp("0"), in_dim)?,
                    Patchify::load(in_dim, dim, /* kernel */ 2, vb.pp("1"))?,
                ))
            }
        };
        let blocks =
            (0..depth).map(|i| Block::load(vb.pp(format!("blocks.{i}")), dim)).collect::<Result<_>>()?;
        Ok(Self { downsample, blocks })
    }

    /// Channels-last in and out.
    fn forward(&self, x: &Tensor, ops_only: bool) -> Result<Tensor> {
        let mut x = match &self.downsample {
            // timm's `LayerNorm2d` normalises over channels: the last axis here.
            Some((norm, conv)) if ops_only => conv.forward_ops(&x.apply(&norm.ops)?)?,
            Some((norm, conv)) => conv.forward(&norm.forward(x)?)?,
            None => x.clone(),
        };
        for block in &self.blocks {
            x = if ops_only { block.forward_ops(&x)? } else { block.forward(&x)? };
        }
        Ok(x)
    }
}

/// The four feature maps Osprey uses, `[B, C_i, S/4/2^i, S/4/2^i]`.
#[derive(Debug, Clone)]
pub struct Features {
    /// res2, res3, res4, res5 (strides 4, 8, 16, 32).
    pub levels: [Tensor; 4],
}

impl Features {
    pub const NAMES: [&'static str; 4] = ["res2", "res3", "res4", "res5"];

    /// res4 flattened row-major to `[H*W, C]` for one image: the projector's input (image tokens).
    pub fn image_tokens(&self) -> Result<Tensor> {
        let res4 = self.levels[2].squeeze(0)?;
        let (c, h, w) = res4.dims3()?;
        res4.reshape((c, h * w))?.t()?.contiguous()
    }
}

/// The timm ConvNeXt trunk up to the last stage.
#[derive(Debug, Clone)]
pub struct ConvNeXt {
    stem_conv: Patchify,
    stem_norm: Norm,
    stages: Vec<Stage>,
}

impl ConvNeXt {
    /// `vb` points at the trunk (`...visual.trunk`); names are timm's (`stem.0`, `stages.N...`).
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let dims = cfg.dims;
        let stem_conv = Patchify::load(/* rgb */ 3, dims[0], /* kernel */ 4, vb.pp("stem.0"))?;
        let stem_norm = Norm::load(vb.pp("stem.1"), dims[0])?;
        let stages = (0..4)
            .map(|i| {
                // The patch stem replaces stage 0's downsample.
                let in_dim = (i > 0).then(|| dims[i - 1]);
                Stage::load(vb.pp(format!("stages.{i}")), in_dim, dims[i], cfg.depths[i])
            })
            .collect::<Result<_>>()?;
        Ok(Self { stem_conv, stem_norm, stages })
    }

    /// `pixel_values` `[B, 3, S, S]` (normalised) to res2..res5. The trunk's `norm_pre` is the
    /// identity and its head is not used.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Features> {
        self.run(pixel_values, false)
    }

    /// [`Self::forward`] with candle ops only, never the CPU kernels: the kernels' reference.
    pub fn forward_ops(&self, pixel_values: &Tensor) -> Result<Features> {
        self.run(pixel_values, true)
    }

    fn run(&self, pixel_values: &Tensor, ops_only: bool) -> Result<Features> {
        let pixels = to_channels_last(pixel_values)?;
        let mut x = if ops_only {
            self.stem_conv.forward_ops(&pixels)?.apply(&self.stem_norm.ops)?
        } else {
            self.stem_norm.forward(&self.stem_conv.forward(&pixels)?)?
        };
        let mut levels = Vec::with_capacity(4);
        for stage in &self.stages {
            x = stage.forward(&x, ops_only)?;
            levels.push(to_channels_first(&x)?);
        }
        let levels: [Tensor; 4] = levels.try_into().expect("four stages. This is a bug.");
        Ok(Features { levels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::{DType, Device};

    fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        osprey_test_support::rel_l2(&values(a), &values(b))
    }

    /// The shifted multiply-adds and the CPU kernel equal candle's grouped convolution (the
    /// PyTorch semantics), on channel counts that exercise every chunk width of the kernel.
    #[test]
    fn depthwise_matches_grouped_conv2d() {
        let dev = Device::Cpu;
        for (c, h, w) in [(6, 9, 5), (45, 8, 13), (3, 3, 2)] {
            let weight = Tensor::randn(0_f32, 1.0, (c, 1, DW_KERNEL, DW_KERNEL), &dev).unwrap();
            let bias = Tensor::randn(0_f32, 1.0, c, &dev).unwrap();
            let x = Tensor::randn(0_f32, 1.0, (2, c, h, w), &dev).unwrap();
            let tensors = [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())];
            let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
            let conv = DepthwiseConv::load(vb, c).unwrap();
            let cfg = Conv2dConfig { padding: DW_KERNEL / 2, groups: c, ..Default::default() };
            let reference = Conv2d::new(weight, Some(bias), cfg).forward(&x).unwrap();
            let ops = to_channels_first(&conv.forward_ops(&to_channels_last(&x).unwrap()).unwrap()).unwrap();
            assert!(rel_l2(&ops, &reference) < 1e-6, "{c}x{h}x{w}");
            // The kernel fuses the LayerNorm: an identity-free check with unit weights against
            // candle's LayerNorm of the reference convolution.
            let norm = NormParams { weight: vec![1.0; c], bias: vec![0.0; c], eps: 1e-6 };
            let ln = LayerNorm::new(
                Tensor::ones(c, DType::F32, &dev).unwrap(),
                Tensor::zeros(c, DType::F32, &dev).unwrap(),
                1e-6,
            );
            let fused =
                kernels::dwconv_norm(&to_channels_last(&x).unwrap(), conv.cpu.as_ref().unwrap(), &norm)
                    .unwrap();
            let want = to_channels_last(&reference).unwrap().apply(&ln).unwrap();
            assert!(rel_l2(&fused, &want) < 1e-5, "{c}x{h}x{w}: {}", rel_l2(&fused, &want));
        }
    }

    /// The fused block kernel against the candle-ops block, with tiles of one row, a few rows
    /// (many tiles, one per task), half the rows and all of them (tiles in turn, threaded
    /// matmuls), on a row count no tile size divides.
    #[test]
    fn fused_block_matches_candle_ops_for_every_tiling() {
        let dev = Device::Cpu;
        let (c, h, w) = (24, 9, 7);
        let varmap = candle_nn::VarMap::new();
        Block::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), c).unwrap();
        for var in varmap.all_vars() {
            let r = Tensor::randn(0_f32, 0.3, var.dims(), &dev).unwrap();
            var.set(&(r + 0.1).unwrap()).unwrap();
        }
        let block = Block::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), c).unwrap();
        let x = Tensor::randn(0_f32, 1.0, (2, h, w, c), &dev).unwrap();
        let want = block.forward_ops(&x).unwrap();
        let (Some(v), Some(dw), Some(norm)) = (&block.cpu, &block.conv_dw.cpu, &block.norm.cpu) else {
            panic!("CPU kernels' parameters not loaded")
        };
        let mlp = MlpParams {
            fc1: block.fc1.weight(),
            fc1_bias: &v.fc1_bias,
            fc2: block.fc2.weight(),
            fc2_bias: &v.fc2_bias,
            gamma: &v.gamma,
        };
        for tile_rows in [1, 5, h * w + 1, 2 * h * w, 10_000] {
            let got = kernels::block_tiled(&x, dw, norm, &mlp, tile_rows).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "tile of {tile_rows} rows: {err}");
        }
        assert!(rel_l2(&block.forward(&x).unwrap(), &want) < 1e-5);
        // Weights of the wrong shape are an error, not a panic.
        let wrong = MlpParams { fc1: block.fc2.weight(), ..mlp };
        assert!(kernels::block_tiled(&x, dw, norm, &wrong, 4).is_err());
    }

    /// A trunk with random weights: the CPU kernels against the candle-ops path, every level.
    #[test]
    fn kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let cfg = VisionConfig::from_json(
            r#"{"hidden_size": 32, "image_size": 64, "vision_depths": [1, 1, 2, 1], "vision_dims": [8, 16, 40, 64]}"#,
        );
        let Ok(cfg) = cfg else { panic!("config: {:?}", cfg.err()) };
        let varmap = candle_nn::VarMap::new();
        // A first load creates the variables; they get random values (VarMap initialises biases
        // and norms to constants), and the second load reads those into the kernels' vectors.
        ConvNeXt::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
        for var in varmap.all_vars() {
            let r = Tensor::randn(0_f32, 0.3, var.dims(), &dev).unwrap();
            var.set(&(r + 0.1).unwrap()).unwrap();
        }
        let trunk = ConvNeXt::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
        // 70: the patch stem and a downsample each drop a remainder row and column.
        for size in [64, 70] {
            let x = Tensor::randn(0_f32, 1.0, (2, 3, size, size), &dev).unwrap();
            let fast = trunk.forward(&x).unwrap();
            let ops = trunk.forward_ops(&x).unwrap();
            for (a, b) in fast.levels.iter().zip(&ops.levels) {
                assert_eq!(a.dims(), b.dims());
                let err = rel_l2(a, b);
                assert!(err < 1e-5, "size {size}, {:?}: {err}", a.dims());
            }
        }
    }
}
