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
                let xs = xs.to_dtype(DType::F32)?.contiguous()?;
                if let QMatMul::QTensor(q) = m {
                    // A prefill's many rows through a q8_0 weight: f32 gemm on the dequantized
                    // weight, a block of rows at a time, where candle's q8_0 kernels are slow.
                    let (out_dim, in_dim) = self.dims();
                    let rows = xs.elem_count() / in_dim;
                    if osprey_kernels::q8_0_prefers_dequantized(rows) {
                        let flat = xs.reshape((rows, in_dim))?;
                        if let Some(out) = osprey_kernels::matmul_q8_0_dequantized(&flat, q)? {
                            let mut dims = xs.dims().to_vec();
                            if let Some(features) = dims.last_mut() {
                                *features = out_dim;
                            }
                            return out.reshape(dims)?.to_dtype(dtype);
                        }
                    }
                }
                m.forward(&xs)?.to_dtype(dtype)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn a_q8_0_prefill_of_batched_sequences_is_the_dequantized_product() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0_f32, 1.0, (48, 64), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let plain = QLinear::Plain(Linear::new(q.dequantize(&dev)?, None));
        let quantized = QLinear::Quantized(QMatMul::from_qtensor(q)?);
        // Two sequences of 20 positions: 40 rows, enough to take the dequantized path where it
        // applies; elsewhere candle's q8_0 kernels quantize the activations too.
        let xs = Tensor::randn(0_f32, 1.0, (2, 20, 64), &dev)?;
        let got = quantized.forward(&xs)?;
        let want = plain.forward(&xs)?;
        assert_eq!(got.dims(), [2, 20, 48]);
        let gap = ((&got - &want)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?
            .to_scalar::<f32>()?;
        let tolerance = if osprey_kernels::q8_0_prefers_dequantized(40) { 1e-6 } else { 2e-2 };
        assert!(gap < tolerance, "relative L2 {gap}");
        Ok(())
    }
}
