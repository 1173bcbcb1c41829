//! Where the model's tensors come from: a checkpoint in transformers' names (every tensor in the
//! loader's dtype), or a GGUF file (linear layers quantized, the rest dequantized). Names are the
//! checkpoint's in both cases; [`crate::gguf`] maps them to llama.cpp's.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::linear::QLinear;
use crate::gguf::GgufModel;

pub enum WeightSource<'a> {
    Checkpoint(VarBuilder<'a>),
    /// Activations (and non-linear weights) in `dtype` on `device`.
    Gguf {
        file: &'a GgufModel,
        dtype: DType,
        device: Device,
    },
}

impl WeightSource<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            WeightSource::Checkpoint(vb) => vb.dtype(),
            WeightSource::Gguf { dtype, .. } => *dtype,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            WeightSource::Checkpoint(vb) => vb.device(),
            WeightSource::Gguf { device, .. } => device,
        }
    }

    /// Tensor `name`, which must have `shape`.
    pub(super) fn get(&self, shape: &[usize], name: &str) -> candle_core::Result<Tensor> {
        match self {
            WeightSource::Checkpoint(vb) => vb.get(shape, name),
            WeightSource::Gguf { file, dtype, device } => file.tensor(name, Some(shape), *dtype, device),
        }
    }

    /// Tensor `name` of whatever shape is stored.
    pub(super) fn get_unchecked(&self, name: &str) -> candle_core::Result<Tensor> {
        match self {
            WeightSource::Checkpoint(vb) => vb.get_unchecked(name),
            WeightSource::Gguf { file, dtype, device } => file.tensor(name, None, *dtype, device),
        }
    }

    /// The bias-free linear layer `{prefix}.weight` `[out, in]`.
    pub(super) fn linear(&self, in_dim: usize, out_dim: usize, prefix: &str) -> candle_core::Result<QLinear> {
        let name = format!("{prefix}.weight");
        match self {
            WeightSource::Checkpoint(vb) => {
                Ok(QLinear::Plain(Linear::new(vb.get((out_dim, in_dim), &name)?, None)))
            }
            WeightSource::Gguf { file, device, .. } => {
                let q = file.qtensor(&name, Some(&[out_dim, in_dim]), device)?;
                let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                let m = if file.options.dequantize || float {
                    QMatMul::Tensor(q.dequantize(device)?)
                } else {
                    // Honours candle's CANDLE_DEQUANTIZE_ALL(_F16) environment switches too.
                    QMatMul::from_arc(Arc::new(q))?
                };
                Ok(QLinear::Quantized(m))
            }
        }
    }
}
