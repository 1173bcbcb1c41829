//! The ConvNeXt trunk of OpenCLIP `convnext_large_d_320` as Osprey uses it: the four stage
//! outputs res2..res5, no pooling, no head.
//!
//! - Paper: "A ConvNet for the 2020s", <https://arxiv.org/abs/2201.03545>.
//! - Upstream: timm `timm/models/convnext.py` (`ConvNeXt`, `ConvNeXtStage`, `ConvNeXtBlock` with
//!   `conv_mlp=False`), wrapped by OpenCLIP `src/open_clip/timm_model.py`; Osprey's forward is
//!   `osprey/model/multimodal_encoder/clip.py::CLIP.extract_features` (CircleRadon/Osprey).
//! - Spec: docs/osprey-model.md §1.2, key names §1.5 (timm names relative to `visual.trunk.`).
//!
//! candle-transformers has a timm ConvNeXt, but its forward returns only pooled features and its
//! stage builders are private, so the trunk is written here.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use crate::config::VisionConfig;

/// timm's `LayerNorm2d` and block norms use eps 1e-6 (not PyTorch's 1e-5 default).
const LN_EPS: f64 = 1e-6;
/// Depthwise kernel of every block.
const DW_KERNEL: usize = 7;

/// Layer norm over the channel axis of an NCHW tensor (timm `LayerNorm2d`).
#[derive(Debug, Clone)]
struct LayerNorm2d(LayerNorm);

impl LayerNorm2d {
    fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self(LayerNorm::new(weight, bias, LN_EPS)))
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // NCHW -> NHWC so that the channel axis is last, as the fused layer norm expects.
        x.permute((0, 2, 3, 1))?.contiguous()?.apply(&self.0)?.permute((0, 3, 1, 2))
    }
}

/// Depthwise 7x7 convolution (`Conv2d(C, C, 7, padding=3, groups=C)`), computed as 49 shifted
/// multiply-adds over the zero-padded input. candle's grouped `conv2d` runs one convolution per
/// channel (768 per block in stage 3), which is 6-7x slower on the CPU and thousands of kernel
/// launches on a GPU; the result is the same up to the order of the 49 additions.
#[derive(Debug, Clone)]
struct DepthwiseConv {
    /// One `[1, C, 1, 1]` weight per kernel tap, row-major over the 7x7 window.
    taps: Vec<Tensor>,
    bias: Tensor,
}

impl DepthwiseConv {
    fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get((channels, 1, DW_KERNEL, DW_KERNEL), "weight")?;
        let bias = vb.get(channels, "bias")?.reshape((1, channels, 1, 1))?;
        let weight = weight.reshape((channels, DW_KERNEL * DW_KERNEL))?;
        let taps = (0..DW_KERNEL * DW_KERNEL)
            .map(|t| weight.narrow(1, t, 1)?.reshape((1, channels, 1, 1)))
            .collect::<Result<_>>()?;
        Ok(Self { taps, bias })
    }
}

impl Module for DepthwiseConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let pad = DW_KERNEL / 2;
        let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let mut acc = self.bias.clone();
        for (t, tap) in self.taps.iter().enumerate() {
            let (dy, dx) = (t / DW_KERNEL, t % DW_KERNEL);
            let window = padded.narrow(2, dy, h)?.narrow(3, dx, w)?;
            acc = acc.broadcast_add(&window.broadcast_mul(tap)?)?;
        }
        Ok(acc)
    }
}

/// `ConvNeXtBlock`: `x + gamma * fc2(gelu(fc1(norm(dwconv7x7(x)))))`, the MLP channels-last.
#[derive(Debug, Clone)]
struct Block {
    conv_dw: DepthwiseConv,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma: Tensor,
}

