//! The Rust sentence embedder against sentence-transformers (all-MiniLM-L6-v2, the real weights):
//! `tests/fixtures/eval/ss_reference.json` from `clients/osprey-eval/reference/make_ss_fixture.py`.

use std::path::PathBuf;

use osprey_eval::embed::{SentenceEmbedder, cosine};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn embedder() -> SentenceEmbedder {
    let dir = std::env::var_os("OSPREY_EMBEDDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ROOT).join(".cache/weights/all-MiniLM-L6-v2"));
    SentenceEmbedder::load(&dir).expect("the MiniLM weights (run tools/fetch_minilm.sh)")
}

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(ROOT).join("tests/fixtures/eval/ss_reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn semantic_similarity_matches_sentence_transformers() {
    let embedder = embedder();
    let fixture = fixture();
    let pairs = fixture["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 300);
    let mut max_error = 0.0f64;
    let mut worst = String::new();
    for pair in pairs {
        let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
        let ss = cosine(&embedder.embed(a).unwrap(), &embedder.embed(b).unwrap());
        let error = (ss - pair["ss"].as_f64().unwrap()).abs();
        if error > max_error {
            max_error = error;
            worst = format!("{a:?} / {b:?}");
        }
    }
    println!("SS over {} pairs: max |Rust - sentence-transformers| = {max_error:.3e} ({worst})", pairs.len());
    assert!(max_error < 1e-4, "max SS error {max_error} at {worst}");
}

#[test]
fn embeddings_match_and_are_unit_length() {
    let embedder = embedder();
    for row in fixture()["embeddings"].as_array().unwrap() {
        let text = row["text"].as_str().unwrap();
        let reference: Vec<f64> =
            row["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let ours = embedder.embed(text).unwrap();
        assert_eq!(ours.len(), 384);
        let max = ours.iter().zip(&reference).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        let norm: f64 = ours.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        println!("{:?}: max element error {max:.3e}", text.chars().take(30).collect::<String>());
        assert!(max < 1e-4, "{text:?}: max element error {max}");
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
