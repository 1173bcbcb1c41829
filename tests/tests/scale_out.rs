//! Scale-out on one machine (issue #7, item 5): a gateway in front of 3 vision and 2 LLM replicas,
//! each a separate process on its own loopback address, with Redis as the shared feature tier.
//! While a bounded load runs, replicas are added (a process starts on an address the gateway
//! lists; its health checks bring it in) and removed (a vision replica SIGKILLed, an LLM replica
//! scaled down with SIGTERM and drained), and one comes back. No request may fail, and the
//! feature-cache hit rate after a replica leaves must stay high: the images it held are found in
//! Redis by the replicas that take them over. Prints the numbers per phase.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_e2e::*;
use osprey_proto::v1::CacheTier;

/// Requests per phase once the phase has begun.
const PER_PHASE: usize = 36;
/// Concurrent clients.
const CLIENTS: usize = 3;

const PHASES: [&str; 5] = [
    "warm-up (3 vision, 2 llm)",
    "steady (3 vision, 2 llm)",
    "scaled out (+1 vision, +1 llm)",
    "replicas left (-1 vision killed, -1 llm drained)",
    "killed vision replica back",
];

/// One finished request: the phase it started in, and its features' tier or its error.
struct Outcome {
    phase: usize,
    result: Result<CacheTier, String>,
}

#[derive(Default)]
struct Row {
    requests: usize,
    failures: usize,
    resident: usize,
    shared: usize,
    computed: usize,
}

