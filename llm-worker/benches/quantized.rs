//! Quantized LLM benchmark (CPU), a `harness = false` binary:
//!
//! ```text
//! cargo bench -p llm-worker --bench quantized -- [--layers 1] [--prompt 1100] [--decode 32]
//!     [--types f32,q8_0,q4_k] [--dir DIR] [--serve target/release/llm-worker] [--text-only]
//!     [--logits 64] [--json FILE] [--repeats 3]
//! ```
//!
//! A model at Osprey-7B width (vocab 32000, hidden 4096, intermediate 11008, 32 heads, projector
//! 768 -> 4096) but only `--layers` decoder layers, with random weights, is written once as an
//! f32 safetensors checkpoint (with the real LLaMA tokenizer from the fixtures) under `--dir`,
//! quantized with `llm-worker quantize`'s code, and each format is measured in a child process
//! of its own so that its resident memory is its own: RSS after load and peak RSS, prefill
//! tokens/s on a `--prompt`-token prompt (median of `--repeats`, 3), decode tokens/s at batch 1 and batch 16
//! (`--decode` steps; every sequence first prefills 16 tokens). Markdown to stdout.
//!
//! Per-layer cost scales the full model: the embedding table and LM head are counted once at
//! full size here, so "32 layers" figures are `fixed + 32 x per-layer`, which the table states.
//!
//! `--serve BIN` also starts `BIN serve --weights <file>` for each format and reads the resident
//! memory of that serving worker once it reports SERVING (loaded and warmed up). `--text-only`
//! writes each quantized file a second time without the projector (`quantize --text-only`, the
//! file llama.cpp loads). `--logits N` makes each format write the logits of every position of
//! an N-token prompt to `<dir>/logits-<type>-<layers>l.f32` (raw little-endian f32, `[N, 32000]`)
//! for fidelity comparisons. `--json FILE` writes the rows as JSON too (tools/bench_gguf.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use llm_worker::checkpoint::load_model;
use llm_worker::models::osprey_llama::{LogitsMode, PrefixKv, SeqCache, SeqStep};
use llm_worker::quantize::QuantType;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    layers: usize,
    prompt: usize,
    decode: usize,
    types: Vec<String>,
    dir: PathBuf,
    measure: Option<PathBuf>,
    serve: Option<PathBuf>,
    text_only: bool,
    logits: usize,
    logits_out: Option<PathBuf>,
    json: Option<PathBuf>,
    repeats: usize,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        layers: 1,
        prompt: 1100,
        decode: 32,
        types: vec!["f32".into(), "q8_0".into(), "q4_k".into()],
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quantized-7b-width"),
        measure: None,
        serve: None,
        text_only: false,
        logits: 0,
        logits_out: None,
        json: None,
        repeats: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--layers" => a.layers = value()?.parse()?,
            "--prompt" => a.prompt = value()?.parse()?,
            "--decode" => a.decode = value()?.parse()?,
            "--types" => a.types = value()?.split(',').map(String::from).collect(),
            "--dir" => a.dir = PathBuf::from(value()?),
            "--measure" => a.measure = Some(PathBuf::from(value()?)),
            "--serve" => a.serve = Some(PathBuf::from(value()?)),
            "--text-only" => a.text_only = true,
            "--logits" => a.logits = value()?.parse()?,
            "--logits-out" => a.logits_out = Some(PathBuf::from(value()?)),
            "--json" => a.json = Some(PathBuf::from(value()?)),
            "--repeats" => a.repeats = value()?.parse::<usize>()?.max(1),
            "--bench" => {}
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

