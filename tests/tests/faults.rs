//! Faults under load (issue 13, items 4 and 5): the real gateway, two vision replicas (each behind
//! a latency proxy), two LLM replicas, one SAM worker and Redis, with a steady closed loop of
//! concurrent Describe (masks given), Segment (point prompts), Ask and Chat (streamed, with an
//! earlier turn) calls over a few distinct images. A fault-free pass first records every
//! answer (greedy, so each answer is fixed); then each fault is injected while calls are in flight,
//! and every call must either return exactly the fault-free answer or fail with a clear status
//! (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) within its deadline. A call that outlives
//! its deadline by `HANG_SLACK` counts as hung. Lost (wrong answers, unclear statuses, hung calls)
//! must be 0. The figures of every phase are printed (docs/RELIABILITY.md, "Faults under load").
//! Needs the workspace's binaries built (`cargo build --bins`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_e2e::*;
use osprey_proto::v1;
use tonic::Code;

/// Concurrent closed-loop clients.
const CLIENTS: usize = 4;
/// Every call's deadline (its `grpc-timeout`).
const CALL_DEADLINE: Duration = Duration::from_secs(6);
/// How long past its deadline a call may take to end before it counts as hung.
const HANG_SLACK: Duration = Duration::from_secs(4);
/// Calls that must complete before a fault, and again after each step of it.
const CALLS_PER_STEP: usize = 30;
/// New tokens per answer: long enough that an LLM replica is mostly decoding when it is killed.
const MAX_NEW_TOKENS: u32 = 24;
/// Distinct images in the load.
const IMAGES: usize = 6;
/// The gateway's `--request-timeout-seconds`: its drain on SIGTERM is bounded by it.
const GATEWAY_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Work a vision replica finished (one per region pooling).
const POOLS: &str = "osprey_vision_pool_duration_seconds_count";
/// Work an LLM replica finished (one per batched decoding step).
const STEPS: &str = "osprey_llm_batch_size_count";
/// The gateway's count of answer streams broken mid-answer and finished on another LLM replica.
const STREAM_RETRIES: &str = "osprey_gateway_llm_stream_retries_total";
/// The gateway's count of cache entries refused as damaged, by kind.
const DAMAGED_ENTRIES: &str = "osprey_cache_damaged_entries_total";

/// Latency the proxy of the slowed vision replica adds to every byte, each way: a round trip of
/// 4 s, so a call that needs one round trip to it fits its deadline and one that needs two does not.
const SLOW_LATENCY: Duration = Duration::from_secs(2);

const PHASES: [&str; 13] = [
    "no fault (control)",
    "vision replica SIGKILL (the busier of 2), restarted",
    "vision replica SIGSTOP (the busier of 2) for deadline + 1 s, then SIGCONT",
    "LLM replica SIGKILL (the busier of 2), restarted",
    "LLM replica SIGSTOP (the busier of 2) for deadline + 1 s, then SIGCONT",
    "SAM worker SIGKILL (its only replica), restarted",
    "SAM worker SIGSTOP (its only replica) for deadline + 1 s, then SIGCONT",
    "Redis restarted empty",
    "LLM replica SIGTERM (the busier of 2; drain, exit), restarted",
    "vision replica slowed (the busier of 2; +2 s each way) for deadline + 1 s",
    "Redis hung (SIGSTOP) for deadline + 1 s, then SIGCONT",
    "Redis feature entries truncated and tampered, again and again",
    "gateway SIGTERM (drain, exit)",
];
const VISION_SLOW: usize = 9;
const REDIS_HUNG: usize = 10;
const REDIS_DAMAGED: usize = 11;
const GATEWAY_SIGTERM: usize = 12;

/// How long feature entries in Redis are damaged, round after round, under the load.
const DAMAGE_FOR: Duration = Duration::from_secs(4);
/// The Redis keys of the gateway's feature entries (`osprey:` + `features:<image key>`).
const FEATURE_KEYS: &str = "osprey:features:*";
/// Bytes of the seal (tag `osp2` and a BLAKE3 digest) in front of every entry's payload.
const SEAL_BYTES: usize = 4 + 32;

/// Damage done to the feature entries in Redis.
#[derive(Default, Debug)]
struct Damage {
    truncated: usize,
    tampered: usize,
    /// What was last written under each key, so that an entry already damaged is not damaged
    /// again (flipping the same bytes twice would mend it).
    written: BTreeMap<String, Vec<u8>>,
}

