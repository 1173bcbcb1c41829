//! The whole system as separate processes (issue #6, item 7): the real gateway, vision, LLM and
//! SAM worker binaries on loopback with the demo weights and a real `redis-server`. Needs the
//! workspace's binaries built (`cargo test --workspace` builds them; else `cargo build --bins`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use llm_worker::checkpoint::{load_checkpoint, load_config};
use llm_worker::models::osprey_llama::{OspreyLlama, PrefixKv, SeqCache};
use llm_worker::prompt::{Task, post_process};
use llm_worker::sampling::SamplingParams;
use llm_worker::tokenizer::OspreyTokenizer;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::Mask;
use osprey_e2e::*;
use osprey_proto::v1::{self, CacheTier};
use tonic::Code;
use vision_worker::VisionCore;
use vision_worker::VisionModel;

/// New tokens per answer: enough to tell answers apart, short enough for two cores.
const MAX_NEW_TOKENS: u32 = 8;

/// One region's answer from the single-process pipeline.
#[derive(Debug, PartialEq)]
struct Answer {
    raw_text: String,
    text: String,
}

/// The single-process pipeline, in this test process, from the library crates: the vision core
/// encodes the image and pools the masks (features kept in f16, the worker's default), then the
/// LLM answers each region on its own, greedily, one sequence at a time — no gRPC, no batching,
/// no prefix sharing, no caches.
fn single_process_answers(image: &TestImage, masks: &[Mask], max_new_tokens: usize) -> Vec<Answer> {
    let device = Device::Cpu;
    let fixtures = std::path::Path::new(FIXTURES);
    let vision = VisionModel::from_dir(&fixtures.join("vision/tiny/tiny_st"), &device).unwrap();
    let core = VisionCore::new(vision, DType::F16);
    let rgb = decode_image(&image.bytes, &ImageLimits::default()).unwrap();
    let features = core.encode_batch(&[&rgb]).unwrap().pop().unwrap();
    let pooled = core.pool(&features, masks, true).unwrap();
    let tensor = |(shape, data): (Vec<usize>, Vec<f32>)| Tensor::from_vec(data, shape, &device).unwrap();
    let mask_tokens = tensor(pooled.mask_tokens);
    let pos_tokens = tensor(pooled.pos_tokens);
    let image_tokens = tensor(pooled.image_tokens.unwrap());

    let llm_dir = fixtures.join("llm/tiny");
    let cfg = load_config(&llm_dir).unwrap();
    let llm = OspreyLlama::load(load_checkpoint(&llm_dir, DType::F32, &device).unwrap(), &cfg).unwrap();
    let tokenizer = OspreyTokenizer::from_dir(&llm_dir).unwrap();
    let projected = llm.project_image(&image_tokens).unwrap();
    let ids = tokenizer.tokenizer_image_token(&Task::Short.prompt()).unwrap();
    (0..masks.len())
        .map(|i| {
            let row = |t: &Tensor| t.narrow(0, i, 1).unwrap();
            let embeds = llm.splice(&ids, Some(&projected), &row(&mask_tokens), &row(&pos_tokens)).unwrap();
            let mut cache = SeqCache::new(PrefixKv::default());
            let greedy = SamplingParams::greedy(max_new_tokens);
            let generation = llm.generate(&mut cache, &embeds, &greedy, false).unwrap();
            let raw_text = tokenizer.decode(&generation.tokens, true).unwrap();
            Answer { text: post_process(&raw_text, Task::Short.post_process()), raw_text }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_regions_match_the_single_process_pipeline_and_a_repeat_skips_encoding() {
    let mut redis = redis_server(loopback(2)).unwrap();
    let mut vision = vision_worker(loopback(3), &[]).unwrap();
    let mut llm = llm_worker(loopback(4), &[]).unwrap();
    wait_all(&mut [&mut redis, &mut vision, &mut llm]).await.unwrap();
    let redis_url = format!("redis://{}/0", redis.addr);
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    // The result cache off: the repeat must go through the feature tiers.
    let flags = ["--redis-url", &redis_url, "--result-cache-ttl-seconds", "0"];
    let mut gateway = gateway(loopback(5), &workers, &flags).unwrap();
    gateway.wait_ready().await.unwrap();
    let mut client = client(&gateway, None).await.unwrap();

    let image = photo();
    let masks = box_masks(image.height, image.width, 16);
    let expected = single_process_answers(&image, &masks, MAX_NEW_TOKENS as usize);
    let request = || describe_request(&image, mask_regions(&masks), MAX_NEW_TOKENS);

    let first = describe(&mut client, request()).await.unwrap();
    assert_eq!(first.len(), 16);
    for (i, result) in first.iter().enumerate() {
        assert_eq!(result.region_index as usize, i);
        assert_eq!(result.label, format!("box-{i}"));
        assert_eq!(result.area, masks[i].area());
        assert_eq!(features_tier(result), CacheTier::Computed, "region {i}: the first request encodes");
        let got = Answer { raw_text: result.raw_text.clone(), text: result.text.clone() };
        assert_eq!(got, expected[i], "region {i}: gateway answer differs from the single-process pipeline");
    }
    let distinct: std::collections::BTreeSet<&str> = expected.iter().map(|a| a.raw_text.as_str()).collect();
    assert!(distinct.len() > 1, "the regions' answers should not all be alike: {expected:?}");
    let encodes = vision.metric("osprey_vision_encode_duration_seconds_count", &[]).await.unwrap();
    assert_eq!(encodes, 1.0, "16 regions, one encoding");

    // The same image again: the routed replica has the features resident, nothing is encoded.
    let hits_before =
        vision.metric("osprey_vision_resident_lookups_total", &[("hit", "true")]).await.unwrap();
    let second = describe(&mut client, request()).await.unwrap();
    assert_eq!(second.len(), 16);
    for (i, result) in second.iter().enumerate() {
        assert_eq!(features_tier(result), CacheTier::Resident, "region {i}: the repeat skips encoding");
        let timing = result.metadata.as_ref().unwrap().timing.as_ref().unwrap();
        assert_eq!(timing.encode_ns, 0);
        assert_eq!(result.raw_text, expected[i].raw_text);
    }
    assert_eq!(vision.metric("osprey_vision_encode_duration_seconds_count", &[]).await.unwrap(), 1.0);
    let hits_after = vision.metric("osprey_vision_resident_lookups_total", &[("hit", "true")]).await.unwrap();
    assert!(hits_after > hits_before, "resident hits {hits_before} -> {hits_after}");
}

/// Sends `rounds` passes over `images` from `clients` concurrent clients (each request four
/// regions); `between` runs once `trigger` requests have completed, while the rest are in flight.
/// Returns the results (or errors) of every request in completion order.
async fn run_load<F, Fut>(
    gateway: &Process,
    images: &[TestImage],
    clients: usize,
    rounds: usize,
    trigger: usize,
    between: F,
) -> Vec<(String, Result<Vec<v1::RegionResult>, tonic::Status>)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = client(gateway, None).await.unwrap();
        let images = images.to_vec();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for r in 0..rounds {
                // Each client walks the images from its own offset, so replicas see mixed traffic.
                for k in 0..images.len() {
                    let image = &images[(k + c * 3 + r) % images.len()];
                    let masks = box_masks(image.height, image.width, 4);
                    let request = describe_request(image, mask_regions(&masks), 4);
                    let outcome = describe(&mut client, request).await;
                    done.fetch_add(1, Ordering::SeqCst);
                    outcomes.push((image.name.clone(), outcome));
                }
            }
            outcomes
        }));
    }
    while done.load(Ordering::SeqCst) < trigger {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    between().await;
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }
    outcomes
}

