//! Mask pooling of Osprey's mask extractor (`osprey/model/layer.py::MaskPooling`,
//! docs/MODEL.md#mask-pooling), as candle custom ops with a CPU implementation (threads,
//! run-encoded masks, prefix sums) and a CUDA kernel (`kernels/mask_pool.cu`, built with NVRTC at run time, only with
//! the `cuda` feature).
//!
//! - [`mask_pool`]: masks `[N, H, W]` at the image resolution and one feature level `[C, h, w]`
//!   give `[N, C]`: each mask is resized to `(h, w)` (PyTorch bilinear, `align_corners=False`, no
//!   antialias), binarised with `> 0`, and averaged over: `sum_p F[c, p] * m[p] / (sum m + 1e-8)`.
//!   Masks are never resized to the tower's input size first: that would give other masks.
//! - [`mask_pool_levels`]: the same for several feature levels in one call, reading each mask
//!   once (at large N the per-mask work, not the features, costs most).
//! - [`mask_resize`]: masks resized to `(out_h, out_w)` without binarising (the `<pos>` input).
//!
//! The CPU implementation and the CUDA kernel compute the same sums by different routes: the
//! kernel resizes every mask cell and adds the features of active cells; the CPU run-encodes each
//! mask and reads sums off column prefix sums (see "CPU implementation" below). Both binarise the
//! same bilinear values, and their results agree to float rounding (tested by `cuda_matches_cpu`).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor, bail,
};
use osprey_common::resize::{LinearTap, bilinear_tap, torch_bilinear, torch_linear_taps};
use rayon::prelude::*;

use osprey_kernels::{Simd, multiversion};

/// Added to the mask area before dividing, as upstream does (an empty mask pools to 0).
const AREA_EPS: f32 = 1e-8;

/// Masked averages of one feature level: masks `[N, H, W]` (u8 or f32, values 0/1) and features
/// `[C, h, w]` f32 on the same device give `[N, C]` f32.
pub fn mask_pool(masks: &Tensor, features: &Tensor) -> Result<Tensor> {
    masks.contiguous()?.apply_op2_no_bwd(&features.contiguous()?, &MaskPool)
}

/// [`mask_pool`] of every level in `features` (`[C_l, h_l, w_l]` f32 each), one `[N, C_l]` per
/// level. On the CPU each mask is read once for all levels; elsewhere this is one op per level.
pub fn mask_pool_levels(masks: &Tensor, features: &[Tensor]) -> Result<Vec<Tensor>> {
    if !matches!(masks.device(), Device::Cpu) {
        return features.iter().map(|f| mask_pool(masks, f)).collect();
    }
    let masks = masks.contiguous()?;
    let features: Vec<Tensor> = features.iter().map(|f| f.contiguous()).collect::<Result<_>>()?;
    let (mask_storage, mask_layout) = masks.storage_and_layout();
    let mut guards = Vec::with_capacity(features.len());
    for f in &features {
        guards.push(f.storage_and_layout());
    }
    let mut levels = Vec::with_capacity(features.len());
    let mut dims = None;
    for (storage, layout) in &guards {
        let d = pool_dims(mask_layout, mask_storage.dtype(), layout, storage.dtype())?;
        dims = Some([d[0], d[1], d[2]]);
        let feats = match &**storage {
            Storage::Cpu(CpuStorage::F32(f)) => contiguous(f, layout, "mask-pool features")?,
            Storage::Cpu(_) => bail!("mask-pool: features must be f32"),
            _ => bail!("mask-pool: features and masks must be on the same device"),
        };
        levels.push((feats, [d[3], d[4], d[5]]));
    }
    let Some(mask_dims) = dims else { return Ok(Vec::new()) };
    let pooled = match &*mask_storage {
        Storage::Cpu(CpuStorage::U8(m)) => pool_levels_cpu(
            contiguous(m, mask_layout, "mask-pool masks")?,
            mask_dims,
            &levels,
            Route::Cheaper,
        ),
        Storage::Cpu(CpuStorage::F32(m)) => pool_levels_cpu(
            contiguous(m, mask_layout, "mask-pool masks")?,
            mask_dims,
            &levels,
            Route::Cheaper,
        ),
        _ => bail!("mask-pool: masks must be u8 or f32"),
    };
    pooled
        .into_iter()
        .zip(&levels)
        .map(|(p, (_, [c, _, _]))| Tensor::from_vec(p, (mask_dims[0], *c), &Device::Cpu))
        .collect()
}

/// Masks `[N, H, W]` (u8 or f32) resized to `[N, out_h * out_w]` f32, not binarised.
pub fn mask_resize(masks: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    masks.contiguous()?.apply_op1_no_bwd(&MaskResize { out_h, out_w })
}

/// The `[N, C]` masked-average op; see [`mask_pool`].
pub struct MaskPool;

/// The `<pos>` resize op; see [`mask_resize`].
pub struct MaskResize {
    pub out_h: usize,
    pub out_w: usize,
}

/// The slice a contiguous layout covers.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what} must be contiguous"),
    }
}

