//! A table of bad inputs sent through the public API to the real binaries (gateway, vision, LLM
//! and SAM workers with the demo weights): each row names the call, the gRPC status it must get
//! and the request field the message must start with. After the table, every process must still
//! be up and a good request answered. The gateway requires an API key: every RPC is also called
//! without one and with a wrong one (UNAUTHENTICATED) and with the right one (answered). Needs the
//! workspace's binaries built (`cargo build --bins`).

use std::time::{Duration, Instant};

use osprey_e2e::*;
use osprey_proto::v1;
use tonic::Code;

/// One call of the public API.
enum Call {
    Register(v1::RegisterImageRequest),
    Segment(v1::SegmentRequest),
    Describe(v1::DescribeRequest),
    Ask(v1::AskRequest),
    Chat(v1::ChatRequest),
    /// A stream of one item; the item's error, if any, is the call's status.
    Annotate(v1::AnnotateRequest),
}

/// Runs `call` to its end (streams drained); the first error is returned.
async fn run(client: &mut Client, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Register(r) => client.register_image(r).await.map(drop),
        Call::Segment(r) => client.segment(r).await.map(drop),
        Call::Describe(r) => describe(client, r).await.map(drop),
        Call::Ask(r) => client.ask(r).await.map(drop),
        Call::Chat(r) => {
            let mut stream = client.chat(r).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        Call::Annotate(r) => {
            let mut stream = client.annotate(tokio_stream::iter([r])).await?.into_inner();
            let mut done = false;
            while let Some(response) = stream.message().await? {
                match response.event {
                    Some(v1::annotate_response::Event::Error(e)) => {
                        return Err(tonic::Status::new(Code::from(e.code), e.message));
                    }
                    Some(v1::annotate_response::Event::Done(_)) => done = true,
                    _ => {}
                }
            }
            if done {
                Ok(())
            } else {
                Err(tonic::Status::internal("the Annotate stream ended without its item done"))
            }
        }
    }
}

/// One row: what is sent, the status it must get and the field its message must start with.
struct Row {
    name: &'static str,
    call: Call,
    code: Code,
    field: &'static str,
}

fn fixture(relative: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(FIXTURES).join(relative)).unwrap()
}

fn encoded(bytes: Vec<u8>) -> Option<v1::Image> {
    Some(v1::Image { source: Some(v1::image::Source::Encoded(bytes)) })
}

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG whose header declares `width` x `height` (8-bit RGB) with one tiny IDAT.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let chunk = |tag: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = tag.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", b"\x78\x9c\x63\x00\x00\x00\x01\x00\x01"));
    png.extend(chunk(b"IEND", b""));
    png
}

fn prompt_region(prompt: v1::SamPrompt) -> v1::Region {
    v1::Region { source: Some(v1::region::Source::Prompt(prompt)), label: String::new() }
}

fn point(x: f32, y: f32) -> v1::SamPrompt {
    v1::SamPrompt {
        points: vec![v1::Point { x, y, label: v1::PointLabel::Foreground as i32 }],
        ..Default::default()
    }
}

fn boxed(x0: f32, y0: f32, x1: f32, y1: f32) -> v1::SamPrompt {
    v1::SamPrompt { r#box: Some(v1::Box { x0, y0, x1, y1 }), ..Default::default() }
}

fn mask_region(format: v1::mask::Format) -> v1::Region {
    v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask { format: Some(format) })),
        label: String::new(),
    }
}

fn rle(height: u32, width: u32, counts: v1::rle_mask::Counts) -> v1::mask::Format {
    v1::mask::Format::Rle(v1::RleMask { height, width, counts: Some(counts) })
}

fn uncompressed(counts: Vec<u32>) -> v1::rle_mask::Counts {
    v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts })
}

fn polygon(height: u32, width: u32, xy: Vec<f64>) -> v1::mask::Format {
    v1::mask::Format::Polygon(v1::PolygonMask { height, width, polygons: vec![v1::Polygon { xy }] })
}

