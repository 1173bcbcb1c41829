//! The feature cache shared by every gateway replica (docs/ARCHITECTURE.md, cache tiers): image
//! features (and the pixels of registered images) keyed by image key, so that an image is encoded
//! once however many regions, requests and replicas ask about it.
//!
//! The same store also keeps answers to deterministic (greedy) questions, so that asking again
//! about the same region skips vision and the LLM (the result cache, `--result-cache-ttl-seconds`).
//!
//! Two backends, one interface: Redis when `--redis-url` is given, process memory otherwise. A
//! cache failure never fails a request: it is logged, counted in
//! `osprey_feature_cache_errors_total`, and the caller recomputes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_common::lru::ByteLru;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex as AsyncMutex;

/// Feature cache flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Redis URL (e.g. `redis://redis:6379/0`) of the feature cache shared by all gateway
    /// replicas. Without it, features are cached in this process's memory.
    #[arg(long, env = "OSPREY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// PEM CA that signed the certificate of a `rediss://` (TLS) Redis; the system's roots when
    /// unset. A password goes in the URL: `rediss://:PASSWORD@redis:6380/0`.
    #[arg(long, env = "OSPREY_REDIS_TLS_CA", requires = "redis_url")]
    pub redis_tls_ca: Option<std::path::PathBuf>,
    /// How long cached features live, in seconds.
    #[arg(long, env = "OSPREY_CACHE_TTL_SECONDS", default_value_t = 24 * 3600)]
    pub cache_ttl_seconds: u64,
    /// Entries larger than this are not cached (bytes).
    #[arg(long, env = "OSPREY_CACHE_MAX_ENTRY_BYTES", default_value_t = 64 << 20)]
    pub cache_max_entry_bytes: usize,
    /// Size of the in-memory cache used when no Redis URL is given (bytes).
    #[arg(long, env = "OSPREY_MEMORY_CACHE_BYTES", default_value_t = 2 << 30)]
    pub memory_cache_bytes: usize,
    /// Redis connect and response timeout, in milliseconds; a slower Redis counts as a miss.
    #[arg(long, env = "OSPREY_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,
    /// After a Redis connection error or timeout, every lookup is a miss at once for this long
    /// (milliseconds) before Redis is tried again, so that a hung or unreachable Redis costs one
    /// timeout per interval, not one per lookup.
    #[arg(long, env = "OSPREY_REDIS_RETRY_AFTER_MS", default_value_t = 1000)]
    pub redis_retry_after_ms: u64,
    /// How long answers to greedy (deterministic) questions are kept, in seconds; a repeated
    /// question about the same region then skips vision and the LLM. 0 (the default) turns the
    /// result cache off. Answers are keyed by `--model-revision`: change it when the workers'
    /// weights or defaults (e.g. the LLM's default `max_new_tokens`) change.
    #[arg(long, env = "OSPREY_RESULT_CACHE_TTL_SECONDS", default_value_t = 0)]
    pub result_cache_ttl_seconds: u64,
}

/// Where cached features live.
pub struct FeatureCache {
    store: Store,
    ttl: Duration,
    result_ttl: Duration,
}

enum Store {
    Memory(MemoryCache),
    /// Boxed: the client (with its TLS settings) is several times the memory store's size.
    Redis(Box<RedisCache>),
}

impl FeatureCache {
    pub fn from_args(args: &CacheArgs) -> anyhow::Result<Self> {
        let store = match &args.redis_url {
            Some(url) => Store::Redis(Box::new(RedisCache::new(
                url,
                args.redis_tls_ca.as_deref(),
                Duration::from_millis(args.redis_timeout_ms),
                Duration::from_millis(args.redis_retry_after_ms),
                args.cache_max_entry_bytes,
            )?)),
            None => Store::Memory(MemoryCache::new(args.memory_cache_bytes, args.cache_max_entry_bytes)),
        };
        Ok(Self {
            store,
            ttl: Duration::from_secs(args.cache_ttl_seconds),
            result_ttl: Duration::from_secs(args.result_cache_ttl_seconds),
        })
    }

