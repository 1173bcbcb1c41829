//! Named API keys (`--api-key` and `--api-keys-file`): each key is known by its name in
//! `osprey_gateway_requests_total{key,status}`, a rate-limited key is refused with
//! RESOURCE_EXHAUSTED and a retry hint once its burst is spent (the gRPC and HTTP sides drawing on
//! the same limit), and the caps on the costliest requests name the field and the limit. Its own
//! test binary: the metrics recorder is global.

use std::io::{Read, Write};
use std::time::Duration;

use osprey_common::error::StatusExt;
use osprey_proto::v1::{self, DescribeTask};
use osprey_test_support::free_port;
use tonic::{Code, Request, Status};

/// The tiny models' servers and the gateway in front of them, as the pipeline tests start them.
#[path = "pipeline/support.rs"]
#[allow(dead_code)]
mod support;
use support::{gateway, llm, masks, photo, vision};

/// A plain HTTP/1.0 request; the whole response.
fn http(port: u16, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The value of the counter `name` whose labels are exactly `labels` (in any order), 0 if absent.
fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{')?.split_once("} "))
        .find(|(found, _)| {
            let mut found: Vec<&str> = found.split(',').collect();
            found.sort();
            found == wanted
        })
        .map_or(0, |(_, value)| value.parse().unwrap())
}

fn describe_request(parameters: Option<v1::GenerationParameters>, regions: usize) -> v1::DescribeRequest {
    v1::DescribeRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Encoded(photo())) }),
        regions: masks(&vec![1; regions]),
        everything: None,
        task: DescribeTask::Short as i32,
        parameters,
    }
}

/// Describe with `header: value`, every result read; the status it ended with.
async fn describe(
    client: &mut support::Client,
    header: Option<(&'static str, &str)>,
    request: v1::DescribeRequest,
) -> Result<usize, Status> {
    let mut request = Request::new(request);
    if let Some((name, value)) = header {
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    let mut stream = client.describe(request).await?.into_inner();
    let mut results = 0;
    while stream.message().await?.is_some() {
        results += 1;
    }
    Ok(results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_keys_are_counted_by_name_and_rate_limited() {
    let metrics_port = free_port();
    osprey_common::telemetry::init_prometheus(([127, 0, 0, 1], metrics_port).into()).unwrap();

    let (vision, llm) = (vision().await, llm().await);

    // bob may make 2 requests, then one every 1000 s.
    let keys = std::env::temp_dir().join(format!("osprey-api-keys-{}", std::process::id()));
    std::fs::write(&keys, "# name:key[:per_second:burst]\nalice:a-key\nbob:b-key:0.001:2\n").unwrap();
    let http_port = free_port();
    let http_listen = format!("127.0.0.1:{http_port}");
    let extra = [
        "--api-key",
        "solo-key",
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--http-listen",
        &http_listen,
        "--max-request-tokens",
        "1024",
        "--max-points-per-side",
        "40",
    ];
    let (_gateway, mut client) = gateway(&[&vision], &llm, &extra).await;
    std::fs::remove_file(&keys).unwrap();

    // Each key opens; an unknown one and none do not.
    let alice = Some(("authorization", "Bearer a-key"));
    assert_eq!(describe(&mut client, alice, describe_request(None, 1)).await.unwrap(), 1);
    assert_eq!(
        describe(&mut client, Some(("x-api-key", "solo-key")), describe_request(None, 1)).await.unwrap(),
        1
    );
    for header in [Some(("x-api-key", "c-key")), None] {
        let status = describe(&mut client, header, describe_request(None, 1)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
    }

    // The caps name the field and the limit: 2 regions x 600 tokens is over 1024, 1 x 4 is not.
    let tokens = |n| Some(v1::GenerationParameters { max_new_tokens: Some(n), ..Default::default() });
    let status = describe(&mut client, alice, describe_request(tokens(600), 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "parameters.max_new_tokens: 2 regions x 600 new tokens is over the limit of 1024 tokens per request \
         (--max-request-tokens)"
    );
    assert_eq!(describe(&mut client, alice, describe_request(tokens(4), 1)).await.unwrap(), 1);
    let grid = v1::EverythingParams { points_per_side: Some(41), ..Default::default() };
    let segment = v1::SegmentRequest { everything: Some(grid), ..Default::default() };
    let segment = v1::SegmentRequest { image: describe_request(None, 0).image, ..segment };
    let mut request = Request::new(segment);
    request.metadata_mut().insert("x-api-key", "a-key".parse().unwrap());
    let status = client.segment(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "everything.points_per_side: 41 is over the limit of 40");

    // bob's burst of 2, one spent on each side; then both sides refuse him, with a retry hint.
    let bob = Some(("x-api-key", "b-key"));
    assert_eq!(describe(&mut client, bob, describe_request(None, 1)).await.unwrap(), 1);
    let models = "GET /x-anylabeling/v1/models HTTP/1.0\r\nHost: localhost\r\nToken: b-key\r\n\r\n";
    assert!(http(http_port, models).starts_with("HTTP/1.0 200"));
    let status = describe(&mut client, bob, describe_request(None, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().starts_with("API key \"bob\" is over its rate limit; retry in"), "{status:?}");
    let retry = status.get_error_details().retry_info().and_then(|r| r.retry_delay).expect("a retry hint");
    assert!(retry > Duration::from_secs(900) && retry <= Duration::from_secs(1000), "{retry:?}");
    let refused = http(http_port, models);
    assert!(refused.starts_with("HTTP/1.0 429"), "{refused}");
    assert!(refused.contains("RATE_LIMITED"), "{refused}");
    // alice is not limited by bob's limit.
    assert_eq!(describe(&mut client, alice, describe_request(None, 1)).await.unwrap(), 1);

    let metrics = http(metrics_port, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let requests = |key: &str, status: &str| {
        counter(&metrics, "osprey_gateway_requests_total", &[("key", key), ("status", status)])
    };
    assert_eq!(requests("alice", "OK"), 3, "{metrics}");
    assert_eq!(requests("alice", "INVALID_ARGUMENT"), 2);
    assert_eq!(requests("default", "OK"), 1);
    assert_eq!(requests("unknown", "UNAUTHENTICATED"), 2);
    assert_eq!(requests("bob", "OK"), 1);
    assert_eq!(requests("bob", "RESOURCE_EXHAUSTED"), 1);
    let integration = |status: &str| {
        let labels = [("tool", "x-anylabeling"), ("key", "bob"), ("status", status)];
        counter(&metrics, "osprey_integration_requests_total", &labels)
    };
    assert_eq!((integration("200"), integration("429")), (1, 1));
    // Keys never appear, only names.
    for key in ["a-key", "b-key", "solo-key", "c-key"] {
        assert!(!metrics.contains(key), "{key} in the metrics");
    }
}
