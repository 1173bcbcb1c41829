//! Fixture helpers shared by the integration tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/vision/...` at the repository root.
pub fn fixture(rel: &str) -> PathBuf {
    osprey_test_support::fixture("vision").join(rel)
}

/// The checkpoint layouts and the expected outputs made from their weights.
pub const LAYOUTS: [(&str, &str); 3] = [
    ("tiny_st", "expected_f32.safetensors"),
    ("tiny_split", "expected_f32.safetensors"),
    ("tiny_bin", "expected_bf16.safetensors"),
];

pub fn load_safetensors(path: &PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// [`osprey_test_support::rel_l2`] of two tensors of the same shape.
pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let values =
        |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    osprey_test_support::rel_l2(&values(got), &values(want))
}

/// Compares `got` with `want[name]`, prints the error and returns whether it is within `tol`.
pub fn check(layout: &str, name: &str, got: &Tensor, want: &HashMap<String, Tensor>, tol: f64) -> bool {
    let want = want.get(name).unwrap_or_else(|| panic!("expected tensor {name} missing"));
    let err = rel_l2(got, want);
    let ok = err <= tol;
    println!("{layout:10} {name:24} {:?} rel L2 {err:.3e}{}", got.dims(), if ok { "" } else { "  <-- FAIL" });
    ok
}
