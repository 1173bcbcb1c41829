//! CPU kernels of the ConvNeXt block, channels-last (`[B, H, W, C]`, the channel loop contiguous).
//!
//! - [`dwconv_norm`]: the depthwise 7x7 convolution, its bias and the block's LayerNorm in one pass
//!   (each output row is normalised while it is still in cache).
//! - [`BiasGelu`]: `fc1`'s bias and exact GELU, in place on the matmul's output.
//! - [`ScaleResidual`]: `fc2`'s bias, the layer scale and the residual, in place.
//! - [`layer_norm_last`]: LayerNorm over the last axis (the stem's and the downsamples' norms).
//!
//! The matmuls stay candle's. Each kernel is compiled for AVX-512, AVX2 and the baseline
//! instruction set and picked at run time ([`Simd`]); the arithmetic is written per lane, with
//! reductions split over a fixed number of partial sums, so every instruction set gives the same
//! bits (no fused multiply-add: Rust never contracts `a * b + c`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Result, Tensor, bail};
use osprey_kernels::{gelu, multiversion};
use rayon::prelude::*;

pub use osprey_kernels::Simd;

/// Partial sums per reduction: enough independent lanes for 2 AVX-512 or 4 AVX2 registers.
const LANES: usize = 32;

/// `sum(v)` over [`LANES`] partial sums combined in a fixed order.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0.0_f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum((v - mean)^2)`, as [`sum`].
#[inline(always)]
fn sum_sq_dev(v: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0_f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|x| (x - mean) * (x - mean)).sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += (x - mean) * (x - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// LayerNorm of each `weight.len()`-long row of `rows`, in place (biased variance, as PyTorch).
#[inline(always)]
fn norm_rows_impl(rows: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let c = weight.len();
    for row in rows.chunks_exact_mut(c) {
        let mean = sum(row) / c as f32;
        let var = sum_sq_dev(row, mean) / c as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *x = (*x - mean) * inv * w + b;
        }
    }
}

multiversion! {
    fn norm_rows(rows: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        norm_rows_impl(rows, weight, bias, eps)
    }
}

/// A LayerNorm's parameters on the CPU.
#[derive(Debug, Clone)]
pub struct NormParams {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

/// Rows per rayon task of the row-wise kernels (enough work to amortise a task).
fn rows_per_task(rows: usize, row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(1, rows.max(1))
}

/// The contiguous f32 slice of a CPU tensor.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => bail!("{what} must be contiguous"),
        (other, _) => bail!("{what} must be f32, got {:?}", other.dtype()),
    }
}

fn cpu_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        (CpuStorage::F32(_), None) => bail!("{what} must be contiguous"),
        (other, _) => bail!("{what} must be f32, got {:?}", other.dtype()),
    }
}

/// Copies a CPU tensor's values into a fresh vector (one pass).
fn to_vec_f32(x: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let data = match &*storage {
        candle_core::Storage::Cpu(s) => cpu_f32(s, layout, "layer-norm input")?.to_vec(),
        _ => bail!("CPU kernels need a CPU tensor"),
    };
    Ok((data, x.dims().to_vec()))
}