/// Checks ranks, sizes and dtypes; returns `(n, in_h, in_w, c, h, w)`.
fn pool_dims(masks: &Layout, mask_dtype: DType, feats: &Layout, feat_dtype: DType) -> Result<[usize; 6]> {
    let (n, in_h, in_w) = masks.shape().dims3()?;
    let (c, h, w) = feats.shape().dims3()?;
    if !matches!(mask_dtype, DType::U8 | DType::F32) {
        bail!("mask-pool: masks must be u8 or f32, got {mask_dtype:?}")
    }
    if feat_dtype != DType::F32 {
        bail!("mask-pool: features must be f32, got {feat_dtype:?}")
    }
    if in_h == 0 || in_w == 0 || h == 0 || w == 0 {
        bail!("mask-pool: empty mask ({in_h}x{in_w}) or feature map ({h}x{w})")
    }
    Ok([n, in_h, in_w, c, h, w])
}

// ---- CPU implementation -------------------------------------------------------------------------
//
// Each level's sum over a mask's active pixels is taken from column prefix sums of the features:
// with P[y][x] = sum of F[y'][x] over y' < y, a vertical run of active pixels y0..y1 in column x sums
// to P[y1][x] - P[y0][x]. A mask's cost is then its number of runs (about its width in grid cells),
// not its area, and the features are read once per level whatever the number of masks.
//
// 1. Per mask (threads over masks): find the rows and columns holding values > 0 (one read of the
//    mask), then resize only the grid cells whose bilinear taps reach them (every other cell is 0),
//    binarise, and record each level's vertical runs and count.
// 2. Per level (threads over blocks of `BLOCK` channels): build the block's prefix sums in f64,
//    channels innermost, so one run adds `BLOCK` contiguous values; then every mask's runs.

/// Channels per prefix-sum block: 8 f64 = one 64-byte cache line per grid cell.
const BLOCK: usize = 8;

/// A mask element: u8 or f32.
trait MaskValue: Copy + Into<f32> + Send + Sync {
    /// Largest value of a row (vectorises; `NaN`s are skipped).
    fn row_max(row: &[Self]) -> f32;
    fn is_positive(self) -> bool;
}

impl MaskValue for u8 {
    fn row_max(row: &[u8]) -> f32 {
        f32::from(row.iter().fold(0_u8, |a, &b| a.max(b)))
    }
    fn is_positive(self) -> bool {
        self > 0
    }
}

impl MaskValue for f32 {
    fn row_max(row: &[f32]) -> f32 {
        row.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
    }
    fn is_positive(self) -> bool {
        self > 0.0
    }
}

/// Index of the first value > 0, testing 32 values at a time (vectorised) before looking closer.
fn first_positive<T: MaskValue>(row: &[T]) -> Option<usize> {
    let mut base = 0;
    for chunk in row.chunks(32) {
        if T::row_max(chunk) > 0.0 {
            return chunk.iter().position(|v| v.is_positive()).map(|i| base + i);
        }
        base += chunk.len();
    }
    None
}

/// Index of the last value > 0, as [`first_positive`] from the end.
fn last_positive<T: MaskValue>(row: &[T]) -> Option<usize> {
    let mut end = row.len();
    for chunk in row.rchunks(32) {
        end -= chunk.len();
        if T::row_max(chunk) > 0.0 {
            return chunk.iter().rposition(|v| v.is_positive()).map(|i| end + i);
        }
    }
    None
}

/// Bounds `[y0, y1, x0, x1]` (inclusive) of a plane's values > 0, `None` when there are none.
/// Only these can make a resized value > 0: every bilinear weight is >= 0. Each row is tested
/// whole (vectorised); only the margins outside the columns found so far are searched further.
fn positive_bounds<T: MaskValue>(plane: &[T], in_w: usize) -> Option<[usize; 4]> {
    let mut bounds: Option<[usize; 4]> = None;
    for (y, row) in plane.chunks_exact(in_w).enumerate() {
        if T::row_max(row) > 0.0 {
            bounds = Some(match bounds {
                None => {
                    let first = first_positive(row).expect("a positive value");
                    [y, y, first, last_positive(row).expect("a positive value")]
                }
                Some([y0, _, x0, x1]) => {
                    let first = first_positive(&row[..x0]).unwrap_or(x0);
                    let last = last_positive(&row[x1 + 1..]).map_or(x1, |i| x1 + 1 + i);
                    [y0, y, first, last]
                }
            });
        }
    }
    bounds
}

/// Output indices `lo..hi` whose taps reach source indices `first..=last` (taps are monotonic).
fn reached(taps: &[LinearTap], first: usize, last: usize) -> std::ops::Range<usize> {
    let lo = taps.partition_point(|t| t.i1 < first);
    let hi = taps.partition_point(|t| t.i0 <= last);
    lo..hi.max(lo)
}

/// One level's grid geometry and taps.
struct LevelGrid {
    h: usize,
    w: usize,
    ys: Vec<LinearTap>,
    xs: Vec<LinearTap>,
}

