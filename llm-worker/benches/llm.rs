//! LLM-stage benchmark (CPU, f32), a `harness = false` binary:
//!
//! ```text
//! cargo bench -p llm-worker --bench llm -- [--reference FILE.json] [--ns 1,4,16,64]
//!     [--new-tokens 32] [--seq-cap 8] [--batched-max-n 16] [--max-batch 32] [--budget-s 30]
//!     [--softmax-ab] [--phases-only] [--hidden 512] [--intermediate 1376] [--layers 8] [--heads 8]
//! ```
//!
//! `--softmax-ab` only times the phases (prefill, decode steps) with attention's fused CPU softmax
//! and with the candle-ops formulation, alternating (fused, ops, fused), and prints that table.
//! `--phases-only` times the phases and prints their table only (with `--reference`, against
//! transformers'). `--hidden`, `--intermediate`, `--layers` and `--heads` change the model's size
//! (the reference script takes the same flags); the headline's LLaMA is 2048 / 5632 / 8 / 16.
//!
//! N region questions about one image (T = 1024 image tokens + the Osprey short-description
//! prompt, one `<mask><pos>` per question, greedy, exactly `--new-tokens` new tokens, no EOS stop)
//! on a reduced LLaMA with random weights, the config of `tools/bench_llm_reference.py`: vocab
//! 32000, hidden 512, intermediate 1376, 8 layers, 8 heads (8 kv heads), projector 768 -> 512.
//! Three modes of our engine:
//!
//! 1. `shared`: one request with N questions: the prefix (system prompt, image, overview text) is
//!    computed once and the N sequences are batched (continuous batching, `--max-batch`);
//! 2. `batched`: N one-question requests with distinct image keys: batched decoding, every
//!    sequence prefills its own prefix. Prefill-bound and linear in N (about N x the sequential
//!    time), so it runs only up to `--batched-max-n`; larger N get an estimate from the largest N run;
//! 3. `sequential` (the baseline): one question at a time, batch size 1, no prefix cache. Its
//!    per-question time does not depend on N, so at most `--seq-cap` questions are timed per N.
//!
//! With `--reference` (the JSON of `tools/bench_llm_reference.py`, transformers' official
//! one-question-per-`generate` loop on the same config and prompt) a fourth column and the ratio.
//! Regions/s = N / wall time of the whole batch (sequential modes: 1 / median seconds per
//! question); tokens/s = regions/s x new tokens. Markdown to stdout, progress to stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use llm_worker::engine::{Engine, EngineConfig, Event, EventStream, GenerateRequest, Question};
use llm_worker::models::osprey_llama::{Config, LogitsMode, OspreyLlama, PrefixKv, SeqCache, SeqStep};
use llm_worker::prompt::Task;
use llm_worker::sampling::SamplingParams;
use llm_worker::tokenizer::OspreyTokenizer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const IMAGE_TOKENS: usize = 1024;
const MM_HIDDEN: usize = 768;

