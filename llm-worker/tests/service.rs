//! The LLM worker over real gRPC with the tiny model and a 40-id tokenizer
//! (`tools/make_tiny_tokenizer.py`): streamed answers, batching and prefix-cache invariance,
//! image tokens kept per image and feature revision, and INVALID_ARGUMENT for every malformed
//! question.

use std::collections::BTreeMap;

use llm_worker::service::{ServeArgs, run};
use osprey_common::tensor::f32_to_proto;
use osprey_proto::worker::v1::llm_client::LlmClient;
use osprey_proto::worker::v1::question::Prompt;
use osprey_proto::worker::v1::{
    Exchange, GenerateRequest, GenerationParameters, Question, RegionTask, Tensor,
};
use osprey_test_support::{InProcess, fixture, parse_args, serve_in_process};
use safetensors::SafeTensors;
use tonic::Code;
use tonic::transport::Channel;

/// Starts a worker on a free loopback port; returns a client once health says SERVING (the
/// worker stops when the returned handle is dropped).
async fn start_worker() -> (LlmClient<Channel>, InProcess) {
    start_worker_with(&[]).await
}

fn serve_args(extra: &[&str]) -> ServeArgs {
    let weights = fixture("llm/tiny");
    let mut argv =
        vec!["llm-worker", "--weights", weights.to_str().unwrap(), "--default-max-new-tokens", "6"];
    argv.extend_from_slice(extra);
    parse_args(argv)
}

async fn start_worker_with(extra: &[&str]) -> (LlmClient<Channel>, InProcess) {
    let args = serve_args(extra);
    let server = serve_in_process(|listener, stopped| run(args, listener, stopped)).await;
    (LlmClient::connect(server.url.clone()).await.unwrap(), server)
}

