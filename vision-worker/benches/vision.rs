//! Vision-stage benchmarks (CPU, f32), a `harness = false` binary:
//!
//! ```text
//! cargo bench -p vision-worker --bench vision -- [--reference FILE.json] [--sizes 512,800,1024]
//!     [--masks 1,16,128,1024] [--no-trunk] [--no-pool] [--no-blocks] [--no-ops] [--no-naive] [--budget-s 60]
//! ```
//!
//! a) The full-size ConvNeXt-L trunk (`[3,3,27,3]` x `[192,384,768,1536]`, random weights) at each
//!    size: seconds per image (median; a few iterations, capped by `--budget-s` per size). With
//!    `--reference` (the JSON of `tools/bench_vision_reference.py`: torch + timm, same thread
//!    count) the ratio candle / torch. Unless `--no-ops`, also the same trunk with candle ops only
//!    (`ConvNeXt::forward_ops`: no CPU kernels, the formulation before them) at the first size.
//! b) One block of each stage: the whole block (`kernels::block`), its depthwise 7x7 conv +
//!    LayerNorm kernel alone, and the block as candle ops, to show where the trunk's time goes
//!    (against torch's block and depthwise conv with `--reference`).
//! c) Mask pooling of all four levels of a 512 image's features for N masks at 640x480 (u8):
//!    `mask_pool_levels` against `mask_pool_naive` (plain candle ops) and against the memory-traffic
//!    floor: the four feature maps and the masks read once, at the copy bandwidth measured here.
//!
//! Markdown goes to stdout, progress to stderr. Speed is reported, never asserted.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use vision_worker::VisionConfig;
use vision_worker::models::clip_convnext::{Block, ConvNeXt};
use vision_worker::models::kernels::Simd;
use vision_worker::pooling::{mask_pool_levels, mask_pool_naive};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Original-image mask resolution of part (c) (H, W).
const MASK_HW: (usize, usize) = (480, 640);
/// Tower input of part (c): the four levels of a 512 image.
const POOL_IMAGE: usize = 512;

struct Args {
    reference: Option<String>,
    sizes: Vec<usize>,
    masks: Vec<usize>,
    trunk: bool,
    blocks: bool,
    pool: bool,
    ops: bool,
    naive: bool,
    budget_s: f64,
}

