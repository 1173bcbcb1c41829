//! Softmax over the last dimension in place, with the vectorised [`exp`](crate::exp), and SAM's
//! attention softmax with its decomposed relative-position terms added in the same pass (candle
//! would make two broadcast additions, each a fresh copy of the whole score tensor, and a softmax
//! with libm's scalar `expf`: together a fifth of the ViT-B encoder's time).

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp3, Layout, Result, Tensor, bail};
use rayon::prelude::*;

use crate::{Simd, exp, multiversion};

/// Lanes of the running maximum and sum: fixed in the source, so that every instruction set adds
/// in the same order and gives the same bits.
const LANES: usize = 8;

multiversion! {
    /// Softmax of each `cols`-long row of `rows`; first, with `rel`, row `r` (of `cols = kh * kw`)
    /// gets `rel_h[r, i] + rel_w[r, j]` added at column `i * kw + j`, as SAM's attention does.
    fn softmax_rows(rows: &mut [f32], cols: usize, rel: Option<(&[f32], &[f32], usize, usize)>, first_row: usize) {
        for (i, row) in rows.chunks_exact_mut(cols).enumerate() {
            if let Some((rel_h, rel_w, kh, kw)) = rel {
                let r = first_row + i;
                let (rh, rw) = (&rel_h[r * kh..(r + 1) * kh], &rel_w[r * kw..(r + 1) * kw]);
                for (segment, &h) in row.chunks_exact_mut(kw).zip(rh) {
                    // (attn + rel_h) + rel_w: the reference's order of additions.
                    for (x, &w) in segment.iter_mut().zip(rw) {
                        *x = (*x + h) + w;
                    }
                }
            }
            softmax_row(row, 1.0);
        }
    }
}

multiversion! {
    fn softmax_scaled_row(row: &mut [f32], scale: f32) {
        softmax_row(row, scale)
    }
}

/// `softmax(row * scale)` in place, with the vectorised `exp`: one row of attention scores, for
/// kernels that pick their rows themselves (a causal mask's visible part).
pub fn softmax_scaled(simd: Simd, row: &mut [f32], scale: f32) {
    softmax_scaled_row(simd, row, scale)
}

/// `softmax(row * scale)`; with `scale` 1 exactly `softmax(row)` (`x * 1.0 == x`).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x * scale);
        }
    }
    let max = chunks.remainder().iter().map(|&x| x * scale).chain(lanes).fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0.0_f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x * scale - max);
            *s += *x;
        }
    }
    let mut sum = 0.0_f32;
    for x in chunks.into_remainder() {
        *x = exp(*x * scale - max);
        sum += *x;
    }
    let inv = 1.0 / sums.iter().fold(sum, |a, &s| a + s);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Rows per parallel task: about 64k values, enough work to be worth a hand-off.
fn rows_per_task(cols: usize) -> usize {
    (65_536 / cols.max(1)).max(1)
}

struct Softmax;

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "osprey-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            bail!("softmax: a contiguous f32 tensor only")
        };
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let simd = Simd::detect();
        data[start..end]
            .par_chunks_mut(rows_per_task(cols) * cols)
            .for_each(|rows| softmax_rows(simd, rows, cols, None, 0));
        Ok(())
    }
}

/// `candle_nn::ops::softmax_last_dim(&xs)`, computed in place when `xs` is a contiguous f32 CPU
/// tensor (pass one no one else holds, such as fresh attention scores); candle's op otherwise.
pub fn softmax_last_dim(xs: Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.is_contiguous() {
        xs.inplace_op1(&Softmax)?;
        Ok(xs)
    } else {
        candle_nn::ops::softmax_last_dim(&xs)
    }
}

struct SoftmaxRelPos {
    kh: usize,
    kw: usize,
}

impl InplaceOp3 for SoftmaxRelPos {
    fn name(&self) -> &'static str {
        "osprey-softmax-rel-pos"
    }

    fn cpu_fwd(
        &self,
        attn: &mut CpuStorage,
        attn_layout: &Layout,
        rel_h: &CpuStorage,
        rel_h_layout: &Layout,
        rel_w: &CpuStorage,
        rel_w_layout: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(attn), CpuStorage::F32(rel_h), CpuStorage::F32(rel_w)) = (attn, rel_h, rel_w)
        else {
            bail!("softmax with relative positions: f32 only")
        };
        let (Some((a0, a1)), Some((h0, h1)), Some((w0, w1))) = (
            attn_layout.contiguous_offsets(),
            rel_h_layout.contiguous_offsets(),
            rel_w_layout.contiguous_offsets(),
        ) else {
            bail!("softmax with relative positions: contiguous tensors only")
        };
        let (kh, kw) = (self.kh, self.kw);
        let cols = kh * kw;
        let (attn, rel_h, rel_w) = (&mut attn[a0..a1], &rel_h[h0..h1], &rel_w[w0..w1]);
        let rows = attn.len() / cols;
        if rel_h.len() != rows * kh || rel_w.len() != rows * kw {
            bail!(
                "softmax with relative positions: {rows} rows of {kh} x {kw}, rel_h {}, rel_w {}",
                rel_h.len(),
                rel_w.len()
            )
        }
        let simd = Simd::detect();
        let per = rows_per_task(cols);
        attn.par_chunks_mut(per * cols).enumerate().for_each(|(task, chunk)| {
            softmax_rows(simd, chunk, cols, Some((rel_h, rel_w, kh, kw)), task * per)
        });
        Ok(())
    }
}

