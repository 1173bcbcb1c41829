//! Worker discovery and health over real gRPC servers on loopback: a replica whose server stops is
//! marked down by its `grpc.health.v1` check and skipped (not even tried) by routing; when a
//! server comes back on the same address it rejoins and gets its images back. Names resolve
//! through the system resolver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway::routing::rank;
use gateway::workers::Replicas;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A real gRPC server with health and reflection whose health service also reports `name`, so a
/// call can tell which replica answered.
async fn start(address: SocketAddr, name: &'static str) -> oneshot::Sender<()> {
    let mut listener = None;
    for _ in 0..200 {
        match TcpListener::bind(address).await {
            Ok(bound) => {
                listener = Some(bound);
                break;
            }
            // The previous server on this address may still be draining.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let listener = listener.expect("address stays in use");
    let (routes, health) = osprey_common::grpc::standard_routes(&[name]).await;
    health.set_serving().await;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        osprey_common::grpc::serve(listener, routes, &health, None, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    stop
}

async fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// Which replica answers for `key`, and how many replicas were tried.
async fn who_answers(replicas: &Replicas, key: &str) -> (&'static str, usize) {
    let mut tried = 0;
    let answer = replicas
        .call(key, |channel| {
            tried += 1;
            async move {
                let request = HealthCheckRequest { service: "replica.a".into() };
                match HealthClient::new(channel).check(request).await {
                    Ok(_) => Ok("a"),
                    Err(status) if status.code() == Code::NotFound => Ok("b"),
                    Err(status) => Err(status),
                }
            }
        })
        .await
        .unwrap();
    (answer, tried)
}

async fn wait_health(replicas: &Replicas, url: &str, healthy: bool) {
    for _ in 0..400 {
        if replicas.replicas().iter().any(|(u, h)| u == url && *h == healthy) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} never became {}", if healthy { "healthy" } else { "down" });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_replica_is_skipped_and_rejoins_when_back() {
    let (a, b) = (free_address().await, free_address().await);
    let stop_a = start(a, "replica.a").await;
    let _stop_b = start(b, "replica.b").await;
    let (url_a, url_b) = (format!("http://{a}"), format!("http://{b}"));

    let replicas = Arc::new(Replicas::new("vision", &[url_a.clone(), b.to_string()]).unwrap());
    replicas.resolve().await;
    replicas.check_health(Duration::from_secs(2)).await;
    let mut known = vec![(url_a.clone(), true), (url_b.clone(), true)];
    known.sort();
    assert_eq!(replicas.replicas(), known);
    replicas.maintain(Duration::from_secs(3600), Duration::from_millis(100));

    // An image key that prefers replica a.
    let urls = [url_a.clone(), url_b.clone()];
    let key = (0..).map(|i| format!("image-{i}")).find(|k| rank(k, &urls)[0] == url_a).unwrap();
    assert_eq!(who_answers(&replicas, &key).await, ("a", 1));

    // a stops: its health check fails, and routing goes straight to b without trying a.
    drop(stop_a);
    wait_health(&replicas, &url_a, false).await;
    for _ in 0..5 {
        assert_eq!(who_answers(&replicas, &key).await, ("b", 1));
    }

    // a comes back on the same address: it rejoins and gets its images back.
    let _stop_a = start(a, "replica.a").await;
    wait_health(&replicas, &url_a, true).await;
    assert_eq!(who_answers(&replicas, &key).await, ("a", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_mid_call_is_marked_down_and_the_next_one_answers() {
    let (a, b) = (free_address().await, free_address().await);
    let stop_a = start(a, "replica.a").await;
    let _stop_b = start(b, "replica.b").await;
    let url_a = format!("http://{a}");
    let urls = [url_a.clone(), format!("http://{b}")];
    // No background checks: only the failed call can mark a down.
    let replicas = Replicas::new("vision", &urls).unwrap();
    replicas.resolve().await;
    let key = (0..).map(|i| format!("image-{i}")).find(|k| rank(k, &urls)[0] == url_a).unwrap();
    assert_eq!(who_answers(&replicas, &key).await, ("a", 1));
    drop(stop_a);
    // Wait until a refuses connections, then: a is tried, fails, is marked down; b answers.
    let mut first = who_answers(&replicas, &key).await;
    for _ in 0..100 {
        if first.0 == "b" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        first = who_answers(&replicas, &key).await;
    }
    assert_eq!(first, ("b", 2));
    assert!(replicas.replicas().contains(&(url_a.clone(), false)));
    // Later calls skip it.
    assert_eq!(who_answers(&replicas, &key).await, ("b", 1));
}

#[tokio::test]
async fn names_resolve_through_the_system_resolver() {
    let replicas = Replicas::new("llm", &["localhost:50099".to_string()]).unwrap();
    replicas.resolve().await;
    let urls: Vec<String> = replicas.replicas().into_iter().map(|(url, _)| url).collect();
    assert!(urls.contains(&"http://127.0.0.1:50099".to_string()), "{urls:?}");

    let nowhere = Replicas::new("llm", &["no-such-host.invalid:1".to_string()]).unwrap();
    nowhere.resolve().await;
    assert!(nowhere.replicas().is_empty());
    let err = nowhere.call("k", |_channel| async { Ok(()) }).await.unwrap_err();
    assert!(err.to_string().contains("no llm workers are known"), "{err}");
}
