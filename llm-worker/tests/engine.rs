//! The generation engine on the tiny fixture: shared prefixes, requests joining a running batch,
//! prefix reuse across requests, dropped streams, and the engine thread.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use llm_worker::LlmError;
use llm_worker::checkpoint::{load_checkpoint, load_config};
use llm_worker::engine::{Engine, EngineConfig, Event, EventStream, Finished, GenerateRequest, Question};
use llm_worker::models::osprey_llama::{OspreyLlama, PrefixKv, SeqCache};
use llm_worker::prompt::PromptError;
use llm_worker::sampling::{FinishReason, SamplingParams};
use osprey_test_support::fixture;

fn model() -> OspreyLlama {
    let dir = fixture("llm/tiny");
    OspreyLlama::load(load_checkpoint(&dir, DType::F32, &Device::Cpu).unwrap(), &load_config(&dir).unwrap())
        .unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("llm/expected.safetensors"), &Device::Cpu).unwrap()
}

fn greedy(k: usize) -> SamplingParams {
    SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(k) }
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}

/// Fixture prompt `suffix` ("" or "_b") as a one-question request.
fn request(
    e: &HashMap<String, Tensor>,
    suffix: &str,
    key: Option<&str>,
    params: SamplingParams,
) -> GenerateRequest {
    GenerateRequest {
        image_key: key.map(str::to_string),
        image_features: Some(e[&format!("image_features{suffix}")].clone()),
        questions: vec![Question {
            input_ids: e[&format!("input_ids{suffix}")].to_vec1::<i64>().unwrap(),
            mask_tokens: e[&format!("mask_tokens{suffix}")].clone(),
            pos_tokens: e[&format!("pos_tokens{suffix}")].clone(),
            params,
        }],
    }
}

/// Everything a finished stream received (the sync engine has already run to completion).
fn drain(rx: &mut EventStream) -> (Vec<u32>, Finished) {
    let mut tokens = Vec::new();
    loop {
        match rx.try_recv().expect("the stream ended without Finished") {
            Event::Token(t) => tokens.push(t),
            Event::Finished(f) => return (tokens, f),
            Event::Error(e) => panic!("stream failed: {e}"),
        }
    }
}

fn run_to_end(engine: &mut Engine) {
    while engine.has_work() {
        engine.step().unwrap();
    }
}

/// What the model alone gives for one question (the reference for engine outputs).
fn alone(model: &OspreyLlama, req: &GenerateRequest) -> Vec<u32> {
    let image = model.project_image(req.image_features.as_ref().unwrap()).unwrap();
    let q = &req.questions[0];
    let embeds = model.splice(&q.input_ids, Some(&image), &q.mask_tokens, &q.pos_tokens).unwrap();
    model.generate(&mut SeqCache::new(PrefixKv::default()), &embeds, &q.params, false).unwrap().tokens
}

#[test]
fn requests_joining_mid_decode_match_running_alone() {
    let e = expected();
    let mut engine = Engine::new(model(), EngineConfig::default());
    let mut a = engine.submit(request(&e, "", None, greedy(8))).unwrap();
    for _ in 0..3 {
        engine.step().unwrap();
    }
    assert_eq!(engine.load(), (0, 1));
    let mut b = engine.submit(request(&e, "_b", None, greedy(8))).unwrap();
    engine.step().unwrap();
    assert_eq!(engine.load(), (0, 2), "B joined the running batch");
    run_to_end(&mut engine);
    let (ta, fa) = drain(&mut a[0]);
    let (tb, fb) = drain(&mut b[0]);
    assert_eq!(ta, u32s(&e["greedy_ids"]));
    assert_eq!(tb, u32s(&e["greedy_ids_b"]));
    assert_eq!((fa.reason, fa.generated_tokens, fa.prompt_positions), (FinishReason::Length, 8, 22));
    assert_eq!((fb.reason, fb.generated_tokens, fb.prompt_positions), (FinishReason::Length, 8, 16));

    // Sampling draws from a per-sequence generator: joining a batch does not change the tokens.
    let model = engine.model().clone();
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 20,
        seed: 11,
        max_new_tokens: 12,
        stop_at_eos: false,
    };
    let want = alone(&model, &request(&e, "_b", None, sampled.clone()));
    let mut a = engine.submit(request(&e, "", None, greedy(8))).unwrap();
    engine.step().unwrap();
    engine.step().unwrap();
    let mut b = engine.submit(request(&e, "_b", None, sampled)).unwrap();
    run_to_end(&mut engine);
    assert_eq!(drain(&mut a[0]).0, u32s(&e["greedy_ids"]));
    assert_eq!(drain(&mut b[0]).0, want);
}

