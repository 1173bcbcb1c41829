//! Data stays where it is: bytes between the gateway and its workers, read from
//! `osprey_gateway_worker_bytes_total{kind,direction}`. A cold Describe sends the pixels once (to
//! encode) and the image tokens once (to the LLM), and never the features back to the replica that
//! computed them; a warm Describe or Ask sends and receives no image-sized payload at all, and
//! answers exactly as the cold one did. An LLM replica that does not keep the image tokens (new,
//! restarted) gets them through the fallback and answers the same. Its own test binary: the metrics
//! recorder is global.

use std::io::{Read, Write};

use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, CacheTier, DescribeTask};

/// The tiny models' servers and the gateway in front of them, as the pipeline tests start them.
#[path = "pipeline/support.rs"]
#[allow(dead_code)]
mod support;
use support::{fixtures, gateway, photo};

/// Image tokens of the tiny vision model: res4 of a 64 px input is 4×4 positions of 24 f32
/// (`tests/fixtures/vision/tiny/tiny_st/config.json`). Every payload of a warm request must stay
/// below this.
const IMAGE_TOKEN_BYTES: u64 = 4 * 4 * 24 * 4;

/// One mask's low-resolution logits from the tiny SAM model: 32 × 32 f32
/// (`tests/fixtures/sam/tiny_config.json`; 256 × 256 at full size).
const SAM_LOGITS_BYTES: u64 = 32 * 32 * 4;

/// Bytes moved per worker kind and direction, from the Prometheus text at `port`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bytes {
    vision_sent: u64,
    vision_received: u64,
    llm_sent: u64,
    llm_received: u64,
    sam_sent: u64,
    sam_received: u64,
}

impl Bytes {
    fn read(port: u16) -> Self {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let counter = |kind: &str, direction: &str| -> u64 {
            text.lines()
                .filter(|line| line.starts_with("osprey_gateway_worker_bytes_total{"))
                .filter(|line| {
                    line.contains(&format!("kind=\"{kind}\""))
                        && line.contains(&format!("direction=\"{direction}\""))
                })
                .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum()
        };
        Self {
            vision_sent: counter("vision", "sent"),
            vision_received: counter("vision", "received"),
            llm_sent: counter("llm", "sent"),
            llm_received: counter("llm", "received"),
            sam_sent: counter("sam", "sent"),
            sam_received: counter("sam", "received"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            vision_sent: self.vision_sent - before.vision_sent,
            vision_received: self.vision_received - before.vision_received,
            llm_sent: self.llm_sent - before.llm_sent,
            llm_received: self.llm_received - before.llm_received,
            sam_sent: self.sam_sent - before.sam_sent,
            sam_received: self.sam_received - before.sam_received,
        }
    }

    /// Every payload under `limit` bytes, to and from every worker kind.
    fn assert_all_below(self, limit: u64, what: &str) {
        for (name, value) in [
            ("vision sent", self.vision_sent),
            ("vision received", self.vision_received),
            ("llm sent", self.llm_sent),
            ("llm received", self.llm_received),
            ("sam sent", self.sam_sent),
            ("sam received", self.sam_received),
        ] {
            assert!(value < limit, "{what}: {name} {value} B, not below {limit} B ({self:?})");
        }
    }
}

fn whole_image_region(width: u32, height: u32) -> v1::Region {
    let mask = Mask::from_row_major(height, width, &vec![1; (width * height) as usize]).unwrap();
    v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(rle_to_proto(&mask.to_rle()))),
        })),
        label: "all".into(),
    }
}

/// A registered image: its key as the request's image, its size.
struct Registered {
    image: v1::Image,
    width: u32,
    height: u32,
}

async fn register(client: &mut support::Client, encoded: Vec<u8>) -> Registered {
    let registered = client
        .register_image(v1::RegisterImageRequest { encoded, warm_features: false })
        .await
        .unwrap()
        .into_inner();
    Registered {
        image: v1::Image { source: Some(v1::image::Source::Key(registered.key)) },
        width: registered.width,
        height: registered.height,
    }
}

