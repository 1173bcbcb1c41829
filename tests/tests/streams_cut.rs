//! Ask and Chat answers cut mid-stream (issue 13, item 4): the LLM replica giving a greedy answer
//! is SIGKILLed while it decodes (Chat: after the first chunk reached the client). The client must
//! get either the whole fault-free answer or a clear status, never an answer that ends early as if
//! it were complete; an Ask, of which nothing has reached the client, must get the whole answer
//! (the gateway asks the other replica). A SIGTERM instead lets the answer finish. The figures are printed
//! (docs/RELIABILITY.md, "Answers cut mid-stream"). Needs the workspace's binaries built
//! (`cargo build --bins`).

use std::time::{Duration, Instant};

use osprey_e2e::*;
use osprey_proto::v1;
use tonic::Code;

/// Kills of each kind (Chat, Ask).
const ROUNDS: usize = 3;
/// Long enough that the kill lands while the replica is still decoding.
const MAX_NEW_TOKENS: u32 = 64;
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Work an LLM replica finished (one per batched decoding step).
const STEPS: &str = "osprey_llm_batch_size_count";

/// How a call cut by a fault ended, as the client saw it.
#[derive(Debug)]
enum Ending {
    /// Ended OK: the text and whether a chunk said `finished`.
    Complete { text: String, finished: bool },
    /// Ended with a status after `chunks` chunks.
    Failed { status: tonic::Status, chunks: usize },
}

fn greedy() -> Option<v1::GenerationParameters> {
    Some(v1::GenerationParameters {
        max_new_tokens: Some(MAX_NEW_TOKENS),
        temperature: Some(0.0),
        ..Default::default()
    })
}

fn chat_request(image: &TestImage) -> tonic::Request<v1::ChatRequest> {
    let mut request = tonic::Request::new(v1::ChatRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Encoded(image.bytes.clone())) }),
        regions: mask_regions(&box_masks(image.height, image.width, 2)),
        history: vec![v1::Turn { question: "What is region1?".into(), answer: "A cat.".into() }],
        question: "And what is region2 next to it?".into(),
        parameters: greedy(),
    });
    request.set_timeout(CALL_DEADLINE);
    request
}

fn ask_request(image: &TestImage) -> tonic::Request<v1::AskRequest> {
    let mut request = tonic::Request::new(v1::AskRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Encoded(image.bytes.clone())) }),
        regions: mask_regions(&box_masks(image.height, image.width, 3)),
        question: "What do region1, region2 and region3 have in common?".into(),
        parameters: greedy(),
        verbatim: false,
    });
    request.set_timeout(CALL_DEADLINE);
    request
}

/// Reads (the rest of) a Chat stream to its end.
async fn read_chat(mut stream: tonic::Streaming<v1::ChatChunk>) -> Ending {
    let (mut text, mut finished, mut chunks) = (String::new(), false, 0);
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                chunks += 1;
                text.push_str(&chunk.text);
                finished |= chunk.finished;
            }
            Ok(None) => return Ending::Complete { text, finished },
            Err(status) => return Ending::Failed { status, chunks },
        }
    }
}

/// The replica whose decoding-step counter moved between `before` and now.
async fn worked(llm: &[Process], before: &[f64]) -> Vec<usize> {
    let mut moved = Vec::new();
    for (k, replica) in llm.iter().enumerate() {
        if replica.metric(STEPS, &[]).await.unwrap() > before[k] {
            moved.push(k);
        }
    }
    moved
}

async fn steps(llm: &[Process]) -> Vec<f64> {
    let mut steps = Vec::new();
    for replica in llm {
        steps.push(replica.metric(STEPS, &[]).await.unwrap());
    }
    steps
}