fn rows(image: &TestImage) -> Vec<Row> {
    let (h, w) = (image.height, image.width);
    let good_regions = || mask_regions(&box_masks(h, w, 2));
    let describe_with = |regions: Vec<v1::Region>| Call::Describe(describe_request(image, regions, 4));
    let describe_params = |p: v1::GenerationParameters| {
        Call::Describe(v1::DescribeRequest {
            parameters: Some(p),
            ..describe_request(image, good_regions(), 4)
        })
    };
    let describe_image = |bytes: Vec<u8>| {
        Call::Describe(v1::DescribeRequest {
            image: encoded(bytes),
            ..describe_request(image, good_regions(), 4)
        })
    };
    let register =
        |bytes: Vec<u8>| Call::Register(v1::RegisterImageRequest { encoded: bytes, warm_features: false });
    let segment = |prompts: Vec<v1::SamPrompt>| {
        Call::Segment(v1::SegmentRequest { image: encoded(image.bytes.clone()), prompts, everything: None })
    };
    let ask = |question: String, verbatim: bool| {
        Call::Ask(v1::AskRequest {
            image: encoded(image.bytes.clone()),
            regions: good_regions(),
            question,
            parameters: Some(v1::GenerationParameters { max_new_tokens: Some(4), ..Default::default() }),
            verbatim,
        })
    };
    let annotate = |regions: Vec<v1::Region>, parameters: Option<v1::GenerationParameters>| {
        Call::Annotate(v1::AnnotateRequest {
            item_id: "item".into(),
            image: encoded(image.bytes.clone()),
            regions,
            everything: None,
            task: v1::DescribeTask::Short as i32,
            parameters,
        })
    };
    let turn = || vec![v1::Turn { question: "What is region1?".into(), answer: "A cat.".into() }];
    let chat_with = |bytes: Vec<u8>, regions: Vec<v1::Region>, history: Vec<v1::Turn>| {
        Call::Chat(v1::ChatRequest {
            image: encoded(bytes),
            regions,
            history,
            question: "And region1?".into(),
            parameters: Some(v1::GenerationParameters { max_new_tokens: Some(4), ..Default::default() }),
        })
    };
    let mut truncated_png = fixture("images/chelsea_palette.png");
    truncated_png.truncate(truncated_png.len() / 2);
    let pixels = h * w;
    let row = |name, call, code, field| Row { name, call, code, field };
    let invalid = |name, call, field| Row { name, call, code: Code::InvalidArgument, field };

    vec![
        // Images.
        invalid("truncated PNG", describe_image(truncated_png.clone()), "image.encoded"),
        invalid("truncated PNG (register)", register(truncated_png.clone()), "encoded"),
        invalid("empty image bytes (register)", register(Vec::new()), "encoded"),
        invalid(
            "truncated PNG (Segment)",
            Call::Segment(v1::SegmentRequest {
                image: encoded(truncated_png.clone()),
                prompts: vec![point(10.0, 10.0)],
                everything: None,
            }),
            "image.encoded",
        ),
        invalid(
            "truncated PNG (Ask)",
            Call::Ask(v1::AskRequest {
                image: encoded(truncated_png.clone()),
                regions: good_regions(),
                question: "What is region1?".into(),
                parameters: None,
                verbatim: false,
            }),
            "image.encoded",
        ),
        invalid(
            "truncated PNG (Chat)",
            chat_with(truncated_png.clone(), good_regions(), vec![]),
            "image.encoded",
        ),
        invalid(
            "truncated PNG (Annotate)",
            Call::Annotate(v1::AnnotateRequest {
                item_id: "item".into(),
                image: encoded(truncated_png.clone()),
                regions: good_regions(),
                ..Default::default()
            }),
            "image.encoded",
        ),
        invalid("truncated JPEG", describe_image(fixture("images/truncated.jpg")), "image.encoded"),
        invalid("empty image bytes", describe_image(Vec::new()), "image.encoded"),
        invalid("zero-width PNG", describe_image(png_declaring(0, 10)), "image.encoded"),
        invalid(
            "decompression bomb (100000x100000 header)",
            describe_image(fixture("images/bomb.png")),
            "image.encoded",
        ),
        invalid("over --max-image-pixels", describe_image(png_declaring(300, 300)), "image.encoded"),
        invalid("garbage bytes", describe_image(fixture("images/garbage.bin")), "image.encoded"),
        invalid(
            "GIF (unsupported format)",
            describe_image(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec()),
            "image.encoded",
        ),
        invalid(
            "no image",
            Call::Describe(v1::DescribeRequest { image: None, ..describe_request(image, good_regions(), 4) }),
            "image",
        ),
        // Masks.
        invalid(
            "RLE mask of another size",
            describe_with(vec![mask_region(rle(h + 1, w, uncompressed(vec![(h + 1) * w])))]),
            "regions[0].mask",
        ),
        invalid(
            "RLE counts not summing to the size",
            describe_with(vec![mask_region(rle(h, w, uncompressed(vec![5, 7])))]),
            "regions[0].mask",
        ),
        invalid(
            "RLE string with a bad character",
            describe_with(vec![mask_region(rle(h, w, v1::rle_mask::Counts::Compressed("\u{1}~~".into())))]),
            "regions[0].mask",
        ),
        invalid(
            "RLE string cut inside a number",
            describe_with(vec![mask_region(rle(h, w, v1::rle_mask::Counts::Compressed("0`".into())))]),
            "regions[0].mask",
        ),
        invalid(
            "RLE declaring 60000x60000 (3.6 GB if decoded)",
            describe_with(vec![mask_region(rle(
                60_000,
                60_000,
                uncompressed(vec![1_800_000_000, 1_800_000_000]),
            ))]),
            "regions[0].mask",
        ),
        invalid(
            "empty (all-zero) mask",
            describe_with(vec![mask_region(rle(h, w, uncompressed(vec![pixels])))]),
            "regions[0].mask",
        ),
        invalid(
            "mask with no format",
            describe_with(vec![v1::Region {
                source: Some(v1::region::Source::Mask(v1::Mask { format: None })),
                label: String::new(),
            }]),
            "regions[0].mask",
        ),
        invalid(
            "polygon with 3 values",
            describe_with(vec![mask_region(polygon(h, w, vec![1.0, 2.0, 3.0]))]),
            "regions[0].mask",
        ),
        invalid(
            "polygon far out of range",
            describe_with(vec![mask_region(polygon(h, w, vec![1e30, 0.0, 2e30, 5.0, 1e30, 9.0]))]),
            "regions[0].mask",
        ),
        invalid(
            "polygon with NaN",
            describe_with(vec![mask_region(polygon(h, w, vec![1.0, f64::NAN, 20.0, 5.0, 4.0, 9.0]))]),
            "regions[0].mask",
        ),
        invalid(
            "polygon declaring 60000x60000",
            describe_with(vec![mask_region(polygon(60_000, 60_000, vec![1.0, 1.0, 20.0, 5.0, 4.0, 9.0]))]),
            "regions[0].mask",
        ),
        invalid(
            "PNG mask that is not a PNG",
            describe_with(vec![mask_region(v1::mask::Format::Png(b"nope".to_vec()))]),
            "regions[0].mask",
        ),
        invalid(
            "region with neither mask nor prompt",
            describe_with(vec![v1::Region::default()]),
            "regions[0]",
        ),
        // SAM prompts (the image is 157x103).
        invalid(
            "point at negative x",
            describe_with(vec![prompt_region(point(-3.0, 10.0))]),
            "regions[0].prompt.points",
        ),
        invalid(
            "point below the image",
            describe_with(vec![good_regions().remove(0), prompt_region(point(10.0, 104.0))]),
            "regions[1].prompt.points",
        ),
        invalid(
            "point outside (Segment)",
            segment(vec![point(10.0, 10.0), point(158.0, 10.0)]),
            "prompts[1].points",
        ),
        invalid(
            "box of zero area",
            describe_with(vec![prompt_region(boxed(10.0, 10.0, 10.0, 50.0))]),
            "regions[0].prompt.box",
        ),
        invalid(
            "box entirely outside",
            describe_with(vec![prompt_region(boxed(200.0, 10.0, 300.0, 50.0))]),
            "regions[0].prompt.box",
        ),
        invalid(
            "box entirely outside (Segment)",
            segment(vec![boxed(-50.0, -50.0, -1.0, -1.0)]),
            "prompts[0].box",
        ),
        invalid(
            "box with corners swapped",
            describe_with(vec![prompt_region(boxed(50.0, 50.0, 10.0, 60.0))]),
            "regions[0].prompt.box",
        ),
        invalid(
            "prompt with neither points nor box",
            describe_with(vec![prompt_region(v1::SamPrompt::default())]),
            "regions[0].prompt.points",
        ),
        invalid(
            "prompt with neither points nor box (Segment)",
            segment(vec![v1::SamPrompt::default()]),
            "prompts[0].points",
        ),
        invalid(
            "point label not FOREGROUND/BACKGROUND",
            segment(vec![v1::SamPrompt {
                points: vec![v1::Point { x: 1.0, y: 1.0, label: 7 }],
                ..Default::default()
            }]),
            "prompts[0].points[0].label",
        ),
        invalid("Segment with neither prompts nor everything", segment(vec![]), "prompts"),
        // Parameters.
        invalid(
            "max_new_tokens 0",
            describe_params(v1::GenerationParameters { max_new_tokens: Some(0), ..Default::default() }),
            "parameters.max_new_tokens",
        ),
        invalid(
            "max_new_tokens over the limit",
            describe_params(v1::GenerationParameters { max_new_tokens: Some(100_000), ..Default::default() }),
            "parameters.max_new_tokens",
        ),
        invalid(
            "temperature NaN",
            describe_params(v1::GenerationParameters { temperature: Some(f32::NAN), ..Default::default() }),
            "parameters.temperature",
        ),
        invalid(
            "temperature negative",
            describe_params(v1::GenerationParameters { temperature: Some(-0.5), ..Default::default() }),
            "parameters.temperature",
        ),
        invalid(
            "top_p above 1",
            describe_params(v1::GenerationParameters {
                temperature: Some(0.5),
                top_p: Some(1.5),
                ..Default::default()
            }),
            "parameters.top_p",
        ),
        invalid(
            "unknown task",
            Call::Describe(v1::DescribeRequest { task: 99, ..describe_request(image, good_regions(), 4) }),
            "task",
        ),
        // Questions.
        invalid("empty question", ask("   ".into(), false), "question"),
        invalid(
            "question over --max-question-bytes",
            ask("what is region1? ".repeat(300), false),
            "question",
        ),
        invalid(
            "verbatim question missing a <mask><pos> pair",
            ask("<image>\nWhat is <mask><pos>?".into(), true),
            "question",
        ),
        invalid(
            "verbatim question without <image>",
            ask("What is <mask><pos> and <mask><pos>?".into(), true),
            "question",
        ),
        invalid(
            "chat with an empty question",
            Call::Chat(v1::ChatRequest {
                image: encoded(image.bytes.clone()),
                regions: good_regions(),
                history: vec![],
                question: String::new(),
                parameters: None,
            }),
            "question",
        ),
        invalid(
            "chat about a mask of another size",
            chat_with(
                image.bytes.clone(),
                vec![mask_region(rle(h + 1, w, uncompressed(vec![(h + 1) * w])))],
                turn(),
            ),
            "regions[0].mask",
        ),
        invalid(
            "chat with a point outside the image",
            chat_with(image.bytes.clone(), vec![prompt_region(point(-3.0, 10.0))], turn()),
            "regions[0].prompt.points",
        ),
        invalid(
            "ask about an empty mask",
            Call::Ask(v1::AskRequest {
                image: encoded(image.bytes.clone()),
                regions: vec![mask_region(rle(h, w, uncompressed(vec![pixels])))],
                question: "What is region1?".into(),
                parameters: None,
                verbatim: false,
            }),
            "regions[0].mask",
        ),
        invalid(
            "annotate an empty mask",
            annotate(vec![mask_region(rle(h, w, uncompressed(vec![pixels])))], None),
            "regions[0].mask",
        ),
        invalid(
            "annotate with max_new_tokens 0",
            annotate(
                good_regions(),
                Some(v1::GenerationParameters { max_new_tokens: Some(0), ..Default::default() }),
            ),
            "parameters.max_new_tokens",
        ),
        invalid(
            "annotate a box entirely outside",
            annotate(vec![prompt_region(boxed(200.0, 10.0, 300.0, 50.0))], None),
            "regions[0].prompt.box",
        ),
        // Limits.
        invalid("regions over --max-regions", describe_with(mask_regions(&box_masks(h, w, 17))), "regions"),
        invalid("no regions", describe_with(vec![]), "regions"),
        row(
            "unknown image key",
            Call::Describe(v1::DescribeRequest {
                image: Some(v1::Image { source: Some(v1::image::Source::Key("0".repeat(64))) }),
                ..describe_request(image, good_regions(), 4)
            }),
            Code::FailedPrecondition,
            "image.key",
        ),
    ]
}

