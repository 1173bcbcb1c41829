//! CPU kernels the model workers share.
//!
//! - [`Simd`] and [`multiversion!`]: a kernel body compiled for AVX-512, AVX2 and the baseline
//!   instruction set, picked at run time (`OSPREY_SIMD` caps it, to run the narrower paths on a
//!   wider machine). Kernels write their arithmetic per lane without fused multiply-adds, so every
//!   instruction set gives the same bits.
//! - [`erf`], [`gelu`] and [`gelu_erf`]: exact GELU (`nn.GELU()`) with a rational erf that
//!   vectorises, applied in place to a CPU f32 tensor (libm's scalar `erff` was a tenth of the SAM
//!   encoders' time).
//! - [`linear_one_row`]: `x @ w.T` for a single row on every thread (gemm runs it on one).
//! - [`matmul_q8_0_dequantized`]: a q8_0 weight times many rows, dequantized block by block into
//!   f32 gemm (candle's q8_0 kernels are slow on CPUs without 8-bit dot products).
//! - [`softmax_last_dim`] and [`softmax_with_rel_pos`]: softmax in place with a vectorised `exp`,
//!   the second with SAM's relative-position terms added in the same pass.
//! - [`silu_mul`]: the SwiGLU gate `silu(gate) * up` in one threaded, vectorised pass (candle
//!   makes two single-threaded passes with libm's scalar `expf`).

use std::sync::OnceLock;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType, QK8_0};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, bail};
use rayon::prelude::*;

mod softmax;
pub use softmax::{softmax_last_dim, softmax_scaled, softmax_with_rel_pos};

/// An instruction set the kernels run with, one the CPU has (so the type cannot name others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simd(Level);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[doc(hidden)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Simd {
    /// Every instruction set this CPU runs, narrowest first.
    pub fn available() -> Vec<Simd> {
        let mut levels = vec![Simd(Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Simd(Level::Avx2));
            }
            if is_x86_feature_detected!("avx512f") {
                levels.push(Simd(Level::Avx512));
            }
        }
        levels
    }

    /// The widest available, or the one `OSPREY_SIMD` (`baseline`, `avx2`, `avx512`) names when
    /// the CPU has it: a way to run the narrower paths on a wider machine.
    pub fn detect() -> Simd {
        static CHOSEN: OnceLock<Simd> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Self::available();
            let widest = *available.last().expect("the baseline is always available");
            let wanted = match std::env::var("OSPREY_SIMD").as_deref() {
                Ok("baseline") => Some(Level::Baseline),
                Ok("avx2") => Some(Level::Avx2),
                Ok("avx512") => Some(Level::Avx512),
                _ => None,
            };
            match wanted {
                Some(level) => available.into_iter().find(|s| s.0 == level).unwrap_or(widest),
                None => widest,
            }
        })
    }

    /// The level (for the dispatch in [`multiversion!`]; only this crate makes a `Simd`).
    #[doc(hidden)]
    pub fn level(self) -> Level {
        self.0
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// Defines `fn name(simd: Simd, args...)` whose body is compiled once per instruction set (the
/// body inlined into functions with those target features) and picked by `simd`.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name(simd: Simd, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                use $crate::Level;
                match simd.level() {
                    // SAFETY: a `Simd` only holds a level the CPU has (see `Simd::available`).
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Baseline => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = simd;
            generic($($arg),*)
        }
    };
}

/// Coefficients of `erf(x) ~ x P(x^2) / Q(x^2)` on `[0, 3.92]` (beyond, erf rounds to 1 in f32).
/// Fitted for this file by iteratively reweighted least squares on the relative error against a
/// 30-digit erf; evaluated in f32 the result is within 4.1e-7 of erf everywhere (under 7 units in
/// the last place of values near 1; far below the 1e-4 parity tolerance) and within 2.4e-7
/// relative below 0.1; the unit tests check both bounds.
const ERF_P: [f32; 6] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    0.188_894_84,
    0.052_565_22,
    0.003_705_838_7,
    2.844_144_5e-4,
    2.072_830_3e-6,
];
const ERF_Q: [f32; 6] = [1.0, 0.500_736_5, 0.113_499_366, 0.014_848_074, 0.001_149_718_6, 3.830_368_6e-5];
/// Past this, erf(x) is 1.0 in f32.
const ERF_CLAMP: f32 = 3.92;

