//! The whole pipeline over real gRPC on loopback: gateway → vision worker(s) → LLM worker, with
//! the tiny reference models. Covers streaming per region, the feature-cache tiers (resident,
//! shared through Redis across gateways, computed), failover between vision replicas, image
//! registration, Ask, Annotate, API keys and INVALID_ARGUMENT for bad input.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::osprey_client::OspreyClient;
use osprey_proto::v1::{self, CacheTier, DescribeTask};
use safetensors::SafeTensors;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request};

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
struct SamCli {
    #[command(flatten)]
    args: sam_worker::service::ServeArgs,
}

#[derive(Parser)]
struct GatewayCli {
    #[command(flatten)]
    args: gateway::service::GatewayArgs,
}

/// A server running in this process until `stop` is sent (or dropped).
struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Running {
    fn stop(&mut self) {
        self.stop.take();
    }
}

async fn spawn<F, Fut>(start: F) -> Running
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let server = start(listener, stopped);
    tokio::spawn(async move { server.await.unwrap() });
    wait_serving(&url).await;
    Running { url, stop: Some(stop) }
}

async fn wait_serving(url: &str) {
    osprey_common::grpc::connect_when_serving(url, "", Duration::from_secs(120)).await.unwrap();
}

async fn vision() -> Running {
    let weights = fixtures().join("vision/tiny/tiny_st");
    let args =
        VisionCli::parse_from(["v", "--weights", weights.to_str().unwrap(), "--feature-dtype", "f32"]).args;
    spawn(|listener, stopped| {
        vision_worker::service::run(args, listener, async {
            let _ = stopped.await;
        })
    })
    .await
}

async fn llm() -> Running {
    let weights = fixtures().join("llm/tiny");
    let args =
        LlmCli::parse_from(["l", "--weights", weights.to_str().unwrap(), "--default-max-new-tokens", "5"])
            .args;
    spawn(|listener, stopped| {
        llm_worker::service::run(args, listener, async {
            let _ = stopped.await;
        })
    })
    .await
}