/// LayerNorm over the last axis of a CPU f32 tensor, into a new tensor.
pub fn layer_norm_last(x: &Tensor, norm: &NormParams) -> Result<Tensor> {
    let c = norm.weight.len();
    if x.dims().last() != Some(&c) {
        bail!("layer norm over {c} channels got a tensor of shape {:?}", x.dims())
    }
    let (mut data, dims) = to_vec_f32(x)?;
    let simd = Simd::detect();
    let chunk = rows_per_task(data.len() / c.max(1), c) * c;
    data.par_chunks_mut(chunk.max(1))
        .for_each(|rows| norm_rows(simd, rows, &norm.weight, &norm.bias, norm.eps));
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Side of the depthwise kernel.
pub const DW_KERNEL: usize = 7;
const DW_TAPS: usize = DW_KERNEL * DW_KERNEL;
const DW_PAD: usize = DW_KERNEL / 2;

/// The depthwise convolution's parameters, tap-major: `taps[t * C + c]` is channel c's weight at
/// kernel position t (row-major over the 7x7 window).
#[derive(Debug, Clone)]
pub struct DwParams {
    pub taps: Vec<f32>,
    pub bias: Vec<f32>,
}

impl DwParams {
    /// From PyTorch's `[C, 1, 7, 7]` weight and `[C]` bias.
    pub fn from_torch(weight: &[f32], bias: &[f32]) -> Result<Self> {
        let c = bias.len();
        if weight.len() != c * DW_TAPS {
            bail!("depthwise weight has {} values, expected {c} x {DW_TAPS}", weight.len())
        }
        let mut taps = vec![0.0_f32; c * DW_TAPS];
        for (ch, kernel) in weight.chunks_exact(DW_TAPS).enumerate() {
            for (t, &v) in kernel.iter().enumerate() {
                taps[t * c + ch] = v;
            }
        }
        Ok(Self { taps, bias: bias.to_vec() })
    }
}

/// `L` channels from `c0` of one output row: bias, then the taps in row-major order (the order
/// the 49 shifted multiply-adds of the candle-ops path use).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_chunk<const L: usize>(
    img: &[f32],
    (h, w, c): (usize, usize, usize),
    y: usize,
    c0: usize,
    taps: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let bias: [f32; L] = bias[c0..c0 + L].try_into().expect("L channels");
    let ky = DW_PAD.saturating_sub(y)..DW_KERNEL.min(h + DW_PAD - y);
    for x in 0..w {
        let kx = DW_PAD.saturating_sub(x)..DW_KERNEL.min(w + DW_PAD - x);
        let mut acc = bias;
        for ky in ky.clone() {
            let row = &img[(y + ky - DW_PAD) * w * c..][..w * c];
            for kx in kx.clone() {
                let input = &row[(x + kx - DW_PAD) * c + c0..][..L];
                let weight = &taps[(ky * DW_KERNEL + kx) * c + c0..][..L];
                for l in 0..L {
                    acc[l] += input[l] * weight[l];
                }
            }
        }
        out[x * c + c0..][..L].copy_from_slice(&acc);
    }
}

multiversion! {
    /// One output row (`y`) of the depthwise convolution of one image `[h, w, c]`, then its
    /// LayerNorm.
    fn dw_norm_row(
        img: &[f32],
        dims: (usize, usize, usize),
        y: usize,
        dw: &DwParams,
        norm: &NormParams,
        out: &mut [f32],
    ) {
        let c = dims.2;
        let mut c0 = 0;
        while c0 + 32 <= c {
            dw_chunk::<32>(img, dims, y, c0, &dw.taps, &dw.bias, out);
            c0 += 32;
        }
        while c0 + 8 <= c {
            dw_chunk::<8>(img, dims, y, c0, &dw.taps, &dw.bias, out);
            c0 += 8;
        }
        while c0 < c {
            dw_chunk::<1>(img, dims, y, c0, &dw.taps, &dw.bias, out);
            c0 += 1;
        }
        norm_rows_impl(out, &norm.weight, &norm.bias, norm.eps);
    }
}

/// `LayerNorm(dwconv7x7(x) + bias)` of a channels-last CPU tensor `[B, H, W, C]` (zero padding 3).
pub fn dwconv_norm(x: &Tensor, dw: &DwParams, norm: &NormParams) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if dw.bias.len() != c || norm.weight.len() != c {
        bail!("depthwise conv over {} channels got {:?}", dw.bias.len(), x.dims())
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let input = match &*storage {
        candle_core::Storage::Cpu(s) => cpu_f32(s, layout, "depthwise conv input")?,
        _ => bail!("CPU kernels need a CPU tensor"),
    };
    let mut out = vec![0.0_f32; b * h * w * c];
    if !out.is_empty() {
        let simd = Simd::detect();
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
            let img = &input[(row / h) * h * w * c..][..h * w * c];
            dw_norm_row(simd, img, (h, w, c), row % h, dw, norm, dst);
        });
    }
    drop(storage);
    Tensor::from_vec(out, (b, h, w, c), &Device::Cpu)
}