/// SAM's attention softmax with decomposed relative positions: `attn` `[B, qh * qw, kh * kw]`,
/// `rel_h` `[B, qh * qw, kh]`, `rel_w` `[B, qh * qw, kw]`; returns
/// `softmax((attn.view(B, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]).view(B, qh * qw, kh * kw))`,
/// in place in `attn` for contiguous f32 CPU tensors, with candle ops otherwise.
pub fn softmax_with_rel_pos(attn: Tensor, rel_h: &Tensor, rel_w: &Tensor) -> Result<Tensor> {
    let (b, q, cols) = attn.dims3()?;
    let (kh, kw) = (rel_h.dim(2)?, rel_w.dim(2)?);
    if kh * kw != cols || rel_h.dims3()? != (b, q, kh) || rel_w.dims3()? != (b, q, kw) {
        bail!(
            "softmax with relative positions: attn {:?}, rel_h {:?}, rel_w {:?}",
            attn.dims(),
            rel_h.dims(),
            rel_w.dims()
        )
    }
    let plain_f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if plain_f32_cpu(&attn) && plain_f32_cpu(rel_h) && plain_f32_cpu(rel_w) {
        attn.inplace_op3(rel_h, rel_w, &SoftmaxRelPos { kh, kw })?;
        return Ok(attn);
    }
    let attn = attn.reshape((b, q, kh, kw))?;
    let attn = attn.broadcast_add(&rel_h.unsqueeze(3)?)?.broadcast_add(&rel_w.unsqueeze(2)?)?;
    candle_nn::ops::softmax_last_dim(&attn.reshape((b, q, cols))?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * scale
            })
            .collect()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Every row length around the lane width, on every instruction set this CPU has, against
    /// candle's softmax; and the same bits on every instruction set.
    #[test]
    fn softmax_matches_candle_on_every_instruction_set() -> Result<()> {
        for cols in [1, 7, 8, 9, 17, 196, 4096] {
            let xs = Tensor::from_vec(random(3 * cols, cols as u32, 40.0), (3, cols), &Device::Cpu)?;
            let want = candle_nn::ops::softmax_last_dim(&xs)?;
            let mut first: Option<Vec<f32>> = None;
            for simd in Simd::available() {
                let mut got = xs.flatten_all()?.to_vec1::<f32>()?;
                for row in got.chunks_exact_mut(cols) {
                    softmax_rows(simd, row, cols, None, 0);
                }
                let got_t = Tensor::from_vec(got.clone(), (3, cols), &Device::Cpu)?;
                let diff = max_abs_diff(&got_t, &want)?;
                assert!(diff < 1e-6, "{} cols {cols}: max abs diff {diff:e}", simd.name());
                match &first {
                    None => first = Some(got),
                    Some(bits) => assert_eq!(bits, &got, "{} cols {cols}: other bits", simd.name()),
                }
            }
            // Scaled: softmax(x * 0.125) against candle's softmax of the scaled scores.
            let want_scaled = candle_nn::ops::softmax_last_dim(&(&xs * 0.125)?)?;
            let mut scaled = xs.flatten_all()?.to_vec1::<f32>()?;
            for row in scaled.chunks_exact_mut(cols) {
                softmax_scaled(Simd::detect(), row, 0.125);
            }
            let scaled = Tensor::from_vec(scaled, (3, cols), &Device::Cpu)?;
            assert!(max_abs_diff(&scaled, &want_scaled)? < 1e-6, "cols {cols}: scaled");
            let via_op = softmax_last_dim(xs.copy()?)?;
            assert!(max_abs_diff(&via_op, &want)? < 1e-6);
        }
        Ok(())
    }

    /// The fused version against the candle ops it replaces, on a window (14 x 14) and a
    /// non-square grid, several rows per task and a batch of heads.
    #[test]
    fn softmax_with_rel_pos_matches_the_candle_ops() -> Result<()> {
        for (b, qh, qw) in [(3, 14, 14), (2, 5, 9), (1, 40, 40)] {
            let (q, cols) = (qh * qw, qh * qw);
            let attn = Tensor::from_vec(random(b * q * cols, 1, 20.0), (b, q, cols), &Device::Cpu)?;
            let rel_h = Tensor::from_vec(random(b * q * qh, 2, 6.0), (b, q, qh), &Device::Cpu)?;
            let rel_w = Tensor::from_vec(random(b * q * qw, 3, 6.0), (b, q, qw), &Device::Cpu)?;
            let want = {
                let a = attn.reshape((b, qh, qw, qh, qw))?;
                let a = a.broadcast_add(&rel_h.reshape((b, qh, qw, qh, 1))?)?;
                let a = a.broadcast_add(&rel_w.reshape((b, qh, qw, 1, qw))?)?;
                candle_nn::ops::softmax_last_dim(&a.reshape((b, q, cols))?)?
            };
            let got = softmax_with_rel_pos(attn.copy()?, &rel_h, &rel_w)?;
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < 1e-6, "{b} x {qh} x {qw}: max abs diff {diff:e}");
            // The candle-ops path (a non-contiguous `rel_w`) gives the same.
            let rel_w_strided = rel_w.t()?.contiguous()?.t()?;
            let fallback = softmax_with_rel_pos(attn.copy()?, &rel_h, &rel_w_strided)?;
            assert!(max_abs_diff(&fallback, &want)? < 1e-7);
        }
        Ok(())
    }
}