#[test]
fn questions_share_the_prefix_and_later_requests_reuse_it() {
    let e = expected();
    let model = model();
    let mut engine =
        Engine::new(model.clone(), EngineConfig { max_batch_size: 2, ..EngineConfig::default() });
    // Three questions about image A: the fixture prompt, the same with regions swapped, and one
    // with a different ending. They share [1, 11, 4, 23, <image>, 17, 8] = 4 + 6 + 2 positions.
    let base = request(&e, "", Some("image-a"), greedy(8));
    let q0 = base.questions[0].clone();
    let swap =
        |t: &Tensor| Tensor::cat(&[t.narrow(0, 1, 1).unwrap(), t.narrow(0, 0, 1).unwrap()], 0).unwrap();
    let q1 = Question { mask_tokens: swap(&q0.mask_tokens), pos_tokens: swap(&q0.pos_tokens), ..q0.clone() };
    let mut ids2 = q0.input_ids.clone();
    ids2.truncate(ids2.len() - 3);
    ids2.extend([5, 9]);
    let q2 = Question { input_ids: ids2, ..q0.clone() };
    let questions = vec![q0, q1, q2];
    let wants: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| alone(&model, &GenerateRequest { questions: vec![q.clone()], ..base.clone() }))
        .collect();
    assert_eq!(wants[0], u32s(&e["greedy_ids"]));
    let mut streams = engine.submit(GenerateRequest { questions, ..base.clone() }).unwrap();
    // Batch size 2: the third question waits for a slot.
    engine.step().unwrap();
    assert_eq!(engine.load(), (1, 2));
    run_to_end(&mut engine);
    for (rx, want) in streams.iter_mut().zip(&wants) {
        let (tokens, f) = drain(rx);
        assert_eq!(&tokens, want);
        assert_eq!((f.shared_prefix_positions, f.cached_prefix_positions), (12, 0));
    }

    // A later request about the same image starts from the cached prefix.
    let mut again = engine.submit(request(&e, "", Some("image-a"), greedy(8))).unwrap();
    run_to_end(&mut engine);
    let (tokens, f) = drain(&mut again[0]);
    assert_eq!(tokens, u32s(&e["greedy_ids"]));
    assert_eq!((f.shared_prefix_positions, f.cached_prefix_positions), (12, 12));
    // Another image key does not.
    let mut other = engine.submit(request(&e, "", Some("image-b"), greedy(8))).unwrap();
    run_to_end(&mut engine);
    let (tokens, f) = drain(&mut other[0]);
    assert_eq!(tokens, u32s(&e["greedy_ids"]));
    assert_eq!(f.cached_prefix_positions, 0);
}

#[test]
fn dropped_streams_leave_the_batch() {
    let e = expected();
    let mut engine = Engine::new(model(), EngineConfig::default());
    let mut req = request(&e, "", None, greedy(8));
    req.questions.push(req.questions[0].clone());
    let mut streams = engine.submit(req).unwrap();
    engine.step().unwrap();
    assert_eq!(engine.load(), (0, 2));
    drop(streams.pop());
    engine.step().unwrap();
    assert_eq!(engine.load(), (0, 1));
    run_to_end(&mut engine);
    assert_eq!(drain(&mut streams[0]).0, u32s(&e["greedy_ids"]));
}