    /// Which tier this is, for metrics and logs.
    pub fn tier(&self) -> &'static str {
        match self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// The cached bytes for `key`, or `None` on a miss or a cache failure.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let found = self.fetch(key).await;
        metrics::counter!("osprey_feature_cache_lookups_total", "tier" => self.tier(), "hit" => found.is_some().to_string())
            .increment(1);
        found
    }

    /// The first `n` bytes cached under `key` (fewer if the entry is shorter), or `None` on a miss
    /// or a cache failure: a registered image's size without its pixels.
    pub async fn get_prefix(&self, key: &str, n: usize) -> Option<Vec<u8>> {
        let found = match &self.store {
            Store::Memory(cache) => cache.get_prefix(key, n),
            Store::Redis(cache) => cache.get_prefix(key, n).await,
        };
        metrics::counter!("osprey_feature_cache_lookups_total", "tier" => self.tier(), "hit" => found.is_some().to_string())
            .increment(1);
        found
    }

    /// Stores `value` under `key` for the cache TTL (best effort).
    pub async fn put(&self, key: &str, value: Vec<u8>) {
        self.store(key, value, self.ttl).await;
    }

    /// Whether answers are cached at all.
    pub fn caches_results(&self) -> bool {
        !self.result_ttl.is_zero()
    }

    /// A cached answer (keyed by `cache_entries::answer_key`), or `None` on a miss, a cache
    /// failure, or when the result cache is off. Counted in `osprey_result_cache_lookups_total{tier,hit}`.
    pub async fn get_result(&self, key: &str) -> Option<Vec<u8>> {
        if !self.caches_results() {
            return None;
        }
        let found = self.fetch(key).await;
        metrics::counter!("osprey_result_cache_lookups_total", "tier" => self.tier(), "hit" => found.is_some().to_string())
            .increment(1);
        found
    }

    /// Stores an answer for the result-cache TTL (best effort).
    pub async fn put_result(&self, key: &str, value: Vec<u8>) {
        if self.caches_results() {
            self.store(key, value, self.result_ttl).await;
        }
    }

    async fn fetch(&self, key: &str) -> Option<Vec<u8>> {
        match &self.store {
            Store::Memory(cache) => cache.get(key),
            Store::Redis(cache) => cache.get(key).await,
        }
    }

    async fn store(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        match &self.store {
            Store::Memory(cache) => cache.put(key, value, ttl),
            Store::Redis(cache) => cache.put(key, value, ttl).await,
        }
    }
}

/// The Redis key of a cache key: everything Osprey stores lives under `osprey:`.
fn redis_key(key: &str) -> String {
    format!("osprey:{key}")
}

/// A value and when it expires.
type Entry = (Instant, Vec<u8>);

/// Entries in this process's memory, least recently used evicted first, expired ones ignored.
pub struct MemoryCache {
    entries: Mutex<ByteLru<String, Arc<Entry>>>,
    max_entry_bytes: usize,
}

impl MemoryCache {
    pub fn new(capacity_bytes: usize, max_entry_bytes: usize) -> Self {
        Self { entries: Mutex::new(ByteLru::new(capacity_bytes)), max_entry_bytes }
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let hit = self.entries.lock().expect("cache lock poisoned. This is a bug.").get(&key.to_string());
        hit.filter(|entry| entry.0 > Instant::now()).map(|entry| entry.1.clone())
    }

    fn get_prefix(&self, key: &str, n: usize) -> Option<Vec<u8>> {
        let hit = self.entries.lock().expect("cache lock poisoned. This is a bug.").get(&key.to_string());
        hit.filter(|entry| entry.0 > Instant::now()).map(|entry| entry.1[..n.min(entry.1.len())].to_vec())
    }

    fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        if value.len() <= self.max_entry_bytes {
            let bytes = value.len();
            let expires = Instant::now() + ttl;
            let mut entries = self.entries.lock().expect("cache lock poisoned. This is a bug.");
            entries.insert(key.to_string(), Arc::new((expires, value)), bytes);
        }
    }
}