/// `erf(x)` in f32, branch-free so that it vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs().min(ERF_CLAMP);
    let t = a * a;
    let mut p = ERF_P[5];
    let mut q = ERF_Q[5];
    for k in (0..5).rev() {
        p = p * t + ERF_P[k];
        q = q * t + ERF_Q[k];
    }
    (a * p / q).min(1.0).copysign(x)
}

/// Exact (erf) GELU, `nn.GELU()`: `x/2 (1 + erf(x / sqrt 2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion! {
    fn gelu_slice(values: &mut [f32]) {
        for x in values.iter_mut() {
            *x = gelu(*x);
        }
    }
}

/// Exact GELU in place (see [`gelu_erf`]).
struct GeluInPlace;

impl InplaceOp1 for GeluInPlace {
    fn name(&self) -> &'static str {
        "osprey-gelu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            bail!("gelu: a contiguous f32 tensor only")
        };
        let simd = Simd::detect();
        data[start..end].par_chunks_mut(16_384).for_each(|chunk| gelu_slice(simd, chunk));
        Ok(())
    }
}

/// `xs.gelu_erf()`, computed in place when `xs` is a contiguous f32 CPU tensor (pass a tensor no
/// one else holds, such as a layer's fresh output); candle's op otherwise.
pub fn gelu_erf(xs: Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.is_contiguous() {
        xs.inplace_op1(&GeluInPlace)?;
        Ok(xs)
    } else {
        xs.gelu_erf()
    }
}

/// `e^x` in f32, branch-free so that it vectorises: `2^n e^r` with `n = round(x / ln 2)` and a
/// degree-7 Taylor polynomial on `|r| <= ln 2 / 2` (truncation error under 1e-8 relative; in f32
/// within 2 ulp of libm's `expf`, the unit tests check). `x` is clamped to `[-87, 88]`, where `2^n`
/// stays a normal float: below, the result is `e^-87` (~1.6e-38) instead of a smaller number.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `silu(x) = x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

multiversion! {
    fn silu_mul_slice(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
}

/// `silu(gate) * up`, written into `gate` (see [`silu_mul`]).
struct SiluMulInPlace;

impl InplaceOp2 for SiluMulInPlace {
    fn name(&self) -> &'static str {
        "osprey-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &mut CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else { bail!("silu_mul: f32 only") };
        let (Some((g0, g1)), Some((u0, u1))) =
            (gate_layout.contiguous_offsets(), up_layout.contiguous_offsets())
        else {
            bail!("silu_mul: contiguous tensors only")
        };
        if g1 - g0 != u1 - u0 {
            bail!("silu_mul: gate has {} values, up {}", g1 - g0, u1 - u0)
        }
        let simd = Simd::detect();
        gate[g0..g1]
            .par_chunks_mut(16_384)
            .zip(up[u0..u1].par_chunks(16_384))
            .for_each(|(g, u)| silu_mul_slice(simd, g, u));
        Ok(())
    }
}

/// `silu(gate) * up`: in place in `gate` when both are contiguous f32 CPU tensors of one shape
/// (pass a `gate` no one else holds, such as a layer's fresh output); candle's ops otherwise.
pub fn silu_mul(gate: Tensor, up: &Tensor) -> Result<Tensor> {
    let plain_f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if plain_f32_cpu(&gate) && plain_f32_cpu(up) && gate.dims() == up.dims() {
        gate.inplace_op2(up, &SiluMulInPlace)?;
        Ok(gate)
    } else {
        gate.silu()? * up
    }
}

/// Output rows one thread takes at least in [`linear_one_row`]. Above 256 rows gemm takes the
/// same matrix-vector kernel for a slice of the weight as for the whole of it (at or below, its
/// small-product kernel), which keeps the result bit-identical to the unsplit product.
const ROWS_PER_TASK: usize = 512;

