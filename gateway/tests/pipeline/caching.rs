//! The feature-cache tiers (computed, resident, shared), failover between vision replicas, the
//! result cache, and two gateways sharing features and answers through Redis.

use std::time::Duration;

use osprey_proto::v1::{self, CacheTier, DescribeTask};
use osprey_test_support::RedisServer;
use tonic::Code;

use crate::support::*;

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

/// A model failure on the replica that owns the image (its encode fails: INTERNAL) is that
/// replica's, not the client's: the gateway tries the next replica, which answers. When every
/// replica fails so, the request is INTERNAL (not INVALID_ARGUMENT, not UNAVAILABLE).
#[tokio::test]
async fn a_failed_encode_is_internal_and_fails_over() {
    let key = photo_key();
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (first, second) = (bind().await.unwrap(), bind().await.unwrap());
    let urls = [&first, &second].map(|l| format!("http://{}", l.local_addr().unwrap()));
    let (owner, other) =
        if gateway::routing::rank(&key, &urls)[0] == urls[0] { (first, second) } else { (second, first) };
    let faulty = vision_on(owner, &["--fault-image-key", &key]).await;
    let fine = vision_on(other, &[]).await;
    let llm = llm().await;
    let image = v1::image::Source::Encoded(photo());

    let (_gateway, mut client) = gateway(&[&faulty, &fine], &llm, &[]).await;
    let results = describe(&mut client, describe_request(image.clone(), masks(&[1, 4]))).await;
    assert_eq!(results.iter().map(|r| r.region_index).collect::<Vec<_>>(), [0, 1]);
    assert!(results.iter().all(|r| tier(r) == CacheTier::Computed));

    // (The first faulty replica holds the features by now, pooled from the blob.)
    let listener = bind().await.unwrap();
    let faulty_alone = vision_on(listener, &["--fault-image-key", &key]).await;
    let (_alone, mut client) = gateway(&[&faulty_alone], &llm, &[]).await;
    let status = match client.describe(describe_request(image, masks(&[1]))).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("injected fault"), "{}", status.message());
}

/// Vision weights replaced under the same gateway `--model-revision` (so the same image keys):
/// the shared cache still holds features of the old weights, which the new replica refuses. They
/// are computed again (and replaced in the cache) instead of failing the request.
#[tokio::test]
async fn features_of_another_feature_revision_are_computed_again() {
    let redis = RedisServer::start();
    let url = redis.url();
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let old = vision_on(bind().await, &["--feature-revision", "weights-1"]).await;
    let new = vision_on(bind().await, &["--feature-revision", "weights-2"]).await;
    let llm = llm().await;
    let shared = ["--redis-url", url.as_str()];
    let (_g1, mut before) = gateway(&[&old], &llm, &shared).await;
    let (_g2, mut after) = gateway(&[&new], &llm, &shared).await;
    let image = v1::image::Source::Encoded(photo());

    let first = describe(&mut before, describe_request(image.clone(), masks(&[1, 4]))).await;
    assert!(first.iter().all(|r| tier(r) == CacheTier::Computed));
    let again = describe(&mut after, describe_request(image.clone(), masks(&[1, 4]))).await;
    assert!(again.iter().all(|r| tier(r) == CacheTier::Computed), "encoded with the new weights");
    for (a, b) in again.iter().zip(&first) {
        assert_eq!(a.raw_text, b.raw_text, "the same weights under two names answer alike");
    }
    // The shared entry is now the new revision's: a third gateway in front of another new
    // replica uses it.
    let newer = vision_on(bind().await, &["--feature-revision", "weights-2"]).await;
    let (_g3, mut third) = gateway(&[&newer], &llm, &shared).await;
    let shared_hit = describe(&mut third, describe_request(image, masks(&[1, 4]))).await;
    assert!(shared_hit.iter().all(|r| tier(r) == CacheTier::Shared));
}

#[tokio::test]
async fn gateways_share_features_through_redis_and_registered_images() {
    let redis = RedisServer::start();
    let url = redis.url();
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

/// Flips one byte in the middle of the Redis value under the first key matching `pattern`.
async fn damage_entry(url: &str, pattern: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut connection).await.unwrap();
    assert_eq!(keys.len(), 1, "one entry matches {pattern}: {keys:?}");
    let mut value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query_async(&mut connection).await.unwrap();
    let middle = value.len() / 2;
    value[middle] ^= 0x01;
    let () = redis::cmd("SET").arg(&keys[0]).arg(value).query_async(&mut connection).await.unwrap();
}

#[tokio::test]
async fn damaged_redis_entries_are_recomputed_or_refused_never_served() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (vision_a, vision_b, llm) = (vision().await, vision().await, llm().await);
    let shared = ["--redis-url", &url];
    let (_g1, mut first) = gateway(&[&vision_a], &llm, &shared).await;
    let (_g2, mut second) = gateway(&[&vision_b], &llm, &shared).await;
    let image = v1::image::Source::Encoded(photo());

    // A registered image's pixels cannot be recomputed: the client is told to register again.
    let registered = first
        .register_image(v1::RegisterImageRequest { encoded: photo(), warm_features: false })
        .await
        .unwrap()
        .into_inner();
    damage_entry(&url, &format!("osprey:pixels:{}", registered.key)).await;
    let by_key = v1::image::Source::Key(registered.key);
    let status = match second.describe(describe_request(by_key, masks(&[1]))).await {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.expect_err("a damaged registered image is refused"),
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("damaged in the cache; register it again"), "{}", status.message());

    // One bit of the shared feature blob changes: the other gateway (whose vision replica holds
    // nothing) must not use it, but encode again and give the same answers.
    let clean = describe(&mut first, describe_request(image.clone(), masks(&[1, 4]))).await;
    assert!(clean.iter().all(|r| tier(r) == CacheTier::Computed));
    damage_entry(&url, "osprey:features:*").await;
    let recomputed = describe(&mut second, describe_request(image, masks(&[1, 4]))).await;
    assert!(recomputed.iter().all(|r| tier(r) == CacheTier::Computed), "a damaged blob is a miss");
    for (a, b) in clean.iter().zip(&recomputed) {
        assert_eq!((&a.raw_text, a.generated_tokens), (&b.raw_text, b.generated_tokens));
    }
}

/// A request that names its image by key reads the pixels only when a stage needs them: once the
/// features are computed, Describe by key reads the image's size alone, so pixels damaged in the
/// cache afterwards go unread (reading them would refuse the request, as above).
#[tokio::test]
async fn requests_by_key_read_pixels_only_when_a_stage_needs_them() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (vision_a, vision_b, llm) = (vision().await, vision().await, llm().await);
    let shared = ["--redis-url", &url];
    let (_g1, mut first) = gateway(&[&vision_a], &llm, &shared).await;
    let (_g2, mut second) = gateway(&[&vision_b], &llm, &shared).await;

    let registered = first
        .register_image(v1::RegisterImageRequest { encoded: photo(), warm_features: true })
        .await
        .unwrap()
        .into_inner();
    damage_entry(&url, &format!("osprey:pixels:{}", registered.key)).await;
    let by_key = v1::image::Source::Key(registered.key);
    let resident = describe(&mut first, describe_request(by_key.clone(), masks(&[1, 4]))).await;
    assert!(resident.iter().all(|r| tier(r) == CacheTier::Resident));
    let from_shared = describe(&mut second, describe_request(by_key, masks(&[1, 4]))).await;
    assert!(from_shared.iter().all(|r| tier(r) == CacheTier::Shared));
    for (a, b) in resident.iter().zip(&from_shared) {
        assert_eq!(a.raw_text, b.raw_text);
    }
}
