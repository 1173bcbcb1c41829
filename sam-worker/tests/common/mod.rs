//! Shared helpers of the SAM parity tests (fixtures from `tools/make_sam_fixtures.py`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

#[allow(unused_imports)] // Not every test binary that includes this module measures errors.
pub use osprey_test_support::rel_l2;

pub fn fixture(name: &str) -> PathBuf {
    osprey_test_support::fixture("sam").join(name)
}

pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

pub fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// Fraction of equal pixels.
pub fn agreement(got: &[u8], want: &[u8]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let same = got.iter().zip(want).filter(|(a, b)| a == b).count();
    same as f64 / want.len().max(1) as f64
}

pub const MAX_REL_L2: f64 = 1e-4;
pub const MIN_AGREEMENT: f64 = 0.999;

/// Entries of prompts.json.
pub fn prompts() -> Vec<sam_worker::dump::DumpPrompt> {
    serde_json::from_slice(&std::fs::read(fixture("prompts.json")).unwrap()).unwrap()
}