fn parse_list(s: &str) -> Res<Vec<usize>> {
    Ok(s.split(',').filter(|x| !x.is_empty()).map(str::parse).collect::<Result<_, _>>()?)
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        reference: None,
        sizes: vec![512, 800, 1024],
        masks: vec![1, 16, 128, 1024],
        trunk: true,
        blocks: true,
        pool: true,
        ops: true,
        naive: true,
        budget_s: 60.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--reference" => a.reference = Some(value()?),
            "--sizes" => a.sizes = parse_list(&value()?)?,
            "--masks" => a.masks = parse_list(&value()?)?,
            "--budget-s" => a.budget_s = value()?.parse()?,
            "--no-trunk" => a.trunk = false,
            "--no-blocks" => a.blocks = false,
            "--no-pool" => a.pool = false,
            "--no-ops" => a.ops = false,
            "--no-naive" => a.naive = false,
            // `cargo bench` passes --bench to harness = false binaries.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// Runs `f` at least `min` and at most `max` times, stopping once `budget_s` seconds have been
/// spent (after `min`); returns each run's seconds.
fn time_runs(min: usize, max: usize, budget_s: f64, mut f: impl FnMut() -> Res<()>) -> Res<Vec<f64>> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < max && (times.len() < min || start.elapsed().as_secs_f64() < budget_s) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn median(times: &[f64]) -> f64 {
    let mut v = times.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Random weights by name and shape: layer-norm weights 1, biases 0, layer scale `gamma` 0.1,
/// convolution and linear weights N(0, 1/fan_in). `tools/bench_vision_reference.py` initialises
/// torch the same way (values only matter in keeping activations finite and normal).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = if dims.len() == 1 {
            if name.ends_with("gamma") {
                Tensor::full(0.1_f32, s, dev)?
            } else if name.ends_with("bias") {
                Tensor::zeros(s, DType::F32, dev)?
            } else {
                Tensor::ones(s, DType::F32, dev)?
            }
        } else {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0_f32, (fan_in as f32).powf(-0.5), s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: random weights need a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The torch numbers of `tools/bench_vision_reference.py`.
#[derive(Default)]
struct Reference {
    trunk: BTreeMap<usize, f64>,
    /// stage -> (dwconv ms, rest ms)
    blocks: BTreeMap<usize, (f64, f64)>,
    label: String,
}

fn read_reference(path: &str) -> Res<Reference> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut r = Reference {
        label: format!(
            "torch {} (timm {}), {} threads",
            v["torch"].as_str().unwrap_or("?"),
            v["timm"].as_str().unwrap_or("?"),
            v["threads"]
        ),
        ..Default::default()
    };
    if let Some(trunk) = v["trunk"].as_object() {
        for (size, entry) in trunk {
            if let Some(m) = entry["median_s"].as_f64() {
                r.trunk.insert(size.parse()?, m);
            }
        }
    }
    if let Some(blocks) = v["blocks"].as_object() {
        for (stage, entry) in blocks {
            if let (Some(dw), Some(rest)) = (entry["dwconv_ms"].as_f64(), entry["rest_ms"].as_f64()) {
                r.blocks.insert(stage.parse()?, (dw, rest));
            }
        }
    }
    Ok(r)
}

fn bench_trunk(args: &Args, cfg: &VisionConfig, reference: Option<&Reference>) -> Res<()> {
    let dev = Device::Cpu;
    eprintln!("trunk: building ConvNeXt-L with random weights ...");
    let t = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let trunk = ConvNeXt::load(vb, cfg)?;
    eprintln!("trunk: built in {:.1} s", t.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    for (i, &size) in args.sizes.iter().enumerate() {
        let x = Tensor::randn(0_f32, 1.0, (1, 3, size, size), &dev)?;
        if i == 0 {
            // Warm-up: first-touch allocations, thread pool start.
            let t = Instant::now();
            trunk.forward(&x)?;
            eprintln!("trunk: warm-up at {size}: {:.2} s", t.elapsed().as_secs_f64());
        }
        let (min, max) = if size <= 512 { (3, 3) } else { (1, 3) };
        let times = time_runs(min, max, args.budget_s, || {
            let f = trunk.forward(&x)?;
            // The values are computed eagerly on the CPU; touch the last level anyway.
            f.levels[3].dims4()?;
            Ok(())
        })?;
        eprintln!("trunk {size}: {times:.3?}");
        let ops = if args.ops && i == 0 {
            let ops = time_runs(1, 3, args.budget_s, || {
                trunk.forward_ops(&x)?.levels[3].dims4()?;
                Ok(())
            })?;
            eprintln!("trunk {size} (candle ops): {ops:.3?}");
            Some(ops)
        } else {
            None
        };
        rows.push((size, times, ops));
    }

    println!("### (a) ConvNeXt-L trunk, random weights, f32, batch 1\n");
    println!(
        "Seconds per image (res2..res5, no head); median of the runs listed. Kernels: {} (`OSPREY_SIMD` \
         caps it). Candle ops = the same trunk without the CPU kernels (`ConvNeXt::forward_ops`, \
         the formulation before them: 49 shifted multiply-adds, unfused LayerNorm, GELU, scale and \
         residual), first size only.\n",
        Simd::detect().name()
    );
    match reference {
        Some(r) => {
            println!(
                "| input | runs | candle median s | candle min s | candle ops median s (runs) | {} median s | candle / torch | candle ops / torch |",
                r.label
            );
            println!("|---|---|---|---|---|---|---|---|");
        }
        None => {
            println!("| input | runs | candle median s | candle min s | candle ops median s (runs) |");
            println!("|---|---|---|---|---|");
        }
    }
    for (size, times, ops) in &rows {
        let m = median(times);
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let ops_m = ops.as_ref().map(|o| median(o));
        let ops_cell = match (ops_m, ops) {
            (Some(o), Some(runs)) => format!("{o:.2} ({})", runs.len()),
            _ => "-".to_string(),
        };
        let base = format!("| {size}x{size} | {} | {m:.2} | {min:.2} | {ops_cell} |", times.len());
        match reference {
            Some(r) => match r.trunk.get(size) {
                Some(t) => {
                    let ops_ratio = ops_m.map_or("-".to_string(), |o| format!("{:.2}x", o / t));
                    println!("{base} {t:.2} | {:.2}x | {ops_ratio} |", m / t)
                }
                None => println!("{base} not measured | - | - |"),
            },
            None => println!("{base}"),
        }
    }
    let measured: Vec<usize> = rows.iter().map(|r| r.0).collect();
    for size in [512, 800, 1024] {
        if !measured.contains(&size) {
            println!("\n{size}x{size}: not run (not in --sizes).");
        }
    }
    println!();
    Ok(())
}

fn bench_blocks(cfg: &VisionConfig, reference: Option<&Reference>) -> Res<()> {
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for stage in 0..4 {
        let c = cfg.dims[stage];
        let s = 512 / (4 << stage);
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
        let block = Block::load(vb, c)?;
        // Channels-last, as the trunk runs its blocks.
        let x = Tensor::randn(0_f32, 1.0, (1, s, s, c), &dev)?;
        block.forward(&x)?;
        block.forward_ops(&x)?;
        let timed = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Res<f64> {
            Ok(median(&time_runs(3, 5, 5.0, || {
                f()?;
                Ok(())
            })?) * 1e3)
        };
        let whole = timed(&|| block.forward(&x))?;
        let dw = timed(&|| block.dwconv_norm(&x))?;
        let ops = timed(&|| block.forward_ops(&x))?;
        eprintln!("block stage {stage}: block {whole:.1} ms, dwconv+norm {dw:.1} ms, candle ops {ops:.1} ms");
        rows.push((stage, c, s, whole, dw, ops));
    }
    println!("### (b) Where the trunk's time goes: one block per stage at 512\n");
    println!(
        "Median ms of one block (channels-last: fused depthwise 7x7 conv + bias + LayerNorm kernel, \
         then per tile of rows fc1, bias + exact GELU, fc2, bias + layer scale + residual), \
         of its depthwise-conv kernel alone (LayerNorm included), and of the same block as candle ops \
         (49 shifted multiply-adds, the formulation before the kernels); x depth = the stage's share \
         of a forward. torch: timm's block (NCHW depthwise conv, then permute, LayerNorm, MLP, \
         scale, permute, residual) and its depthwise conv alone.\n"
    );
    let depths = cfg.depths;
    let with_ref = reference.is_some_and(|r| !r.blocks.is_empty());
    if with_ref {
        println!(
            "| stage | C x H x W | depth | candle block ms | torch block ms | ratio | candle dwconv+LN ms | torch dwconv ms | ratio | candle ops block ms | ops / torch |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| stage | C x H x W | depth | candle block ms | candle dwconv+LN ms | candle ops block ms |"
        );
        println!("|---|---|---|---|---|---|");
    }
    let (mut tot, mut tot_ops, mut tot_torch) = (0.0, 0.0, 0.0);
    for (stage, c, s, whole, dw, ops) in rows {
        let d = depths[stage] as f64;
        tot += d * whole;
        tot_ops += d * ops;
        match reference.and_then(|r| r.blocks.get(&stage)) {
            Some(&(tdw, trest)) if with_ref => {
                let torch = tdw + trest;
                tot_torch += d * torch;
                println!(
                    "| {stage} | {c}x{s}x{s} | {} | {whole:.1} | {torch:.1} | {:.2}x | {dw:.1} | {tdw:.1} | {:.2}x | {ops:.1} | {:.2}x |",
                    depths[stage],
                    whole / torch,
                    dw / tdw,
                    ops / torch
                );
            }
            _ if with_ref => println!(
                "| {stage} | {c}x{s}x{s} | {} | {whole:.1} | - | - | {dw:.1} | - | - | {ops:.1} | - |",
                depths[stage]
            ),
            _ => println!("| {stage} | {c}x{s}x{s} | {} | {whole:.1} | {dw:.1} | {ops:.1} |", depths[stage]),
        }
    }
    println!();
    print!("Sum over the 36 blocks: candle {:.2} s, candle ops {:.2} s", tot / 1e3, tot_ops / 1e3);
    if with_ref {
        print!(", torch {:.2} s (candle / torch {:.2}x)", tot_torch / 1e3, tot / tot_torch);
    }
    println!(".\n");
    Ok(())
}

/// Copy bandwidth ((bytes read + bytes written) / s) of a `size`-byte memcpy on `threads` threads
/// (the buffer split evenly); best of `reps`.
fn copy_bandwidth(size: usize, threads: usize, reps: usize) -> f64 {
    let src = vec![1_u8; size];
    let mut dst = vec![0_u8; size];
    let chunk = size.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sr) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(sr));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * size as f64 / best
}

