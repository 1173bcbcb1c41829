//! CPU kernels of the ConvNeXt block, channels-last (`[B, H, W, C]`, the channel loop contiguous).
//!
//! - [`dwconv_norm`]: the depthwise 7x7 convolution, its bias and the block's LayerNorm in one pass
//!   (each output row is normalised while it is still in cache).
//! - [`block`]: the whole block: that kernel, then per tile of rows fc1 (gemm), fc1's bias and exact
//!   GELU, fc2 (gemm), fc2's bias, the layer scale and the residual, the tile's hidden layer in cache.
//! - [`layer_norm_last`]: LayerNorm over the last axis (the stem's and the downsamples' norms).
//!
//! The matmuls are the `gemm` crate's (what candle's matmul runs). Each kernel is compiled for
//! AVX-512, AVX2 and the baseline instruction set and picked at run time ([`Simd`]); the arithmetic
//! is written per lane, with reductions split over a fixed number of partial sums, so every
//! instruction set gives the same bits (no fused multiply-add: Rust never contracts `a * b + c`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, bail};
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
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let input = cpu_slice(&storage, layout, "depthwise conv input")?;
    let out = dwconv_norm_values(input, (b, h, w, c), dw, norm)?;
    drop(storage);
    Tensor::from_vec(out, (b, h, w, c), &Device::Cpu)
}

/// The values of [`dwconv_norm`] of the channels-last `input` `[b, h, w, c]`.
fn dwconv_norm_values(
    input: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    dw: &DwParams,
    norm: &NormParams,
) -> Result<Vec<f32>> {
    if dw.bias.len() != c || norm.weight.len() != c {
        bail!("depthwise conv over {} channels got [{b}, {h}, {w}, {c}]", dw.bias.len())
    }
    let mut out = vec![0.0_f32; b * h * w * c];
    if !out.is_empty() {
        let simd = Simd::detect();
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
            let img = &input[(row / h) * h * w * c..][..h * w * c];
            dw_norm_row(simd, img, (h, w, c), row % h, dw, norm, dst);
        });
    }
    Ok(out)
}

/// The contiguous f32 values of a CPU storage.
fn cpu_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => cpu_f32(s, layout, what),
        _ => bail!("CPU kernels need a CPU tensor"),
    }
}

/// A ConvNeXt block's MLP and layer scale on the CPU: `fc1` `[4C, C]` and `fc2` `[C, 4C]` as
/// PyTorch stores them (out, in), their biases and `gamma`.
pub struct MlpParams<'a> {
    pub fc1: &'a Tensor,
    pub fc1_bias: &'a [f32],
    pub fc2: &'a Tensor,
    pub fc2_bias: &'a [f32],
    pub gamma: &'a [f32],
}