/// `x @ w.T` for one row `x` `[1, k]` and a weight `w` `[n, k]` (contiguous f32 CPU tensors), the
/// weight's rows split over the thread pool. gemm runs a one-row product as a single-threaded
/// matrix-vector product, and in a batch-1 decode step that is nearly all the time (every weight
/// is read once): split, it uses every core's memory bandwidth. Each output is the dot product
/// gemm would compute, in the same order, so the result is bit-identical to `x.matmul(&w.t())`.
/// `None` where this does not apply (other shapes, dtypes or devices; too few rows to split).
pub fn linear_one_row(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((1, k)), Ok((n, wk))) = (x.dims2(), w.dims2()) else { return Ok(None) };
    let plain_f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if k != wk || n < 2 * ROWS_PER_TASK || !plain_f32_cpu(x) || !plain_f32_cpu(w) {
        return Ok(None);
    }
    let mut out = vec![0_f32; n];
    {
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xd)), Storage::Cpu(CpuStorage::F32(wd))) =
            (&*x_storage, &*w_storage)
        else {
            return Ok(None);
        };
        let xd = &xd[x_layout.start_offset()..x_layout.start_offset() + k];
        let wd = &wd[w_layout.start_offset()..w_layout.start_offset() + n * k];
        // A few tasks per thread, so a thread slowed by other work on the machine is helped out.
        let rows = n.div_ceil(4 * rayon::current_num_threads()).max(ROWS_PER_TASK);
        out.par_chunks_mut(rows).zip(wd.par_chunks(rows * k)).for_each(|(dst, w)| {
            // SAFETY: `w` is `dst.len()` rows of `k` contiguous values, `xd` is `k` values and
            // `dst` has `dst.len()` values; the strides below describe exactly those slices.
            unsafe {
                gemm::gemm(
                    dst.len(),
                    1,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    1,
                    false,
                    w.as_ptr(),
                    1,
                    k as isize,
                    xd.as_ptr(),
                    1,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    }
    Tensor::from_vec(out, (1, n), x.device()).map(Some)
}

/// Whether [`matmul_q8_0_dequantized`] beats candle's q8_0 kernels for `rows` rows on this CPU:
/// with 32 rows or more on an x86 CPU without VNNI (candle has tiled 8-bit kernels with it).
pub fn q8_0_prefers_dequantized(rows: usize) -> bool {
    static NO_VNNI: OnceLock<bool> = OnceLock::new();
    rows >= 32
        && *NO_VNNI.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            return !(is_x86_feature_detected!("avx512vnni") || is_x86_feature_detected!("avxvnni"));
            #[cfg(not(target_arch = "x86_64"))]
            false
        })
}

/// Weight rows one task dequantizes and multiplies in [`matmul_q8_0_dequantized`]: 64 rows of
/// 4096 f32 (1 MiB) stay in cache between the dequantization and gemm's packing of them.
const Q8_0_ROWS_PER_TASK: usize = 64;