/// A buffer copied again and again (split over two threads or not) to take the bandwidth.
struct Copy {
    src: Vec<u8>,
    dst: Vec<u8>,
    one_thread: bool,
}

impl Copy {
    fn new(size: usize, one_thread: bool) -> Self {
        Copy { src: vec![1; size], dst: vec![0; size], one_thread }
    }

    /// (bytes read + bytes written) / s of one copy.
    fn bandwidth(&mut self) -> f64 {
        let chunk = if self.one_thread { self.src.len() } else { self.src.len().div_ceil(2) };
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sr) in self.dst.chunks_mut(chunk).zip(self.src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(sr));
            }
        });
        let elapsed = t.elapsed().as_secs_f64();
        std::hint::black_box(&self.dst);
        2.0 * self.src.len() as f64 / elapsed
    }
}

/// Deterministic xorshift64* generator for the masks.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// `n` filled ellipses `[n, H, W]` u8 (0/1), radii log-uniform from 8 to 256 px (what SAM's
/// "segment everything" gives, roughly: many small masks, a few large ones).
fn ellipse_masks(n: usize, (h, w): (usize, usize)) -> (Vec<u8>, f64) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut data = vec![0_u8; n * h * w];
    let mut on = 0_usize;
    for plane in data.chunks_exact_mut(h * w) {
        let cx = rng.next_f64() * w as f64;
        let cy = rng.next_f64() * h as f64;
        let rx = 8.0 * 32_f64.powf(rng.next_f64());
        let ry = 8.0 * 32_f64.powf(rng.next_f64());
        let y0 = (cy - ry).floor().max(0.0) as usize;
        let y1 = ((cy + ry).ceil() as usize).min(h - 1);
        for y in y0..=y1 {
            let dy = (y as f64 + 0.5 - cy) / ry;
            if dy.abs() > 1.0 {
                continue;
            }
            let half = rx * (1.0 - dy * dy).sqrt();
            let x0 = (cx - half).round().max(0.0) as usize;
            let x1 = ((cx + half).round().max(0.0) as usize).min(w);
            if x0 < x1 {
                plane[y * w + x0..y * w + x1].fill(1);
                on += x1 - x0;
            }
        }
    }
    (data, on as f64 / (n * h * w).max(1) as f64)
}