impl Damage {
    /// One round: every feature entry the gateway (re)wrote since the last round is replaced by a
    /// truncated copy or by a copy with bytes of its payload flipped, in turn.
    async fn round(&mut self, connection: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
        let keys: Vec<String> = redis::cmd("KEYS").arg(FEATURE_KEYS).query_async(connection).await?;
        for key in keys {
            let value: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(connection).await?;
            let Some(mut value) = value else { continue };
            if self.written.get(&key) == Some(&value) || value.len() <= SEAL_BYTES + 8 {
                continue;
            }
            if (self.truncated + self.tampered).is_multiple_of(2) {
                value.truncate(value.len() / 2);
                self.truncated += 1;
            } else {
                // Bytes of the payload (past the seal): the revision's length and the tensors.
                let payload = value.len() - SEAL_BYTES;
                for at in [SEAL_BYTES, SEAL_BYTES + payload / 2, value.len() - 1] {
                    value[at] ^= 0x5a;
                }
                self.tampered += 1;
            }
            let () = redis::cmd("SET").arg(&key).arg(&value).query_async(connection).await?;
            self.written.insert(key, value);
        }
        Ok(())
    }
}

/// One call of the load.
#[derive(Clone)]
enum Call {
    Describe(v1::DescribeRequest),
    Segment(v1::SegmentRequest),
    Ask(v1::AskRequest),
    /// Streamed, with an earlier turn (the result cache is off: every answer is generated).
    Chat(v1::ChatRequest),
    /// With `warm_features`: the image is encoded, or its features found in Redis.
    Register(v1::RegisterImageRequest),
}

/// Kinds of call, as [`Call::kind`] numbers them.
const KINDS: usize = 5;
const DESCRIBE: usize = 0;
const SEGMENT: usize = 1;

impl Call {
    fn kind(&self) -> usize {
        match self {
            Call::Describe(_) => DESCRIBE,
            Call::Segment(_) => SEGMENT,
            Call::Ask(_) => 2,
            Call::Chat(_) => 3,
            Call::Register(_) => 4,
        }
    }
}

/// How far a Segment score may move from the fault-free one. The SAM worker decodes the prompts
/// of concurrent calls on one image in one batched call, and summing in another order changes the
/// last bits of a predicted IoU (the masks stay the same).
const SCORE_TOLERANCE: f32 = 1e-4;

/// What the client sees of an answer, timings and cache tiers aside: text that must be equal, and
/// SAM scores compared within [`SCORE_TOLERANCE`].
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    scores: Vec<f32>,
}

impl Answer {
    fn matches(&self, expected: &Answer) -> bool {
        self.text == expected.text
            && self.scores.len() == expected.scores.len()
            && self.scores.iter().zip(&expected.scores).all(|(a, b)| (a - b).abs() <= SCORE_TOLERANCE)
    }
}

/// Runs `call` to its end under `CALL_DEADLINE`.
async fn run(client: &mut Client, call: &Call) -> Result<Answer, tonic::Status> {
    match call {
        Call::Describe(request) => {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(CALL_DEADLINE);
            let mut stream = client.describe(request).await?.into_inner();
            let mut results = Vec::new();
            while let Some(result) = stream.message().await? {
                results.push(result);
            }
            results.sort_by_key(|r| r.region_index);
            let text = results
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {} {:?} {:?} {} {}\n",
                        r.region_index,
                        r.label,
                        r.area,
                        r.raw_text,
                        r.text,
                        r.generated_tokens,
                        r.finish_reason
                    )
                })
                .collect();
            Ok(Answer { text, scores: vec![] })
        }
        Call::Segment(request) => {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(CALL_DEADLINE);
            let response = client.segment(request).await?.into_inner();
            let masks =
                || response.prompts.iter().enumerate().flat_map(|(p, r)| r.masks.iter().map(move |m| (p, m)));
            let text = masks().map(|(p, m)| format!("{p} {:?} {} {:?}\n", m.mask, m.area, m.bbox)).collect();
            Ok(Answer { text, scores: masks().map(|(_, m)| m.predicted_iou).collect() })
        }
        Call::Ask(request) => {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(CALL_DEADLINE);
            let r = client.ask(request).await?.into_inner();
            let text =
                format!("ask {:?} {:?} {} {}", r.raw_text, r.text, r.generated_tokens, r.finish_reason);
            Ok(Answer { text, scores: vec![] })
        }
        Call::Chat(request) => {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(CALL_DEADLINE);
            let mut stream = client.chat(request).await?.into_inner();
            // The pieces, then whether (and how) a chunk said the answer is finished: an answer
            // that ends OK without it does not equal the fault-free one.
            let (mut pieces, mut finished) = (String::new(), None);
            while let Some(chunk) = stream.message().await? {
                pieces.push_str(&chunk.text);
                if chunk.finished {
                    finished = Some(chunk.finish_reason);
                }
            }
            Ok(Answer { text: format!("chat {pieces:?} finished {finished:?}"), scores: vec![] })
        }
        Call::Register(request) => {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(CALL_DEADLINE);
            let r = client.register_image(request).await?.into_inner();
            Ok(Answer { text: format!("register {} {}x{}", r.key, r.width, r.height), scores: vec![] })
        }
    }
}

