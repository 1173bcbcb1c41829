//! Data stays where it is: bytes between the gateway and its workers, read from
//! `osprey_gateway_worker_bytes_total{kind,direction}`. A cold Describe sends the pixels once (to
//! encode) and never the features back to the replica that computed them; a warm one sends no
//! image-sized payload to the vision worker. Its own test binary: the metrics recorder is global.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::osprey_client::OspreyClient;
use osprey_proto::v1::{self, CacheTier, DescribeTask};
use tokio::net::TcpListener;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[derive(Parser)]
struct VisionCli {
    #[command(flatten)]
    args: vision_worker::service::ServeArgs,
}

#[derive(Parser)]
struct LlmCli {
    #[command(flatten)]
    args: llm_worker::service::ServeArgs,
}

#[derive(Parser)]
struct GatewayCli {
    #[command(flatten)]
    args: gateway::service::GatewayArgs,
}

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

async fn serving(url: &str) {
    osprey_common::grpc::connect_when_serving(url, "", Duration::from_secs(120)).await.unwrap();
}

/// The counter's value for `kind` and `direction` in the Prometheus text at `port`.
fn worker_bytes(port: u16, kind: &str, direction: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|line| line.starts_with("osprey_gateway_worker_bytes_total{"))
        .filter(|line| {
            line.contains(&format!("kind=\"{kind}\"")) && line.contains(&format!("direction=\"{direction}\""))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_describe_sends_no_image_sized_payload() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    osprey_common::telemetry::init_prometheus(([127, 0, 0, 1], port).into()).unwrap();

    let weights = fixtures().join("vision/tiny/tiny_st");
    let vision_args =
        VisionCli::parse_from(["v", "--weights", weights.to_str().unwrap(), "--feature-dtype", "f32"]).args;
    let (vision_listener, vision_url) = listener().await;
    tokio::spawn(vision_worker::service::run(vision_args, vision_listener, std::future::pending()));
    let weights = fixtures().join("llm/tiny");
    let llm_args =
        LlmCli::parse_from(["l", "--weights", weights.to_str().unwrap(), "--default-max-new-tokens", "3"])
            .args;
    let (llm_listener, llm_url) = listener().await;
    tokio::spawn(llm_worker::service::run(llm_args, llm_listener, std::future::pending()));
    serving(&vision_url).await;
    serving(&llm_url).await;
    let args = GatewayCli::parse_from(["g", "--vision-workers", &vision_url, "--llm-workers", &llm_url]).args;
    let (gateway_listener, gateway_url) = listener().await;
    tokio::spawn(gateway::service::run(args, gateway_listener, std::future::pending()));
    serving(&gateway_url).await;
    let mut client = OspreyClient::connect(gateway_url).await.unwrap();

    let photo = std::fs::read(fixtures().join("vision/photo.png")).unwrap();
    let registered = client
        .register_image(v1::RegisterImageRequest { encoded: photo, warm_features: false })
        .await
        .unwrap()
        .into_inner();
    let pixel_bytes = (registered.width * registered.height * 3) as u64;
    let mask =
        Mask::from_row_major(registered.height, registered.width, &vec![1; (pixel_bytes / 3) as usize])
            .unwrap();
    let describe = v1::DescribeRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Key(registered.key)) }),
        regions: vec![v1::Region {
            source: Some(v1::region::Source::Mask(v1::Mask {
                format: Some(v1::mask::Format::Rle(rle_to_proto(&mask.to_rle()))),
            })),
            label: "all".into(),
        }],
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: None,
    };
    let mut run = async || {
        let before = ["sent", "received"].map(|d| worker_bytes(port, "vision", d));
        let mut stream = client.describe(describe.clone()).await.unwrap().into_inner();
        let result = stream.message().await.unwrap().unwrap();
        assert!(stream.message().await.unwrap().is_none());
        let tier = CacheTier::try_from(result.metadata.unwrap().cache.unwrap().vision_features).unwrap();
        let after = ["sent", "received"].map(|d| worker_bytes(port, "vision", d));
        (tier, after[0] - before[0], after[1] - before[1])
    };

    let (tier, cold_sent, cold_received) = run().await;
    assert_eq!(tier, CacheTier::Computed);
    // The pixels go once, to encode; the features come back once (for the shared cache) and are
    // not sent back: everything else sent is masks and keys.
    println!("cold: vision sent {cold_sent} B, received {cold_received} B; pixels {pixel_bytes} B");
    assert!(cold_sent >= pixel_bytes, "{cold_sent}");
    assert!(cold_sent < pixel_bytes + 4096, "{cold_sent}");

    let (tier, warm_sent, warm_received) = run().await;
    assert_eq!(tier, CacheTier::Resident);
    println!("warm: vision sent {warm_sent} B, received {warm_received} B");
    assert!(warm_sent < 4096, "{warm_sent}");
}