/// Every request answered, each region of it.
fn assert_all_succeeded(outcomes: &[(String, Result<Vec<v1::RegionResult>, tonic::Status>)]) {
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|(name, outcome)| match outcome {
            Ok(results) if results.len() == 4 => None,
            Ok(results) => Some(format!("{name}: {} of 4 regions answered", results.len())),
            Err(status) => Some(format!("{name}: {status:?}")),
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:#?}", failures.len(), outcomes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_replica_killed_mid_run_fails_no_request() {
    let mut vision_a = vision_worker(loopback(11), &[]).unwrap();
    let mut vision_b = vision_worker(loopback(12), &[]).unwrap();
    let mut llm = llm_worker(loopback(13), &[]).unwrap();
    wait_all(&mut [&mut vision_a, &mut vision_b, &mut llm]).await.unwrap();
    // The embedded (in-process memory) feature cache: replica failover needs no Redis. No result
    // cache, so that repeated requests reach the vision replicas.
    let workers = Workers { vision: vec![&vision_a, &vision_b], llm: vec![&llm], sam: vec![] };
    let mut gateway = gateway(loopback(14), &workers, &["--result-cache-ttl-seconds", "0"]).unwrap();
    gateway.wait_ready().await.unwrap();

    let images = images();
    let total = 3 * 2 * images.len();
    let before = Arc::new(std::sync::Mutex::new((0.0, 0.0)));
    let outcomes = run_load(&gateway, &images, 3, 2, total / 3, || async {
        // Both replicas have been serving: each has encoded some images.
        let encoded_a = vision_a.metric("osprey_vision_encode_duration_seconds_count", &[]).await.unwrap();
        let encoded_b = vision_b.metric("osprey_vision_encode_duration_seconds_count", &[]).await.unwrap();
        *before.lock().unwrap() = (encoded_a, encoded_b);
        vision_a.kill();
    })
    .await;
    let (encoded_a, encoded_b) = *before.lock().unwrap();
    assert!(encoded_a > 0.0 && encoded_b > 0.0, "both replicas served: {encoded_a} and {encoded_b} encodes");
    assert_eq!(outcomes.len(), total);
    assert_all_succeeded(&outcomes);
    let failovers =
        gateway.metric("osprey_gateway_replica_failures_total", &[("kind", "vision")]).await.unwrap();
    assert!(failovers > 0.0, "calls to the killed replica were retried on the other one");
    assert!(!vision_a.is_running());
    assert!(vision_b.is_serving().await && gateway.is_serving().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_no_request() {
    let mut redis = redis_server(loopback(21)).unwrap();
    // No resident copies: every request goes through the shared cache, so Redis is on its path.
    let mut vision = vision_worker(loopback(22), &["--max-resident-bytes", "1"]).unwrap();
    let mut llm = llm_worker(loopback(23), &[]).unwrap();
    wait_all(&mut [&mut redis, &mut vision, &mut llm]).await.unwrap();
    let redis_url = format!("redis://{}/0", redis.addr);
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    let flags = ["--redis-url", &redis_url, "--result-cache-ttl-seconds", "0"];
    let mut gateway = gateway(loopback(24), &workers, &flags).unwrap();
    gateway.wait_ready().await.unwrap();

    let images = images();
    let total = 2 * 2 * images.len();
    let shared_before = Arc::new(AtomicUsize::new(0));
    let outcomes = run_load(&gateway, &images, 2, 2, total / 2, || async {
        let hits = gateway
            .metric("osprey_feature_cache_lookups_total", &[("tier", "redis"), ("hit", "true")])
            .await
            .unwrap();
        shared_before.store(hits as usize, Ordering::SeqCst);
        redis.kill();
    })
    .await;
    assert_eq!(outcomes.len(), total);
    assert_all_succeeded(&outcomes);
    assert!(shared_before.load(Ordering::SeqCst) > 0, "before the kill, features came from Redis");
    let errors = gateway.metric("osprey_feature_cache_errors_total", &[]).await.unwrap();
    assert!(errors > 0.0, "after the kill, the cache failures were counted ({errors})");
    assert!(vision.is_serving().await && llm.is_serving().await && gateway.is_serving().await);
}

fn rle_region(height: u32, width: u32, counts: v1::rle_mask::Counts) -> v1::Region {
    v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(v1::RleMask { height, width, counts: Some(counts) })),
        })),
        label: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_invalid_argument_naming_the_field_and_a_missing_api_key_is_refused() {
    let mut vision = vision_worker(loopback(31), &[]).unwrap();
    let mut llm = llm_worker(loopback(32), &[]).unwrap();
    let mut sam = sam_worker(loopback(33), &[]).unwrap();
    wait_all(&mut [&mut vision, &mut llm, &mut sam]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![&sam] };
    let limits = ["--api-key", "sesame", "--max-regions", "16", "--max-image-pixels", "40000"];
    let mut gateway = gateway(loopback(34), &workers, &limits).unwrap();
    gateway.wait_ready().await.unwrap();

    let image = photo();
    let (h, w) = (image.height, image.width);
    let good = || describe_request(&image, mask_regions(&box_masks(h, w, 2)), 4);

    // Without the key, or with a wrong one: refused before any work.
    for key in [None, Some("open-sesame")] {
        let mut stranger = client(&gateway, key).await.unwrap();
        let status = describe(&mut stranger, good()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "key {key:?}: {status:?}");
    }

    let mut client = client(&gateway, Some("sesame")).await.unwrap();
    let with_regions = |regions: Vec<v1::Region>| describe_request(&image, regions, 4);
    let inverted_box = v1::Region {
        source: Some(v1::region::Source::Prompt(v1::SamPrompt {
            r#box: Some(v1::Box { x0: 50.0, y0: 50.0, x1: 10.0, y1: 60.0 }),
            ..Default::default()
        })),
        label: String::new(),
    };
    let mut cases: Vec<(&str, v1::DescribeRequest)> = vec![
        (
            "image.encoded",
            v1::DescribeRequest {
                image: Some(v1::Image { source: Some(v1::image::Source::Encoded(b"not an image".to_vec())) }),
                ..good()
            },
        ),
        ("image", v1::DescribeRequest { image: None, ..good() }),
        ("image.encoded", {
            let large = TestImage::load("images/skimage_coffee.png").unwrap(); // 240000 pixels
            describe_request(&large, mask_regions(&box_masks(large.height, large.width, 1)), 4)
        }),
        ("regions[1].mask", with_regions(mask_regions(&[box_masks(h, w, 1).remove(0), Mask::empty(10, 10)]))),
        (
            "regions[0].mask",
            with_regions(vec![rle_region(
                h,
                w,
                v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts: vec![5, 7] }),
            )]),
        ),
        (
            "regions[0].mask",
            with_regions(vec![rle_region(h, w, v1::rle_mask::Counts::Compressed("\u{1}\u{2}~~".into()))]),
        ),
        (
            "regions[0].mask",
            with_regions(vec![v1::Region {
                source: Some(v1::region::Source::Mask(v1::Mask {
                    format: Some(v1::mask::Format::Polygon(v1::PolygonMask {
                        height: h,
                        width: w,
                        polygons: vec![v1::Polygon { xy: vec![1.0, 2.0, 3.0] }],
                    })),
                })),
                label: String::new(),
            }]),
        ),
        ("regions[0]", with_regions(vec![v1::Region::default()])),
        ("regions", with_regions(mask_regions(&box_masks(h, w, 17)))),
        ("regions", with_regions(vec![])),
        (
            "regions[1].prompt.box",
            with_regions(vec![mask_regions(&box_masks(h, w, 1)).remove(0), inverted_box]),
        ),
        ("task", v1::DescribeRequest { task: 99, ..good() }),
    ];
    let mut parameters = |field: &'static str, p: v1::GenerationParameters| {
        cases.push((field, v1::DescribeRequest { parameters: Some(p), ..good() }));
    };
    parameters(
        "parameters.temperature",
        v1::GenerationParameters { temperature: Some(-1.0), ..Default::default() },
    );
    parameters(
        "parameters.top_p",
        v1::GenerationParameters { temperature: Some(0.5), top_p: Some(1.5), ..Default::default() },
    );
    parameters(
        "parameters.max_new_tokens",
        v1::GenerationParameters { max_new_tokens: Some(0), ..Default::default() },
    );
    for (field, request) in cases {
        let status = describe(&mut client, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(&format!("{field}:")), "{field}: {:?}", status.message());
    }
    let status = client
        .ask(v1::AskRequest {
            image: good().image,
            regions: mask_regions(&box_masks(h, w, 2)),
            question: "  ".into(),
            parameters: None,
            verbatim: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("question:"), "{:?}", status.message());

    // Nothing was hurt: every service is up and a good request is answered.
    for process in [&mut vision, &mut llm, &mut sam, &mut gateway] {
        assert!(process.is_running() && process.is_serving().await, "{} is unhealthy", process.name());
    }
    let answered = describe(&mut client, good()).await.unwrap();
    assert_eq!(answered.len(), 2);
    assert!(answered.iter().all(|r| r.generated_tokens >= 1));
}