async fn sam() -> Running {
    let dir = fixtures().join("sam");
    let (weights, config) = (dir.join("tiny_sam.pth"), dir.join("tiny_config.json"));
    let args = SamCli::parse_from([
        "s",
        "--weights",
        weights.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .args;
    spawn(|listener, stopped| {
        sam_worker::service::run(args, listener, async {
            let _ = stopped.await;
        })
    })
    .await
}

async fn gateway(vision: &[&Running], llm: &Running, extra: &[&str]) -> (Running, OspreyClient<Channel>) {
    let vision_urls: Vec<&str> = vision.iter().map(|v| v.url.as_str()).collect();
    let vision_urls = vision_urls.join(",");
    let mut argv = vec!["g", "--vision-workers", &vision_urls, "--llm-workers", &llm.url];
    argv.extend_from_slice(extra);
    let args = GatewayCli::parse_from(argv).args;
    let running = spawn(|listener, stopped| {
        gateway::service::run(args, listener, async {
            let _ = stopped.await;
        })
    })
    .await;
    let client = OspreyClient::connect(running.url.clone()).await.unwrap();
    (running, client)
}

fn photo() -> Vec<u8> {
    std::fs::read(fixtures().join("vision/photo.png")).unwrap()
}

/// The vision fixture's masks (103x157): 1 full, 4 blobs, 8 person.
fn masks(indices: &[usize]) -> Vec<v1::Region> {
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

fn describe_request(image: v1::image::Source, regions: Vec<v1::Region>) -> v1::DescribeRequest {
    v1::DescribeRequest {
        image: Some(v1::Image { source: Some(image) }),
        regions,
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: None,
    }
}

async fn describe(client: &mut OspreyClient<Channel>, request: v1::DescribeRequest) -> Vec<v1::RegionResult> {
    let mut stream = client.describe(request).await.unwrap().into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await.unwrap() {
        results.push(result);
    }
    results.sort_by_key(|r| r.region_index);
    results
}

fn tier(result: &v1::RegionResult) -> CacheTier {
    CacheTier::try_from(result.metadata.as_ref().unwrap().cache.as_ref().unwrap().vision_features).unwrap()
}

#[tokio::test]
async fn describe_many_regions_with_cache_tiers_and_failover() {
    let (vision_a, mut vision_b, llm) = (vision().await, vision().await, llm().await);
    let (_gateway, mut client) = gateway(&[&vision_a, &vision_b], &llm, &[]).await;
    let image = v1::image::Source::Encoded(photo());

    let first = describe(&mut client, describe_request(image.clone(), masks(&[1, 4, 8]))).await;
    assert_eq!(first.iter().map(|r| r.region_index).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(first.iter().all(|r| tier(r) == CacheTier::Computed), "first request encodes");
    assert_eq!(first[0].area, 103 * 157);
    assert_eq!(first[0].bbox, [0.0, 0.0, 157.0, 103.0]);
    assert_eq!(first[1].label, "mask-4");
    for result in &first {
        assert!(result.generated_tokens >= 1 && result.generated_tokens <= 5);
        let timing = result.metadata.as_ref().unwrap().timing.as_ref().unwrap();
        assert!(timing.encode_ns > 0 && timing.total_ns >= timing.encode_ns);
    }

    // Same image again: the routed replica has the features resident; answers are identical,
    // also when each region is asked alone (greedy decoding does not depend on batching).
    let second = describe(&mut client, describe_request(image.clone(), masks(&[1, 4, 8]))).await;
    assert!(second.iter().all(|r| tier(r) == CacheTier::Resident), "second request skips encoding");
    for (i, region) in [1, 4, 8].into_iter().enumerate() {
        let alone = describe(&mut client, describe_request(image.clone(), masks(&[region]))).await;
        assert_eq!(alone[0].raw_text, first[i].raw_text);
        assert_eq!(second[i].raw_text, first[i].raw_text);
    }

    // Stop the replica that holds this image's features: the other one serves, from the
    // gateway's in-memory feature cache, with the same answers.
    let key_holder_url = {
        let image = osprey_common::image::decode_image(&photo(), &Default::default()).unwrap();
        let key = image.key("osprey-7b");
        let urls = vec![vision_a.url.clone(), vision_b.url.clone()];
        gateway::routing::rank(&key, &urls)[0].to_string()
    };
    let mut vision_a = vision_a;
    if key_holder_url == vision_a.url {
        vision_a.stop()
    } else {
        vision_b.stop()
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = describe(&mut client, describe_request(image, masks(&[1, 4, 8]))).await;
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|r| tier(r) == CacheTier::Shared), "features come from the shared cache");
    for (a, b) in after.iter().zip(&first) {
        assert_eq!(a.raw_text, b.raw_text);
    }
}

fn result_hit(result: &v1::RegionResult) -> bool {
    result.metadata.as_ref().unwrap().cache.as_ref().unwrap().result
}

#[tokio::test]
async fn result_cache_answers_repeated_greedy_questions_without_vision_or_llm() {
    let (mut vision, mut llm) = (vision().await, llm().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &["--result-cache-ttl-seconds", "600"]).await;
    let image = v1::image::Source::Encoded(photo());
    let ask = |question: &str, parameters: Option<v1::GenerationParameters>| v1::AskRequest {
        image: Some(v1::Image { source: Some(image.clone()) }),
        regions: masks(&[1, 4]),
        question: question.into(),
        parameters,
        verbatim: false,
    };

    let first = describe(&mut client, describe_request(image.clone(), masks(&[1, 4]))).await;
    assert!(first.iter().all(|r| !result_hit(r)));
    // Two regions asked before, one new: only the new one goes to vision and the LLM.
    let mixed = describe(&mut client, describe_request(image.clone(), masks(&[1, 4, 8]))).await;
    assert_eq!(mixed.iter().map(result_hit).collect::<Vec<_>>(), [true, true, false]);
    assert_eq!(tier(&mixed[2]), CacheTier::Resident);
    for (cached, fresh) in mixed.iter().zip(&first) {
        assert_eq!(cached.raw_text, fresh.raw_text);
        assert_eq!(cached.text, fresh.text);
        assert_eq!(cached.label, fresh.label);
        assert_eq!(cached.area, fresh.area);
        let timing = cached.metadata.as_ref().unwrap().timing.as_ref().unwrap();
        assert_eq!((timing.encode_ns, timing.pool_ns, timing.prefill_ns), (0, 0, 0));
    }
    let asked = client.ask(ask("What is region1 doing?", None)).await.unwrap().into_inner();
    assert!(!asked.metadata.as_ref().unwrap().cache.as_ref().unwrap().result);

    // With vision and the LLM gone, cached answers are still served...
    vision.stop();
    llm.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cached = describe(&mut client, describe_request(image.clone(), masks(&[8, 1]))).await;
    assert!(cached.iter().all(result_hit));
    assert_eq!((cached[0].label.as_str(), &cached[0].raw_text), ("mask-8", &mixed[2].raw_text));
    let again = client.ask(ask("What is region1 doing?", None)).await.unwrap().into_inner();
    assert!(again.metadata.as_ref().unwrap().cache.as_ref().unwrap().result);
    assert_eq!((&again.text, &again.raw_text), (&asked.text, &asked.raw_text));
    let chat = v1::ChatRequest {
        image: Some(v1::Image { source: Some(image.clone()) }),
        regions: masks(&[1, 4]),
        history: vec![],
        question: "What is region1 doing?".into(),
        parameters: None,
    };
    let mut chunks = client.chat(chat).await.unwrap().into_inner();
    let chunk = chunks.message().await.unwrap().unwrap();
    assert!(chunk.finished && chunk.metadata.unwrap().cache.unwrap().result);
    assert_eq!(chunk.text, asked.raw_text);

    // ...but anything not asked before, or not deterministic, needs the workers.
    let other_task = v1::DescribeRequest {
        task: DescribeTask::Category as i32,
        ..describe_request(image.clone(), masks(&[1]))
    };
    let sampled = v1::DescribeRequest {
        parameters: Some(v1::GenerationParameters { temperature: Some(0.7), ..Default::default() }),
        ..describe_request(image.clone(), masks(&[1]))
    };
    let longer = v1::DescribeRequest {
        parameters: Some(v1::GenerationParameters { max_new_tokens: Some(3), ..Default::default() }),
        ..describe_request(image.clone(), masks(&[1]))
    };
    for request in [other_task, sampled, longer] {
        let status = match client.describe(request).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let status = client.ask(ask("What is region2 doing?", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Bad parameters are refused even when the answer would be cached.
    let bad = v1::GenerationParameters { top_p: Some(2.0), ..Default::default() };
    let status = client.ask(ask("What is region1 doing?", Some(bad))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis() -> (RedisServer, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be on PATH (.ci/run installs it)");
    let server = RedisServer(child);
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, format!("redis://127.0.0.1:{port}/0"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not start");
}

#[tokio::test]
async fn gateways_share_features_through_redis_and_registered_images() {
    let (_redis, url) = redis();
    let (vision_a, vision_b, llm) = (vision().await, vision().await, llm().await);
    let shared = ["--redis-url", &url, "--result-cache-ttl-seconds", "600"];
    let (_g1, mut first) = gateway(&[&vision_a], &llm, &shared).await;
    let (_g2, mut second) = gateway(&[&vision_b], &llm, &shared).await;

    let registered = first
        .register_image(v1::RegisterImageRequest { encoded: photo(), warm_features: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((registered.width, registered.height), (157, 103));
    // The other gateway (other vision replica) finds the pixels and the features in Redis.
    let by_key = v1::image::Source::Key(registered.key.clone());
    let results = describe(&mut second, describe_request(by_key.clone(), masks(&[1, 4]))).await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| tier(r) == CacheTier::Shared));
    // The answers are shared too: the first gateway finds them in Redis's result cache.
    let again = describe(&mut first, describe_request(by_key.clone(), masks(&[1, 4]))).await;
    assert!(again.iter().all(result_hit), "answers come from the shared result cache");
    for (a, b) in again.iter().zip(&results) {
        assert_eq!((&a.raw_text, &a.text, a.generated_tokens), (&b.raw_text, &b.text, b.generated_tokens));
    }

    let answer = second
        .ask(v1::AskRequest {
            image: Some(v1::Image { source: Some(by_key) }),
            regions: masks(&[1, 4]),
            question: "What is region1 doing with region2?".into(),
            parameters: None,
            verbatim: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.generated_tokens >= 1);
    let unknown = v1::Image { source: Some(v1::image::Source::Key("no-such-key".into())) };
    let status = second
        .describe(v1::DescribeRequest {
            image: Some(unknown),
            ..describe_request(v1::image::Source::Encoded(vec![]), masks(&[1]))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// `Ask` with `verbatim` sends the user message as written: the category task's own wording gives
/// `Describe(CATEGORY)`'s raw answer for the same region; a pair count that is not the region count
/// is INVALID_ARGUMENT on `question`.
#[tokio::test]
async fn verbatim_questions_reach_the_llm_as_written() {
    let (vision, llm) = (vision().await, llm().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &[]).await;
    let image = v1::image::Source::Encoded(photo());
    let category = v1::DescribeRequest {
        task: DescribeTask::Category as i32,
        ..describe_request(image.clone(), masks(&[4]))
    };
    let described = describe(&mut client, category).await;
    let ask = |question: &str| v1::AskRequest {
        image: Some(v1::Image { source: Some(image.clone()) }),
        regions: masks(&[4]),
        question: question.into(),
        parameters: None,
        verbatim: true,
    };
    let category_question = "<image>\nThis provides an overview of the picture.\nWhat is the category of \
                             <mask><pos>? Using only one word or phrase.";
    let asked = client.ask(ask(category_question)).await.unwrap().into_inner();
    assert_eq!(asked.raw_text, described[0].raw_text);

    for (question, message) in [
        ("<image>\n<mask><pos> and <mask><pos>?", "question: verbatim: 2 `<mask><pos>` pairs for 1 regions"),
        ("What is <mask><pos>?", "question: verbatim: 0 `<image>`, expected 1"),
        ("<image>\nWhat is <mask> <pos>?", "question"),
    ] {
        let status = client.ask(ask(question)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{question}: {status:?}");
        assert!(status.message().starts_with(message), "{question}: {:?}", status.message());
    }
    // The count is checked before any region work: a SAM prompt region is refused on the question,
    // not sent to SAM (this gateway has no SAM worker, which would be FAILED_PRECONDITION).
    let point = v1::Point { x: 80.0, y: 50.0, label: v1::PointLabel::Foreground as i32 };
    let prompt = v1::region::Source::Prompt(v1::SamPrompt { points: vec![point], ..Default::default() });
    let mut prompted = ask("<image>\n<mask><pos> and <mask><pos>?");
    prompted.regions = vec![v1::Region { source: Some(prompt), label: String::new() }];
    let status = client.ask(prompted).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("question: verbatim: 2"), "{:?}", status.message());
}

#[tokio::test]
async fn bad_input_and_auth() {
    let (vision, llm) = (vision().await, llm().await);
    let (_gateway, mut client) =
        gateway(&[&vision], &llm, &["--api-key", "secret", "--max-regions", "3"]).await;
    let image = v1::image::Source::Encoded(photo());

    let status = client.describe(describe_request(image.clone(), masks(&[1]))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let authed = |request: v1::DescribeRequest| {
        let mut request = Request::new(request);
        request.metadata_mut().insert("authorization", "Bearer secret".parse().unwrap());
        request
    };
    let mut wrong_size = masks(&[1]);
    wrong_size.push(v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(rle_to_proto(&Mask::empty(10, 10).to_rle()))),
        })),
        label: String::new(),
    });
    let bad_rle = vec![v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(v1::RleMask {
                height: 103,
                width: 157,
                counts: Some(v1::rle_mask::Counts::Compressed("1~".into())),
            })),
        })),
        label: String::new(),
    }];
    let cases = [
        (
            describe_request(image.clone(), wrong_size),
            "regions[1].mask: mask is 10x10 but the image is 103x157",
        ),
        (describe_request(image.clone(), bad_rle), "regions[0].mask: RLE string has invalid character"),
        (describe_request(image.clone(), masks(&[1, 1, 1, 1])), "regions: 4 regions, over the limit of 3"),
        (describe_request(image.clone(), vec![]), "regions: at least one region"),
        (
            describe_request(v1::image::Source::Encoded(b"not an image".to_vec()), masks(&[1])),
            "image.encoded:",
        ),
        (
            v1::DescribeRequest { image: None, ..describe_request(image.clone(), masks(&[1])) },
            "image: required",
        ),
    ];
    for (request, expected) in cases {
        let status = match client.describe(authed(request)).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}: {status:?}");
        assert!(status.message().starts_with(expected), "expected {expected:?}, got {:?}", status.message());
    }

    // Annotate: a bad item gets an error, the stream goes on with the next one.
    let items = vec![
        v1::AnnotateRequest {
            item_id: "bad".into(),
            image: None,
            regions: masks(&[1]),
            ..Default::default()
        },
        v1::AnnotateRequest {
            item_id: "good".into(),
            image: Some(v1::Image { source: Some(image.clone()) }),
            regions: masks(&[1, 4]),
            ..Default::default()
        },
    ];
    let mut request = Request::new(tokio_stream::iter(items));
    request.metadata_mut().insert("x-api-key", "secret".parse().unwrap());
    let mut stream = client.annotate(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(response) = stream.message().await.unwrap() {
        events.push(response);
    }
    use v1::annotate_response::Event;
    assert!(
        matches!(&events[0].event, Some(Event::Error(e)) if e.code == Code::InvalidArgument as i32 && events[0].item_id == "bad")
    );
    let good: Vec<_> = events.iter().filter(|e| e.item_id == "good").collect();
    let regions: BTreeSet<u32> = good
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Region(r)) => Some(r.region_index),
            _ => None,
        })
        .collect();
    assert_eq!(regions, BTreeSet::from([0, 1]));
    assert!(matches!(&good.last().unwrap().event, Some(Event::Done(done)) if done.regions == 2));

    // Still healthy and answering.
    let mut stream =
        client.describe(authed(describe_request(image, masks(&[1])))).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().region_index, 0);
}

