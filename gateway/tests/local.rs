//! The README's first command, `gateway local`, as real processes: it starts the vision, LLM and
//! SAM worker binaries, serves the public API, sends the sample image through it, prints the answers
//! and timings, and exits 0. (`cargo test --workspace` builds the worker binaries next to this
//! package's.)

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use llm_worker::gguf::{GgufModel, GgufOptions};

#[test]
fn local_pipeline_runs_the_sample_and_exits_cleanly() {
    let gateway = env!("CARGO_BIN_EXE_gateway");
    let workers = std::path::Path::new(gateway).with_file_name("vision-worker");
    assert!(workers.exists(), "build the workspace first: {} is missing", workers.display());
    let port = osprey_test_support::free_port();
    let output = Command::new(gateway)
        .args(["local", "--listen", &format!("127.0.0.1:{port}"), "--max-new-tokens", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Using generated demo weights"), "{stdout}");
    // The given regions, described twice (everything mode's regions are listed as `[everything k]`).
    for region in 1..5 {
        let given = stdout
            .lines()
            .filter(|line| line.starts_with(&format!("region {region} [")) && !line.contains("[everything"))
            .count();
        assert_eq!(given, 2, "{stdout}");
    }
    assert_eq!(stdout.matches("features Computed").count(), 5, "{stdout}");
    assert_eq!(stdout.matches("features Resident").count(), 5, "{stdout}");
    assert_eq!(stdout.matches("[SAM point prompt]").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("[SAM box prompt]").count(), 2, "{stdout}");
    assert!(stdout.contains("== Describe everything SAM finds"), "{stdout}");
    // The real MobileSAM weights (fetched into .cache/ by tools/fetch_mobile_sam.sh when missing).
    assert!(stdout.contains("SAM: the official MobileSAM weights"), "{stdout}");
    assert!(stdout.contains("== Ask about region1 and region2"), "{stdout}");
}

/// Runs `gateway local` with the tiny demo vision weights, the generated tiny SAM and `llm` as
/// the LLM weights; `dequantize_all` sets candle's `CANDLE_DEQUANTIZE_ALL=1` (inherited by the
/// spawned llm-worker: GGUF weights dequantized to f32, f32 matmuls). Returns stdout.
fn run_local(llm: &Path, dequantize_all: bool) -> String {
    let gateway = env!("CARGO_BIN_EXE_gateway");
    let sam = osprey_test_support::fixture("sam");
    let port = osprey_test_support::free_port();
    let mut command = Command::new(gateway);
    command
        .args(["local", "--listen", &format!("127.0.0.1:{port}"), "--max-new-tokens", "4"])
        .arg("--vision-weights")
        .arg(osprey_test_support::fixture("vision/tiny/tiny_st"))
        .arg("--llm-weights")
        .arg(llm)
        .arg("--sam-weights")
        .arg(sam.join("tiny_sam.pth"))
        .arg("--sam-config")
        .arg(sam.join("tiny_config.json"))
        .env_remove("CANDLE_DEQUANTIZE_ALL");
    if dequantize_all {
        command.env("CANDLE_DEQUANTIZE_ALL", "1");
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}: exit {:?}\n{stdout}\n{}",
        llm.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Every answer the demo printed, each with its region (`region 3 [label]`), sorted: everything
/// mode streams its regions as they finish, so their order varies between runs.
fn answers(stdout: &str) -> Vec<String> {
    let mut region = "";
    let mut found: Vec<String> = Vec::new();
    for line in stdout.lines() {
        if let Some(answer) = line.strip_prefix("  answer: ") {
            found.push(format!("{region}: {answer}"));
        } else if let Some((head, rest)) = line.split_once(", answer ") {
            let answer = rest.rsplit_once(", sam ").map_or(rest, |(answer, _)| answer);
            found.push(format!("{}: {answer}", head.split_once(':').map_or(head, |(h, _)| h)));
        } else if line.starts_with("region ") {
            region = line.split_once(':').map_or(line, |(h, _)| h);
        } else if line.starts_with("== Ask") {
            region = "ask";
        }
    }
    found.sort();
    found
}

/// `gateway local --llm-weights FILE.gguf`: the tiny demo LLM quantized to q8_0 by the
/// `llm-worker quantize` binary serves the whole pipeline. Its answers, with the weights
/// dequantized (`CANDLE_DEQUANTIZE_ALL=1`), equal those of an f32 checkpoint holding the same
/// dequantized weights, so the spawned worker really runs the file's weights; with the quantized
/// kernels the same requests are all answered.
#[test]
fn local_pipeline_serves_a_gguf() {
    let gateway = Path::new(env!("CARGO_BIN_EXE_gateway"));
    let llm_worker = gateway.with_file_name("llm-worker");
    assert!(llm_worker.exists(), "build the workspace first: {} is missing", llm_worker.display());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("local-gguf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = osprey_test_support::fixture("llm/tiny");
    let gguf = dir.join("tiny_q8_0.gguf");
    let status = Command::new(&llm_worker)
        .arg("quantize")
        .arg("--weights")
        .arg(&tiny)
        .arg("--out")
        .arg(&gguf)
        .args(["--type", "q8_0"])
        .status()
        .unwrap();
    assert!(status.success() && gguf.is_file(), "quantize: {status:?}");

    // The same weights as an f32 checkpoint: every tensor of the file dequantized, under its
    // checkpoint name, with the tiny model's config and tokenizer.
    let dequantized = dir.join("tiny_q8_0_dequantized");
    std::fs::create_dir_all(&dequantized).unwrap();
    for file in ["config.json", "tokenizer.json", "added_tokens.json"] {
        std::fs::copy(tiny.join(file), dequantized.join(file)).unwrap();
    }
    let model = GgufModel::open(&gguf, GgufOptions::default()).unwrap();
    let source = candle_core::safetensors::load(tiny.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in source.keys().filter(|name| model.has_tensor(name)) {
        tensors.insert(name.clone(), model.tensor(name, None, DType::F32, &Device::Cpu).unwrap());
    }
    assert!(tensors.contains_key("model.mm_projector.2.weight") && tensors.contains_key("lm_head.weight"));
    candle_core::safetensors::save(&tensors, dequantized.join("model.safetensors")).unwrap();

    let from_gguf = run_local(&gguf, true);
    let from_checkpoint = run_local(&dequantized, true);
    let quantized_kernels = run_local(&gguf, false);
    let want = answers(&from_checkpoint);
    // 4 given regions x 2 rounds, up to 5 found by everything mode, the question.
    assert!(want.len() >= 10, "{from_checkpoint}");
    assert!(want.iter().any(|a| !a.ends_with(": \"\"")), "all answers empty: {from_checkpoint}");
    assert_eq!(answers(&from_gguf), want, "GGUF (dequantized) vs f32 checkpoint\n{from_gguf}");
    assert_eq!(answers(&quantized_kernels).len(), want.len(), "{quantized_kernels}");
    assert!(quantized_kernels.contains("== Ask about region1 and region2"), "{quantized_kernels}");
}