/// The load's calls: for each image, a Describe of two box masks, a Segment of two points, an Ask
/// about the two masks, a Chat about them with one earlier turn and a RegisterImage that warms
/// the features.
fn calls() -> Vec<(String, Call)> {
    let mut calls = Vec::new();
    for image in images().into_iter().take(IMAGES) {
        let masks = box_masks(image.height, image.width, 2);
        let describe = describe_request(&image, mask_regions(&masks), MAX_NEW_TOKENS);
        calls.push((format!("describe {}", image.name), Call::Describe(describe.clone())));
        let point = |x: f32, y: f32| v1::SamPrompt {
            points: vec![v1::Point { x, y, label: v1::PointLabel::Foreground as i32 }],
            ..Default::default()
        };
        let (w, h) = (image.width as f32, image.height as f32);
        let segment = v1::SegmentRequest {
            image: Some(v1::Image { source: Some(v1::image::Source::Encoded(image.bytes.clone())) }),
            prompts: vec![point(w / 2.0, h / 2.0), point(w / 4.0, h / 3.0)],
            everything: None,
        };
        calls.push((format!("segment {}", image.name), Call::Segment(segment)));
        let parameters = describe.parameters;
        let ask = v1::AskRequest {
            image: describe.image.clone(),
            regions: describe.regions.clone(),
            question: "What is region1 next to region2?".into(),
            parameters,
            verbatim: false,
        };
        calls.push((format!("ask {}", image.name), Call::Ask(ask)));
        let chat = v1::ChatRequest {
            image: describe.image.clone(),
            regions: describe.regions.clone(),
            history: vec![v1::Turn { question: "What is region1?".into(), answer: "A cat.".into() }],
            question: "And what is region2 next to it?".into(),
            parameters,
        };
        calls.push((format!("chat {}", image.name), Call::Chat(chat)));
        let register = v1::RegisterImageRequest { encoded: image.bytes.clone(), warm_features: true };
        calls.push((format!("register {}", image.name), Call::Register(register)));
    }
    calls
}

/// How one call ended.
enum Ending {
    Answered(Answer),
    Failed(tonic::Status),
    Hung,
}

struct Outcome {
    phase: usize,
    call: usize,
    started: Instant,
    ended: Instant,
    ending: Ending,
}

/// The closed loop's shared state.
#[derive(Default)]
struct Load {
    phase: AtomicUsize,
    stop: AtomicBool,
    started: AtomicUsize,
    /// Calls in flight, by kind ([`Call::kind`]).
    in_flight: [AtomicUsize; KINDS],
    outcomes: Mutex<Vec<Outcome>>,
}

