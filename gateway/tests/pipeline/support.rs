//! What every topic shares: the tiny models' servers in this process, the gateway in front of
//! them, the photo fixture with its masks, and Describe helpers.

use std::path::PathBuf;

pub use osprey_client::Client;
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, CacheTier, DescribeTask};
pub use osprey_test_support::{InProcess as Running, fixtures, parse_args};
use osprey_test_support::{serve_in_process, serve_on};
use safetensors::SafeTensors;

pub async fn vision() -> Running {
    vision_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), &[]).await
}

/// A vision worker on `listener`, with `extra` flags.
pub async fn vision_on(listener: tokio::net::TcpListener, extra: &[&str]) -> Running {
    let weights = fixtures().join("vision/tiny/tiny_st");
    let mut argv = vec!["v", "--weights", weights.to_str().unwrap(), "--feature-dtype", "f32"];
    argv.extend_from_slice(extra);
    let args = parse_args(argv);
    serve_on(listener, |listener, stopped| vision_worker::service::run(args, listener, stopped)).await
}

pub async fn llm() -> Running {
    let weights = fixtures().join("llm/tiny");
    let args = parse_args(["l", "--weights", weights.to_str().unwrap(), "--default-max-new-tokens", "5"]);
    serve_in_process(|listener, stopped| llm_worker::service::run(args, listener, stopped)).await
}

pub async fn sam() -> Running {
    let dir = fixtures().join("sam");
    let (weights, config) = (dir.join("tiny_sam.pth"), dir.join("tiny_config.json"));
    let args =
        parse_args(["s", "--weights", weights.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    serve_in_process(|listener, stopped| sam_worker::service::run(args, listener, stopped)).await
}

pub async fn gateway(vision: &[&Running], llm: &Running, extra: &[&str]) -> (Running, Client) {
    let vision_urls: Vec<&str> = vision.iter().map(|v| v.url.as_str()).collect();
    let vision_urls = vision_urls.join(",");
    let mut argv = vec!["g", "--vision-workers", &vision_urls, "--llm-workers", &llm.url];
    argv.extend_from_slice(extra);
    let args = parse_args(argv);
    let running = serve_in_process(|listener, stopped| gateway::service::run(args, listener, stopped)).await;
    let client = client(&running.url).await;
    (running, client)
}

/// A client of the gateway at `url`, connected by the shared client library.
pub async fn client(url: &str) -> Client {
    let options = osprey_client::ConnectOptions { endpoint: url.to_string(), ..Default::default() };
    osprey_client::connect(&options).await.unwrap()
}

pub fn photo() -> Vec<u8> {
    std::fs::read(fixtures().join("vision/photo.png")).unwrap()
}

/// The photo's image key under the gateway's default `--model-revision`.
pub fn photo_key() -> String {
    osprey_common::image::decode_image(&photo(), &Default::default()).unwrap().key("osprey-7b")
}

/// The vision fixture's masks (103x157): 1 full, 4 blobs, 8 person.
pub fn masks(indices: &[usize]) -> Vec<v1::Region> {
    let bytes = std::fs::read(fixtures().join("vision/masks.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let masks = tensors.tensor("masks").unwrap();
    let (h, w) = (masks.shape()[1], masks.shape()[2]);
    indices
        .iter()
        .map(|&i| {
            let mask =
                Mask::from_row_major(h as u32, w as u32, &masks.data()[i * h * w..(i + 1) * h * w]).unwrap();
            v1::Region {
                source: Some(v1::region::Source::Mask(v1::Mask {
                    format: Some(v1::mask::Format::Rle(rle_to_proto(&mask.to_rle()))),
                })),
                label: format!("mask-{i}"),
            }
        })
        .collect()
}

pub fn describe_request(image: v1::image::Source, regions: Vec<v1::Region>) -> v1::DescribeRequest {
    v1::DescribeRequest {
        image: Some(v1::Image { source: Some(image) }),
        regions,
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: None,
    }
}

pub async fn describe(client: &mut Client, request: v1::DescribeRequest) -> Vec<v1::RegionResult> {
    let mut stream = client.describe(request).await.unwrap().into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await.unwrap() {
        results.push(result);
    }
    results.sort_by_key(|r| r.region_index);
    results
}

pub fn tier(result: &v1::RegionResult) -> CacheTier {
    CacheTier::try_from(result.metadata.as_ref().unwrap().cache.as_ref().unwrap().vision_features).unwrap()
}

pub fn result_hit(result: &v1::RegionResult) -> bool {
    result.metadata.as_ref().unwrap().cache.as_ref().unwrap().result
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-gateway-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