fn status_kb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes the random f32 checkpoint: RMSNorm weights U(0.8, 1.2), biases N(0, 0.5^2), matrices
/// N(0, 1/in_features), like the other LLM benchmark.
fn write_checkpoint(dir: &Path, layers: usize) -> Res<()> {
    if dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let (v, h, i, m) = (32000usize, 4096usize, 11008usize, 768usize);
    let config = serde_json::json!({
        "vocab_size": v, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "mm_hidden_size": m, "mm_projector_type": "mlp2x_gelu", "tie_word_embeddings": false,
        "rope_theta": 10000.0
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm/tokenizer");
    for f in ["tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.join(f))?;
    }
    let dev = Device::Cpu;
    let mat = |rows: usize, cols: usize| Tensor::randn(0f32, (cols as f32).powf(-0.5), (rows, cols), &dev);
    let norm = || Tensor::rand(0f32, 1.0, h, &dev)?.affine(0.4, 0.8);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), Tensor::randn(0f32, 1.0, (v, h), &dev)?);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            t.insert(format!("{p}.{name}.weight"), mat(rows, cols)?);
        }
        t.insert(format!("{p}.input_layernorm.weight"), norm()?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), norm()?);
    }
    t.insert("model.norm.weight".into(), norm()?);
    t.insert("lm_head.weight".into(), mat(v, h)?);
    t.insert("model.mm_projector.0.weight".into(), mat(h, m)?);
    t.insert("model.mm_projector.0.bias".into(), Tensor::randn(0f32, 0.5, h, &dev)?);
    t.insert("model.mm_projector.2.weight".into(), mat(h, h)?);
    t.insert("model.mm_projector.2.bias".into(), Tensor::randn(0f32, 0.5, h, &dev)?);
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

/// The benchmark's prompt: `n` ordinary token ids, the same for every format and for llama.cpp.
fn prompt_ids(n: usize) -> Vec<u32> {
    (0..n).map(|k| 100 + (k * 7919 % 31000) as u32).collect()
}

