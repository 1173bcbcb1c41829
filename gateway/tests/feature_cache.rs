//! The feature cache against a real `redis-server` (started here on a free loopback port), and
//! the in-memory backend: hits, TTL, size limits, and that a Redis outage is a miss, never an
//! error or a hang, with the cache recovering when Redis comes back.

use std::time::Duration;

use gateway::cache::{CacheArgs, FeatureCache};
use osprey_test_support::{RedisServer, counted, free_port, parse_args};

fn cache(args: &[&str]) -> FeatureCache {
    let mut argv = vec!["gateway"];
    argv.extend_from_slice(args);
    let args: CacheArgs = parse_args(argv);
    FeatureCache::from_args(&args).unwrap()
}

#[tokio::test]
async fn redis_cache_survives_an_outage() {
    let port = free_port();
    let redis = RedisServer::start_on(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let cache = cache(&[
        "--redis-url",
        &url,
        "--cache-ttl-seconds",
        "60",
        "--cache-max-entry-bytes",
        "1000",
        "--redis-timeout-ms",
        "500",
    ]);
    assert_eq!(cache.tier(), "redis");

    assert_eq!(cache.get("img").await, None);
    cache.put("img", vec![1, 2, 3]).await;
    assert_eq!(cache.get("img").await, Some(vec![1, 2, 3]));
    cache.put("big", vec![0; 1001]).await;
    assert_eq!(cache.get("big").await, None, "entries over the size limit are not cached");

    // The TTL is set on the key.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("TTL").arg("osprey:img").query_async(&mut connection).await.unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    // Redis goes away: misses, quickly, no errors.
    drop(redis);
    let started = std::time::Instant::now();
    assert_eq!(cache.get("img").await, None);
    cache.put("img2", vec![4]).await;
    assert_eq!(cache.get("img2").await, None);
    assert!(started.elapsed() < Duration::from_secs(10), "outage took {:?}", started.elapsed());

    // Redis comes back (empty): the cache reconnects by itself.
    let redis = RedisServer::start_on(port);
    let mut reconnected = false;
    for _ in 0..50 {
        cache.put("img3", vec![5]).await;
        if cache.get("img3").await == Some(vec![5]) {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reconnected, "cache did not recover after Redis came back");
    drop(redis);
}

#[tokio::test]
async fn redis_down_at_startup_is_a_miss() {
    let port = free_port();
    let cache = cache(&["--redis-url", &format!("redis://127.0.0.1:{port}/0"), "--redis-timeout-ms", "300"]);
    assert_eq!(cache.get("img").await, None);
    cache.put("img", vec![1]).await;
}

#[test]
fn a_hung_redis_costs_one_timeout_then_is_left_alone_a_while() {
    let redis = RedisServer::start();
    let url = redis.url();
    let flags = ["--redis-url", &url, "--redis-timeout-ms", "300", "--redis-retry-after-ms", "3000"];
    let cache = cache(&flags);
    // One thread, so that `counted` sees every counter the cache increments.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        cache.put("img", vec![1]).await;
        assert_eq!(cache.get("img").await, Some(vec![1]));
    });

    redis.pause();
    let counters = counted(|| {
        runtime.block_on(async {
            for _ in 0..20 {
                assert_eq!(cache.get("img").await, None);
                cache.put("img", vec![2]).await;
            }
        })
    });
    // The first lookup timed out; the 39 calls after it were misses without asking Redis.
    let errors: Vec<&(String, u64)> =
        counters.iter().filter(|(name, _)| name.starts_with("osprey_feature_cache_errors_total")).collect();
    assert_eq!(errors, [&("osprey_feature_cache_errors_total{operation=get}".to_string(), 1)]);

    // Redis answers again: after the pause it is asked again, and the cache recovers.
    redis.resume();
    runtime.block_on(async {
        let mut recovered = false;
        for _ in 0..100 {
            cache.put("img", vec![3]).await;
            if cache.get("img").await == Some(vec![3]) {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recovered, "the cache did not recover after Redis answered again");
    });
}

#[tokio::test]
async fn memory_cache_is_bounded() {
    let cache = cache(&["--memory-cache-bytes", "10", "--cache-max-entry-bytes", "8"]);
    assert_eq!(cache.tier(), "memory");
    cache.put("a", vec![0; 6]).await;
    assert_eq!(cache.get("a").await, Some(vec![0; 6]));
    cache.put("b", vec![1; 6]).await; // evicts "a"
    assert_eq!(cache.get("a").await, None);
    assert_eq!(cache.get("b").await, Some(vec![1; 6]));
    cache.put("c", vec![2; 9]).await; // over the entry limit
    assert_eq!(cache.get("c").await, None);
}

#[tokio::test]
async fn entries_expire_after_their_ttl_in_both_backends() {
    let port = free_port();
    let _redis = RedisServer::start_on(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let ttls = ["--cache-ttl-seconds", "1", "--result-cache-ttl-seconds", "3"];
    let memory = cache(&ttls);
    let redis = cache(&[&["--redis-url", url.as_str()][..], &ttls[..]].concat());
    for cache in [&memory, &redis] {
        cache.put("features:x", vec![1]).await;
        cache.put_result("result:x", vec![2]).await;
        assert_eq!(cache.get("features:x").await, Some(vec![1]));
        assert_eq!(cache.get_result("result:x").await, Some(vec![2]));
    }
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    for cache in [&memory, &redis] {
        assert_eq!(cache.get("features:x").await, None, "{} features outlived their TTL", cache.tier());
        assert_eq!(
            cache.get_result("result:x").await,
            Some(vec![2]),
            "{} results have their own TTL",
            cache.tier()
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for cache in [&memory, &redis] {
        assert_eq!(cache.get_result("result:x").await, None, "{} result outlived its TTL", cache.tier());
    }

    // A zero result TTL (the default) turns the result cache off.
    assert!(!cache(&[]).caches_results());
    let off = cache(&["--result-cache-ttl-seconds", "0"]);
    off.put_result("result:y", vec![3]).await;
    assert!(!off.caches_results());
    assert_eq!(off.get_result("result:y").await, None);
}

#[tokio::test]
async fn redis_with_a_password_in_the_url() {
    let port = free_port();
    let _redis = RedisServer::start_with(port, &["--requirepass", "s3cret"]);
    for url in
        [format!("redis://:s3cret@127.0.0.1:{port}/0"), format!("redis://default:s3cret@127.0.0.1:{port}/0")]
    {
        let cache = cache(&["--redis-url", &url, "--redis-timeout-ms", "500"]);
        cache.put("img", vec![7, 8]).await;
        assert_eq!(cache.get("img").await, Some(vec![7, 8]), "{url}");
    }
    // A wrong or missing password: every lookup a miss (counted as an error), never a failure.
    for url in [format!("redis://:wrong@127.0.0.1:{port}/0"), format!("redis://127.0.0.1:{port}/0")] {
        let cache = cache(&["--redis-url", &url, "--redis-timeout-ms", "500"]);
        cache.put("img2", vec![1]).await;
        assert_eq!(cache.get("img").await, None, "{url}");
    }
    // The entry is really in Redis, behind the password.
    let client = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{port}/0")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Vec<u8> = redis::cmd("GET").arg("osprey:img").query_async(&mut connection).await.unwrap();
    assert_eq!(stored, [7, 8]);
    let exists: bool = redis::cmd("EXISTS").arg("osprey:img2").query_async(&mut connection).await.unwrap();
    assert!(!exists, "a refused client stored an entry");
}

#[tokio::test]
async fn redis_over_tls_with_a_password() {
    let tls = osprey_test_support::fixtures().join("tls");
    let path = |name: &str| tls.join(name).to_str().unwrap().to_string();
    let port = free_port();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let flags = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "s3cret",
    ];
    let _redis = RedisServer::start_with(port, &flags);
    let url = format!("rediss://:s3cret@127.0.0.1:{port}/0");
    let trusting = cache(&["--redis-url", &url, "--redis-tls-ca", &ca, "--redis-timeout-ms", "2000"]);
    trusting.put("img", vec![4, 2]).await;
    assert_eq!(trusting.get("img").await, Some(vec![4, 2]));

    // Not trusting the server's CA, or plaintext to the TLS port: misses, never an answer.
    let untrusting = cache(&["--redis-url", &url, "--redis-timeout-ms", "500"]);
    assert_eq!(untrusting.get("img").await, None);
    let plaintext =
        cache(&["--redis-url", &format!("redis://:s3cret@127.0.0.1:{port}/0"), "--redis-timeout-ms", "500"]);
    assert_eq!(plaintext.get("img").await, None);
    // A missing CA file is a startup error naming it.
    let args: CacheArgs = parse_args(["gateway", "--redis-url", &url, "--redis-tls-ca", "no-such-ca.pem"]);
    let error = FeatureCache::from_args(&args).err().expect("a missing CA refused");
    assert!(error.to_string().contains("no-such-ca.pem"), "{error}");
}
