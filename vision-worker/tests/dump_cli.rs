//! `vision-worker dump` end to end on the tiny fixtures, in the three checkpoint layouts.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{LAYOUTS, check, fixture, load_safetensors};

const TOL: f64 = 1e-4;

fn out_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("osprey-vision-dump-{}-{name}.safetensors", std::process::id()))
}

fn dump(weights: &PathBuf, masks: &PathBuf, out: &PathBuf) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vision-worker"))
        .arg("dump")
        .arg("--weights")
        .arg(weights)
        .arg("--image")
        .arg(fixture("photo.png"))
        .arg("--masks")
        .arg(masks)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn dump_matches_reference_in_all_layouts() {
    let mut ok = true;
    for (layout, expected) in LAYOUTS {
        let out = out_path(layout);
        let run = dump(&fixture("tiny").join(layout), &fixture("masks.safetensors"), &out);
        assert!(run.status.success(), "{layout}: {}", String::from_utf8_lossy(&run.stderr));
        let got = load_safetensors(&out);
        let want = load_safetensors(&fixture(expected));
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["mask_tokens", "pixel_values", "pos_tokens", "res2", "res3", "res4", "res5"],
            "{layout}: output tensors"
        );
        for name in names {
            assert_eq!(got[name].dtype(), candle_core::DType::F32);
            ok &= check(layout, name, &got[name], &want, TOL);
        }
        std::fs::remove_file(out).unwrap();
    }
    assert!(ok, "dump output differs from the reference");
}

#[test]
fn dump_rejects_masks_of_another_size() {
    let masks = out_path("small-masks");
    let small =
        candle_core::Tensor::zeros((1, 10, 12), candle_core::DType::U8, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("masks".to_string(), small)]), &masks)
        .unwrap();
    let out = out_path("never-written");
    let run = dump(&fixture("tiny/tiny_st"), &masks, &out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("mask 0 is 10x12") && stderr.contains("103x157"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists());
    std::fs::remove_file(masks).unwrap();
}
