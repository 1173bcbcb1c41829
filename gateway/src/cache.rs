//! The feature cache shared by every gateway replica (architecture.md §3): image features (and
//! the pixels of registered images) keyed by image key, so that an image is encoded once however
//! many regions, requests and replicas ask about it.
//!
//! Two backends, one interface: Redis when `--redis-url` is given, process memory otherwise. A
//! cache failure never fails a request: it is logged, counted in
//! `osprey_feature_cache_errors_total`, and the caller recomputes.

use std::sync::Mutex;
use std::time::Duration;

use osprey_common::lru::ByteLru;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex as AsyncMutex;

/// Feature cache flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Redis URL (e.g. `redis://redis:6379/0`) of the feature cache shared by all gateway
    /// replicas. Without it, features are cached in this process's memory.
    #[arg(long, env)]
    pub redis_url: Option<String>,
    /// How long cached features live, in seconds.
    #[arg(long, env, default_value_t = 24 * 3600)]
    pub cache_ttl_seconds: u64,
    /// Entries larger than this are not cached (bytes).
    #[arg(long, env, default_value_t = 64 << 20)]
    pub cache_max_entry_bytes: usize,
    /// Size of the in-memory cache used when no Redis URL is given (bytes).
    #[arg(long, env, default_value_t = 2 << 30)]
    pub memory_cache_bytes: usize,
    /// Redis connect and response timeout, in milliseconds; a slower Redis counts as a miss.
    #[arg(long, env, default_value_t = 2000)]
    pub redis_timeout_ms: u64,
}

/// Where cached features live.
pub enum FeatureCache {
    Memory(MemoryCache),
    Redis(RedisCache),
}

impl FeatureCache {
    pub fn from_args(args: &CacheArgs) -> Result<Self, redis::RedisError> {
        Ok(match &args.redis_url {
            Some(url) => Self::Redis(RedisCache::new(
                url,
                Duration::from_secs(args.cache_ttl_seconds),
                Duration::from_millis(args.redis_timeout_ms),
                args.cache_max_entry_bytes,
            )?),
            None => Self::Memory(MemoryCache::new(args.memory_cache_bytes, args.cache_max_entry_bytes)),
        })
    }

    /// Which tier this is, for metrics and logs.
    pub fn tier(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// The cached bytes for `key`, or `None` on a miss or a cache failure.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let found = match self {
            Self::Memory(cache) => cache.get(key),
            Self::Redis(cache) => cache.get(key).await,
        };
        metrics::counter!("osprey_feature_cache_lookups_total", "tier" => self.tier(), "hit" => found.is_some().to_string())
            .increment(1);
        found
    }

    /// Stores `value` under `key` (best effort).
    pub async fn put(&self, key: &str, value: Vec<u8>) {
        match self {
            Self::Memory(cache) => cache.put(key, value),
            Self::Redis(cache) => cache.put(key, value).await,
        }
    }
}

/// The Redis key of a cache key: everything Osprey stores lives under `osprey:`.
fn redis_key(key: &str) -> String {
    format!("osprey:{key}")
}

/// The cache key of an image's vision features.
pub fn features_key(image_key: &str) -> String {
    format!("features:{image_key}")
}

/// The cache key of an image's decoded pixels (registered images).
pub fn pixels_key(image_key: &str) -> String {
    format!("pixels:{image_key}")
}

/// Features in this process's memory, least recently used evicted first.
pub struct MemoryCache {
    entries: Mutex<ByteLru<String, std::sync::Arc<Vec<u8>>>>,
    max_entry_bytes: usize,
}

impl MemoryCache {
    pub fn new(capacity_bytes: usize, max_entry_bytes: usize) -> Self {
        Self { entries: Mutex::new(ByteLru::new(capacity_bytes)), max_entry_bytes }
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let hit = self.entries.lock().expect("cache lock poisoned. This is a bug.").get(&key.to_string());
        hit.map(|value| value.as_ref().clone())
    }

    fn put(&self, key: &str, value: Vec<u8>) {
        if value.len() <= self.max_entry_bytes {
            let bytes = value.len();
            let mut entries = self.entries.lock().expect("cache lock poisoned. This is a bug.");
            entries.insert(key.to_string(), std::sync::Arc::new(value), bytes);
        }
    }
}

/// Features in Redis, with a TTL. The connection is made lazily and remade after failures, so a
/// gateway starts, and keeps serving, while Redis is down.
pub struct RedisCache {
    client: redis::Client,
    connection: AsyncMutex<Option<ConnectionManager>>,
    ttl: Duration,
    timeout: Duration,
    max_entry_bytes: usize,
}

impl RedisCache {
    pub fn new(
        url: &str,
        ttl: Duration,
        timeout: Duration,
        max_entry_bytes: usize,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: AsyncMutex::new(None),
            ttl,
            timeout,
            max_entry_bytes,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connection = self.client.get_connection_manager_with_config(config).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn failed(&self, operation: &'static str, err: redis::RedisError) {
        tracing::warn!(%err, operation, "feature cache unavailable; recomputing");
        metrics::counter!("osprey_feature_cache_errors_total", "operation" => operation).increment(1);
        // Drop the connection so the next call reconnects from scratch.
        if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal()
        {
            *self.connection.lock().await = None;
        }
    }

    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let result = async { self.connection().await?.get::<_, Option<Vec<u8>>>(redis_key(key)).await }.await;
        match result {
            Ok(value) => value,
            Err(err) => {
                self.failed("get", err).await;
                None
            }
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        if value.len() > self.max_entry_bytes {
            return;
        }
        let ttl = self.ttl.as_secs().max(1);
        let result =
            async { self.connection().await?.set_ex::<_, _, ()>(redis_key(key), value, ttl).await }.await;
        if let Err(err) = result {
            self.failed("put", err).await;
        }
    }
}