fn bench_pool(args: &Args, cfg: &VisionConfig) -> Res<()> {
    let dev = Device::Cpu;
    let (h, w) = MASK_HW;
    eprintln!("pool: measuring copy bandwidth ...");
    let size = 512 << 20;
    let bw1 = copy_bandwidth(size, 1, 5);
    let bw2 = copy_bandwidth(size, 2, 5);
    let bw = bw1.max(bw2);
    let mut copy = Copy::new(size / 2, bw1 >= bw2);
    eprintln!("pool: copy bandwidth {:.1} GB/s (1 thread), {:.1} GB/s (2 threads)", bw1 / 1e9, bw2 / 1e9);

    let levels: Vec<Tensor> = (0..4)
        .map(|l| {
            let s = POOL_IMAGE / (4 << l);
            Tensor::randn(0_f32, 1.0, (cfg.dims[l], s, s), &dev)
        })
        .collect::<Result<_, _>>()?;
    let feature_bytes: usize = levels.iter().map(|t| t.elem_count() * 4).sum();
    let max_n = args.masks.iter().copied().max().unwrap_or(0);
    let (data, fill) = ellipse_masks(max_n, MASK_HW);
    let all_masks = Tensor::from_vec(data, (max_n, h, w), &dev)?;
    eprintln!("pool: {max_n} masks, {:.1}% of pixels on", 100.0 * fill);

    let pool_naive = |masks: &Tensor| -> Res<Vec<Tensor>> {
        Ok(levels.iter().map(|l| mask_pool_naive(masks, l)).collect::<Result<_, _>>()?)
    };
    let mut rows = Vec::new();
    for &n in &args.masks {
        let masks = all_masks.narrow(0, 0, n)?;
        // Same results (checked once per N; relative to the largest pooled value).
        let fast = mask_pool_levels(&masks, &levels)?;
        let (min_fast, max_fast) = if n <= 16 { (10, 50) } else { (3, 10) };
        // Each run is followed by a copy, timed apart, so that a loaded machine slows the pooling
        // and the bandwidth its floor is taken from alike.
        let (mut fast_t, mut copy_bw) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while fast_t.len() < max_fast && (fast_t.len() < min_fast || start.elapsed().as_secs_f64() < 10.0) {
            let t = Instant::now();
            mask_pool_levels(&masks, &levels)?;
            fast_t.push(t.elapsed().as_secs_f64());
            copy_bw.push(copy.bandwidth());
        }
        let (mut err, mut naive_t) = (f32::NAN, Vec::new());
        if args.naive {
            let naive = pool_naive(&masks)?;
            err = 0.0;
            for (a, b) in fast.iter().zip(&naive) {
                let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
                err = err.max(d / s);
            }
            let (min_naive, max_naive) = if n >= 1024 {
                (1, 2)
            } else if n >= 128 {
                (2, 5)
            } else {
                (3, 10)
            };
            naive_t = time_runs(min_naive, max_naive, 15.0, || {
                pool_naive(&masks)?;
                Ok(())
            })?;
        }
        let bytes = feature_bytes + n * h * w;
        let floor = bytes as f64 / bw;
        let floor_interleaved = bytes as f64 / median(&copy_bw);
        eprintln!(
            "pool N={n}: custom {:.4} s ({} runs), naive {:.4} s ({} runs), floor {:.5} s, max rel err {err:.1e}",
            median(&fast_t),
            fast_t.len(),
            median(&naive_t),
            naive_t.len(),
            floor
        );
        rows.push((n, fast_t, naive_t, bytes, floor, floor_interleaved, err));
    }

    println!("### (c) Mask pooling, all four levels of a 512 image, masks 640x480 u8\n");
    println!(
        "Features res2..res5 = {:.1} MB f32; masks: filled ellipses (radii log-uniform 8-256 px, {:.1}% of pixels on). \
         Memory-traffic floor = (feature bytes + N x 640 x 480 mask bytes) / copy bandwidth, the \
         bandwidth of a 512 MiB memcpy measured in this run: {:.1} GB/s on 1 thread, {:.1} GB/s on 2 \
         threads ((bytes read + bytes written) / s; the larger is used). Interleaved floor: the same \
         with the median bandwidth of a 256 MiB copy run after every timed pooling run (on the \
         thread count that copied faster above), so that load from other processes weighs on both. \
         `mask_pool_levels` (all four levels in one call, each mask read once) and the naive \
         version's matmuls use all threads.\n",
        feature_bytes as f64 / 1e6,
        100.0 * fill,
        bw1 / 1e9,
        bw2 / 1e9
    );
    println!(
        "| N masks | bytes read once | floor ms | interleaved floor ms | `mask_pool_levels` median ms (runs) | `mask_pool_naive` median ms (runs) | naive / custom | custom / floor | custom / interleaved floor | max rel. diff |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, fast_t, naive_t, bytes, floor, floor_interleaved, err) in rows {
        let (f, nv) = (median(&fast_t), median(&naive_t));
        println!(
            "| {n} | {:.1} MB | {:.2} | {:.2} | {:.2} ({}) | {:.1} ({}) | {:.1}x | {:.1}x | {:.1}x | {err:.1e} |",
            bytes as f64 / 1e6,
            floor * 1e3,
            floor_interleaved * 1e3,
            f * 1e3,
            fast_t.len(),
            nv * 1e3,
            naive_t.len(),
            nv / f,
            f / floor,
            f / floor_interleaved
        );
    }
    println!();
    Ok(())
}

fn main() -> Res<()> {
    // As the services run (see `osprey_common::memory`).
    osprey_common::memory::keep_freed_memory();
    let args = parse_args()?;
    let reference = args.reference.as_deref().map(read_reference).transpose()?;
    let cfg = VisionConfig::from_json(r#"{"hidden_size": 4096}"#)?;
    assert_eq!((cfg.depths, cfg.dims), ([3, 3, 27, 3], [192, 384, 768, 1536]));
    let threads = candle_core::utils::get_num_threads();
    let load_before = uptime();
    let start = Instant::now();
    println!("## Vision worker (`cargo bench -p vision-worker --bench vision`)\n");
    println!(
        "candle 0.11.1 CPU, f32, {threads} threads (RAYON_NUM_THREADS={}); load average before: {load_before}.\n",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    if args.trunk {
        bench_trunk(&args, &cfg, reference.as_ref())?;
    }
    if args.blocks {
        bench_blocks(&cfg, reference.as_ref())?;
    }
    if args.pool {
        bench_pool(&args, &cfg)?;
    }
    println!(
        "Vision bench wall time {:.0} s; load average after: {}.\n",
        start.elapsed().as_secs_f64(),
        uptime()
    );
    Ok(())
}