/// Features in Redis, with a TTL. The connection is made lazily and remade after failures, so a
/// gateway starts, and keeps serving, while Redis is down.
pub struct RedisCache {
    client: redis::Client,
    connection: AsyncMutex<Option<ConnectionManager>>,
    timeout: Duration,
    /// How long Redis is left alone after a connection error or timeout.
    retry_after: Duration,
    /// Until when it is left alone.
    resting_until: Mutex<Option<Instant>>,
    max_entry_bytes: usize,
}

impl RedisCache {
    /// A cache at `url` (`redis://`, or `rediss://` trusting `tls_ca`, else the system's roots).
    pub fn new(
        url: &str,
        tls_ca: Option<&std::path::Path>,
        timeout: Duration,
        retry_after: Duration,
        max_entry_bytes: usize,
    ) -> anyhow::Result<Self> {
        let client = match tls_ca {
            None => redis::Client::open(url)?,
            Some(ca) => {
                let root_cert = std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("cannot read --redis-tls-ca {}: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) },
                )?
            }
        };
        Ok(Self {
            client,
            connection: AsyncMutex::new(None),
            timeout,
            retry_after,
            resting_until: Mutex::new(None),
            max_entry_bytes,
        })
    }

    /// Whether Redis failed less than `retry_after` ago (then it is not asked).
    fn resting(&self) -> bool {
        let until = *self.resting_until.lock().expect("cache lock poisoned. This is a bug.");
        until.is_some_and(|until| Instant::now() < until)
    }

    /// The connection, made if there is none; `None` while Redis rests after a failure, or when
    /// connecting fails (counted against `operation`).
    async fn connection(&self, operation: &'static str) -> Option<ConnectionManager> {
        if self.resting() {
            return None;
        }
        let mut slot = self.connection.lock().await;
        // Calls that waited here while another one's connection attempt failed do not try again.
        if self.resting() {
            return None;
        }
        if let Some(connection) = slot.as_ref() {
            return Some(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        match self.client.get_connection_manager_with_config(config).await {
            Ok(connection) => {
                *slot = Some(connection.clone());
                Some(connection)
            }
            Err(err) => {
                drop(slot);
                self.failed(operation, err).await;
                None
            }
        }
    }

    async fn failed(&self, operation: &'static str, err: redis::RedisError) {
        tracing::warn!(%err, operation, "feature cache unavailable; recomputing");
        metrics::counter!("osprey_feature_cache_errors_total", "operation" => operation).increment(1);
        // Drop the connection so the next call reconnects from scratch, and leave Redis alone a
        // while: a hung Redis would cost every lookup a timeout.
        if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal()
        {
            *self.connection.lock().await = None;
            *self.resting_until.lock().expect("cache lock poisoned. This is a bug.") =
                Some(Instant::now() + self.retry_after);
        }
    }

    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut connection = self.connection("get").await?;
        let result = connection.get::<_, Option<Vec<u8>>>(redis_key(key)).await;
        match result {
            Ok(value) => value,
            Err(err) => {
                self.failed("get", err).await;
                None
            }
        }
    }

    /// GETRANGE answers an empty string for a missing key: that is a miss.
    async fn get_prefix(&self, key: &str, n: usize) -> Option<Vec<u8>> {
        let end = n.checked_sub(1)? as isize;
        let result = self.connection("get").await?.getrange::<_, Vec<u8>>(redis_key(key), 0, end).await;
        match result {
            Ok(value) => (!value.is_empty()).then_some(value),
            Err(err) => {
                self.failed("get", err).await;
                None
            }
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        if value.len() > self.max_entry_bytes {
            return;
        }
        let ttl = ttl.as_secs().max(1);
        let Some(mut connection) = self.connection("put").await else { return };
        if let Err(err) = connection.set_ex::<_, _, ()>(redis_key(key), value, ttl).await {
            self.failed("put", err).await;
        }
    }
}