/// A mask's active cells on one level, as runs of cells (`y * w + x`) both ways.
#[derive(Default)]
struct LevelRuns {
    /// Vertical runs, pairs `[end, start]` of prefix-sum cells (the prefix route).
    columns: Vec<[u32; 2]>,
    /// Horizontal runs `[start, end)`, contiguous in a channel's row (the direct route).
    rows: Vec<[u32; 2]>,
    active: usize,
}

/// Resizes, binarises and run-encodes one mask on every level.
fn mask_runs<T: MaskValue>(
    plane: &[T],
    in_w: usize,
    grids: &[LevelGrid],
    on: &mut Vec<bool>,
) -> Vec<LevelRuns> {
    let Some([y0, y1, x0, x1]) = positive_bounds(plane, in_w) else {
        return grids.iter().map(|_| LevelRuns::default()).collect();
    };
    grids
        .iter()
        .map(|g| {
            let (oys, oxs) = (reached(&g.ys, y0, y1), reached(&g.xs, x0, x1));
            let bw = oxs.len();
            on.clear();
            for ty in &g.ys[oys.clone()] {
                let r0 = &plane[ty.i0 * in_w..(ty.i0 + 1) * in_w];
                let r1 = &plane[ty.i1 * in_w..(ty.i1 + 1) * in_w];
                on.extend(g.xs[oxs.clone()].iter().map(|tx| bilinear_tap(r0, r1, tx, ty) > 0.0));
            }
            let mut level = LevelRuns::default();
            for (by, oy) in oys.clone().enumerate() {
                let row = &on[by * bw..(by + 1) * bw];
                let mut bx = 0;
                while let Some(first) = row[bx..].iter().position(|&b| b) {
                    let start = bx + first;
                    let len = row[start..].iter().position(|&b| !b).unwrap_or(bw - start);
                    let cell = oy * g.w + oxs.start + start;
                    level.rows.push([cell as u32, (cell + len) as u32]);
                    bx = start + len;
                }
            }
            for (bx, ox) in oxs.clone().enumerate() {
                let mut start = None;
                for (by, oy) in oys.clone().enumerate() {
                    match (on[by * bw + bx], start) {
                        (true, None) => start = Some(oy),
                        (false, Some(s)) => {
                            level.columns.push([(oy * g.w + ox) as u32, (s * g.w + ox) as u32]);
                            level.active += oy - s;
                            start = None;
                        }
                        _ => {}
                    }
                }
                if let Some(s) = start {
                    level.columns.push([(oys.end * g.w + ox) as u32, (s * g.w + ox) as u32]);
                    level.active += oys.end - s;
                }
            }
            level
        })
        .collect()
}

/// The `BLOCK` channel rows from `c0` of a level `[C, hw]`; rows past `C` read as zeros.
fn block_rows<'a>(feats: &'a [f32], hw: usize, c0: usize, zeros: &'a [f32]) -> [&'a [f32]; BLOCK] {
    std::array::from_fn(|k| feats.get((c0 + k) * hw..(c0 + k + 1) * hw).unwrap_or(zeros))
}

multiversion! {
    /// `prefix[(y * w + x) * BLOCK + k]` = sum over y' < y of `rows[k][y' * w + x]`, in f64.
    fn column_prefix_sums(rows: &[&[f32]; BLOCK], w: usize, prefix: &mut [f64]) {
        prefix[..w * BLOCK].fill(0.0);
        let h = rows[0].len() / w.max(1);
        for y in 0..h {
            let (done, next) = prefix.split_at_mut((y + 1) * w * BLOCK);
            let above = &done[y * w * BLOCK..];
            for (x, (next, above)) in next.chunks_exact_mut(BLOCK).zip(above.chunks_exact(BLOCK)).take(w).enumerate() {
                for k in 0..BLOCK {
                    next[k] = above[k] + f64::from(rows[k][y * w + x]);
                }
            }
        }
    }
}

multiversion! {
    /// Each mask's sums over its vertical runs off the prefix sums (mask `i`'s runs are
    /// `runs[offsets[i]..offsets[i + 1]]`), times its weight, into `out` `[n, BLOCK]`.
    fn sums_from_prefix(prefix: &[f64], runs: &[[u32; 2]], offsets: &[usize], weights: &[f64], out: &mut [f32]) {
        for ((span, weight), dst) in offsets.windows(2).zip(weights).zip(out.chunks_exact_mut(BLOCK)) {
            let mut acc = [0.0_f64; BLOCK];
            for &[end, start] in &runs[span[0]..span[1]] {
                let hi = &prefix[end as usize * BLOCK..][..BLOCK];
                let lo = &prefix[start as usize * BLOCK..][..BLOCK];
                for k in 0..BLOCK {
                    acc[k] += hi[k] - lo[k];
                }
            }
            for k in 0..BLOCK {
                dst[k] = (acc[k] * weight) as f32;
            }
        }
    }
}

/// Sum of a short contiguous run in f32, over 8 partial sums (one AVX register).
#[inline(always)]
fn run_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0_f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