/// Restarts `replica` and waits until the gateway routes to it again.
async fn restart(replica: &mut Process, gateway: &Process) {
    replica.start().unwrap();
    replica.wait_ready().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while gateway.metric("osprey_gateway_replicas", &[("kind", "llm"), ("state", "up")]).await.unwrap() < 2.0
    {
        assert!(Instant::now() < deadline, "the gateway did not take the restarted replica back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A status the caller can act on: the service failed, it did not answer wrongly.
fn clear(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_mid_stream_end_with_a_clear_status_never_truncated() {
    let mut vision = vision_worker(loopback(81), &[]).unwrap();
    let mut llm = [llm_worker(loopback(82), &[]).unwrap(), llm_worker(loopback(83), &[]).unwrap()];
    {
        let [l0, l1] = &mut llm;
        wait_all(&mut [&mut vision, l0, l1]).await.unwrap();
    }
    let workers = Workers { vision: vec![&vision], llm: llm.iter().collect(), sam: vec![] };
    let mut gateway = gateway(loopback(84), &workers, &["--health-interval", "0.2"]).unwrap();
    gateway.wait_ready().await.unwrap();
    let mut client = client(&gateway, None).await.unwrap();
    let image = photo();

    // The fault-free answers, and the replica that gives them (rendezvous hashing on the image).
    let before = steps(&llm).await;
    let stream = client.chat(chat_request(&image)).await.unwrap().into_inner();
    let Ending::Complete { text: chat_expected, finished: true } = read_chat(stream).await else {
        panic!("the fault-free chat did not finish")
    };
    let ask_expected = client.ask(ask_request(&image)).await.unwrap().into_inner();
    let serving = worked(&llm, &before).await;
    assert_eq!(serving.len(), 1, "one replica answers for one image: {serving:?}");
    let serving = serving[0];
    assert!(
        ask_expected.generated_tokens >= 16 && chat_expected.len() > 16,
        "answers too short to cut: {ask_expected:?} / {chat_expected:?}"
    );

    // Chat: the replica dies right after the first chunk reached the client.
    let mut chat_endings = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut stream = client.chat(chat_request(&image)).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().expect("a first chunk");
        llm[serving].kill();
        let rest = tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(4), read_chat(stream))
            .await
            .expect("the cut chat stream hung");
        let ending = match rest {
            Ending::Complete { text, finished } => {
                Ending::Complete { text: first.text.clone() + &text, finished: finished || first.finished }
            }
            Ending::Failed { status, chunks } => Ending::Failed { status, chunks: chunks + 1 },
        };
        chat_endings.push((ending, started.elapsed()));
        restart(&mut llm[serving], &gateway).await;
    }

    // Ask: the replica dies while it decodes the answer.
    let mut ask_endings = Vec::new();
    for _ in 0..ROUNDS {
        let mut asking = client.clone();
        let request = ask_request(&image);
        let started = Instant::now();
        let call = tokio::spawn(async move { asking.ask(request).await });
        let before = llm[serving].metric(STEPS, &[]).await.unwrap();
        while llm[serving].metric(STEPS, &[]).await.unwrap() == before {
            assert!(started.elapsed() < CALL_DEADLINE, "the replica did not start decoding");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        llm[serving].kill();
        let answer = tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(4), call)
            .await
            .expect("the cut ask hung")
            .unwrap();
        let ending = match answer {
            Ok(response) => {
                let response = response.into_inner();
                let full = response.text == ask_expected.text
                    && response.generated_tokens == ask_expected.generated_tokens
                    && response.finish_reason == ask_expected.finish_reason;
                Ending::Complete { text: response.text, finished: full }
            }
            Err(status) => Ending::Failed { status, chunks: 0 },
        };
        ask_endings.push((ending, started.elapsed()));
        restart(&mut llm[serving], &gateway).await;
    }

    // SIGTERM instead: the replica finishes the answer it is streaming, then exits.
    let mut stream = client.chat(chat_request(&image)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    llm[serving].signal(libc::SIGTERM).unwrap();
    let drained = read_chat(stream).await;
    let exit = llm[serving].wait_exit(CALL_DEADLINE).expect("the replica did not exit after SIGTERM");

    println!("\nanswers cut mid-stream: {ROUNDS} SIGKILLs each, {MAX_NEW_TOKENS} new tokens, greedy");
    let mut cut_mid_answer = 0;
    for (kind, endings) in [("chat", &chat_endings), ("ask", &ask_endings)] {
        for (ending, took) in endings {
            match ending {
                Ending::Complete { text, finished } => {
                    let expected = if kind == "chat" { &chat_expected } else { &ask_expected.text };
                    println!("{kind}: complete after {:.0} ms", took.as_secs_f64() * 1e3);
                    assert!(
                        *finished && text == expected,
                        "{kind}: a cut answer ended as if complete: {text:?} (finished: {finished}) instead of \
                         {expected:?}"
                    );
                }
                Ending::Failed { status, chunks } => {
                    println!(
                        "{kind}: {:?} after {chunks} chunks, {:.0} ms: {:?}",
                        status.code(),
                        took.as_secs_f64() * 1e3,
                        status.message()
                    );
                    assert!(clear(status), "{kind}: an unclear status {status:?}");
                    // Nothing of an Ask reaches the client before its whole answer, so the gateway
                    // asks the other replica: the kill costs no Ask.
                    assert_eq!(kind, "chat", "an Ask failed although another replica was up");
                    if kind == "chat" && *chunks > 0 {
                        cut_mid_answer += 1;
                    }
                }
            }
        }
    }
    assert!(cut_mid_answer > 0, "no chat stream was cut after its first chunk");
    match drained {
        Ending::Complete { text, finished } => {
            assert!(finished && first.text.clone() + &text == chat_expected, "the drained chat: {text:?}")
        }
        Ending::Failed { status, .. } => panic!("a chat streaming at SIGTERM failed: {status:?}"),
    }
    assert!(exit.success(), "the LLM replica exited with {exit:?}");
    println!("chat streaming at SIGTERM: finished whole; the replica exited {exit}");
}