/// `x @ dequantize(w).T` for `x` `[m, k]` (contiguous f32 CPU) and a q8_0 weight `w` `[n, k]`: the
/// weight is dequantized a block of rows at a time, on every thread, and each block multiplied by
/// gemm in f32. On CPUs without 8-bit dot-product instructions (AVX2 but no VNNI) candle multiplies
/// q8_0 row by row at about a third of f32 gemm's rate (measured at k 4096, n 11008); with 32 or
/// more rows the dequantization costs less than it saves. The result is candle's dequantized
/// matmul's (the activations stay f32, as `CANDLE_DEQUANTIZE_ALL` does), in gemm's summation
/// order. `None` where this does not apply (other types, shapes, dtypes or devices).
pub fn matmul_q8_0_dequantized(x: &Tensor, w: &QTensor) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((n, wk))) = (x.dims2(), w.shape().dims2()) else { return Ok(None) };
    let plain_f32_cpu = x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous();
    if w.dtype() != GgmlDType::Q8_0
        || !w.device().is_cpu()
        || k != wk
        || !k.is_multiple_of(QK8_0)
        || !plain_f32_cpu
    {
        return Ok(None);
    }
    let bytes = w.data()?;
    let block_bytes = std::mem::size_of::<BlockQ8_0>();
    if bytes.len() != n * k / QK8_0 * block_bytes
        || bytes.as_ptr().align_offset(std::mem::align_of::<BlockQ8_0>()) != 0
    {
        return Ok(None);
    }
    // SAFETY: BlockQ8_0 is candle's `repr(C)` q8_0 block (an f16 scale and 32 i8), which is how
    // a q8_0 QTensor stores its data; length and alignment are checked above.
    let blocks: &[BlockQ8_0] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / block_bytes) };
    let mut out = vec![0_f32; m * n];
    {
        let (x_storage, x_layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(xd)) = &*x_storage else { return Ok(None) };
        let xd = &xd[x_layout.start_offset()..x_layout.start_offset() + m * k];
        // Each task writes its own columns of `out`; the pointer crosses threads as an address.
        let out_address = out.as_mut_ptr() as usize;
        let row_blocks = k / QK8_0;
        blocks.par_chunks(Q8_0_ROWS_PER_TASK * row_blocks).enumerate().for_each(|(task, w_blocks)| {
            let rows = w_blocks.len() / row_blocks;
            let mut w_f32 = vec![0_f32; rows * k];
            BlockQ8_0::to_float(w_blocks, &mut w_f32);
            let first_column = task * Q8_0_ROWS_PER_TASK;
            // SAFETY: `dst` is column `first_column` of the `[m, n]` row-major `out`, and gemm
            // writes its `m x rows` block there (row stride n), which no other task touches;
            // `xd` is `[m, k]` row-major and `w_f32` `[rows, k]`, read as its transpose.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    (out_address as *mut f32).add(first_column),
                    1,
                    n as isize,
                    false,
                    xd.as_ptr(),
                    1,
                    k as isize,
                    w_f32.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    }
    Tensor::from_vec(out, (m, n), x.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_a_few_ulp() {
        let mut worst_abs = 0.0_f64;
        let mut worst_rel_small = 0.0_f64;
        for i in 0..=2_000_000 {
            let x = i as f32 * 2.5e-6;
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let got = f64::from(erf(x));
            worst_abs = worst_abs.max((got - want).abs());
            if x > 0.0 && x < 0.1 {
                worst_rel_small = worst_rel_small.max(((got - want) / want).abs());
            }
            assert_eq!(erf(-x), -erf(x));
        }
        for x in [5.0_f32, 10.0, 1e10, f32::INFINITY] {
            assert_eq!(erf(x), 1.0);
        }
        assert!(gelu(f32::NAN).is_nan());
        assert!(worst_abs < 4.2e-7, "max abs error {worst_abs:e}");
        assert!(worst_rel_small < 3e-7, "max rel error below 0.1: {worst_rel_small:e}");
    }

    #[test]
    fn gelu_erf_matches_candle_on_every_instruction_set() -> Result<()> {
        let values: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 2_500.0).collect();
        let xs = Tensor::from_vec(values.clone(), (200, 200), &candle_core::Device::Cpu)?;
        let want: Vec<f32> = xs.gelu_erf()?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = gelu_erf(xs.copy()?)?.flatten_all()?.to_vec1()?;
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0_f32, f32::max);
        assert!(worst < 1e-6, "max abs difference {worst:e}");
        let mut results = Vec::new();
        for simd in Simd::available() {
            let mut v = values.clone();
            gelu_slice(simd, &mut v);
            results.push(v);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "instruction sets differ");
        // Not contiguous: candle's op.
        let t = Tensor::from_vec(values, (200, 200), &candle_core::Device::Cpu)?.t()?;
        assert_eq!(gelu_erf(t.clone())?.to_vec2::<f32>()?, t.gelu_erf()?.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn q8_0_dequantized_matmul_matches_candles_dequantized_product() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        for (m, n, k) in [(1, 64, 32), (33, 200, 128), (128, 130, 4096)] {
            let x = Tensor::randn(0_f32, 1.0, (m, k), &dev)?;
            let w = QTensor::quantize(&Tensor::randn(0_f32, 1.0, (n, k), &dev)?, GgmlDType::Q8_0)?;
            let got = matmul_q8_0_dequantized(&x, &w)?.expect("applies");
            let want = x.matmul(&w.dequantize(&dev)?.t()?)?;
            let diff = (&got - &want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            assert!(diff / norm < 1e-6, "m {m}, n {n}, k {k}: relative L2 {}", diff / norm);
        }
        // Not applicable: another type, a row length that is not whole blocks, f64 activations.
        let w = Tensor::randn(0_f32, 1.0, (64, 256), &dev)?;
        let x = Tensor::zeros((4, 256), DType::F32, &dev)?;
        assert!(matmul_q8_0_dequantized(&x, &QTensor::quantize(&w, GgmlDType::Q4K)?)?.is_none());
        let w40 = QTensor::quantize(&Tensor::zeros((64, 40), DType::F32, &dev)?, GgmlDType::F32)?;
        assert!(matmul_q8_0_dequantized(&Tensor::zeros((4, 40), DType::F32, &dev)?, &w40)?.is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        assert!(matmul_q8_0_dequantized(&x.to_dtype(DType::F64)?, &q)?.is_none());
        Ok(())
    }

    #[test]
    fn linear_one_row_is_bit_identical_to_the_matmul() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        for (n, k) in [(1024, 64), (2048, 512), (5000, 300), (32000, 96)] {
            let x = Tensor::randn(0_f32, 1.0, (1, k), &dev)?;
            let w = Tensor::randn(0_f32, 1.0, (n, k), &dev)?;
            let got = linear_one_row(&x, &w)?.expect("applies");
            let want = x.matmul(&w.t()?)?;
            assert_eq!(got.dims(), [1, n]);
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "n {n}, k {k}");
        }
        // Not applicable: two rows, too few outputs, a transposed weight, f64.
        let w = Tensor::randn(0_f32, 1.0, (2048, 64), &dev)?;
        assert!(linear_one_row(&Tensor::zeros((2, 64), DType::F32, &dev)?, &w)?.is_none());
        assert!(linear_one_row(&Tensor::zeros((1, 64), DType::F32, &dev)?, &w.narrow(0, 0, 100)?)?.is_none());
        let wt = Tensor::randn(0_f32, 1.0, (64, 2048), &dev)?.t()?;
        assert!(linear_one_row(&Tensor::zeros((1, 64), DType::F32, &dev)?, &wt)?.is_none());
        let x64 = Tensor::zeros((1, 64), DType::F64, &dev)?;
        assert!(linear_one_row(&x64, &w.to_dtype(DType::F64)?)?.is_none());
        Ok(())
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut worst = 0;
        for i in 0..=1_750_000 {
            let x = -87.0 + i as f32 * 1e-4;
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_mul_matches_candle_on_every_instruction_set() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let gate: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 1_000.0).collect();
        let up: Vec<f32> = (0..40_000).map(|i| ((i % 97) as f32 - 48.0) / 10.0).collect();
        let g = Tensor::from_vec(gate.clone(), (200, 200), &dev)?;
        let u = Tensor::from_vec(up.clone(), (200, 200), &dev)?;
        let want: Vec<f32> = (g.silu()? * &u)?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = silu_mul(g.copy()?, &u)?.flatten_all()?.to_vec1()?;
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert!((a - b).abs() <= 5e-7 * a.abs().max(1.0), "at {i}: candle {a}, ours {b}");
        }
        let mut results = Vec::new();
        for simd in Simd::available() {
            let mut v = gate.clone();
            silu_mul_slice(simd, &mut v, &up);
            results.push(v);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "instruction sets differ");
        // Not contiguous: candle's ops.
        let t = g.t()?;
        assert_eq!(silu_mul(t.clone(), &u)?.to_vec2::<f32>()?, (t.silu()? * &u)?.to_vec2::<f32>()?);
        Ok(())
    }
}
