//! Full-size key manifests: `Sam::load` must request exactly the state-dict keys and shapes of the
//! official ViT-B/L/H models (lists generated on the meta device by tools/make_sam_fixtures.py).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use common::fixture;
use sam_worker::{Sam, SamConfig};

/// Records every requested tensor and hands back a zero-strided broadcast (no memory).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Requests>>);

/// `(name, shape)` in request order.
type Requests = Vec<(String, Vec<usize>)>;

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn check(kind: &str, cfg: SamConfig) {
    let manifest: BTreeMap<String, Vec<usize>> =
        serde_json::from_slice(&std::fs::read(fixture(&format!("manifest_{kind}.json"))).unwrap()).unwrap();
    let rec = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    Sam::load(vb, &cfg).unwrap();
    let requested = rec.0.lock().unwrap().clone();
    let mut got = BTreeMap::new();
    for (name, shape) in requested {
        assert!(got.insert(name.clone(), shape).is_none(), "{kind}: {name} requested twice");
    }
    let missing: Vec<_> = manifest.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !manifest.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{kind}: missing {missing:?}, extra {extra:?}");
    for (name, shape) in &manifest {
        assert_eq!(&got[name], shape, "{kind}: shape of {name}");
    }
    eprintln!("{kind}: {} keys match", manifest.len());
}

#[test]
fn vit_b_requests_official_keys() {
    check("vit_b", SamConfig::vit_b());
}

#[test]
fn vit_l_requests_official_keys() {
    check("vit_l", SamConfig::vit_l());
}

#[test]
fn vit_h_requests_official_keys() {
    check("vit_h", SamConfig::vit_h());
}

#[test]
fn default_config_is_vit_b_and_tiny_config_parses() {
    assert_eq!(SamConfig::default(), SamConfig::vit_b());
    let empty: SamConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(empty, SamConfig::vit_b());
    let tiny = sam_worker::dump::read_config(Some(&fixture("tiny_config.json"))).unwrap();
    assert_eq!((tiny.grid_size(), tiny.low_res_size()), (8, 32));
    assert!(serde_json::from_str::<SamConfig>(r#"{"no_such_field": 1}"#).is_err());
}