impl Block {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let norm = vb.pp("norm");
        Ok(Self {
            conv_dw: DepthwiseConv::load(vb.pp("conv_dw"), dim)?,
            norm: LayerNorm::new(norm.get(dim, "weight")?, norm.get(dim, "bias")?, LN_EPS),
            fc1: candle_nn::linear(dim, 4 * dim, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(4 * dim, dim, vb.pp("mlp.fc2"))?,
            // The loader also finds this under `weight` (Hugging Face's rename of `gamma`).
            gamma: vb.get(dim, "gamma")?,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = self.conv_dw.forward(x)?;
        // Channels-last and flattened to [B*H*W, C] so the linears are plain matmuls.
        let y = y.permute((0, 2, 3, 1))?.contiguous()?.reshape((b * h * w, c))?;
        let y = self.norm.forward(&y)?;
        let y = self.fc1.forward(&y)?.gelu_erf()?;
        let y = self.fc2.forward(&y)?.broadcast_mul(&self.gamma)?;
        let y = y.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        x + y
    }
}

/// `ConvNeXtStage`: an optional downsample (LayerNorm2d + 2x2 stride-2 conv) then the blocks.
#[derive(Debug, Clone)]
struct Stage {
    downsample: Option<(LayerNorm2d, Conv2d)>,
    blocks: Vec<Block>,
}

impl Stage {
    fn load(vb: VarBuilder, in_dim: Option<usize>, dim: usize, depth: usize) -> Result<Self> {
        let downsample = match in_dim {
            None => None,
            Some(in_dim) => {
                let vb = vb.pp("downsample");
                let conv = Conv2dConfig { stride: 2, ..Default::default() };
                Some((
                    LayerNorm2d::load(vb.pp("0"), in_dim)?,
                    candle_nn::conv2d(in_dim, dim, /* kernel */ 2, conv, vb.pp("1"))?,
                ))
            }
        };
        let blocks =
            (0..depth).map(|i| Block::load(vb.pp(format!("blocks.{i}")), dim)).collect::<Result<_>>()?;
        Ok(Self { downsample, blocks })
    }
}

impl Module for Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = match &self.downsample {
            Some((norm, conv)) => x.apply(norm)?.apply(conv)?,
            None => x.clone(),
        };
        for block in &self.blocks {
            x = x.apply(block)?;
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
    stem_conv: Conv2d,
    stem_norm: LayerNorm2d,
    stages: Vec<Stage>,
}

impl ConvNeXt {
    /// `vb` points at the trunk (`...visual.trunk`); names are timm's (`stem.0`, `stages.N...`).
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let dims = cfg.dims;
        let stem = Conv2dConfig { stride: 4, ..Default::default() };
        let stem_conv =
            candle_nn::conv2d(/* rgb */ 3, dims[0], /* kernel */ 4, stem, vb.pp("stem.0"))?;
        let stem_norm = LayerNorm2d::load(vb.pp("stem.1"), dims[0])?;
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
        let mut x = pixel_values.apply(&self.stem_conv)?.apply(&self.stem_norm)?;
        let mut levels = Vec::with_capacity(4);
        for stage in &self.stages {
            x = x.apply(stage)?;
            levels.push(x.clone());
        }
        let levels: [Tensor; 4] = levels.try_into().expect("four stages. This is a bug.");
        Ok(Features { levels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::{DType, Device};

    /// The shifted multiply-adds equal candle's grouped convolution (the PyTorch semantics).
    #[test]
    fn depthwise_matches_grouped_conv2d() {
        let dev = Device::Cpu;
        let (c, h, w) = (6, 9, 5);
        let weight = Tensor::randn(0_f32, 1.0, (c, 1, DW_KERNEL, DW_KERNEL), &dev).unwrap();
        let bias = Tensor::randn(0_f32, 1.0, c, &dev).unwrap();
        let x = Tensor::randn(0_f32, 1.0, (2, c, h, w), &dev).unwrap();
        let tensors = [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())];
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
        let ours = DepthwiseConv::load(vb, c).unwrap().forward(&x).unwrap();
        let cfg = Conv2dConfig { padding: DW_KERNEL / 2, groups: c, ..Default::default() };
        let reference = Conv2d::new(weight, Some(bias), cfg).forward(&x).unwrap();
        let diff = (ours - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
