//! `llm-worker dump` end to end on the tiny fixture: the binary's logits and greedy ids must match
//! transformers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use candle_core::{Device, Tensor};
use osprey_test_support::fixture;

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let values = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    osprey_test_support::rel_l2(&values(got), &values(want))
}

/// Runs `llm-worker dump` on the `weights` fixture with the inputs of `expected_file` and checks
/// its outputs against that file's references; returns the inputs and the scratch paths.
fn dump_and_check(
    weights: &str,
    expected_file: &str,
    dir: &std::path::Path,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>, PathBuf, PathBuf) {
    let expected = candle_core::safetensors::load(fixture("llm").join(expected_file), &Device::Cpu).unwrap();
    let (inputs, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let names = ["input_ids", "image_features", "mask_tokens", "pos_tokens"];
    let tensors: HashMap<String, Tensor> =
        names.iter().map(|n| (n.to_string(), expected[*n].clone())).collect();
    candle_core::safetensors::save(&tensors, &inputs).unwrap();

    let status = Command::new(env!("CARGO_BIN_EXE_llm-worker"))
        .arg("dump")
        .arg("--weights")
        .arg(fixture("llm").join(weights))
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .args(["--max-new-tokens", "8"])
        .status()
        .expect("run llm-worker");
    assert!(status.success(), "{weights}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let e = rel_l2(&got["logits"], &expected["spliced_logits"]);
    println!("dump {weights} logits: relative L2 error {e:.3e}");
    assert!(e <= 1e-4, "{weights}");
    assert_eq!(
        got["greedy_ids"].to_vec1::<i64>().unwrap(),
        expected["greedy_ids"].to_vec1::<i64>().unwrap(),
        "{weights}"
    );
    (expected, tensors, inputs, out)
}

#[test]
fn dump_matches_the_reference() {
    let dir = std::env::temp_dir().join(format!("llm-worker-dump-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The bf16 torch shards (Osprey-7B's layout) against their own reference.
    dump_and_check("tiny_bin", "expected_bf16.safetensors", &dir);
    let (expected, tensors, inputs, out) = dump_and_check("tiny", "expected.safetensors", &dir);

    // A prompt whose pairs do not match the regions fails with a clear message.
    let mut bad = tensors.clone();
    bad.insert("mask_tokens".into(), expected["mask_tokens"].narrow(0, 0, 1).unwrap());
    bad.insert("pos_tokens".into(), expected["pos_tokens"].narrow(0, 0, 1).unwrap());
    candle_core::safetensors::save(&bad, &inputs).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_llm-worker"))
        .args(["dump", "--weights"])
        .arg(fixture("llm/tiny"))
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run llm-worker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2 <mask><pos> pairs but 1 regions"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