thread_local! {
    /// Each thread's `[rows, 4C]` hidden activations of the tile it runs, reused from block to
    /// block (a fresh buffer per block cost its page faults).
    static HIDDEN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of one tile of [`block`]'s MLP. Where the MLP's weights are small (ConvNeXt-L's stages 0
/// and 1: 0.6 and 2.4 MB each, which stay cached from tile to tile), tiles whose hidden layer
/// (`rows x 4C`) fills about a core's L2 cache run one per thread: on a 2-core AVX2 EPYC (512 KiB
/// L2 per core) that made a stage-0 block 1.6x and a stage-1 block 1.2x faster than two
/// whole-tensor matmuls. With larger
/// weights every tile would read them again (stage 2 took 1.5x as long, stage 3 2.2x), so there
/// all rows are one tile and each matmul is split over the threads.
fn mlp_tile_rows(c: usize, rows: usize) -> usize {
    if c * 4 * c * std::mem::size_of::<f32>() <= SMALL_WEIGHT_BYTES {
        (HIDDEN_TILE_BYTES / (4 * c * std::mem::size_of::<f32>())).max(8)
    } else {
        rows.max(1)
    }
}

/// A weight this small is read by every tile (see [`mlp_tile_rows`]).
const SMALL_WEIGHT_BYTES: usize = 4 << 20;
/// The hidden layer of one tile (see [`mlp_tile_rows`]).
const HIDDEN_TILE_BYTES: usize = 512 * 1024;

/// `dst = src @ w.T` for `src` `[rows, k]`, `w` `[n, k]` (row-major) and `dst` `[rows, n]`, with
/// gemm's `parallelism`.
fn matmul_wt(dst: &mut [f32], src: &[f32], w: &[f32], k: usize, n: usize, parallelism: gemm::Parallelism) {
    let rows = src.len() / k;
    assert!(dst.len() == rows * n && w.len() == n * k && src.len() == rows * k, "matmul shapes");
    // SAFETY: the assert above: dst is `rows x n`, src `rows x k` and w `n x k`, all row-major
    // and contiguous, which the strides below describe (w read as its transpose).
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            src.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A whole ConvNeXt block on a channels-last CPU tensor `x` `[B, H, W, C]`:
/// `x + gamma * (fc2(gelu(fc1(LayerNorm(dwconv7x7(x))))) )`, biases included.
///
/// The depthwise convolution and LayerNorm fill one fresh buffer; then each tile of rows runs
/// fc1, bias + GELU, fc2, bias + layer scale + residual with its hidden layer in cache, and
/// writes the block's output over its own (no longer needed) normalised rows.
pub fn block(x: &Tensor, dw: &DwParams, norm: &NormParams, mlp: &MlpParams) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    block_tiled(x, dw, norm, mlp, mlp_tile_rows(c, b * h * w))
}

/// [`block`] with `tile_rows` rows per MLP tile (the tests' way to run every schedule).
pub(crate) fn block_tiled(
    x: &Tensor,
    dw: &DwParams,
    norm: &NormParams,
    mlp: &MlpParams,
    tile_rows: usize,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let hidden = mlp.fc1_bias.len();
    let want = |t: &Tensor, dims: &[usize]| t.dims() == dims && is_cpu_f32(t) && t.is_contiguous();
    if c == 0
        || tile_rows == 0
        || !want(mlp.fc1, &[hidden, c])
        || !want(mlp.fc2, &[c, hidden])
        || mlp.fc2_bias.len() != c
        || mlp.gamma.len() != c
    {
        bail!("block over {c} channels: fc1 {:?}, fc2 {:?}", mlp.fc1.dims(), mlp.fc2.dims())
    }
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let input = cpu_slice(&x_storage, x_layout, "block input")?;
    let mut out = dwconv_norm_values(input, (b, h, w, c), dw, norm)?;
    let (w1_storage, w1_layout) = mlp.fc1.storage_and_layout();
    let w1 = cpu_slice(&w1_storage, w1_layout, "fc1 weight")?;
    let (w2_storage, w2_layout) = mlp.fc2.storage_and_layout();
    let w2 = cpu_slice(&w2_storage, w2_layout, "fc2 weight")?;
    let simd = Simd::detect();
    let tile = tile_rows * c;
    let threads = rayon::current_num_threads();
    if (b * h * w).div_ceil(tile_rows) >= 2 * threads {
        // Enough tiles to keep every thread busy: one tile per task, each on one thread.
        out.par_chunks_mut(tile).zip(input.par_chunks(tile)).for_each(|(rows, residual)| {
            HIDDEN.with_borrow_mut(|act| {
                act.resize(rows.len() / c * hidden, 0.0);
                matmul_wt(act, rows, w1, c, hidden, gemm::Parallelism::None);
                bias_gelu_rows(simd, act, mlp.fc1_bias);
                matmul_wt(rows, act, w2, hidden, c, gemm::Parallelism::None);
                scale_residual_rows(simd, rows, residual, mlp.fc2_bias, mlp.gamma);
            })
        });
    } else {
        // Few rows (the late stages, with the largest weights): the tiles in turn, each matmul
        // split over the threads.
        let parallel = gemm::Parallelism::Rayon(threads);
        HIDDEN.with_borrow_mut(|act| {
            for (rows, residual) in out.chunks_mut(tile).zip(input.chunks(tile)) {
                let n = rows.len() / c;
                act.resize(n * hidden, 0.0);
                matmul_wt(act, rows, w1, c, hidden, parallel);
                let per_task = rows_per_task(n, hidden);
                act.par_chunks_mut(per_task * hidden).for_each(|a| bias_gelu_rows(simd, a, mlp.fc1_bias));
                matmul_wt(rows, act, w2, hidden, c, parallel);
                let per_task = rows_per_task(n, c) * c;
                rows.par_chunks_mut(per_task)
                    .zip(residual.par_chunks(per_task))
                    .for_each(|(z, x)| scale_residual_rows(simd, z, x, mlp.fc2_bias, mlp.gamma));
            }
        });
    }
    drop((x_storage, w1_storage, w2_storage));
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