impl Load {
    fn completed(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// Waits until `n` more calls have completed.
    async fn wait_calls(&self, n: usize) {
        let target = self.completed() + n;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.completed() < target {
            assert!(
                Instant::now() < deadline,
                "the load stalled: {} of {target} calls completed",
                self.completed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until a call of `kind` is in flight; the number in flight then (all kinds).
    async fn wait_in_flight(&self, kind: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.in_flight[kind].load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no call of kind {kind} went in flight");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.in_flight()
    }
}

/// Waits until `process` is working: its counter `metric` (work it finished) moves between two
/// reads a few milliseconds apart.
async fn wait_busy(process: &Process, metric: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = process.metric(metric, &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        if process.metric(metric, &[]).await.unwrap() > before {
            return;
        }
        assert!(Instant::now() < deadline, "{} did no work ({metric})", process.name());
    }
}

/// The replica of `replicas` that has done the most work (`metric`) so far: rendezvous hashing may
/// send every image of the load to one replica, and the fault must hit the one working.
async fn busiest(replicas: &[Process], metric: &str) -> usize {
    let mut work = Vec::new();
    for replica in replicas {
        work.push(replica.metric(metric, &[]).await.unwrap());
    }
    (0..replicas.len()).max_by(|&a, &b| work[a].total_cmp(&work[b])).unwrap()
}

/// One closed-loop client: calls one after the other, from its own offset in `calls`.
async fn client_loop(mut client: Client, offset: usize, calls: Arc<Vec<(String, Call)>>, load: Arc<Load>) {
    let mut k = offset;
    while !load.stop.load(Ordering::SeqCst) {
        let index = k % calls.len();
        k += 1;
        let call = &calls[index].1;
        let phase = load.phase.load(Ordering::SeqCst);
        load.started.fetch_add(1, Ordering::SeqCst);
        load.in_flight[call.kind()].fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let ending = match tokio::time::timeout(CALL_DEADLINE + HANG_SLACK, run(&mut client, call)).await {
            Ok(Ok(answer)) => Ending::Answered(answer),
            Ok(Err(status)) => Ending::Failed(status),
            Err(_) => Ending::Hung,
        };
        load.in_flight[call.kind()].fetch_sub(1, Ordering::SeqCst);
        let ended = Instant::now();
        let failed = matches!(ending, Ending::Failed(_));
        load.outcomes.lock().unwrap().push(Outcome { phase, call: index, started, ended, ending });
        if failed {
            // A refused call comes back at once; do not spin while a service is down.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One phase's figures.
#[derive(Default)]
struct Row {
    sent: usize,
    answered: usize,
    wrong: Vec<String>,
    failed: BTreeMap<&'static str, usize>,
    /// The first message of each clear status.
    examples: BTreeMap<&'static str, String>,
    unclear: Vec<String>,
    hung: usize,
    latencies: Vec<f64>,
}

impl Row {
    fn lost(&self) -> usize {
        self.wrong.len() + self.unclear.len() + self.hung
    }

    fn p99_ms(&self) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((sorted.len() as f64) * 0.99).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1] * 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.latencies.iter().copied().fold(0.0, f64::max) * 1000.0
    }
}

/// A clear refusal: the caller can tell what happened and retry.
fn clear(code: Code) -> Option<&'static str> {
    match code {
        Code::Unavailable => Some("UNAVAILABLE"),
        Code::DeadlineExceeded => Some("DEADLINE_EXCEEDED"),
        Code::ResourceExhausted => Some("RESOURCE_EXHAUSTED"),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_under_faults_is_answered_as_without_them_or_refused_clearly_in_time() {
    let mut redis = redis_server(loopback(61)).unwrap();
    // No resident features on the vision replicas: every call reads them from Redis, so Redis is
    // on the path when it restarts.
    let no_resident = ["--max-resident-bytes", "1"];
    let mut vision = [
        vision_worker(loopback(62), &no_resident).unwrap(),
        vision_worker(loopback(63), &no_resident).unwrap(),
    ];
    let mut llm = [llm_worker(loopback(64), &[]).unwrap(), llm_worker(loopback(65), &[]).unwrap()];
    let mut sam = sam_worker(loopback(66), &[]).unwrap();
    {
        let [v0, v1] = &mut vision;
        let [l0, l1] = &mut llm;
        wait_all(&mut [&mut redis, v0, v1, l0, l1, &mut sam]).await.unwrap();
    }
    let redis_url = format!("redis://{}/0", redis.addr);
    // The gateway reaches the vision replicas through proxies that can slow one down.
    let proxies = [
        LatencyProxy::start(loopback(68), vision[0].addr).await.unwrap(),
        LatencyProxy::start(loopback(68), vision[1].addr).await.unwrap(),
    ];
    let vision_urls = format!("{},{}", proxies[0].url(), proxies[1].url());
    let llm_urls = format!("{},{}", llm[0].url(), llm[1].url());
    let request_timeout = GATEWAY_REQUEST_TIMEOUT.as_secs().to_string();
    let flags = [
        "--redis-url",
        &redis_url,
        "--health-interval",
        "0.2",
        "--request-timeout-seconds",
        &request_timeout,
        "--redis-timeout-ms",
        "500",
    ];
    let mut gateway = gateway_for_urls(loopback(67), &vision_urls, &llm_urls, &sam.url(), &flags).unwrap();
    gateway.wait_ready().await.unwrap();

    // The fault-free answers, one call at a time.
    let calls = Arc::new(calls());
    let mut expected = Vec::new();
    {
        let mut client = client(&gateway, None).await.unwrap();
        for (name, call) in calls.iter() {
            let answer = run(&mut client, call).await.unwrap_or_else(|s| panic!("{name}: {s:?}"));
            assert!(!answer.text.is_empty(), "{name}: an empty answer");
            expected.push(answer);
        }
    }
    let distinct: std::collections::BTreeSet<&String> = expected.iter().map(|a| &a.text).collect();
    assert_eq!(distinct.len(), expected.len(), "every call has its own answer: {expected:#?}");

    let load = Arc::new(Load::default());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let client = client(&gateway, None).await.unwrap();
        clients.push(tokio::spawn(client_loop(client, c * 3, calls.clone(), load.clone())));
    }
    let mut in_flight_at_fault = [0usize; PHASES.len()];
    let start_phase = |n: usize| load.phase.store(n, Ordering::SeqCst);

    // 0: no fault; answers under concurrency (batching) must equal the one-at-a-time ones.
    load.wait_calls(2 * CALLS_PER_STEP).await;

    // 1: a vision replica dies abruptly, and comes back.
    start_phase(1);
    load.wait_calls(CALLS_PER_STEP).await;
    let victim = busiest(&vision, POOLS).await;
    wait_busy(&vision[victim], POOLS).await;
    in_flight_at_fault[1] = load.wait_in_flight(DESCRIBE).await;
    vision[victim].kill();
    load.wait_calls(CALLS_PER_STEP).await;
    vision[victim].start().unwrap();
    vision[victim].wait_ready().await.unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 2: a vision replica hangs (stopped, not dead) past the calls' deadline, then resumes.
    start_phase(2);
    load.wait_calls(CALLS_PER_STEP).await;
    let victim = busiest(&vision, POOLS).await;
    wait_busy(&vision[victim], POOLS).await;
    in_flight_at_fault[2] = load.wait_in_flight(DESCRIBE).await;
    vision[victim].signal(libc::SIGSTOP).unwrap();
    tokio::time::sleep(CALL_DEADLINE + Duration::from_secs(1)).await;
    vision[victim].signal(libc::SIGCONT).unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 3: an LLM replica dies with answers streaming, and comes back.
    start_phase(3);
    load.wait_calls(CALLS_PER_STEP).await;
    // A kill can fall between two answers: kill again (after a restart) until one breaks a stream.
    let mut llm_kills = 0;
    while gateway.metric(STREAM_RETRIES, &[]).await.unwrap() == 0.0 && llm_kills < 5 {
        llm_kills += 1;
        let victim = busiest(&llm, STEPS).await;
        wait_busy(&llm[victim], STEPS).await;
        in_flight_at_fault[3] = load.wait_in_flight(DESCRIBE).await;
        llm[victim].kill();
        load.wait_calls(CALLS_PER_STEP).await;
        llm[victim].start().unwrap();
        llm[victim].wait_ready().await.unwrap();
        load.wait_calls(CALLS_PER_STEP).await;
    }

    // 4: an LLM replica hangs with answers streaming, then resumes.
    start_phase(4);
    load.wait_calls(CALLS_PER_STEP).await;
    let victim = busiest(&llm, STEPS).await;
    wait_busy(&llm[victim], STEPS).await;
    in_flight_at_fault[4] = load.wait_in_flight(DESCRIBE).await;
    llm[victim].signal(libc::SIGSTOP).unwrap();
    tokio::time::sleep(CALL_DEADLINE + Duration::from_secs(1)).await;
    llm[victim].signal(libc::SIGCONT).unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 5: the only SAM worker dies with point prompts in flight; it is restarted.
    start_phase(5);
    load.wait_calls(CALLS_PER_STEP).await;
    wait_busy(&sam, "osprey_sam_predict_batch_size_count").await;
    in_flight_at_fault[5] = load.wait_in_flight(SEGMENT).await;
    sam.kill();
    load.wait_calls(CALLS_PER_STEP).await;
    sam.start().unwrap();
    sam.wait_ready().await.unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 6: the only SAM worker hangs with point prompts in flight, then resumes.
    start_phase(6);
    load.wait_calls(CALLS_PER_STEP).await;
    wait_busy(&sam, "osprey_sam_predict_batch_size_count").await;
    in_flight_at_fault[6] = load.wait_in_flight(SEGMENT).await;
    sam.signal(libc::SIGSTOP).unwrap();
    tokio::time::sleep(CALL_DEADLINE + Duration::from_secs(1)).await;
    sam.signal(libc::SIGCONT).unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 7: Redis restarts empty (no persistence) under the feature reads.
    start_phase(7);
    load.wait_calls(CALLS_PER_STEP).await;
    in_flight_at_fault[7] = load.wait_in_flight(DESCRIBE).await;
    let redis_errors_before = gateway.metric("osprey_feature_cache_errors_total", &[]).await.unwrap();
    redis.kill();
    redis.start().unwrap();
    redis.wait_ready().await.unwrap();
    load.wait_calls(2 * CALLS_PER_STEP).await;
    let redis_errors =
        gateway.metric("osprey_feature_cache_errors_total", &[]).await.unwrap() - redis_errors_before;
    let vision_failovers =
        gateway.metric("osprey_gateway_replica_failures_total", &[("kind", "vision")]).await.unwrap();
    let llm_failovers =
        gateway.metric("osprey_gateway_replica_failures_total", &[("kind", "llm")]).await.unwrap();
    let llm_stream_retries = gateway.metric(STREAM_RETRIES, &[]).await.unwrap();

    // 8: an LLM replica is told to stop with answers streaming: it finishes them and exits by
    // itself inside its grace period; the gateway sends new questions to the other replica.
    start_phase(8);
    load.wait_calls(CALLS_PER_STEP).await;
    let victim = busiest(&llm, STEPS).await;
    wait_busy(&llm[victim], STEPS).await;
    in_flight_at_fault[8] = load.wait_in_flight(DESCRIBE).await;
    let llm_terminated = Instant::now();
    llm[victim].signal(libc::SIGTERM).unwrap();
    let llm_exit = llm[victim].wait_exit(CALL_DEADLINE + Duration::from_secs(2));
    let llm_drain = llm_terminated.elapsed();
    let llm_exit = llm_exit.unwrap_or_else(|| panic!("the LLM replica did not exit within its grace period"));
    assert!(llm_exit.success(), "the LLM replica exited with {llm_exit:?}");
    load.wait_calls(CALLS_PER_STEP).await;
    llm[victim].start().unwrap();
    llm[victim].wait_ready().await.unwrap();
    load.wait_calls(CALLS_PER_STEP).await;

    // 9: a vision replica turns slow (its proxy holds every byte SLOW_LATENCY each way) past the
    // calls' deadline, then fast again. Its health check (timeout: one interval) fails meanwhile.
    start_phase(VISION_SLOW);
    load.wait_calls(CALLS_PER_STEP).await;
    let slow_victim = busiest(&vision, POOLS).await;
    wait_busy(&vision[slow_victim], POOLS).await;
    let pools_before =
        [vision[0].metric(POOLS, &[]).await.unwrap(), vision[1].metric(POOLS, &[]).await.unwrap()];
    in_flight_at_fault[VISION_SLOW] = load.wait_in_flight(DESCRIBE).await;
    let slowed = Instant::now();
    proxies[slow_victim].set_latency(SLOW_LATENCY);
    let mut marked_down = None;
    while slowed.elapsed() < CALL_DEADLINE + Duration::from_secs(1) {
        let down = gateway
            .metric("osprey_gateway_replicas", &[("kind", "vision"), ("state", "down")])
            .await
            .unwrap();
        if down > 0.0 && marked_down.is_none() {
            marked_down = Some(slowed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slow_pools = [
        vision[0].metric(POOLS, &[]).await.unwrap() - pools_before[0],
        vision[1].metric(POOLS, &[]).await.unwrap() - pools_before[1],
    ];
    proxies[slow_victim].set_latency(Duration::ZERO);
    load.wait_calls(CALLS_PER_STEP).await;

    // 10: Redis hangs (stopped: it accepts connections and answers nothing) past the gateway's
    // `--redis-timeout-ms` and the calls' deadline, then resumes. Lookups time out and count as
    // misses, so the features are encoded again.
    start_phase(REDIS_HUNG);
    load.wait_calls(CALLS_PER_STEP).await;
    let redis_errors_before = gateway.metric("osprey_feature_cache_errors_total", &[]).await.unwrap();
    in_flight_at_fault[REDIS_HUNG] = load.wait_in_flight(DESCRIBE).await;
    redis.signal(libc::SIGSTOP).unwrap();
    tokio::time::sleep(CALL_DEADLINE + Duration::from_secs(1)).await;
    redis.signal(libc::SIGCONT).unwrap();
    load.wait_calls(CALLS_PER_STEP).await;
    let hung_redis_errors =
        gateway.metric("osprey_feature_cache_errors_total", &[]).await.unwrap() - redis_errors_before;

    // 11: the feature entries in Redis are damaged under the load, round after round: each entry
    // the gateway writes is soon truncated or tampered with. A damaged entry must be dropped and
    // the features encoded again, never served.
    start_phase(REDIS_DAMAGED);
    load.wait_calls(CALLS_PER_STEP).await;
    let damaged_before = gateway.metric(DAMAGED_ENTRIES, &[("kind", "features")]).await.unwrap();
    let mut redis_client = redis::Client::open(format!("redis://{}/0", redis.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut damage = Damage::default();
    in_flight_at_fault[REDIS_DAMAGED] = load.wait_in_flight(DESCRIBE).await;
    let damaging = Instant::now();
    while damaging.elapsed() < DAMAGE_FOR {
        damage.round(&mut redis_client).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.wait_calls(CALLS_PER_STEP).await;
    let damaged_refused =
        gateway.metric(DAMAGED_ENTRIES, &[("kind", "features")]).await.unwrap() - damaged_before;

    // 10: the gateway is told to stop with calls in flight: they finish, new ones are refused, and
    // it exits by itself inside its grace period (every call it holds has a deadline).
    start_phase(GATEWAY_SIGTERM);
    load.wait_calls(CALLS_PER_STEP).await;
    in_flight_at_fault[GATEWAY_SIGTERM] = load.wait_in_flight(DESCRIBE).await;
    let terminated = Instant::now();
    gateway.signal(libc::SIGTERM).unwrap();
    let grace = GATEWAY_REQUEST_TIMEOUT + Duration::from_secs(2);
    let exit = gateway.wait_exit(grace);
    let drain = terminated.elapsed();
    let exited = Instant::now();
    // Calls keep coming for a moment after the exit: each must be refused at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.stop.store(true, Ordering::SeqCst);
    for client in clients {
        tokio::time::timeout(CALL_DEADLINE + HANG_SLACK * 2, client)
            .await
            .expect("a client did not stop")
            .expect("a client panicked");
    }

    // The figures.
    let outcomes = std::mem::take(&mut *load.outcomes.lock().unwrap());
    assert_eq!(outcomes.len(), load.started.load(Ordering::SeqCst), "every call started has an outcome");
    let mut rows: Vec<Row> = (0..PHASES.len()).map(|_| Row::default()).collect();
    // Over all phases, by RPC: (sent, answered with the fault-free answer).
    let mut by_kind = [(0usize, 0usize); KINDS];
    for outcome in &outcomes {
        let kind = &mut by_kind[calls[outcome.call].1.kind()];
        kind.0 += 1;
        if matches!(&outcome.ending, Ending::Answered(a) if a.matches(&expected[outcome.call])) {
            kind.1 += 1;
        }
        let row = &mut rows[outcome.phase];
        let name = &calls[outcome.call].0;
        row.sent += 1;
        row.latencies.push((outcome.ended - outcome.started).as_secs_f64());
        match &outcome.ending {
            Ending::Answered(answer) if answer.matches(&expected[outcome.call]) => row.answered += 1,
            Ending::Answered(answer) => {
                row.wrong.push(format!("{name}: {answer:?} instead of {:?}", expected[outcome.call]))
            }
            Ending::Failed(status) => match clear(status.code()) {
                Some(code) => {
                    *row.failed.entry(code).or_default() += 1;
                    row.examples.entry(code).or_insert_with(|| status.message().to_string());
                }
                // tonic's answer when the client's own timer (the call's deadline) fires first: a
                // unary call whose server is hung races the gateway's DEADLINE_EXCEEDED.
                None if status.code() == Code::Cancelled && status.message() == "Timeout expired" => {
                    *row.failed.entry("CANCELLED (client deadline)").or_default() += 1
                }
                // tonic's own answer when the connection closes under a call the gateway never
                // took: a call sent after SIGTERM, racing the connection's close.
                None if outcome.phase == GATEWAY_SIGTERM
                    && outcome.started > terminated
                    && status.code() == Code::Cancelled
                    && status.message() == "operation was canceled" =>
                {
                    *row.failed.entry("CANCELLED (connection closed, sent after SIGTERM)").or_default() += 1
                }
                None => row.unclear.push(format!("{name}: {status:?}")),
            },
            Ending::Hung => row.hung += 1,
        }
    }
    println!("\nfaults under load: {CLIENTS} clients, deadline {CALL_DEADLINE:?}, {} calls", outcomes.len());
    println!(
        "| fault | in flight at fault | sent | answered (= fault-free) | failed, by status | lost | p99 (ms) | max (ms) |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    for (p, (name, row)) in PHASES.iter().zip(&rows).enumerate() {
        let failed: Vec<String> = row.failed.iter().map(|(code, n)| format!("{n} {code}")).collect();
        let in_flight = if p == 0 { "-".to_string() } else { in_flight_at_fault[p].to_string() };
        println!(
            "| {name} | {in_flight} | {} | {} | {} | {} | {:.0} | {:.0} |",
            row.sent,
            row.answered,
            if failed.is_empty() { "0".to_string() } else { failed.join(", ") },
            row.lost(),
            row.p99_ms(),
            row.max_ms()
        );
    }
    for (name, row) in PHASES.iter().zip(&rows) {
        for (code, message) in &row.examples {
            println!("{name}: e.g. {code} {message:?}");
        }
    }
    let [describe, segment, ask, chat, register] = by_kind;
    println!(
        "by RPC (sent/answered): Describe {}/{}, Segment {}/{}, Ask {}/{}, Chat {}/{}, RegisterImage {}/{}",
        describe.0, describe.1, segment.0, segment.1, ask.0, ask.1, chat.0, chat.1, register.0, register.1
    );
    for (kind, (sent, answered)) in by_kind.iter().enumerate() {
        assert!(*answered > 0 && *sent > 0, "calls of kind {kind}: {sent} sent, {answered} answered");
    }
    println!(
        "gateway: {vision_failovers} vision and {llm_failovers} LLM calls moved to another replica; \
         {llm_stream_retries} broken answer streams finished on another LLM replica \
         ({llm_kills} LLM kills); {redis_errors} Redis errors after the restart"
    );
    println!(
        "Redis hung: {hung_redis_errors} Redis errors; damaged: {} feature entries truncated and {} tampered \
         with, {damaged_refused} damaged entries refused by the gateway",
        damage.truncated, damage.tampered
    );
    let slow_marked_down =
        marked_down.map_or("never".to_string(), |t| format!("after {:.2} s", t.as_secs_f64()));
    println!(
        "slow vision replica: marked down {slow_marked_down}; while slow it pooled {:.0} times, the other {:.0}",
        slow_pools[slow_victim],
        slow_pools[1 - slow_victim]
    );

    let lost: Vec<String> = PHASES
        .iter()
        .zip(&rows)
        .filter(|(_, row)| row.lost() > 0)
        .map(|(name, row)| {
            format!(
                "{name}: wrong answers {:#?}, unclear failures {:#?}, {} hung",
                row.wrong, row.unclear, row.hung
            )
        })
        .collect();
    assert!(lost.is_empty(), "calls lost: {lost:#?}");
    for (name, row) in PHASES.iter().zip(&rows) {
        assert!(row.sent > 0, "{name}: no calls");
    }
    // Without a fault every call is answered; a hung vision replica costs at most the calls it
    // held (they end at their deadline), a killed one none at all.
    for phase in [0, 1, REDIS_DAMAGED] {
        assert_eq!(rows[phase].answered, rows[phase].sent, "{}: every call answered", PHASES[phase]);
    }
    // A hung Redis was noticed (lookups timed out) and cost no wrong answer; damaged entries were
    // read, refused and recomputed.
    assert!(hung_redis_errors > 0.0, "no Redis error while Redis was stopped");
    assert!(damage.truncated > 0 && damage.tampered > 0, "nothing was damaged: {damage:?}");
    assert!(damaged_refused > 0.0, "the gateway read no damaged entry");
    // The LLM replica died with answers streaming, and they were finished by the other one.
    assert!(llm_stream_retries > 0.0, "the LLM replica was killed with no answer streaming");
    for (p, n) in in_flight_at_fault.iter().enumerate().skip(1) {
        assert!(*n > 0, "{}: no call was in flight at the fault", PHASES[p]);
    }

    // SIGTERM: a clean exit inside the grace period, no SIGKILL needed.
    let exit = exit.unwrap_or_else(|| panic!("the gateway did not exit within {grace:?} of SIGTERM"));
    assert!(exit.success(), "the gateway exited with {exit:?}");
    // Calls it held when told to stop were answered after the signal...
    let drained = outcomes
        .iter()
        .filter(|o| o.started < terminated && o.ended > terminated)
        .filter(|o| matches!(&o.ending, Ending::Answered(a) if a.matches(&expected[o.call])))
        .count();
    assert!(drained > 0, "no call in flight at SIGTERM was answered");
    // ...and calls made after it exited were refused as UNAVAILABLE, at once.
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.started > exited).collect();
    assert!(!after.is_empty(), "no call was made after the gateway exited");
    for outcome in after {
        match &outcome.ending {
            Ending::Failed(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            _ => panic!("a call after the gateway exited did not fail"),
        }
        assert!(outcome.ended - outcome.started < Duration::from_secs(2), "a refusal took long");
    }
    println!(
        "SIGTERM: the LLM replica drained in {:.2} s ({llm_exit}); the gateway in {:.2} s ({exit}), \
         {drained} calls in flight answered after the signal",
        llm_drain.as_secs_f64(),
        drain.as_secs_f64()
    );
    for process in vision.iter_mut().chain(llm.iter_mut()).chain([&mut sam]) {
        assert!(process.is_serving().await, "{} is unhealthy after the faults", process.name());
    }
}