fn expected(name: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(fixture("llm/expected.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let t = tensors.tensor(name).unwrap();
    let values = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (t.shape().iter().map(|&d| d as u64).collect(), values)
}

fn tensor(name: &str, rows: std::ops::Range<usize>) -> Tensor {
    let (shape, values) = expected(name);
    let width = shape[1] as usize;
    f32_to_proto(&[rows.len(), width], &values[rows.start * width..rows.end * width])
}

fn question(index: u32, prompt: Prompt, regions: std::ops::Range<usize>) -> Question {
    Question {
        index,
        prompt: Some(prompt),
        history: vec![],
        mask_tokens: Some(tensor("mask_tokens", regions.clone())),
        pos_tokens: Some(tensor("pos_tokens", regions)),
    }
}

fn request(key: &str, questions: Vec<Question>) -> GenerateRequest {
    GenerateRequest {
        image_key: key.into(),
        image_tokens: Some(tensor("image_features", 0..6)),
        questions,
        parameters: None,
        feature_revision: String::new(),
    }
}

/// Answers by question index: (streamed text, raw text, generated tokens, prefix-cache hit).
async fn answers(
    client: &mut LlmClient<Channel>,
    request: GenerateRequest,
) -> BTreeMap<u32, (String, String, u32, bool)> {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut out: BTreeMap<u32, (String, String, u32, bool)> = BTreeMap::new();
    let mut finished = BTreeMap::new();
    while let Some(response) = stream.message().await.unwrap() {
        assert!(!finished.contains_key(&response.question_index), "response after the last one");
        let entry = out.entry(response.question_index).or_default();
        entry.0.push_str(&response.text);
        if response.finished {
            entry.1 = response.raw_text;
            entry.2 = response.generated_tokens;
            entry.3 = response.prefix_cache_hit;
            finished.insert(response.question_index, ());
        }
    }
    assert_eq!(finished.len(), out.len(), "every question finishes exactly once");
    out
}

#[tokio::test]
async fn streams_answers_invariant_to_batching_and_prefix_cache() {
    let (mut client, _worker) = start_worker().await;
    let short = || question(0, Prompt::Task(RegionTask::Short as i32), 0..1);
    let ask = || question(1, Prompt::Text("what is region1 doing with region2?".into()), 0..2);

    let together = answers(&mut client, request("image-a", vec![short(), ask()])).await;
    assert_eq!(together.len(), 2);
    for (text, raw, tokens, _) in together.values() {
        assert_eq!(text, raw, "streamed pieces add up to the whole answer");
        assert!((1..=6).contains(tokens), "{tokens} tokens");
    }
    // The same questions one at a time, about a fresh image key (no cached prefix), give the same
    // answers; asking again about the first key hits the prefix cache and changes nothing.
    let alone_short = answers(&mut client, request("image-b", vec![short()])).await;
    let alone_ask = answers(&mut client, request("image-c", vec![ask()])).await;
    assert_eq!(alone_short[&0].1, together[&0].1);
    assert_eq!(alone_ask[&1].1, together[&1].1);
    let again = answers(&mut client, request("image-a", vec![short()])).await;
    assert!(again[&0].3, "second request about image-a reuses its prefix");
    assert_eq!(again[&0].1, together[&0].1);

    // Chat history and whole-image questions are accepted.
    let mut chat = question(2, Prompt::Text("and region1?".into()), 0..1);
    chat.history = vec![Exchange { question: "what is region1?".into(), answer: "a cat".into() }];
    let whole_image = Question {
        mask_tokens: None,
        pos_tokens: None,
        ..question(3, Prompt::Text("is there a cat?".into()), 0..0)
    };
    let mut sampled = request("image-a", vec![chat, whole_image]);
    sampled.parameters =
        Some(GenerationParameters { temperature: Some(0.7), seed: Some(7), ..Default::default() });
    assert_eq!(answers(&mut client, sampled).await.len(), 2);
}

/// `--dtype bf16` (the GPU default) serves the same way on the CPU: batched and single answers
/// agree, and a GPU device on a CPU-only build is refused at load with a clear message.
#[tokio::test]
async fn half_precision_serves_and_gpu_device_needs_the_cuda_build() {
    let (mut client, _worker) = start_worker_with(&["--dtype", "bf16"]).await;
    let short = || question(0, Prompt::Task(RegionTask::Short as i32), 0..1);
    let ask = || question(1, Prompt::Text("what is region1 doing with region2?".into()), 0..2);
    let together = answers(&mut client, request("image-a", vec![short(), ask()])).await;
    let alone = answers(&mut client, request("image-b", vec![ask()])).await;
    assert_eq!(alone[&1].1, together[&1].1);
    assert!((1..=6).contains(&together[&0].2));

    for (flag, value, message) in [
        ("--dtype", "fp8", "--dtype fp8: expected"),
        ("--device", "gpu", "--device gpu: expected `cpu` or `cuda:N`"),
    ] {
        let err = llm_worker::service::LlmService::load(&serve_args(&[flag, value])).err().unwrap();
        assert!(err.to_string().contains(message), "{err}");
    }
    if !candle_core::utils::cuda_is_available() {
        let err = llm_worker::service::LlmService::load(&serve_args(&["--device", "cuda:0"])).err().unwrap();
        assert!(err.to_string().contains("built without the `cuda` feature"), "{err}");
    }
}

/// A verbatim prompt is the user message as given: the category task's own wording sent verbatim
/// gives the task's raw answer; a pair count that differs from the regions is refused.
#[tokio::test]
async fn verbatim_prompts_match_the_task_they_spell_out() {
    let (mut client, _worker) = start_worker().await;
    let category = question(0, Prompt::Task(RegionTask::Category as i32), 0..1);
    let verbatim = question(1, Prompt::Verbatim(llm_worker::prompt::Task::Category.question()), 0..1);
    let got = answers(&mut client, request("image-v", vec![category, verbatim])).await;
    assert_eq!(got[&0].1, got[&1].1);

    let two_pairs = question(0, Prompt::Verbatim("<image>\n<mask><pos> or <mask><pos>?".into()), 0..1);
    let err = client.generate(request("k", vec![two_pairs])).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("questions[0]"), "{}", err.message());
}

#[tokio::test]
async fn malformed_questions_are_invalid_argument() {
    let (mut client, _worker) = start_worker().await;
    let short = || question(0, Prompt::Task(RegionTask::Short as i32), 0..1);
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (request("k", vec![]), "questions: at least one"),
        (
            GenerateRequest {
                image_tokens: Some(tensor("mask_tokens", 0..2)),
                ..request("k", vec![short()])
            },
            "image_features must be",
        ),
        (GenerateRequest { image_tokens: None, ..request("", vec![short()]) }, "image_tokens: required"),
        (
            request("k", vec![question(0, Prompt::Task(RegionTask::Short as i32), 0..2)]),
            "questions[0]: a task is about exactly one region",
        ),
        (request("k", vec![question(0, Prompt::Text("where is region3?".into()), 0..2)]), "questions[0]"),
        (
            request("k", vec![Question { pos_tokens: Some(tensor("pos_tokens", 0..2)), ..short() }]),
            "questions[0]: 1 mask tokens but 2 pos tokens",
        ),
        (
            request("k", vec![Question { mask_tokens: Some(f32_to_proto(&[1, 3], &[0.0; 3])), ..short() }]),
            "questions[0].mask_tokens: must be [N, 32]",
        ),
        (
            GenerateRequest {
                parameters: Some(GenerationParameters { max_new_tokens: Some(0), ..Default::default() }),
                ..request("k", vec![short()])
            },
            "parameters.max_new_tokens",
        ),
        (
            GenerateRequest {
                parameters: Some(GenerationParameters {
                    temperature: Some(1.0),
                    top_p: Some(2.0),
                    ..Default::default()
                }),
                ..request("k", vec![short()])
            },
            "parameters: top_p",
        ),
    ];
    for (request, expected) in cases {
        let status = client.generate(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}: {status:?}");
        assert!(status.message().contains(expected), "expected {expected:?} in {:?}", status.message());
    }
    // Still serving.
    assert_eq!(answers(&mut client, request("k", vec![short()])).await.len(), 1);
}