/// Child process: load `path`, measure, print one JSON line.
fn measure(path: &Path, args: &Args) -> Res<()> {
    let (prompt, decode) = (args.prompt, args.decode);
    let t0 = Instant::now();
    let model = load_model(path, DType::F32, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_load = status_kb("VmRSS:") / 1024.0;
    if let Some(out) = &args.logits_out {
        let n = args.logits;
        let mut cache = SeqCache::new(PrefixKv::default());
        let embeds = model.embed_ids(&prompt_ids(n))?;
        let step = SeqStep { cache: &mut cache, embeds, logits: LogitsMode::All };
        let all = model.forward(&mut [step])?.remove(0).ok_or("no logits")?;
        let values: Vec<f32> = all.flatten_all()?.to_vec1()?;
        std::fs::write(out, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    let ids = prompt_ids(prompt);
    let embeds = model.embed_ids(&ids)?;
    let mut prefill = Vec::new();
    for _ in 0..args.repeats {
        let mut cache = SeqCache::new(PrefixKv::default());
        let t = Instant::now();
        model.forward(&mut [SeqStep {
            cache: &mut cache,
            embeds: embeds.clone(),
            logits: LogitsMode::Last,
        }])?;
        prefill.push(t.elapsed().as_secs_f64());
    }
    let mut decode_rate = Vec::new();
    for batch in [1usize, 16] {
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(PrefixKv::default())).collect();
        let start = model.embed_ids(&ids[..16])?;
        for c in caches.iter_mut() {
            model.forward(&mut [SeqStep { cache: c, embeds: start.clone(), logits: LogitsMode::Skip }])?;
        }
        let next = model.embed_ids(&[29871])?;
        let t = Instant::now();
        for _ in 0..decode {
            let mut steps: Vec<SeqStep> = caches
                .iter_mut()
                .map(|c| SeqStep { cache: c, embeds: next.clone(), logits: LogitsMode::Last })
                .collect();
            model.forward(&mut steps)?;
        }
        decode_rate.push((batch * decode) as f64 / t.elapsed().as_secs_f64());
    }
    let out = serde_json::json!({
        "load_s": load_s,
        "rss_load_mb": rss_load,
        "peak_rss_mb": status_kb("VmHWM:") / 1024.0,
        "prefill_tok_s": prompt as f64 / median(prefill),
        "decode1_tok_s": decode_rate[0],
        "decode16_tok_s": decode_rate[1],
    });
    println!("{out}");
    Ok(())
}

fn main() -> Res<()> {
    // As the services run (see `osprey_common::memory`).
    osprey_common::memory::keep_freed_memory();
    let args = parse_args()?;
    if let Some(path) = &args.measure {
        return measure(path, &args);
    }
    let ckpt = args.dir.join(format!("f32-{}l", args.layers));
    let t = Instant::now();
    write_checkpoint(&ckpt, args.layers)?;
    eprintln!("checkpoint ready in {:.1} s", t.elapsed().as_secs_f64());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("CPU: {cpu}, {} threads, load average at start {}", num_threads(), load.trim());
    println!(
        "Model: 7B width, {} layer(s), prompt {} tokens, decode {} steps\n",
        args.layers, args.prompt, args.decode
    );
    println!(
        "| weights | file MB | quantize s | load s | RSS after load MB | peak RSS MB | serving worker RSS MB | prefill tok/s | decode b1 tok/s | decode b16 tok/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for ty in &args.types {
        let (path, quantize_s) = match ty.as_str() {
            "f32" => (ckpt.clone(), f64::NAN),
            other => {
                let quant = match other {
                    "q8_0" => QuantType::Q8_0,
                    "q4_k" => QuantType::Q4K,
                    "q5_k" => QuantType::Q5K,
                    "q6_k" => QuantType::Q6K,
                    _ => return Err(format!("unknown type {other}").into()),
                };
                let out = args.dir.join(format!("{other}-{}l.gguf", args.layers));
                let t = Instant::now();
                if !out.is_file() {
                    llm_worker::quantize::run(&ckpt, &out, quant)?;
                }
                let quantize_s = t.elapsed().as_secs_f64();
                let text = args.dir.join(format!("{other}-{}l-text.gguf", args.layers));
                if args.text_only && !text.is_file() {
                    let options = llm_worker::quantize::QuantizeOptions { text_only: true };
                    llm_worker::quantize::run_with(&ckpt, &text, quant, options)?;
                }
                (out, quantize_s)
            }
        };
        let size: u64 = if path.is_dir() {
            std::fs::metadata(path.join("model.safetensors"))?.len()
        } else {
            std::fs::metadata(&path)?.len()
        };
        let serving_rss = match &args.serve {
            Some(bin) => serving_rss_mb(bin, &path)?,
            None => f64::NAN,
        };
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe);
        child.args(["--measure", path.to_str().unwrap(), "--prompt", &args.prompt.to_string()]).args([
            "--decode",
            &args.decode.to_string(),
            "--repeats",
            &args.repeats.to_string(),
        ]);
        if args.logits > 0 {
            let out = args.dir.join(format!("logits-{ty}-{}l.f32", args.layers));
            child.args(["--logits", &args.logits.to_string(), "--logits-out", out.to_str().unwrap()]);
        }
        let out = child.output()?;
        if !out.status.success() {
            return Err(format!("{ty}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let mut r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {ty} | {:.0} | {quantize_s:.1} | {:.1} | {:.0} | {:.0} | {serving_rss:.0} | {:.1} | {:.2} | {:.1} |",
            size as f64 / 1e6,
            f("load_s"),
            f("rss_load_mb"),
            f("peak_rss_mb"),
            f("prefill_tok_s"),
            f("decode1_tok_s"),
            f("decode16_tok_s")
        );
        r["weights"] = serde_json::json!(ty);
        r["path"] = serde_json::json!(path);
        r["file_bytes"] = serde_json::json!(size);
        r["serving_rss_mb"] = serde_json::json!(serving_rss);
        rows.push(r);
    }
    if let Some(json) = &args.json {
        let doc = serde_json::json!({ "layers": args.layers, "prompt": args.prompt, "decode": args.decode, "rows": rows });
        std::fs::write(json, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

/// Starts `bin serve --weights path` on a free port, waits until it reports SERVING (model
/// loaded and warmed up), reads its resident memory, and stops it.
fn serving_rss_mb(bin: &Path, path: &Path) -> Res<f64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(bin)
        .args(["serve", "--weights", path.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let result = loop {
        if let Some(status) = child.try_wait()? {
            break Err(format!("{} serve exited during start-up ({status})", bin.display()).into());
        }
        if runtime.block_on(osprey_common::grpc::is_serving(&url, "")) {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
            let kb = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or("no VmRSS")?;
            break Ok(kb / 1024.0);
        }
        if Instant::now() > deadline {
            break Err(format!("{url} not SERVING after 600 s").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn num_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
