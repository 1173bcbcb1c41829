//! The decoder's linear layers (no bias): a plain weight `[out, in]` in the model's dtype, or a
//! quantized one from a GGUF file, multiplied by candle's quantized kernels.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;

#[derive(Debug, Clone)]
pub enum QLinear {
    /// `x @ w.T` in the activations' dtype.
    Plain(Linear),
    /// A GGUF weight: quantized blocks, or a dequantized f32 copy (see
    /// [`crate::gguf::GgufOptions::dequantize`]). The kernels take f32 activations.
    Quantized(QMatMul),
}

impl QLinear {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            QLinear::Plain(l) => l.weight().dims().to_vec(),
            QLinear::Quantized(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
            QLinear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims().to_vec(),
        };
        (dims[0], dims[1])
    }
}

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // A batch-1 decode step: the weight's rows split over every thread (bit-identical).
            QLinear::Plain(l) if l.bias().is_none() => {
                match osprey_kernels::linear_one_row(xs, l.weight())? {
                    Some(out) => Ok(out),
                    None => l.forward(xs),
                }
            }
            QLinear::Plain(l) => l.forward(xs),
            QLinear::Quantized(m) => {
                let dtype = xs.dtype();
                m.forward(&xs.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(dtype)
            }
        }
    }
}