/// A short description of the whole image: (answer, vision tier, LLM prefix hit, bytes moved).
async fn describe(
    client: &mut support::Client,
    port: u16,
    image: &v1::Image,
    (width, height): (u32, u32),
) -> (String, CacheTier, bool, Bytes) {
    let request = v1::DescribeRequest {
        image: Some(image.clone()),
        regions: vec![whole_image_region(width, height)],
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: None,
    };
    let before = Bytes::read(port);
    let mut stream = client.describe(request).await.unwrap().into_inner();
    let result = stream.message().await.unwrap().unwrap();
    assert!(stream.message().await.unwrap().is_none());
    let cache = result.metadata.unwrap().cache.unwrap();
    let tier = CacheTier::try_from(cache.vision_features).unwrap();
    (result.raw_text, tier, cache.llm_prefix, Bytes::read(port).since(before))
}

/// A question about the whole image as region1: (answer, bytes moved).
async fn ask(
    client: &mut support::Client,
    port: u16,
    image: &v1::Image,
    (width, height): (u32, u32),
) -> (String, Bytes) {
    let request = v1::AskRequest {
        image: Some(image.clone()),
        regions: vec![whole_image_region(width, height)],
        question: "what is region1?".into(),
        parameters: None,
        verbatim: false,
    };
    let before = Bytes::read(port);
    let answer = client.ask(request).await.unwrap().into_inner();
    (answer.raw_text, Bytes::read(port).since(before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_requests_send_no_image_sized_payload_and_answer_as_cold_ones() {
    let port = osprey_test_support::free_port();
    osprey_common::telemetry::init_prometheus(([127, 0, 0, 1], port).into()).unwrap();

    let (vision, llm) = (support::vision().await, support::llm().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &[]).await;

    let photo = photo();
    let a = register(&mut client, photo.clone()).await;
    let a_size = (a.width, a.height);
    let pixel_bytes = u64::from(a.width * a.height * 3);
    assert!(pixel_bytes > IMAGE_TOKEN_BYTES);

    let (cold, tier, _, bytes) = describe(&mut client, port, &a.image, a_size).await;
    assert_eq!(tier, CacheTier::Computed);
    println!("cold Describe: {bytes:?}; pixels {pixel_bytes} B, image tokens {IMAGE_TOKEN_BYTES} B");
    // The pixels go once, to encode; the features come back once (for the shared cache) and are
    // not sent back; the image tokens come back once and go to the LLM once.
    assert!(bytes.vision_sent >= pixel_bytes, "{bytes:?}");
    assert!(bytes.vision_sent < pixel_bytes + 4096, "{bytes:?}");
    assert!(bytes.llm_sent >= IMAGE_TOKEN_BYTES, "{bytes:?}");
    assert!(bytes.llm_sent < 2 * IMAGE_TOKEN_BYTES, "{bytes:?}");

    let (warm, tier, prefix_hit, bytes) = describe(&mut client, port, &a.image, a_size).await;
    println!("warm Describe: {bytes:?}");
    assert_eq!(tier, CacheTier::Resident);
    assert!(prefix_hit);
    assert_eq!(warm, cold, "a warm Describe answers as the cold one did");
    bytes.assert_all_below(IMAGE_TOKEN_BYTES, "warm Describe");

    let (warm_ask, bytes) = ask(&mut client, port, &a.image, a_size).await;
    println!("warm Ask: {bytes:?}");
    bytes.assert_all_below(IMAGE_TOKEN_BYTES, "warm Ask");

    // Another image between two requests about the first: each keeps its own answer.
    let cat = std::fs::read(fixtures().join("images/chelsea_palette.png")).unwrap();
    let b = register(&mut client, cat).await;
    let b_size = (b.width, b.height);
    let (b_cold, tier, _, bytes) = describe(&mut client, port, &b.image, b_size).await;
    assert_eq!(tier, CacheTier::Computed);
    assert!(bytes.llm_sent >= IMAGE_TOKEN_BYTES, "its own image tokens go to the LLM: {bytes:?}");
    let (b_ask, _) = ask(&mut client, port, &b.image, b_size).await;
    let (b_warm, _, _, bytes) = describe(&mut client, port, &b.image, b_size).await;
    assert_eq!(b_warm, b_cold);
    bytes.assert_all_below(IMAGE_TOKEN_BYTES, "warm Describe of the second image");
    let (a_again, _, _, bytes) = describe(&mut client, port, &a.image, a_size).await;
    assert_eq!(a_again, cold);
    bytes.assert_all_below(IMAGE_TOKEN_BYTES, "warm Describe of the first image again");
    println!("answers: first image {cold:?} / {warm_ask:?}, second image {b_cold:?} / {b_ask:?}");

    // A new LLM replica (replaced or restarted: it keeps nothing) behind another gateway: the
    // first request finds the features resident on vision, the LLM lacking the image tokens; they
    // are fetched from vision and sent once, and the answers are the same.
    let fresh_llm = support::llm().await;
    let (_other_gateway, mut other) = gateway(&[&vision], &fresh_llm, &[]).await;
    let by_file = v1::Image { source: Some(v1::image::Source::Encoded(photo)) };
    let (answer, tier, prefix_hit, bytes) = describe(&mut other, port, &by_file, a_size).await;
    println!("Describe, new LLM replica: {bytes:?}");
    assert_eq!(tier, CacheTier::Resident);
    assert!(!prefix_hit);
    assert_eq!(answer, cold);
    assert!(bytes.vision_sent < IMAGE_TOKEN_BYTES, "no pixels or features sent: {bytes:?}");
    assert!(bytes.vision_received >= IMAGE_TOKEN_BYTES, "the image tokens fetched: {bytes:?}");
    assert!(bytes.llm_sent >= IMAGE_TOKEN_BYTES, "and sent: {bytes:?}");
    let (answer, bytes) = ask(&mut other, port, &by_file, a_size).await;
    assert_eq!(answer, warm_ask);
    bytes.assert_all_below(IMAGE_TOKEN_BYTES, "warm Ask on the new LLM replica");

    // A SAM prompt as a region: SAM sends back its masks, and their low-resolution logits only to
    // Segment, whose clients refine masks with them; a described region needs only its mask.
    let sam = support::sam().await;
    let (_sam_gateway, mut with_sam) = gateway(&[&vision], &llm, &["--sam-workers", &sam.url]).await;
    let point = v1::SamPrompt {
        points: vec![v1::Point { x: 80.0, y: 50.0, label: v1::PointLabel::Foreground as i32 }],
        ..Default::default()
    };
    let before = Bytes::read(port);
    let segment =
        v1::SegmentRequest { image: Some(by_file.clone()), prompts: vec![point.clone()], everything: None };
    let segmented = with_sam.segment(segment).await.unwrap().into_inner();
    let bytes = Bytes::read(port).since(before);
    println!("Segment, one point: {bytes:?}");
    assert!(segmented.prompts[0].masks[0].low_res_logits.is_some());
    assert!(bytes.sam_received >= SAM_LOGITS_BYTES, "Segment gets the logits: {bytes:?}");
    let request = v1::DescribeRequest {
        image: Some(by_file),
        regions: vec![v1::Region { source: Some(v1::region::Source::Prompt(point)), label: "p".into() }],
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: None,
    };
    let before = Bytes::read(port);
    let mut stream = with_sam.describe(request).await.unwrap().into_inner();
    let result = stream.message().await.unwrap().unwrap();
    let bytes = Bytes::read(port).since(before);
    println!("Describe, one point region (all warm): {bytes:?}");
    assert_eq!(result.mask, segmented.prompts[0].masks[0].mask, "the region is SAM's mask");
    assert!(bytes.sam_sent < SAM_LOGITS_BYTES, "no pixels to SAM: {bytes:?}");
    assert!(bytes.sam_received < SAM_LOGITS_BYTES, "no logits from SAM: {bytes:?}");
}