multiversion! {
    /// Every mask's sums straight off the features, in one pass down the channel rows: the
    /// horizontal runs `[mask, start, end)` come sorted by grid row, each contiguous in a channel's
    /// row, summed in f32 and added up in f64 into `acc` `[n, BLOCK]`. Cheaper than prefix sums
    /// when the masks cover few cells in all.
    fn sums_direct(rows: &[&[f32]; BLOCK], runs: &[[u32; 3]], acc: &mut [f64]) {
        for &[mask, start, end] in runs {
            let acc = &mut acc[mask as usize * BLOCK..][..BLOCK];
            for k in 0..BLOCK {
                acc[k] += f64::from(run_sum(&rows[k][start as usize..end as usize]));
            }
        }
    }
}

thread_local! {
    /// Each thread's prefix-sum buffer, kept between calls: a fresh megabyte per block costs
    /// more in page faults than the sums themselves.
    static PREFIX: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a level's sums are taken.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// Whichever [`direct_is_cheaper`] picks.
    Cheaper,
    /// Straight off the features ([`sums_direct`]); the forced routes are for the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Direct,
    /// Off column prefix sums ([`sums_from_prefix`]).
    #[cfg_attr(not(test), allow(dead_code))]
    Prefix,
}

/// Whether summing the runs straight off the features costs less than building the level's
/// prefix sums (which touches every cell in f64) and reading them at both ends of every vertical
/// run. Per channel, in rough units of one value added: a horizontal run costs its cells plus a
/// fixed overhead; a prefix-sum cell about two; a vertical run a quarter (8 channels at once).
fn direct_is_cheaper(hw: usize, masks: &[&LevelRuns]) -> bool {
    let cells: usize = masks.iter().map(|m| m.active).sum();
    let row_runs: usize = masks.iter().map(|m| m.rows.len()).sum();
    let column_runs: usize = masks.iter().map(|m| m.columns.len()).sum();
    cells + 4 * row_runs <= 2 * hw + column_runs / 4
}

/// `[N, C]` masked averages of one level `[C, h, w]` from the masks' runs on it.
fn pool_level(feats: &[f32], c: usize, grid: &LevelGrid, masks: &[&LevelRuns], route: Route) -> Vec<f32> {
    let (h, w) = (grid.h, grid.w);
    let hw = h * w;
    let n = masks.len();
    // Upstream divides the mask by its area before the weighted sum: F * (m / den).
    let weights: Vec<f64> = masks.iter().map(|m| f64::from(1.0 / (m.active as f32 + AREA_EPS))).collect();
    let direct = match route {
        Route::Cheaper => direct_is_cheaper(hw, masks),
        Route::Direct => true,
        Route::Prefix => false,
    };
    let zeros = vec![0.0_f32; hw];
    let simd = Simd::detect();
    let blocks: Vec<Vec<f32>> = if direct {
        // Every mask's horizontal runs, sorted by grid row (counting sort; masks in order).
        let mut per_row = vec![0_usize; h + 1];
        for m in masks {
            for run in &m.rows {
                per_row[run[0] as usize / w + 1] += 1;
            }
        }
        for y in 0..h {
            per_row[y + 1] += per_row[y];
        }
        let mut runs = vec![[0_u32; 3]; per_row[h]];
        for (i, m) in masks.iter().enumerate() {
            for &[start, end] in &m.rows {
                let slot = &mut per_row[start as usize / w];
                runs[*slot] = [i as u32, start, end];
                *slot += 1;
            }
        }
        (0..c.div_ceil(BLOCK))
            .into_par_iter()
            .map(|block| {
                let rows = block_rows(feats, hw, block * BLOCK, &zeros);
                let mut acc = vec![0.0_f64; n * BLOCK];
                sums_direct(simd, &rows, &runs, &mut acc);
                acc.chunks_exact(BLOCK)
                    .zip(&weights)
                    .flat_map(|(sums, weight)| sums.iter().map(move |s| (s * weight) as f32))
                    .collect()
            })
            .collect()
    } else {
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        let mut runs = Vec::new();
        for m in masks {
            runs.extend_from_slice(&m.columns);
            offsets.push(runs.len());
        }
        (0..c.div_ceil(BLOCK))
            .into_par_iter()
            .map(|block| {
                let rows = block_rows(feats, hw, block * BLOCK, &zeros);
                let mut out = vec![0.0_f32; n * BLOCK];
                PREFIX.with_borrow_mut(|prefix| {
                    prefix.resize(prefix.len().max((h + 1) * w * BLOCK), 0.0);
                    column_prefix_sums(simd, &rows, w, prefix);
                    sums_from_prefix(simd, prefix, &runs, &offsets, &weights, &mut out);
                });
                out
            })
            .collect()
    };
    let mut out = vec![0.0_f32; n * c];
    out.par_chunks_mut(c.max(1)).enumerate().for_each(|(i, row)| {
        for (block, dst) in blocks.iter().zip(row.chunks_mut(BLOCK)) {
            dst.copy_from_slice(&block[i * BLOCK..][..dst.len()]);
        }
    });
    out
}