#[test]
fn invalid_requests_are_rejected_before_queueing() {
    let e = expected();
    let mut engine = Engine::new(model(), EngineConfig::default());
    let mut req = request(&e, "", None, greedy(8));
    req.questions[0].mask_tokens = e["mask_tokens"].narrow(0, 0, 1).unwrap();
    req.questions[0].pos_tokens = e["pos_tokens"].narrow(0, 0, 1).unwrap();
    let err = engine.submit(req).unwrap_err();
    assert!(matches!(err, LlmError::Prompt(PromptError::RegionCount { pairs: 2, regions: 1 })), "{err}");
    let mut req = request(&e, "", None, greedy(8));
    req.questions[0].input_ids[7] = 5; // <mask> 38 replaced: the following <pos> stands alone
    let err = engine.submit(req).unwrap_err();
    assert!(matches!(err, LlmError::Prompt(PromptError::PosWithoutMask { .. })), "{err}");
    let mut req = request(&e, "", None, greedy(8));
    req.image_features = None;
    assert!(engine.submit(req).unwrap_err().is_invalid_argument());
    let req = request(&e, "", None, SamplingParams { top_p: 0.0, ..greedy(8) });
    assert!(engine.submit(req).unwrap_err().is_invalid_argument());
    assert!(!engine.has_work());
}

#[test]
fn engine_thread_streams_tokens() {
    let e = expected();
    let (handle, thread) = Engine::new(model(), EngineConfig::default()).spawn().unwrap();
    let mut a = handle.try_submit(request(&e, "", Some("a"), greedy(8))).unwrap();
    let mut b = handle.try_submit(request(&e, "_b", Some("b"), greedy(8))).unwrap();
    let dropped = handle.try_submit(request(&e, "_b", None, greedy(200))).unwrap();
    drop(dropped);
    let collect = |rx: &mut EventStream| {
        let mut tokens = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token(t) => tokens.push(t),
                Event::Finished(f) => return (tokens, f),
                Event::Error(e) => panic!("{e}"),
            }
        }
        panic!("stream closed without Finished");
    };
    assert_eq!(collect(&mut a[0]).0, u32s(&e["greedy_ids"]));
    assert_eq!(collect(&mut b[0]).0, u32s(&e["greedy_ids_b"]));
    let err = handle
        .try_submit(GenerateRequest { questions: vec![], ..request(&e, "", None, greedy(1)) })
        .unwrap_err();
    assert!(err.is_invalid_argument());
    // The thread ends once every handle is gone and the work is done.
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_busy_engine_refuses_what_its_queue_cannot_hold() {
    let e = expected();
    let config = EngineConfig { max_batch_size: 1, max_queued_requests: 2, ..EngineConfig::default() };
    let (handle, thread) = Engine::new(model(), config).spawn().unwrap();
    // One long answer keeps the only batch slot busy.
    let mut running = handle.try_submit(request(&e, "", None, greedy(200))).unwrap();
    assert!(matches!(running[0].blocking_recv(), Some(Event::Token(_))));
    let mut finished = false;
    let mut accepted = Vec::new();
    let refused = loop {
        match handle.try_submit(request(&e, "_b", None, greedy(200))) {
            Ok(streams) => accepted.push(streams),
            Err(LlmError::Overloaded(_)) => break true,
            Err(other) => panic!("{other}"),
        }
        // Time for the engine to take from the channel what it will.
        std::thread::sleep(std::time::Duration::from_millis(5));
        while let Ok(event) = running[0].try_recv() {
            finished |= matches!(event, Event::Finished(_));
        }
        if finished {
            break false;
        }
    };
    // One question waits beside the running one and two requests wait in the channel; the next is
    // refused while the first answer is still decoding.
    assert!(refused, "{} requests were queued behind a running answer, none refused", accepted.len());
    assert_eq!(accepted.len(), 3);
    drop((running, accepted, handle));
    thread.join().unwrap();
}
