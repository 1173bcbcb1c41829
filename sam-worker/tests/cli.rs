//! Runs the `sam-worker dump` binary on the tiny fixture (both checkpoint formats) and compares its
//! safetensors output with the reference.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use common::*;

fn dump(weights: &str, prompts: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sam-worker"))
        .arg("dump")
        .arg("--weights")
        .arg(fixture(weights))
        .arg("--config")
        .arg(fixture("tiny_config.json"))
        .arg("--image")
        .arg(fixture("photo.png"))
        .arg("--prompts")
        .arg(prompts)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run sam-worker")
}

fn check(weights: &str) {
    let dir = std::env::temp_dir().join(format!("sam-worker-cli-{}-{weights}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.safetensors");
    let run = dump(weights, &fixture("prompts.json"), &out);
    assert!(run.status.success(), "sam-worker failed: {}", String::from_utf8_lossy(&run.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let exp = expected();
    let n = prompts().len();
    assert_eq!(got.len(), 1 + 3 * n, "keys: {:?}", got.keys().collect::<Vec<_>>());
    let e = rel_l2(&f32s(&got["image_embeddings"]), &f32s(&exp["image_embeddings"]));
    assert!(e <= MAX_REL_L2, "image_embeddings {e}");
    for i in 0..n {
        let masks = &got[&format!("masks_{i}")];
        assert_eq!(masks.dtype(), DType::U8);
        assert_eq!(masks.dims(), exp[&format!("masks_{i}")].dims());
        assert_eq!(got[&format!("iou_predictions_{i}")].dtype(), DType::F32);
        let logits = &got[&format!("low_res_logits_{i}")];
        assert_eq!(logits.dims(), exp[&format!("low_res_logits_{i}")].dims());
        let l = rel_l2(&f32s(logits), &f32s(&exp[&format!("low_res_logits_{i}")]));
        let iou = rel_l2(
            &f32s(&got[&format!("iou_predictions_{i}")]),
            &f32s(&exp[&format!("iou_predictions_{i}")]),
        );
        let agree = agreement(&u8s(masks), &u8s(&exp[&format!("masks_{i}")]));
        assert!(
            l <= MAX_REL_L2 && iou <= MAX_REL_L2 && agree >= MIN_AGREEMENT,
            "prompt {i}: {l} {iou} {agree}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dump_pth_matches_reference() {
    check("tiny_sam.pth");
}

#[test]
fn dump_safetensors_matches_reference() {
    check("tiny_sam.safetensors");
}

#[test]
fn dump_reports_bad_prompt_by_name_and_field() {
    let dir = std::env::temp_dir().join(format!("sam-worker-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.json");
    std::fs::write(
        &prompts,
        r#"[{"name": "flipped", "point_coords": null, "point_labels": null, "box": [50, 10, 20, 40], "multimask_output": false}]"#,
    )
    .unwrap();
    let run = dump("tiny_sam.safetensors", &prompts, &dir.join("out.safetensors"));
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("\"flipped\"") && stderr.contains("`box`"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