/// The gateway's only API key.
const API_KEY: &str = "sesame";

/// One good call of every RPC: (RPC, call).
fn good_calls(image: &TestImage) -> Vec<(&'static str, Call)> {
    let regions = || mask_regions(&box_masks(image.height, image.width, 2));
    let parameters = || Some(v1::GenerationParameters { max_new_tokens: Some(4), ..Default::default() });
    vec![
        (
            "RegisterImage",
            Call::Register(v1::RegisterImageRequest { encoded: image.bytes.clone(), warm_features: false }),
        ),
        (
            "Segment",
            Call::Segment(v1::SegmentRequest {
                image: encoded(image.bytes.clone()),
                prompts: vec![point(20.0, 20.0)],
                everything: None,
            }),
        ),
        ("Describe", Call::Describe(describe_request(image, regions(), 4))),
        (
            "Ask",
            Call::Ask(v1::AskRequest {
                image: encoded(image.bytes.clone()),
                regions: regions(),
                question: "What is region1 next to region2?".into(),
                parameters: parameters(),
                verbatim: false,
            }),
        ),
        (
            "Chat",
            Call::Chat(v1::ChatRequest {
                image: encoded(image.bytes.clone()),
                regions: regions(),
                history: vec![v1::Turn { question: "What is region1?".into(), answer: "A cat.".into() }],
                question: "And region2?".into(),
                parameters: parameters(),
            }),
        ),
        (
            "Annotate",
            Call::Annotate(v1::AnnotateRequest {
                item_id: "item".into(),
                image: encoded(image.bytes.clone()),
                regions: regions(),
                everything: None,
                task: v1::DescribeTask::Short as i32,
                parameters: parameters(),
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_naming_the_field() {
    let mut vision = vision_worker(loopback(61), &[]).unwrap();
    let mut llm = llm_worker(loopback(62), &[]).unwrap();
    let mut sam = sam_worker(loopback(63), &[]).unwrap();
    wait_all(&mut [&mut vision, &mut llm, &mut sam]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![&sam] };
    let limits = [
        "--max-regions",
        "16",
        "--max-image-pixels",
        "40000",
        "--max-question-bytes",
        "4096",
        "--api-key",
        API_KEY,
    ];
    let mut gateway = gateway(loopback(64), &workers, &limits).unwrap();
    gateway.wait_ready().await.unwrap();
    let mut client = client(&gateway, Some(API_KEY)).await.unwrap();
    let image = photo();
    assert_eq!((image.width, image.height), (157, 103), "the prompt rows assume the sample photo's size");

    let rows = rows(&image);
    let mut failures = Vec::new();
    let start = Instant::now();
    for row in rows.into_iter() {
        let sent = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(30), run(&mut client, row.call)).await;
        let took = sent.elapsed();
        match outcome {
            Err(_) => failures.push(format!("{}: no answer within 30 s", row.name)),
            Ok(Ok(())) => {
                failures.push(format!("{}: accepted, expected {:?} on {}", row.name, row.code, row.field))
            }
            Ok(Err(status)) => {
                let prefix = format!("{}:", row.field);
                if status.code() != row.code || !status.message().starts_with(&prefix) {
                    failures.push(format!(
                        "{}: expected {:?} `{prefix} …`, got {:?} {:?}",
                        row.name,
                        row.code,
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
        eprintln!("{:<50} {:>6} ms", row.name, took.as_millis());
    }
    eprintln!("table done in {:.1} s, {} unexpected outcomes", start.elapsed().as_secs_f64(), failures.len());
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));

    // Nothing was hurt: every service is up, and good requests are answered, a CMYK JPEG among them.
    for process in [&mut vision, &mut llm, &mut sam, &mut gateway] {
        assert!(process.is_running() && process.is_serving().await, "{} is unhealthy", process.name());
    }
    let answered = describe(&mut client, describe_request(&image, mask_regions(&box_masks(103, 157, 2)), 4))
        .await
        .unwrap();
    assert_eq!(answered.len(), 2);
    let cmyk = fixture("images/chelsea_cmyk_q90.jpg");
    let registered = client
        .register_image(v1::RegisterImageRequest { encoded: cmyk, warm_features: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((registered.width, registered.height), (160, 120));
    let border = client
        .segment(v1::SegmentRequest {
            image: encoded(image.bytes.clone()),
            prompts: vec![point(0.0, 0.0), point(157.0, 103.0), boxed(-20.0, -20.0, 60.0, 50.0)],
            everything: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(border.prompts.len(), 3, "points on the border and a box partly outside are accepted");

    // API keys, every RPC: without a key or with a wrong one refused, with the right one answered.
    let mut failures = Vec::new();
    for key in [None, Some("open-sesame"), Some(API_KEY)] {
        let mut caller = osprey_e2e::client(&gateway, key).await.unwrap();
        for (rpc, call) in good_calls(&image) {
            let outcome = tokio::time::timeout(Duration::from_secs(30), run(&mut caller, call)).await;
            let answered = key == Some(API_KEY);
            match outcome {
                Err(_) => failures.push(format!("{rpc} with key {key:?}: no answer within 30 s")),
                Ok(Ok(())) if answered => {}
                Ok(Err(status)) if !answered && status.code() == Code::Unauthenticated => {}
                Ok(result) => failures.push(format!(
                    "{rpc} with key {key:?}: {result:?}, expected {}",
                    if answered { "an answer" } else { "UNAUTHENTICATED" }
                )),
            }
        }
    }
    assert!(failures.is_empty(), "API keys:\n{}", failures.join("\n"));
}