/// A request about `key` at feature revision `revision`, carrying `tokens` or not.
fn about(key: &str, revision: &str, tokens: Option<Tensor>, questions: Vec<Question>) -> GenerateRequest {
    GenerateRequest { image_tokens: tokens, feature_revision: revision.into(), ..request(key, questions) }
}

/// Raw answers by question index.
async fn raw_answers(client: &mut LlmClient<Channel>, request: GenerateRequest) -> Vec<(u32, String, bool)> {
    answers(client, request).await.into_iter().map(|(i, (_, raw, _, hit))| (i, raw, hit)).collect()
}

/// Image tokens go once per image and feature revision: a request without them is answered from
/// the copy kept for its (image key, feature revision), exactly as with them; an image or a
/// revision the worker has not been sent is FAILED_PRECONDITION naming the image; two images, or
/// two revisions of one image, never share tokens or a cached prefix.
#[tokio::test]
async fn image_tokens_are_kept_per_image_and_feature_revision() {
    let (mut client, _worker) = start_worker().await;
    let questions = || {
        vec![
            question(0, Prompt::Task(RegionTask::Short as i32), 0..1),
            question(1, Prompt::Text("what is region1 doing with region2?".into()), 0..2),
        ]
    };
    let first = tensor("image_features", 0..6);
    // Other image tokens: the same rows in reverse order.
    let (shape, values) = expected("image_features");
    let width = shape[1] as usize;
    let reversed: Vec<f32> = values[..6 * width].chunks(width).rev().flatten().copied().collect();
    let second = f32_to_proto(&[6, width], &reversed);

    let texts =
        |got: &[(u32, String, bool)]| got.iter().map(|(i, raw, _)| (*i, raw.clone())).collect::<Vec<_>>();
    let a1 = raw_answers(&mut client, about("img-1", "r1", Some(first.clone()), questions())).await;
    let a2 = raw_answers(&mut client, about("img-2", "r1", Some(second.clone()), questions())).await;
    assert_ne!(
        texts(&a1),
        texts(&a2),
        "other image tokens give other answers (else this test proves nothing)"
    );

    for (key, revision, expected) in [("img-1", "r1", &a1), ("img-2", "r1", &a2), ("img-1", "r1", &a1)] {
        let got = raw_answers(&mut client, about(key, revision, None, questions())).await;
        assert_eq!(texts(&got), texts(expected), "{key} without its tokens");
        assert!(got.iter().all(|(_, _, hit)| *hit), "{key}: the cached prefix is reused");
    }

    for (key, revision) in [("img-1", "r2"), ("img-3", "r1"), ("img-2", "")] {
        let status = client.generate(about(key, revision, None, questions())).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{key} {revision}: {status:?}");
        assert!(status.message().contains(&format!("image tokens of image {key}")), "{}", status.message());
        assert!(status.message().contains("not resident"), "{}", status.message());
    }

    // A new feature revision of img-1 with other tokens: answered from those (as img-2 was), not
    // from the prefix of the old revision, which stays as it was.
    let renewed = raw_answers(&mut client, about("img-1", "r2", Some(second.clone()), questions())).await;
    assert_eq!(texts(&renewed), texts(&a2));
    assert!(renewed.iter().all(|(_, _, hit)| !hit), "no prefix of revision r1 is reused for r2");
    let again = raw_answers(&mut client, about("img-1", "r2", None, questions())).await;
    assert_eq!(texts(&again), texts(&a2));
    let old = raw_answers(&mut client, about("img-1", "r1", None, questions())).await;
    assert_eq!(texts(&old), texts(&a1));

    // With no room to keep image tokens, every request must carry them.
    let (mut keeps_none, _keeps_none_worker) =
        start_worker_with(&["--resident-image-token-bytes", "0"]).await;
    let sent = raw_answers(&mut keeps_none, about("img-1", "r1", Some(first), questions())).await;
    assert_eq!(texts(&sent), texts(&a1));
    let status = keeps_none.generate(about("img-1", "r1", None, questions())).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}
