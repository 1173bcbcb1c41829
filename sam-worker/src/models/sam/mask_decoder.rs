//! SAM's mask decoder (`segment_anything/modeling/mask_decoder.py`: `MaskDecoder`, `MLP`).
//!
//! Differences from `candle_transformers::models::segment_anything::mask_decoder`: the output
//! up-scaling uses the exact (erf) GELU like `nn.GELU()` (candle uses the tanh approximation), and the
//! transformer, IoU head and LayerNorm2d eps come from [`SamConfig`].

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::segment_anything::LayerNorm2d;
use osprey_kernels::gelu_erf;

use super::SamConfig;
use super::transformer::TwoWayTransformer;

/// `MLP(input_dim, hidden_dim, output_dim, num_layers)`: ReLU between layers, no output activation.
#[derive(Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn load(vb: VarBuilder, input: usize, hidden: usize, output: usize, num_layers: usize) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..num_layers)
            .map(|i| {
                let in_dim = if i == 0 { input } else { hidden };
                let out_dim = if i + 1 == num_layers { output } else { hidden };
                candle_nn::linear(in_dim, out_dim, vb.pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i + 1 < self.layers.len() {
                xs = xs.relu()?;
            }
        }
        Ok(xs)
    }
}

/// `nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)`. The 2x2 stride-2 kernels do not overlap, so
/// every input pixel's four outputs are one matmul over channels followed by a pixel shuffle (candle's
/// CPU transposed convolution is a direct loop and dominated everything mode's decodes).
#[derive(Debug)]
struct Upscale2x {
    /// `[cin, cout * 4]` (the `[cin, cout, 2, 2]` weight flattened).
    weight: Tensor,
    bias: Tensor,
    cout: usize,
}

impl Upscale2x {
    fn load(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let weight = vb.get((cin, cout, 2, 2), "weight")?.reshape((cin, cout * 4))?;
        Ok(Self { weight, bias: vb.get(cout, "bias")?, cout })
    }

    /// `[B, cin, H, W]` → `[B, cout, 2H, 2W]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = xs.dims4()?;
        let cout = self.cout;
        let ys = xs.permute((0, 2, 3, 1))?.contiguous()?.reshape((b * h * w, cin))?.matmul(&self.weight)?;
        // [B, H, W, cout, ky, kx] → [B, cout, H, ky, W, kx]
        let ys = ys.reshape((b, h, w, cout, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.contiguous()?;
        ys.reshape((b, cout, 2 * h, 2 * w))?.broadcast_add(&self.bias.reshape((1, cout, 1, 1))?)
    }
}

#[derive(Debug)]
pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    iou_token: Tensor,
    mask_tokens: Tensor,
    upscale_conv1: Upscale2x,
    upscale_ln: LayerNorm2d,
    upscale_conv2: Upscale2x,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
    num_mask_tokens: usize,
}

impl MaskDecoder {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let vb_h = vb.pp("output_hypernetworks_mlps");
        let hypernetworks = (0..num_mask_tokens)
            .map(|i| Mlp::load(vb_h.pp(i), dim, dim, dim / 8, 3))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            transformer: TwoWayTransformer::load(vb.pp("transformer"), cfg)?,
            iou_token: vb.get((1, dim), "iou_token.weight")?,
            mask_tokens: vb.get((num_mask_tokens, dim), "mask_tokens.weight")?,
            upscale_conv1: Upscale2x::load(vb.pp("output_upscaling.0"), dim, dim / 4)?,
            upscale_ln: LayerNorm2d::new(dim / 4, cfg.layernorm2d_eps, vb.pp("output_upscaling.1"))?,
            upscale_conv2: Upscale2x::load(vb.pp("output_upscaling.3"), dim / 4, dim / 8)?,
            hypernetworks,
            iou_head: Mlp::load(
                vb.pp("iou_prediction_head"),
                dim,
                cfg.iou_head_hidden_dim,
                num_mask_tokens,
                cfg.iou_head_depth,
            )?,
            num_mask_tokens,
        })
    }

    /// Low-res mask logits `[B, K, 4*grid, 4*grid]` and IoU predictions `[B, K]`, with K = 1 (token 0)
    /// or `num_multimask_outputs` (tokens 1..) when `multimask_output`.
    ///
    /// `image_embeddings`/`image_pe`: `[1, C, grid, grid]`; `sparse`: `[B, N, C]`; `dense`: `[B, C, grid, grid]`.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask_output: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (masks, iou) = self.predict_masks(image_embeddings, image_pe, sparse, dense)?;
        let (start, len) = if multimask_output { (1, self.num_mask_tokens - 1) } else { (0, 1) };
        Ok((masks.narrow(1, start, len)?.contiguous()?, iou.narrow(1, start, len)?.contiguous()?))
    }

    fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let b = sparse.dim(0)?;
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?;
        let (n_out, c) = output_tokens.dims2()?;
        let output_tokens = output_tokens.unsqueeze(0)?.broadcast_as((b, n_out, c))?;
        let tokens = Tensor::cat(&[&output_tokens, &sparse.contiguous()?], 1)?;

        // repeat_interleave over the prompt batch, then add the dense prompt.
        let (_, ce, h, w) = image_embeddings.dims4()?;
        let src = image_embeddings.broadcast_as((b, ce, h, w))?.broadcast_add(dense)?.contiguous()?;
        let pos_src = image_pe.broadcast_as((b, ce, h, w))?.contiguous()?;

        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens)?;
        let iou_token_out = hs.i((.., 0))?;
        let mask_tokens_out = hs.narrow(1, 1, self.num_mask_tokens)?;

        let src = src.transpose(1, 2)?.contiguous()?.reshape((b, ce, h, w))?;
        let upscaled = gelu_erf(self.upscale_conv1.forward(&src)?.apply(&self.upscale_ln)?)?;
        let upscaled = gelu_erf(self.upscale_conv2.forward(&upscaled)?)?;
        let hyper_in = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&mask_tokens_out.i((.., i))?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?; // [B, K, C/8]
        let (b, cu, hu, wu) = upscaled.dims4()?;
        let masks = hyper_in.matmul(&upscaled.reshape((b, cu, hu * wu))?)?.reshape((b, (), hu, wu))?;
        let iou = self.iou_head.forward(&iou_token_out)?;
        Ok((masks, iou))
    }
}