/// CPU [`mask_pool_levels`]: masks `[n, in_h, in_w]` and levels `[c, h, w]` to `[n, c]` each.
fn pool_levels_cpu<T: MaskValue>(
    masks: &[T],
    [n, in_h, in_w]: [usize; 3],
    levels: &[(&[f32], [usize; 3])],
    route: Route,
) -> Vec<Vec<f32>> {
    let grids: Vec<LevelGrid> = levels
        .iter()
        .map(|&(_, [_, h, w])| LevelGrid {
            h,
            w,
            ys: torch_linear_taps(in_h, h),
            xs: torch_linear_taps(in_w, w),
        })
        .collect();
    let per_mask: Vec<Vec<LevelRuns>> = if n == 0 {
        Vec::new()
    } else {
        masks
            .par_chunks_exact(in_h * in_w)
            .map_init(Vec::new, |on, plane| mask_runs(plane, in_w, &grids, on))
            .collect()
    };
    levels
        .iter()
        .zip(&grids)
        .enumerate()
        .map(|(l, (&(feats, [c, _, _]), grid))| {
            let runs: Vec<&LevelRuns> = per_mask.iter().map(|m| &m[l]).collect();
            pool_level(feats, c, grid, &runs, route)
        })
        .collect()
}

impl CustomOp2 for MaskPool {
    fn name(&self) -> &'static str {
        "osprey-mask-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [n, in_h, in_w, c, h, w] = pool_dims(l1, s1.dtype(), l2, s2.dtype())?;
        let feats = match s2 {
            CpuStorage::F32(f) => contiguous(f, l2, "mask-pool features")?,
            _ => bail!("mask-pool: features must be f32"),
        };
        let level = [(feats, [c, h, w])];
        let mut out = match s1 {
            CpuStorage::U8(m) => pool_levels_cpu(
                contiguous(m, l1, "mask-pool masks")?,
                [n, in_h, in_w],
                &level,
                Route::Cheaper,
            ),
            CpuStorage::F32(m) => pool_levels_cpu(
                contiguous(m, l1, "mask-pool masks")?,
                [n, in_h, in_w],
                &level,
                Route::Cheaper,
            ),
            _ => bail!("mask-pool: masks must be u8 or f32"),
        };
        Ok((CpuStorage::F32(out.remove(0)), Shape::from((n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::mask_pool(s1, l1, s2, l2)
    }
}

impl CustomOp1 for MaskResize {
    fn name(&self) -> &'static str {
        "osprey-mask-resize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, in_h, in_w) = layout.shape().dims3()?;
        let (out_h, out_w) = (self.out_h, self.out_w);
        let resized = match storage {
            CpuStorage::U8(m) => {
                torch_bilinear(contiguous(m, layout, "mask-resize masks")?, n, in_h, in_w, out_h, out_w)
            }
            CpuStorage::F32(m) => {
                torch_bilinear(contiguous(m, layout, "mask-resize masks")?, n, in_h, in_w, out_h, out_w)
            }
            other => bail!("mask-resize: masks must be u8 or f32, got {:?}", other.dtype()),
        };
        let resized = resized.map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(resized), Shape::from((n, out_h * out_w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::mask_resize(storage, layout, self.out_h, self.out_w)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launches of `kernels/mask_pool.cu`.

    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape, bail};

    use super::pool_dims;

    const MODULE: &str = "osprey_mask_pool";
    /// Threads per block of the pooling kernel (8 warps).
    const POOL_THREADS: u32 = 256;
    /// The default limit of dynamic shared memory per block.
    const MAX_SHARED_BYTES: usize = 48 * 1024;

    /// The kernels' PTX, compiled once per process.
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        match PTX.get_or_init(super::compile_kernels) {
            Ok(ptx) => Ok(ptx),
            Err(e) => bail!("compiling kernels/mask_pool.cu with NVRTC: {e}"),
        }
    }

    fn offsets(layout: &Layout, what: &str) -> Result<(usize, usize)> {
        match layout.contiguous_offsets() {
            Some(o) => Ok(o),
            None => bail!("{what} must be contiguous"),
        }
    }

    fn to_i32(v: usize) -> Result<i32> {
        match i32::try_from(v) {
            Ok(v) => Ok(v),
            Err(_) => bail!("mask-pool: size {v} is too large for the kernel"),
        }
    }

    pub(super) fn mask_pool(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = pool_dims(l1, s1.dtype(), l2, s2.dtype())?;
        let [n, in_h, in_w, c, h, w] = dims;
        let dev = s1.device().clone();
        let mut out = dev.alloc_zeros::<f32>(n * c)?;
        if n > 0 && c > 0 {
            let words = (h * w).div_ceil(32);
            let shared = (words + POOL_THREADS as usize / 32) * 4;
            if shared > MAX_SHARED_BYTES {
                bail!(
                    "mask-pool: a {h}x{w} feature map needs {shared} bytes of shared memory (limit {MAX_SHARED_BYTES})"
                )
            }
            let channel_groups = c.div_ceil(POOL_THREADS as usize / 32).min(65_535);
            let cfg = LaunchConfig {
                grid_dim: (to_i32(n)? as u32, channel_groups as u32, 1),
                block_dim: (POOL_THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            let (f0, f1) = offsets(l2, "mask-pool features")?;
            let feats = s2.as_cuda_slice::<f32>()?.slice(f0..f1);
            let (m0, m1) = offsets(l1, "mask-pool masks")?;
            let sizes = [to_i32(in_h)?, to_i32(in_w)?, to_i32(c)?, to_i32(h)?, to_i32(w)?];
            // Generic over the mask element type: the launch is the same for u8 and f32.
            fn launch<T: DeviceRepr>(
                dev: &candle_core::CudaDevice,
                name: &str,
                masks: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
                feats: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
                out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
                sizes: &[i32],
                cfg: LaunchConfig,
            ) -> Result<()> {
                let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
                let mut builder = func.builder();
                builder.arg(masks);
                builder.arg(feats);
                builder.arg(out);
                for s in sizes {
                    builder.arg(s);
                }
                // SAFETY: the kernel reads n*in_h*in_w masks and c*h*w features and writes n*c
                // outputs, the sizes of the buffers passed.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(())
            }
            match s1.dtype() {
                DType::U8 => {
                    let masks = s1.as_cuda_slice::<u8>()?.slice(m0..m1);
                    launch(&dev, "mask_pool_u8", &masks, &feats, &mut out, &sizes, cfg)?
                }
                DType::F32 => {
                    let masks = s1.as_cuda_slice::<f32>()?.slice(m0..m1);
                    launch(&dev, "mask_pool_f32", &masks, &feats, &mut out, &sizes, cfg)?
                }
                other => bail!("mask-pool: masks must be u8 or f32, got {other:?}"),
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, c))))
    }

    pub(super) fn mask_resize(
        storage: &CudaStorage,
        layout: &Layout,
        out_h: usize,
        out_w: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, in_h, in_w) = layout.shape().dims3()?;
        if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
            bail!("mask-resize: cannot resize {in_h}x{in_w} to {out_h}x{out_w}")
        }
        let dev = storage.device().clone();
        let total = n * out_h * out_w;
        let mut out = dev.alloc_zeros::<f32>(total)?;
        if total > 0 {
            let threads = 256_u32;
            let blocks = total.div_ceil(threads as usize).min(65_535 * 16) as u32;
            let cfg =
                LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            let (m0, m1) = offsets(layout, "mask-resize masks")?;
            let sizes = [to_i32(n)?, to_i32(in_h)?, to_i32(in_w)?, to_i32(out_h)?, to_i32(out_w)?];
            fn launch<T: DeviceRepr>(
                dev: &candle_core::CudaDevice,
                name: &str,
                masks: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
                out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
                sizes: &[i32],
                cfg: LaunchConfig,
            ) -> Result<()> {
                let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
                let mut builder = func.builder();
                builder.arg(masks);
                builder.arg(out);
                for s in sizes {
                    builder.arg(s);
                }
                // SAFETY: the kernel reads n*in_h*in_w masks and writes n*out_h*out_w values.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(())
            }
            match storage.dtype() {
                DType::U8 => {
                    let masks = storage.as_cuda_slice::<u8>()?.slice(m0..m1);
                    launch(&dev, "mask_resize_u8", &masks, &mut out, &sizes, cfg)?
                }
                DType::F32 => {
                    let masks = storage.as_cuda_slice::<f32>()?.slice(m0..m1);
                    launch(&dev, "mask_resize_f32", &masks, &mut out, &sizes, cfg)?
                }
                other => bail!("mask-resize: masks must be u8 or f32, got {other:?}"),
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, out_h * out_w))))
    }
}

