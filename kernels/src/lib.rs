//! CPU kernels the model workers share.
//!
//! - [`Simd`] and [`multiversion!`]: a kernel body compiled for AVX-512, AVX2 and the baseline
//!   instruction set, picked at run time (`OSPREY_SIMD` caps it, to run the narrower paths on a
//!   wider machine). Kernels write their arithmetic per lane without fused multiply-adds, so every
//!   instruction set gives the same bits.
//! - [`erf`], [`gelu`] and [`gelu_erf`]: exact GELU (`nn.GELU()`) with a rational erf that
//!   vectorises, applied in place to a CPU f32 tensor (libm's scalar `erff` was a tenth of the SAM
//!   encoders' time).

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor, bail};
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
}