impl Row {
    fn hit_rate(&self) -> f64 {
        (self.resident + self.shared) as f64 / (self.requests - self.failures).max(1) as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_join_and_leave_under_load_without_failures_and_redis_keeps_hits_high() {
    let mut redis = redis_server(loopback(41)).unwrap();
    let mut vision: Vec<Process> = (42..=45).map(|n| vision_worker(loopback(n), &[]).unwrap()).collect();
    let mut llm: Vec<Process> = (46..=48).map(|n| llm_worker(loopback(n), &[]).unwrap()).collect();
    // The fourth vision and the third LLM address are listed from the start but nothing serves
    // there yet: that is where replicas are "added" later.
    vision[3].kill();
    llm[2].kill();
    let mut starting: Vec<&mut Process> = vec![&mut redis];
    starting.extend(vision[..3].iter_mut());
    starting.extend(llm[..2].iter_mut());
    wait_all(&mut starting).await.unwrap();

    let urls = |list: &[Process]| list.iter().map(|p| p.url()).collect::<Vec<_>>().join(",");
    let redis_url = format!("redis://{}/0", redis.addr);
    // No result cache: every request needs the image's features, so the feature tiers are measured.
    let flags = [
        "--redis-url",
        &redis_url,
        "--health-interval",
        "0.2",
        "--resolve-interval",
        "1",
        "--result-cache-ttl-seconds",
        "0",
    ];
    let mut gateway = gateway_for_urls(loopback(49), &urls(&vision), &urls(&llm), "", &flags).unwrap();
    gateway.wait_ready().await.unwrap();

    // Bounded load: CLIENTS clients over a dozen images until the last phase has its requests.
    let images = images();
    let phase = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = client(&gateway, None).await.unwrap();
        let (images, phase, done, stop, outcomes) =
            (images.clone(), phase.clone(), done.clone(), stop.clone(), outcomes.clone());
        clients.push(tokio::spawn(async move {
            let mut k = c * 5;
            while !stop.load(Ordering::SeqCst) {
                let image = &images[k % images.len()];
                k += 1;
                let started_in = phase.load(Ordering::SeqCst);
                let masks = box_masks(image.height, image.width, 4);
                let result = match describe(&mut client, describe_request(image, mask_regions(&masks), 4))
                    .await
                {
                    Ok(results) if results.len() == 4 => Ok(features_tier(&results[0])),
                    Ok(results) => Err(format!("{}: {} of 4 regions answered", image.name, results.len())),
                    Err(status) => Err(format!("{}: {status:?}", image.name)),
                };
                outcomes.lock().unwrap().push(Outcome { phase: started_in, result });
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let next_phase = |n: usize| {
        let (phase, done) = (phase.clone(), done.clone());
        async move {
            let target = done.load(Ordering::SeqCst) + PER_PHASE;
            let deadline = Instant::now() + Duration::from_secs(300);
            while done.load(Ordering::SeqCst) < target && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            phase.store(n, Ordering::SeqCst);
        }
    };

    next_phase(1).await;
    // Scale out: a vision and an LLM replica start on listed addresses.
    next_phase(2).await;
    vision[3].start().unwrap();
    llm[2].start().unwrap();
    wait_all(&mut [&mut vision[3], &mut llm[2]]).await.unwrap();
    // Scale in: the vision replica preferred by the most images dies abruptly; an LLM replica is
    // scaled down (drains its streams).
    let all_urls: Vec<String> = vision.iter().map(|p| p.url()).collect();
    let held =
        |url: &str| images.iter().filter(|i| gateway::routing::rank(&i.key, &all_urls)[0] == url).count();
    let victim = (0..3).max_by_key(|&v| held(&all_urls[v])).unwrap();
    let victim_held = held(&all_urls[victim]);
    next_phase(3).await;
    vision[victim].kill();
    llm[0].terminate(Duration::from_secs(30));
    // The dead vision replica comes back on its address and rejoins.
    next_phase(4).await;
    vision[victim].start().unwrap();
    vision[victim].wait_ready().await.unwrap();
    next_phase(5).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut rows: Vec<Row> = (0..PHASES.len()).map(|_| Row::default()).collect();
    let mut failures = Vec::new();
    for outcome in &outcomes {
        let row = &mut rows[outcome.phase.min(PHASES.len() - 1)];
        row.requests += 1;
        match &outcome.result {
            Ok(CacheTier::Resident) => row.resident += 1,
            Ok(CacheTier::Shared) => row.shared += 1,
            Ok(CacheTier::Computed) => row.computed += 1,
            Ok(tier) => {
                row.failures += 1;
                failures.push(format!("unexpected feature tier {tier:?}"));
            }
            Err(message) => {
                row.failures += 1;
                failures.push(message.clone());
            }
        }
    }
    println!("\nscale-out: {} requests of 4 regions, {} failed", outcomes.len(), failures.len());
    println!("| phase | requests | failures | resident | shared (Redis) | computed | feature hit rate |");
    println!("|---|---|---|---|---|---|---|");
    for (name, row) in PHASES.iter().zip(&rows) {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.1}% |",
            row.requests,
            row.failures,
            row.resident,
            row.shared,
            row.computed,
            100.0 * row.hit_rate()
        );
    }
    let redis_hits = gateway
        .metric("osprey_feature_cache_lookups_total", &[("tier", "redis"), ("hit", "true")])
        .await
        .unwrap();
    let failovers = gateway.metric("osprey_gateway_replica_failures_total", &[]).await.unwrap();
    println!(
        "gateway: {redis_hits} Redis feature hits, {failovers} calls retried on another replica; \
         the killed vision replica was preferred by {victim_held} of {} images",
        images.len()
    );

    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    let (steady, left) = (&rows[1], &rows[3]);
    assert!(steady.requests > 0 && left.requests > 0);
    assert!(steady.hit_rate() >= 0.9, "steady-state hit rate {:.2}", steady.hit_rate());
    assert!(left.hit_rate() >= 0.9, "hit rate after a replica left {:.2}", left.hit_rate());
    let recomputed: usize = rows[1..].iter().map(|r| r.computed).sum();
    assert_eq!(recomputed, 0, "after the warm-up no image is encoded again, whichever replica serves it");
    // Every image of the killed replica moved to another one and was found in Redis there.
    assert!(victim_held > 0);
    assert!(redis_hits >= victim_held as f64, "{redis_hits} Redis hits for {victim_held} moved images");
    // The added replicas took work, and so did the one that came back.
    for (replica, role) in [(&vision[3], "the added"), (&vision[victim], "the returned")] {
        let pools = replica.metric("osprey_vision_pool_duration_seconds_count", &[]).await.unwrap();
        assert!(pools > 0.0, "{role} vision replica served no request");
    }
    let generated = llm[2].metric("osprey_llm_generate_duration_seconds_count", &[]).await.unwrap();
    assert!(generated > 0.0, "the added LLM replica served");
    for process in vision.iter_mut().chain(llm.iter_mut().skip(1)) {
        assert!(process.is_serving().await, "{} is unhealthy", process.name());
    }
}