struct Args {
    reference: Option<String>,
    ns: Vec<usize>,
    new_tokens: usize,
    seq_cap: usize,
    batched_max_n: usize,
    max_batch: usize,
    budget_s: f64,
    softmax_ab: bool,
    phases_only: bool,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        reference: None,
        ns: vec![1, 4, 16, 64],
        new_tokens: 32,
        seq_cap: 8,
        batched_max_n: 16,
        max_batch: EngineConfig::default().max_batch_size,
        budget_s: 30.0,
        softmax_ab: false,
        phases_only: false,
        hidden: 512,
        intermediate: 1376,
        layers: 8,
        heads: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--reference" => a.reference = Some(value()?),
            "--ns" => a.ns = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--new-tokens" => a.new_tokens = value()?.parse()?,
            "--seq-cap" => a.seq_cap = value()?.parse()?,
            "--batched-max-n" => a.batched_max_n = value()?.parse()?,
            "--max-batch" => a.max_batch = value()?.parse()?,
            "--budget-s" => a.budget_s = value()?.parse()?,
            "--softmax-ab" => a.softmax_ab = true,
            "--phases-only" => a.phases_only = true,
            "--hidden" => a.hidden = value()?.parse()?,
            "--intermediate" => a.intermediate = value()?.parse()?,
            "--layers" => a.layers = value()?.parse()?,
            "--heads" => a.heads = value()?.parse()?,
            // `cargo bench` passes --bench to harness = false binaries.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// `tools/bench_llm_reference.py`'s model (its default size: hidden 512, intermediate 1376, 8
/// layers, 8 heads).
fn bench_config(a: &Args) -> Res<Config> {
    if a.heads == 0 || !a.hidden.is_multiple_of(a.heads) {
        return Err(format!("--hidden {} is not a multiple of --heads {}", a.hidden, a.heads).into());
    }
    Ok(Config {
        vocab_size: 32000,
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.heads,
        head_dim: a.hidden / a.heads,
        max_position_embeddings: 4096,
        mm_hidden_size: Some(MM_HIDDEN),
        ..Config::osprey_7b()
    })
}

/// Random weights like the reference script: RMSNorm weights U(0.8, 1.2), biases N(0, 0.5^2),
/// matrices N(0, 1/in_features).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = match dims.as_slice() {
            [_] if name.ends_with("bias") => Tensor::randn(0_f32, 0.5, s, dev)?,
            [_] => Tensor::rand(0_f32, 1.0, s, dev)?.affine(0.4, 0.8)?,
            [.., fan_in] => Tensor::randn(0_f32, (*fan_in as f32).powf(-0.5), s, dev)?,
            [] => candle_core::bail!("{name}: scalar weight"),
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The workload: one image's res4 tokens and N questions (same prompt ids, own region tokens).
struct Workload {
    ids: Vec<i64>,
    image: Tensor,
    regions: Vec<(Tensor, Tensor)>,
    params: SamplingParams,
}

impl Workload {
    fn question(&self, i: usize) -> Question {
        let (mask_tokens, pos_tokens) = self.regions[i].clone();
        Question { input_ids: self.ids.clone(), mask_tokens, pos_tokens, params: self.params.clone() }
    }

    fn request(&self, key: Option<String>, range: std::ops::Range<usize>) -> GenerateRequest {
        GenerateRequest {
            image_key: key,
            image_features: Some(self.image.clone()),
            questions: range.map(|i| self.question(i)).collect(),
        }
    }
}

/// Runs the engine until idle and returns every stream's tokens (checking the count).
fn finish(engine: &mut Engine, streams: Vec<EventStream>, want: usize) -> Res<Vec<Vec<u32>>> {
    while engine.has_work() {
        engine.step()?;
    }
    let mut out = Vec::with_capacity(streams.len());
    for mut rx in streams {
        let mut tokens = Vec::new();
        loop {
            match rx.try_recv()? {
                Event::Token(t) => tokens.push(t),
                Event::Finished(f) => {
                    if f.generated_tokens != want || tokens.len() != want {
                        return Err(format!("expected {want} tokens, got {}", tokens.len()).into());
                    }
                    break;
                }
                Event::Error(e) => return Err(e.into()),
            }
        }
        out.push(tokens);
    }
    Ok(out)
}

#[derive(Default, Clone)]
struct Measure {
    /// Seconds per run (whole batch) or per question (sequential).
    times: Vec<f64>,
    /// Questions per timed unit (N for batch runs, 1 for sequential questions).
    per_unit: usize,
    note: String,
}

impl Measure {
    fn regions_per_s(&self) -> f64 {
        self.per_unit as f64 / median(&self.times)
    }

