//! Bad input to the CLI ends with an error that names the problem, never a panic, and before any
//! request (nothing listens at the endpoint).

use std::path::PathBuf;
use std::process::Command;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/eval/samples");

fn fails_with(args: &[&str], expected: &str) {
    let out = std::env::temp_dir().join(format!("osprey-eval-cli-{}-{}.jsonl", std::process::id(), args[0]));
    let output = Command::new(env!("CARGO_BIN_EXE_osprey-eval"))
        .args(args)
        .args(["--endpoint", "http://127.0.0.1:1", "--images", SAMPLES])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in\n{stderr}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let data = |name: &str| PathBuf::from(SAMPLES).join(name).display().to_string();
    fails_with(&["cityscapes", "--data", &data("panoptic_sample.json")], "--masks");
    fails_with(&["lvis", "--data", &data("missing.json")], "missing.json");
    // A POPE file is not the LVIS format.
    fails_with(&["lvis", "--data", &data("pope_sample.jsonl")], "not the expected format");
    fails_with(&["pope", "--data", &data("pope_sample.jsonl"), "--temperature=-1"], "--temperature");
    fails_with(&["pope", "--data", &data("pope_sample.jsonl"), "--concurrency", "0"], "--concurrency");
    // Pending questions and no gateway: a connection error naming the endpoint.
    fails_with(&["pope", "--data", &data("pope_sample.jsonl")], "http://127.0.0.1:1");
    // The class-names file must have one line per category.
    fails_with(
        &[
            "ade20k",
            "--data",
            &data("panoptic_sample.json"),
            "--masks",
            &data("panoptic"),
            "--class-names",
            &data("pope_sample.jsonl"),
        ],
        "categories",
    );
}