/// Source of the CUDA kernels.
pub const KERNEL_SOURCE: &str = include_str!("../kernels/mask_pool.cu");

/// Compiles [`KERNEL_SOURCE`] to PTX with NVRTC (found at run time). `--fmad=false` keeps
/// multiply-adds unfused, as on the CPU, so both sides round alike.
#[cfg(any(feature = "cuda", feature = "kernel-check"))]
pub fn compile_kernels() -> std::result::Result<String, String> {
    let opts = cudarc::nvrtc::CompileOptions { fmad: Some(false), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts)
        .map(|p| p.to_src())
        .map_err(|e| format!("{e:?}"))
}

/// The same pooling written with plain candle ops (interpolation matrices and matmuls); a check
/// of the custom op, far slower and memory-hungrier.
pub fn mask_pool_naive(masks: &Tensor, features: &Tensor) -> Result<Tensor> {
    let (n, in_h, in_w) = masks.dims3()?;
    let (c, h, w) = features.dims3()?;
    let dev = masks.device();
    // Bilinear resizing is separable: out = Ry [h, H] @ m [H, W] @ Rx^T [W, w].
    let matrix = |in_size: usize, out_size: usize| -> Result<Tensor> {
        let mut m = vec![0.0_f32; out_size * in_size];
        for (o, tap) in torch_linear_taps(in_size, out_size).iter().enumerate() {
            m[o * in_size + tap.i0] += tap.w0;
            m[o * in_size + tap.i1] += tap.w1;
        }
        Tensor::from_vec(m, (out_size, in_size), dev)
    };
    let ry = matrix(in_h, h)?.broadcast_left(n)?;
    let rx = matrix(in_w, w)?.t()?.broadcast_left(n)?;
    let m = masks.to_dtype(DType::F32)?;
    let resized = ry.matmul(&m)?.matmul(&rx.contiguous()?)?;
    let binary = resized.gt(0.0)?.to_dtype(DType::F32)?.reshape((n, h * w))?;
    let den = (binary.sum_keepdim(1)? + f64::from(AREA_EPS))?;
    let weights = binary.broadcast_div(&den)?;
    weights.matmul(&features.reshape((c, h * w))?.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::Device;

    fn fixture_masks() -> Tensor {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/vision/masks.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap().remove("masks").unwrap()
    }

    fn random_features(c: usize, h: usize, w: usize, dev: &Device) -> Tensor {
        Tensor::randn(0.0_f32, 1.0, (c, h, w), dev).unwrap()
    }

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-6)
    }

    #[test]
    fn custom_pool_matches_naive_candle_ops() {
        let masks = fixture_masks();
        assert_eq!(masks.dims(), [10, 103, 157]);
        // Down and up in each axis, and the identity size.
        for (h, w) in [(16, 16), (8, 8), (4, 4), (2, 2), (37, 200), (103, 157)] {
            let feats = random_features(5, h, w, &Device::Cpu);
            let fast = mask_pool(&masks, &feats).unwrap();
            let naive = mask_pool_naive(&masks, &feats).unwrap();
            assert_eq!(fast.dims(), [10, 5]);
            let err = max_rel_err(&fast, &naive);
            assert!(err < 1e-5, "{h}x{w}: {err}");
            let fast_f32 = mask_pool(&masks.to_dtype(DType::F32).unwrap(), &feats).unwrap();
            assert_eq!(fast.to_vec2::<f32>().unwrap(), fast_f32.to_vec2::<f32>().unwrap());
        }
    }

    /// The straightforward definition: resize every cell, binarise, average in f64.
    fn reference_pool(masks: &Tensor, feats: &Tensor) -> Vec<Vec<f32>> {
        let (n, in_h, in_w) = masks.dims3().unwrap();
        let (c, h, w) = feats.dims3().unwrap();
        let planes: Vec<f32> = masks.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let feats: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
        let (ys, xs) = (torch_linear_taps(in_h, h), torch_linear_taps(in_w, w));
        (0..n)
            .map(|m| {
                let plane = &planes[m * in_h * in_w..(m + 1) * in_h * in_w];
                let mut active = Vec::new();
                for (oy, ty) in ys.iter().enumerate() {
                    let r0 = &plane[ty.i0 * in_w..(ty.i0 + 1) * in_w];
                    let r1 = &plane[ty.i1 * in_w..(ty.i1 + 1) * in_w];
                    for (ox, tx) in xs.iter().enumerate() {
                        if bilinear_tap(r0, r1, tx, ty) > 0.0 {
                            active.push(oy * w + ox);
                        }
                    }
                }
                let weight = 1.0 / (active.len() as f32 + AREA_EPS);
                (0..c)
                    .map(|ch| {
                        let sum: f64 = active.iter().map(|&p| f64::from(feats[ch * h * w + p])).sum();
                        (sum * f64::from(weight)) as f32
                    })
                    .collect()
            })
            .collect()
    }

    /// All levels in one call equal one call per level and the straightforward definition, for
    /// u8 masks and f32 masks with negative values (only values > 0 can switch a cell on), by
    /// either route of the sums.
    #[test]
    fn levels_match_the_definition() {
        let dev = Device::Cpu;
        let (n, in_h, in_w) = (7, 45, 61);
        let mut values: Vec<f32> = vec![0.0; n * in_h * in_w];
        for (i, v) in values.iter_mut().enumerate() {
            let (m, y, x) = (i / (in_h * in_w), (i / in_w) % in_h, i % in_w);
            // Mask 0 empty, 1 full, 2 a single pixel at the corner, the rest blobs and stripes.
            *v = match m {
                0 => 0.0,
                1 => 1.0,
                2 => f32::from(y == in_h - 1 && x == in_w - 1),
                3 => f32::from((y as i64 - 20).pow(2) + (x as i64 - 30).pow(2) < 150),
                4 => f32::from(x % 9 == 0 || y % 13 == 5),
                5 => f32::from((x + 2 * y) % 17 < 3),
                _ => f32::from(x < 3 && y > 40),
            };
        }
        let masks_u8 =
            Tensor::from_vec(values.iter().map(|&v| v as u8).collect::<Vec<u8>>(), (n, in_h, in_w), &dev)
                .unwrap();
        // Negative values where the u8 masks hold 0 in every other row.
        let signed: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| if v == 0.0 && (i / in_w) % 2 == 0 { -0.75 } else { v })
            .collect();
        let masks_signed = Tensor::from_vec(signed, (n, in_h, in_w), &dev).unwrap();
        let levels: Vec<Tensor> = [(9, 16, 16), (5, 8, 8), (17, 3, 5), (3, 45, 61), (4, 90, 17)]
            .iter()
            .map(|&(c, h, w)| random_features(c, h, w, &dev))
            .collect();
        for masks in [&masks_u8, &masks_signed] {
            let together = mask_pool_levels(masks, &levels).unwrap();
            assert_eq!(together.len(), levels.len());
            for (pooled, feats) in together.iter().zip(&levels) {
                let alone = mask_pool(masks, feats).unwrap();
                assert_eq!(pooled.to_vec2::<f32>().unwrap(), alone.to_vec2::<f32>().unwrap());
                let want = reference_pool(masks, feats);
                let (c, h, w) = feats.dims3().unwrap();
                let flat: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
                let level = [(flat.as_slice(), [c, h, w])];
                let planes: Vec<f32> =
                    masks.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut routes = vec![pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
                for route in [Route::Direct, Route::Prefix] {
                    routes.push(pool_levels_cpu(&planes, [n, in_h, in_w], &level, route).remove(0));
                }
                for got in routes {
                    for (a, b) in got.iter().zip(want.iter().flatten()) {
                        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{:?}: {a} vs {b}", feats.dims());
                    }
                }
            }
        }
        assert!(mask_pool_levels(&masks_u8, &[]).unwrap().is_empty());
    }

    #[test]
    fn empty_mask_pools_to_zero_and_full_mask_to_the_mean() {
        let dev = Device::Cpu;
        let masks = Tensor::from_vec(vec![0_u8; 2 * 9 * 7], (2, 9, 7), &dev).unwrap();
        let masks = Tensor::cat(
            &[masks.narrow(0, 0, 1).unwrap(), (masks.narrow(0, 1, 1).unwrap() + 1.0).unwrap()],
            0,
        )
        .unwrap();
        let feats = random_features(3, 4, 4, &dev);
        let pooled = mask_pool(&masks, &feats).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(pooled[0], [0.0; 3]);
        let mean = feats.mean_keepdim((1, 2)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in pooled[1].iter().zip(&mean) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn no_masks_and_bad_inputs() {
        let dev = Device::Cpu;
        let none = Tensor::zeros((0, 9, 7), DType::U8, &dev).unwrap();
        let feats = random_features(3, 4, 4, &dev);
        assert_eq!(mask_pool(&none, &feats).unwrap().dims(), [0, 3]);
        assert_eq!(mask_resize(&none, 8, 8).unwrap().dims(), [0, 64]);
        let bad = Tensor::zeros((2, 9, 7), DType::I64, &dev).unwrap();
        assert!(mask_pool(&bad, &feats).is_err());
        let flat = Tensor::zeros((9, 7), DType::U8, &dev).unwrap();
        assert!(mask_pool(&flat, &feats).is_err());
        assert!(mask_resize(&flat, 8, 8).is_err());
    }

    #[test]
    fn mask_resize_is_torch_bilinear() {
        let masks = fixture_masks();
        let got = mask_resize(&masks, 8, 8).unwrap();
        assert_eq!(got.dims(), [10, 64]);
        let plane: Vec<u8> = masks.get(4).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = torch_bilinear(&plane, 1, 103, 157, 8, 8).unwrap();
        assert_eq!(got.get(4).unwrap().to_vec1::<f32>().unwrap(), want);
    }

    /// The kernel source compiles and exports the four entry points the launches name.
    #[cfg(any(feature = "cuda", feature = "kernel-check"))]
    #[test]
    fn kernels_compile_with_nvrtc() {
        let ptx = compile_kernels().unwrap();
        for name in ["mask_pool_u8", "mask_pool_f32", "mask_resize_u8", "mask_resize_f32"] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }

    /// GPU kernels against the CPU reference, on the fixture masks and random features.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_matches_cpu() {
        // A `cuda` build links the CUDA libraries: it only starts on a machine with a driver.
        let gpu = Device::new_cuda(0).unwrap();
        let masks = fixture_masks();
        for masks in [masks.clone(), masks.to_dtype(DType::F32).unwrap()] {
            let masks_gpu = masks.to_device(&gpu).unwrap();
            for (c, h, w) in [(192, 128, 128), (384, 64, 64), (768, 32, 32), (1536, 16, 16), (7, 5, 300)] {
                let feats = random_features(c, h, w, &Device::Cpu);
                let cpu = mask_pool(&masks, &feats).unwrap();
                let cuda = mask_pool(&masks_gpu, &feats.to_device(&gpu).unwrap()).unwrap();
                let err = max_rel_err(&cuda.to_device(&Device::Cpu).unwrap(), &cpu);
                assert!(err < 1e-5, "{c}x{h}x{w}: {err}");
            }
            for size in [8, 112] {
                let cpu = mask_resize(&masks, size, size).unwrap();
                let cuda = mask_resize(&masks_gpu, size, size).unwrap().to_device(&Device::Cpu).unwrap();
                let err = max_rel_err(&cuda, &cpu);
                assert!(err < 1e-6, "pos {size}: {err}");
            }
        }
    }
}