#[tokio::test]
async fn sam_prompts_segment_and_everything() {
    let (vision, llm, sam) = (vision().await, llm().await, sam().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &["--sam-workers", &sam.url]).await;
    let image = v1::Image { source: Some(v1::image::Source::Encoded(photo())) };
    let point = |label: v1::PointLabel| v1::SamPrompt {
        points: vec![v1::Point { x: 80.0, y: 50.0, label: label as i32 }],
        ..Default::default()
    };

    let segmented = client
        .segment(v1::SegmentRequest {
            image: Some(image.clone()),
            prompts: vec![point(v1::PointLabel::Foreground)],
            everything: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(segmented.prompts.len(), 1);
    assert_eq!(segmented.prompts[0].masks.len(), 1);
    let mask = segmented.prompts[0].masks[0].mask.as_ref().unwrap();
    assert_eq!((mask.height, mask.width), (103, 157));

    // A prompt region is described with the mask SAM made, which comes back with the result.
    let prompt_region = v1::Region {
        source: Some(v1::region::Source::Prompt(point(v1::PointLabel::Foreground))),
        label: "p".into(),
    };
    let mut regions = masks(&[1]);
    regions.push(prompt_region);
    let results = describe(
        &mut client,
        v1::DescribeRequest {
            image: Some(image.clone()),
            ..describe_request(v1::image::Source::Key(String::new()), regions)
        },
    )
    .await;
    assert_eq!(results.len(), 2);
    assert!(results[0].mask.is_none());
    assert_eq!(results[1].mask.as_ref(), Some(mask));
    let sam_tier = results[1].metadata.as_ref().unwrap().cache.as_ref().unwrap().sam_embedding;
    assert_eq!(sam_tier, CacheTier::Resident as i32, "the embedding from Segment is reused");

    // A bad prompt is named by its region.
    let mut bad = point(v1::PointLabel::Foreground);
    bad.points[0].x = f32::NAN;
    let regions = vec![
        masks(&[1]).remove(0),
        v1::Region { source: Some(v1::region::Source::Prompt(bad)), label: String::new() },
    ];
    let status = client
        .describe(v1::DescribeRequest {
            image: Some(image.clone()),
            ..describe_request(v1::image::Source::Key(String::new()), regions)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("regions[1].prompt"), "{}", status.message());

    // Everything mode describes what SAM proposes (loose thresholds for the random model).
    let everything = v1::EverythingParams {
        points_per_side: Some(4),
        pred_iou_thresh: Some(0.0),
        stability_score_thresh: Some(0.0),
        ..Default::default()
    };
    let request = v1::DescribeRequest {
        image: Some(image),
        everything: Some(everything),
        ..describe_request(v1::image::Source::Key(String::new()), vec![])
    };
    let results = describe(&mut client, request).await;
    assert!(!results.is_empty());
    assert!(results.iter().all(|r| r.mask.is_some() && r.label.starts_with("everything")));
}

#[tokio::test]
async fn tls_serves_the_api_to_clients_that_trust_the_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig};
    let tls = fixtures().join("tls");
    let (cert, key) = (tls.join("server.pem"), tls.join("server.key"));
    let (vision, llm) = (vision().await, llm().await);
    let argv = [
        "g",
        "--vision-workers",
        &vision.url,
        "--llm-workers",
        &llm.url,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let args = GatewayCli::parse_from(argv).args;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(gateway::service::run(args, listener, async {
        let _ = stopped.await;
    }));

    let ca = Certificate::from_pem(std::fs::read(tls.join("ca.pem")).unwrap());
    let endpoint = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap();
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(connected) = endpoint.connect().await {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut client = OspreyClient::new(channel.expect("TLS connection"));
    let results =
        describe(&mut client, describe_request(v1::image::Source::Encoded(photo()), masks(&[1]))).await;
    assert_eq!(results.len(), 1);
    assert!(results[0].generated_tokens >= 1);

    // The annotate CLI speaks TLS with --ca-cert.
    let dir = scratch("annotate-tls");
    std::fs::copy(fixtures().join("vision/photo.png"), dir.join("photo.png")).unwrap();
    let coco = serde_json::json!({
        "images": [{"id": 7, "file_name": "photo.png", "height": 103, "width": 157}],
        "annotations": [{"id": 70, "image_id": 7, "segmentation": compressed_rle(4)}],
    });
    std::fs::write(dir.join("coco.json"), coco.to_string()).unwrap();
    let run = annotate_cli(
        [
            "--endpoint",
            &format!("https://localhost:{port}"),
            "--ca-cert",
            tls.join("ca.pem").to_str().unwrap(),
            "--coco",
            dir.join("coco.json").to_str().unwrap(),
            "--out",
            dir.join("out.json").to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out.json")).unwrap()).unwrap();
    assert!(out["annotations"][0]["answer"].is_string());
    let _ = std::fs::remove_dir_all(&dir);

    // A plaintext client gets nothing.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await;
    if let Ok(plain) = plain {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = tonic_health::pb::health_client::HealthClient::new(plain).check(request).await;
        assert!(answer.is_err(), "plaintext was answered: {answer:?}");
    }
    // A client that does not trust the certificate refuses the connection.
    let untrusting = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    assert!(untrusting.is_err());

    // Missing key files are a startup error naming the file.
    let missing = tls.join("no-such.key");
    let argv = [
        "g",
        "--vision-workers",
        &vision.url,
        "--llm-workers",
        &llm.url,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = gateway::service::run(GatewayCli::parse_from(argv).args, listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("no-such.key"), "{err}");
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-gateway-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `gateway annotate` with `args` to completion (off the async runtime's threads).
async fn annotate_cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_gateway")).arg("annotate").args(args).output().unwrap()
    })
    .await
    .unwrap()
}

fn compressed_rle(index: usize) -> serde_json::Value {
    let region = masks(&[index]).remove(0);
    let Some(v1::region::Source::Mask(v1::Mask { format: Some(v1::mask::Format::Rle(rle)) })) = region.source
    else {
        unreachable!()
    };
    let rle = osprey_common::mask::rle_from_proto(&rle).unwrap();
    serde_json::json!({"size": [103, 157], "counts": rle.to_compressed()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_cli_resumes_after_a_kill_without_duplicates_or_losses() {
    let (vision, llm) = (vision().await, llm().await);
    // No result cache (the default): every image costs real work, so the kill lands mid-run.
    let (gateway, _client) = gateway(&[&vision], &llm, &[]).await;
    let dir = scratch("annotate");
    const IMAGES: usize = 30;
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..IMAGES {
        let name = format!("photo-{i:02}.png");
        std::fs::copy(fixtures().join("vision/photo.png"), dir.join(&name)).unwrap();
        images.push(serde_json::json!({"id": 100 + i, "file_name": name, "height": 103, "width": 157}));
        for (k, region) in [1, 4, 8].into_iter().enumerate() {
            let id = 1000 + 10 * i + k;
            let segmentation = compressed_rle(region);
            annotations.push(serde_json::json!({"id": id, "image_id": 100 + i, "category_id": 1, "segmentation": segmentation}));
        }
        let polygon = [[20.0, 20.0, 120.0, 20.0, 120.0, 90.0, 20.0, 90.0]];
        annotations.push(serde_json::json!({"id": 1000 + 10 * i + 5, "image_id": 100 + i, "category_id": 1, "segmentation": polygon}));
    }
    let coco = serde_json::json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]});
    let coco_path = dir.join("coco.json");
    std::fs::write(&coco_path, serde_json::to_vec(&coco).unwrap()).unwrap();
    let args = |out: &str| {
        [
            "--endpoint",
            &gateway.url,
            "--coco",
            coco_path.to_str().unwrap(),
            "--out",
            dir.join(out).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    // Reference: one uninterrupted run.
    let reference = annotate_cli(args("reference.json")).await;
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    assert_eq!(reference["images"].as_array().unwrap().len(), IMAGES);
    let answered = reference["annotations"].as_array().unwrap();
    assert_eq!(answered.len(), 4 * IMAGES);
    assert!(answered.iter().all(|a| a["answer"].is_string() && a["generated_tokens"].as_u64().unwrap() >= 1));
    assert_eq!(reference["categories"], coco["categories"]);

    // Killed mid-run (SIGKILL: no chance to clean up), with a record cut in half as a kill in
    // the middle of a write would leave it.
    let journal = dir.join("out.json.journal.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("annotate")
        .args(args("out.json"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = |path: &PathBuf| std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
    while lines(&journal) < 1 + 5 {
        assert!(child.try_wait().unwrap().is_none(), "finished before it could be interrupted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = lines(&journal) - 1;
    assert!(at_kill < IMAGES, "the run finished before the kill ({at_kill} images)");
    let mut file = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    std::io::Write::write_all(&mut file, br#"{"item":"1"#).unwrap();
    drop(file);
    assert!(!dir.join("out.json").exists());

    // The rerun does only the rest and writes the same output.
    let rerun = annotate_cli(args("out.json")).await;
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{at_kill} already done")), "{stderr}");
    let out: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out.json")).unwrap()).unwrap();
    assert_eq!(out, reference);
    let records: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|record| record["item"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(records.len(), IMAGES, "one journal record per image");
    assert_eq!(records.iter().collect::<BTreeSet<_>>().len(), IMAGES, "no image twice");

    // Another run with the same options has nothing left to do; other options are refused.
    let again = annotate_cli(args("out.json")).await;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("{IMAGES} already done")));
    let mut other = args("out.json");
    other.extend(["--task", "category"].map(String::from));
    let refused = annotate_cli(other).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("other options"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_cli_describes_everything_in_a_folder() {
    let (vision, llm, sam) = (vision().await, llm().await, sam().await);
    let (gateway, _client) = gateway(&[&vision], &llm, &["--sam-workers", &sam.url]).await;
    let dir = scratch("annotate-everything");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["b.png", "a.png"] {
        std::fs::copy(fixtures().join("vision/photo.png"), images.join(name)).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let out = dir.join("out.json");
    let args =
        ["--endpoint", &gateway.url, "--images", images.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let mut everything = args.map(String::from).to_vec();
    // Loose thresholds for the random SAM.
    let loose =
        ["--everything", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"];
    everything.extend(loose.map(String::from));

    let refused = annotate_cli(args.map(String::from).to_vec()).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--images needs --everything"));

    let run = annotate_cli(everything).await;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0], serde_json::json!({"id": 1, "file_name": "a.png", "width": 157, "height": 103}));
    let annotations = out["annotations"].as_array().unwrap();
    assert!(!annotations.is_empty());
    for (k, annotation) in annotations.iter().enumerate() {
        assert_eq!(annotation["id"], k + 1);
        assert_eq!(annotation["segmentation"]["size"], serde_json::json!([103, 157]));
        assert!(annotation["segmentation"]["counts"].is_string());
        assert!(annotation["answer"].is_string());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

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
