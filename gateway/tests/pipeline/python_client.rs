//! The Python client (tools/osprey_client.py) against the gateway.

use std::path::PathBuf;
use std::process::Command;

use osprey_proto::v1;
use tonic::Request;

use crate::support::*;

/// The Python interpreter of the test suite (with grpcio and grpcio-tools).
fn python() -> PathBuf {
    std::env::var_os("OSPREY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-ci/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_registers_and_describes() {
    let (vision, llm) = (vision().await, llm().await);
    let (gateway, mut client) = gateway(&[&vision], &llm, &["--api-key", "py-secret"]).await;
    let dir = scratch("python-client");
    let polygons = ["20,20,120,20,120,90,20,90", "0,0,60,0,60,50,0,50"];
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/osprey_client.py");
    let photo_path = fixtures().join("vision/photo.png");
    let mut args: Vec<String> = vec![
        script.to_str().unwrap().into(),
        "--endpoint".into(),
        gateway.url.trim_start_matches("http://").into(),
        "--stubs".into(),
        dir.join("stubs").to_str().unwrap().into(),
        "--image".into(),
        photo_path.to_str().unwrap().into(),
        "--api-key".into(),
        "py-secret".into(),
    ];
    for polygon in polygons {
        args.extend(["--polygon".into(), polygon.into()]);
    }
    let python = python();
    let output =
        tokio::task::spawn_blocking(move || Command::new(python).args(args).output().unwrap()).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    // The same regions through the Rust client give the same answers.
    let regions = polygons
        .iter()
        .map(|p| v1::Region {
            source: Some(v1::region::Source::Mask(v1::Mask {
                format: Some(v1::mask::Format::Polygon(v1::PolygonMask {
                    height: 103,
                    width: 157,
                    polygons: vec![v1::Polygon { xy: p.split(',').map(|v| v.parse().unwrap()).collect() }],
                })),
            })),
            label: String::new(),
        })
        .collect();
    let mut request = Request::new(describe_request(v1::image::Source::Encoded(photo()), regions));
    request.metadata_mut().insert("x-api-key", "py-secret".parse().unwrap());
    let mut stream = client.describe(request).await.unwrap().into_inner();
    let mut expected = Vec::new();
    while let Some(result) = stream.message().await.unwrap() {
        expected.push(result);
    }
    expected.sort_by_key(|r| r.region_index);

    assert_eq!((answer["width"].as_u64(), answer["height"].as_u64()), (Some(157), Some(103)));
    assert_eq!(answer["key"].as_str().unwrap().len(), 64);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (got, want) in results.iter().zip(&expected) {
        assert_eq!(got["region_index"].as_u64(), Some(want.region_index as u64));
        assert_eq!(got["label"].as_str(), Some(format!("polygon {}", want.region_index).as_str()));
        assert_eq!(got["text"].as_str(), Some(want.text.as_str()));
        assert_eq!(got["raw_text"].as_str(), Some(want.raw_text.as_str()));
        assert_eq!(got["area"].as_u64(), Some(want.area));
        assert!(got["generated_tokens"].as_u64().unwrap() >= 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