    fn ran(&self) -> bool {
        !self.times.is_empty()
    }
}

/// Batch runs of N questions, up to 3 while within `budget_s` (at least 1).
fn batch_runs(budget_s: f64, mut run: impl FnMut(usize) -> Res<()>) -> Res<Vec<f64>> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 && (times.is_empty() || start.elapsed().as_secs_f64() < budget_s) {
        let t = Instant::now();
        run(times.len())?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Cost split: prefill of the whole spliced prompt (last logits only), single-token decode steps
/// on its cache at batch 1, and one decode step of `batch` sequences sharing that prompt as a prefix.
struct Phases {
    prefill_s: f64,
    decode_ms: f64,
    batch: usize,
    batch_decode_ms: f64,
}

fn phases(model: &OspreyLlama, work: &Workload, batch: usize) -> Res<Phases> {
    let image = model.project_image(&work.image)?;
    let (m, p) = &work.regions[0];
    let embeds = model.splice(&work.ids, Some(&image), m, p)?;
    let mut prefill = Vec::new();
    let mut cache = SeqCache::new(PrefixKv::default());
    for _ in 0..3 {
        cache = SeqCache::new(PrefixKv::default());
        let t = Instant::now();
        model.forward(&mut [SeqStep {
            cache: &mut cache,
            embeds: embeds.clone(),
            logits: LogitsMode::Last,
        }])?;
        prefill.push(t.elapsed().as_secs_f64());
    }
    let token = model.embed_ids(&[29871])?;
    let mut decode = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        model.forward(&mut [SeqStep {
            cache: &mut cache,
            embeds: token.clone(),
            logits: LogitsMode::Last,
        }])?;
        decode.push(t.elapsed().as_secs_f64());
    }
    let prefix = cache.into_prefix()?;
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(prefix.clone())).collect();
    let mut batch_decode = Vec::new();
    for step in 0..5 {
        let t = Instant::now();
        let mut steps: Vec<SeqStep<'_>> = caches
            .iter_mut()
            .map(|c| SeqStep { cache: c, embeds: token.clone(), logits: LogitsMode::Last })
            .collect();
        model.forward(&mut steps)?;
        // The first step allocates every sequence's tail buffers.
        if step > 0 {
            batch_decode.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(Phases {
        prefill_s: median(&prefill),
        decode_ms: 1e3 * median(&decode),
        batch,
        batch_decode_ms: 1e3 * median(&batch_decode),
    })
}

fn main() -> Res<()> {
    // As the services run (see `osprey_common::memory`).
    osprey_common::memory::keep_freed_memory();
    let args = parse_args()?;
    let dev = Device::Cpu;
    let cfg = bench_config(&args)?;
    let threads = candle_core::utils::get_num_threads();
    let load_before = loadavg();
    let start = Instant::now();

    // The Osprey short-description prompt with the real LLaMA-2 tokenizer (fixture).
    let tok_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm/tokenizer");
    let tokenizer = OspreyTokenizer::from_dir(&tok_dir)?;
    let ids = tokenizer.tokenizer_image_token(&Task::Short.prompt())?;
    let positions = ids.len() - 1 + IMAGE_TOKENS;
    let mask_at =
        ids.iter().position(|&i| i == i64::from(cfg.mask_token_id)).ok_or("no <mask> in the prompt")?;
    let shared_positions = mask_at - 1 + IMAGE_TOKENS;
    eprintln!("prompt: {} ids, {positions} positions, {shared_positions} before the region", ids.len());

    eprintln!("building the model (random weights) ...");
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let model = OspreyLlama::load(vb, &cfg)?;
    let max_n = args.ns.iter().copied().max().unwrap_or(1);
    let work = Workload {
        ids,
        image: Tensor::randn(0_f32, 1.0, (IMAGE_TOKENS, MM_HIDDEN), &dev)?,
        regions: (0..max_n)
            .map(|_| {
                Ok((
                    (Tensor::randn(0_f32, 1.0, (1, cfg.hidden_size), &dev)? * 0.5)?,
                    (Tensor::randn(0_f32, 1.0, (1, cfg.hidden_size), &dev)? * 0.5)?,
                ))
            })
            .collect::<Res<_>>()?,
        params: SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(args.new_tokens) },
    };
    let n_new = args.new_tokens;
    let engine_cfg = EngineConfig { max_batch_size: args.max_batch, ..EngineConfig::default() };
    let seq_cfg = EngineConfig { max_batch_size: 1, prefix_cache_entries: 0, ..EngineConfig::default() };

    // Warm-up: one sequential question (the phases alone warm up in their first prefill).
    if !args.phases_only {
        let t = Instant::now();
        let mut e = Engine::new(model.clone(), seq_cfg.clone());
        let s = e.submit(work.request(None, 0..1))?;
        finish(&mut e, s, n_new)?;
        eprintln!("warm-up question: {:.2} s", t.elapsed().as_secs_f64());
    }
    let ph = phases(&model, &work, args.max_batch)?;
    eprintln!(
        "phases: prefill {:.3} s, decode step {:.1} ms, batch-{} decode step {:.1} ms",
        ph.prefill_s, ph.decode_ms, ph.batch, ph.batch_decode_ms
    );
    let reference = args.reference.as_deref().map(read_reference).transpose()?;
    if args.phases_only {
        println!(
            "LLaMA hidden {}, intermediate {}, {} layers, {} heads, vocab {}; {threads} threads; \
             load average before: {load_before}.\n",
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.vocab_size
        );
        if let Some(r) = &reference {
            println!("Reference: {}.\n", r.label);
        }
        print_phases(&ph, reference.as_ref(), positions);
        println!("load average after: {}.", loadavg());
        return Ok(());
    }
    if args.softmax_ab {
        let ops_model = model.clone().with_candle_ops_softmax();
        let ops = phases(&ops_model, &work, args.max_batch)?;
        let again = phases(&model, &work, args.max_batch)?;
        println!(
            "| phase (median ms) | fused softmax (1st) | candle ops | fused softmax (2nd) | fused / ops |"
        );
        println!("|---|---|---|---|---|");
        let rows = [
            ("prefill, whole prompt", 1e3 * ph.prefill_s, 1e3 * ops.prefill_s, 1e3 * again.prefill_s),
            ("decode step, batch 1", ph.decode_ms, ops.decode_ms, again.decode_ms),
            (
                &*format!("decode step, batch {}", ph.batch),
                ph.batch_decode_ms,
                ops.batch_decode_ms,
                again.batch_decode_ms,
            ),
        ];
        for (what, a, b, c) in rows {
            println!("| {what} | {a:.1} | {b:.1} | {c:.1} | {:.2} |", 0.5 * (a + c) / b);
        }
        println!("\nload average before: {load_before}; after: {}.", loadavg());
        return Ok(());
    }

    let mut key = 0_usize;
    let mut next_key = || {
        key += 1;
        Some(format!("image-{key}"))
    };
    let mut results: BTreeMap<usize, [Measure; 3]> = BTreeMap::new();
    let mut agreement: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for &n in &args.ns {
        // (1) shared prefix + batching: a fresh engine (cold prefix cache), a new image key.
        let mut shared_tokens = Vec::new();
        let shared = batch_runs(args.budget_s, |_| {
            let mut e = Engine::new(model.clone(), engine_cfg.clone());
            let s = e.submit(work.request(next_key(), 0..n))?;
            shared_tokens = finish(&mut e, s, n_new)?;
            Ok(())
        })?;
        eprintln!("N={n} shared: {shared:.3?}");
        // (2) batched, no prefix sharing: N requests with distinct keys, all queued, then stepped.
        let batched = if n <= args.batched_max_n {
            batch_runs(args.budget_s, |_| {
                let mut e = Engine::new(model.clone(), engine_cfg.clone());
                let mut streams = Vec::with_capacity(n);
                for i in 0..n {
                    streams.extend(e.submit(work.request(next_key(), i..i + 1))?);
                }
                finish(&mut e, streams, n_new)?;
                Ok(())
            })?
        } else {
            Vec::new()
        };
        eprintln!("N={n} batched: {batched:.3?}");
        // (3) sequential baseline: one question at a time, at most seq_cap of the N timed.
        let timed = n.min(args.seq_cap);
        let mut seq = Vec::with_capacity(timed);
        let mut agree = 0;
        for (i, shared_answer) in shared_tokens.iter().enumerate().take(timed) {
            let t = Instant::now();
            let mut e = Engine::new(model.clone(), seq_cfg.clone());
            let s = e.submit(work.request(None, i..i + 1))?;
            let tokens = finish(&mut e, s, n_new)?;
            seq.push(t.elapsed().as_secs_f64());
            agree += usize::from(tokens[0] == *shared_answer);
        }
        eprintln!("N={n} sequential ({timed} timed): median {:.3} s/question", median(&seq));
        agreement.insert(n, (agree, timed));
        let note = if timed < n { format!("{timed} of {n} timed") } else { String::new() };
        results.insert(
            n,
            [
                Measure { times: shared, per_unit: n, note: String::new() },
                Measure { times: batched, per_unit: n, note: String::new() },
                Measure { times: seq, per_unit: 1, note },
            ],
        );
    }

    println!("## LLM worker (`cargo bench -p llm-worker --bench llm`)\n");
    println!(
        "candle 0.11.1 CPU, f32, {threads} threads (RAYON_NUM_THREADS={}); load average before: {load_before}.\n",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!(
        "Reduced LLaMA, random weights: vocab {}, hidden {}, intermediate {}, {} layers, {} heads, \
         projector {MM_HIDDEN} -> {}. Prompt: the Osprey short-description prompt (`osprey_v1`, real \
         LLaMA-2 tokenizer) with {IMAGE_TOKENS} image tokens = {positions} positions, {shared_positions} \
         of them before the region (the shareable prefix). Greedy, exactly {n_new} new tokens per \
         question (no EOS stop). Engine `max_batch_size` {}.\n",
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.hidden_size,
        args.max_batch
    );
    if let Some(r) = &reference {
        println!("Reference: {}.\n", r.label);
        if r.prefix_positions != Some(positions) {
            println!(
                "**Note:** the reference prompt has {:?} positions, ours {positions}.\n",
                r.prefix_positions
            );
        }
    }
    println!(
        "Modes: **shared** = one request with N questions (prefix computed once, sequences batched); \
         **batched** = N one-question requests (distinct image keys: every sequence prefills its own \
         prefix, decoding batched; prefill-bound, so run only up to N = {}, larger N estimated at the \
         regions/s of the largest N run); **sequential** = one question at a time, batch 1, no prefix cache \
         (the baseline; per-question time does not depend on N, so at most {} questions are timed). \
         Regions/s = N / median wall time of the batch (sequential: 1 / median s per question); \
         tokens/s = regions/s x {n_new}. Runs per cell in parentheses.\n",
        args.batched_max_n, args.seq_cap
    );
    // Batched mode above --batched-max-n: estimated from the largest N run (prefill-bound: the
    // regions/s stay about constant).
    let batched_est = results.iter().rfind(|(_, m)| m[1].ran()).map(|(n, m)| (*n, m[1].regions_per_s()));
    let ba_rps = |m: &Measure| if m.ran() { Some(m.regions_per_s()) } else { batched_est.map(|e| e.1) };
    let ba_cell = |m: &Measure, scale: f64, prec: usize| -> String {
        match (m.ran(), batched_est) {
            (true, _) => format!("{:.*}", prec, scale * m.regions_per_s()),
            (false, Some((from, rps))) => format!("not run (est. ~{:.*} from N={from})", prec, scale * rps),
            (false, None) => "not run".into(),
        }
    };
    let ratio = |x: Option<f64>, base: f64, est: bool| match x {
        Some(x) if est => format!("~{:.1}x (est.)", x / base),
        Some(x) => format!("{:.1}x", x / base),
        None => "-".into(),
    };
    let ref_col = reference.is_some();
    if ref_col {
        println!(
            "| N | shared regions/s | batched regions/s | sequential regions/s | transformers loop regions/s | shared / sequential | batched / sequential | shared / transformers | sequential / transformers |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| N | shared regions/s | batched regions/s | sequential regions/s | shared / sequential | batched / sequential |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for (n, [sh, ba, sq]) in &results {
        let base = sq.regions_per_s();
        let seq_note = if sq.note.is_empty() { String::new() } else { format!(", {}", sq.note) };
        let ba_text = if ba.ran() {
            format!("{} ({})", ba_cell(ba, 1.0, 2), ba.times.len())
        } else {
            ba_cell(ba, 1.0, 2)
        };
        let mut row = format!(
            "| {n} | {:.2} ({}) | {ba_text} | {:.2} ({}{seq_note}) |",
            sh.regions_per_s(),
            sh.times.len(),
            base,
            sq.times.len()
        );
        let (r_sh, r_ba) = (ratio(Some(sh.regions_per_s()), base, false), ratio(ba_rps(ba), base, !ba.ran()));
        match reference.as_ref().map(|r| r.per_question.get(n)) {
            Some(Some((t, measured))) => {
                let rr = 1.0 / t;
                row += &format!(
                    " {rr:.2} ({measured}) | {r_sh} | {r_ba} | {:.1}x | {:.2}x |",
                    sh.regions_per_s() / rr,
                    base / rr
                );
            }
            Some(None) => row += &format!(" not measured | {r_sh} | {r_ba} | - | - |"),
            None => row += &format!(" {r_sh} | {r_ba} |"),
        }
        println!("{row}");
    }
    println!();
    println!("Tokens/s (= regions/s x {n_new}):\n");
    if ref_col {
        println!("| N | shared | batched | sequential | transformers loop |");
        println!("|---|---|---|---|---|");
    } else {
        println!("| N | shared | batched | sequential |");
        println!("|---|---|---|---|");
    }
    for (n, [sh, ba, sq]) in &results {
        let k = n_new as f64;
        let mut row = format!(
            "| {n} | {:.1} | {} | {:.1} |",
            k * sh.regions_per_s(),
            ba_cell(ba, k, 1),
            k * sq.regions_per_s()
        );
        if let Some(r) = &reference {
            match r.per_question.get(n) {
                Some((t, _)) => row += &format!(" {:.1} |", k / t),
                None => row += " not measured |",
            }
        }
        println!("{row}");
    }
    println!();
    println!("Median wall seconds per batch of N (shared, batched) and per question (sequential):\n");
    println!("| N | shared s | batched s | sequential s/question |");
    println!("|---|---|---|---|");
    for (n, [sh, ba, sq]) in &results {
        let ba_s = if ba.ran() { format!("{:.2}", median(&ba.times)) } else { "not run".into() };
        println!("| {n} | {:.2} | {ba_s} | {:.3} |", median(&sh.times), median(&sq.times));
    }
    println!();
    print_phases(&ph, reference.as_ref(), positions);
    let (agree, total) = agreement.values().fold((0, 0), |(a, t), (x, y)| (a + x, t + y));
    println!(
        "Greedy answers identical between shared (batched) and sequential runs: {agree} of {total} \
         questions compared (batching changes matmul shapes, so float rounding may flip a near-tie).\n"
    );
    println!(
        "LLM bench wall time {:.0} s; load average after: {}.\n",
        start.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

/// The phases table: ours, and transformers' where the reference measured them.
fn print_phases(ph: &Phases, reference: Option<&Reference>, positions: usize) {
    println!("Where a question's time goes (one question's prompt, {positions} positions):\n");
    let rp = reference.and_then(|r| r.phases);
    match rp {
        Some(_) => {
            println!("| phase | candle | transformers | candle / transformers |");
            println!("|---|---|---|---|");
        }
        None => {
            println!("| phase | candle |");
            println!("|---|---|");
        }
    }
    let row = |what: &str, ours: f64, theirs: Option<f64>, unit: &str| match theirs {
        Some(t) => println!("| {what} | {ours:.1} {unit} | {t:.1} {unit} | {:.2}x |", ours / t),
        None if rp.is_some() => println!("| {what} | {ours:.1} {unit} | - | - |"),
        None => println!("| {what} | {ours:.1} {unit} |"),
    };
    row("prefill, whole prompt (last logits)", 1e3 * ph.prefill_s, rp.map(|p| 1e3 * p.prefill_s), "ms");
    row("decode step, batch 1 (median of 8)", ph.decode_ms, rp.map(|p| p.decode_ms), "ms");
    // The reference's batch decode only counts when it ran at our batch size.
    let rb = rp.and_then(|p| p.batch).filter(|&(b, _)| b == ph.batch).map(|(_, ms)| ms);
    row(
        &format!("decode step, batch {} on a shared prefix (per step)", ph.batch),
        ph.batch_decode_ms,
        rb,
        "ms",
    );
    row(
        &format!("decode step, batch {} (per sequence)", ph.batch),
        ph.batch_decode_ms / ph.batch as f64,
        rb.map(|ms| ms / ph.batch as f64),
        "ms",
    );
    println!();
}

/// The numbers of `tools/bench_llm_reference.py`.
struct Reference {
    /// N -> (median seconds per question, questions timed).
    per_question: BTreeMap<usize, (f64, usize)>,
    prefix_positions: Option<usize>,
    phases: Option<RefPhases>,
    label: String,
}

/// transformers' phases: prefill s, decode step ms at batch 1, and (batch, ms per step).
#[derive(Clone, Copy)]
struct RefPhases {
    prefill_s: f64,
    decode_ms: f64,
    batch: Option<(usize, f64)>,
}

fn read_reference(path: &str) -> Res<Reference> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut per_question = BTreeMap::new();
    if let Some(res) = v["results"].as_object() {
        for (n, entry) in res {
            if let Some(t) = entry["median_s_per_question"].as_f64() {
                let measured = entry["measured_questions"].as_u64().unwrap_or(0) as usize;
                per_question.insert(n.parse()?, (t, measured));
            }
        }
    }
    Ok(Reference {
        per_question,
        prefix_positions: v["prefix_tokens"].as_u64().map(|p| p as usize),
        phases: v["phases"]["prefill_s"].as_f64().zip(v["phases"]["decode_step_ms"].as_f64()).map(
            |(prefill_s, decode_ms)| RefPhases {
                prefill_s,
                decode_ms,
                batch: v["phases"]["batch"]
                    .as_u64()
                    .zip(v["phases"]["batch_decode_step_ms"].as_f64())
                    .map(|(b, ms)| (b as usize, ms)),
            },
        ),
        label: format!(
            "transformers {} / torch {}, {} threads, attention {}, one `generate` per question",
            v["transformers"].as_str().unwrap_or("?"),
            v["torch"].as_str().unwrap_or("?"),
            v["threads"],
            v["config"]["attn"].as_str().unwrap_or("?")
        ),
    })
}