multiversion! {
    fn bias_gelu_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                *x = gelu(*x + b);
            }
        }
    }
}

/// In place on `[rows, bias.len()]`: `x = gelu(x + bias)` (fc1's bias, then the activation).
pub struct BiasGelu<'a> {
    pub bias: &'a [f32],
}

impl InplaceOp1 for BiasGelu<'_> {
    fn name(&self) -> &'static str {
        "osprey-bias-gelu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let n = self.bias.len();
        if layout.dims().last() != Some(&n) {
            bail!("bias-gelu: {n} biases for a tensor of shape {:?}", layout.dims())
        }
        let data = cpu_f32_mut(storage, layout, "bias-gelu input")?;
        let simd = Simd::detect();
        let chunk = rows_per_task(data.len() / n.max(1), n) * n;
        data.par_chunks_mut(chunk.max(1)).for_each(|rows| bias_gelu_rows(simd, rows, self.bias));
        Ok(())
    }
}

multiversion! {
    fn scale_residual_rows(rows: &mut [f32], residual: &[f32], bias: &[f32], gamma: &[f32]) {
        let c = bias.len();
        for (row, res) in rows.chunks_exact_mut(c).zip(residual.chunks_exact(c)) {
            for (((z, r), b), g) in row.iter_mut().zip(res).zip(bias).zip(gamma) {
                *z = r + g * (*z + b);
            }
        }
    }
}

/// In place on fc2's output `z` `[rows, C]`, with the block input `x` of the same shape:
/// `z = x + gamma * (z + bias)` (fc2's bias, the layer scale, the residual).
pub struct ScaleResidual<'a> {
    pub bias: &'a [f32],
    pub gamma: &'a [f32],
}

impl InplaceOp2 for ScaleResidual<'_> {
    fn name(&self) -> &'static str {
        "osprey-scale-residual"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let c = self.bias.len();
        if l1.shape().elem_count() != l2.shape().elem_count() || l1.dims().last() != Some(&c) {
            bail!("scale-residual: shapes {:?} and {:?} with {c} channels", l1.dims(), l2.dims())
        }
        let z = cpu_f32_mut(s1, l1, "scale-residual output")?;
        let x = cpu_f32(s2, l2, "scale-residual input")?;
        let simd = Simd::detect();
        let chunk = (rows_per_task(z.len() / c.max(1), c) * c).max(1);
        z.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(z, x)| scale_residual_rows(simd, z, x, self.bias, self.gamma));
        Ok(())
    }
}

/// Checks that a tensor is f32 on the CPU (the kernels' domain).
pub fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (h, w, c) = (9, 11, 72);
        let img: Vec<f32> = (0..h * w * c).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let weight: Vec<f32> = (0..c * DW_TAPS).map(|i| ((i * 104_729) % 97) as f32 / 97.0 - 0.5).collect();
        let bias: Vec<f32> = (0..c).map(|i| i as f32 / c as f32).collect();
        let dw = DwParams::from_torch(&weight, &bias).unwrap();
        let norm =
            NormParams { weight: bias.iter().map(|b| 1.0 + b).collect(), bias: bias.clone(), eps: 1e-6 };
        let mut results = Vec::new();
        for simd in Simd::available() {
            let mut out = vec![0.0_f32; h * w * c];
            for (y, row) in out.chunks_exact_mut(w * c).enumerate() {
                dw_norm_row(simd, &img, (h, w, c), y, &dw, &norm, row);
            }
            let mut act = img.clone();
            bias_gelu_rows(simd, &mut act, &bias);
            let mut res = img.clone();
            scale_residual_rows(simd, &mut res, &act, &bias, &norm.weight);
            results.push((simd.name(), out, act, res));
        }
        println!("instruction sets: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
        for r in &results[1..] {
            assert!(r.1 == results[0].1 && r.2 == results[0].2 && r.3 == results[0].3, "{} differs", r.0);
        }
    }
}
