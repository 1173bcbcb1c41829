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
//! - [`silu_mul`]: the SwiGLU gate `silu(gate) * up` in one threaded, vectorised pass (candle
//!   makes two single-threaded passes with libm's scalar `expf`).

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, bail};
use rayon::prelude::*;

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
