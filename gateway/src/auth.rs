//! The API key check on every public call (health and reflection stay open for probes): named
//! keys (`--api-key`, `--api-keys-file`), each with an optional rate limit, and per-key request
//! counts in `osprey_gateway_requests_total{key, status}` (the key's name, never the key).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{self, HeaderMap, StatusCode};
use tonic::server::NamedService;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The name `--api-key` gets in metrics.
pub const SINGLE_KEY_NAME: &str = "default";
/// The `key` label of calls to a gateway with no keys configured.
const OPEN_NAME: &str = "open";
/// The `key` label of calls refused for a missing or unknown key.
const UNKNOWN_NAME: &str = "unknown";

/// One configured key.
struct ApiKey {
    name: String,
    /// The key's BLAKE3 digest: comparing digests takes the same time whatever the key given,
    /// its length included (`blake3::Hash` compares in constant time).
    digest: blake3::Hash,
    limit: Option<Mutex<TokenBucket>>,
}

/// A rate limit: `per_second` requests on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: RateLimit) -> Self {
        Self { limit, tokens: limit.burst, last: Instant::now() }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.limit.per_second))
        }
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No key, or one that is not configured.
    Unauthenticated,
    /// The key `name` is over its rate limit; a token is back after `retry_after`.
    RateLimited { name: String, retry_after: Duration },
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated => Code::Unauthenticated,
            Self::RateLimited { .. } => Code::ResourceExhausted,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Unauthenticated => "missing or invalid API key".into(),
            Self::RateLimited { name, retry_after } => {
                format!(
                    "API key {name:?} is over its rate limit; retry in {} ms",
                    retry_after.as_millis().max(1)
                )
            }
        }
    }

    /// The gRPC status, with a `google.rpc.RetryInfo` hint when rate limited; counted with every
    /// other failure.
    pub fn into_status(self) -> Status {
        osprey_common::error::count_failure(self.code());
        let message = self.message();
        match self {
            Self::Unauthenticated => Status::unauthenticated(message),
            Self::RateLimited { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
        }
    }

    /// The `key` label a refused call is counted under.
    pub fn key_label(&self) -> String {
        match self {
            Self::Unauthenticated => UNKNOWN_NAME.into(),
            Self::RateLimited { name, .. } => name.clone(),
        }
    }
}

/// The configured keys; every call is open when there are none.
#[derive(Clone)]
pub struct ApiKeyCheck {
    keys: Arc<Vec<ApiKey>>,
}

impl ApiKeyCheck {
    /// Named keys, each with an optional rate limit.
    pub fn new(keys: impl IntoIterator<Item = (String, String, Option<RateLimit>)>) -> Self {
        let keys = keys
            .into_iter()
            .map(|(name, key, limit)| ApiKey {
                name,
                digest: blake3::hash(key.as_bytes()),
                limit: limit.map(|limit| Mutex::new(TokenBucket::new(limit))),
            })
            .collect();
        Self { keys: Arc::new(keys) }
    }

    /// Every call open.
    pub fn open() -> Self {
        Self::new([])
    }

    /// `--api-key` (named [`SINGLE_KEY_NAME`]) and the keys of `--api-keys-file`.
    pub fn from_flags(single: Option<&str>, file: Option<&Path>) -> anyhow::Result<Self> {
        let mut keys: Vec<_> =
            single.map(|key| (SINGLE_KEY_NAME.to_string(), key.to_string(), None)).into_iter().collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?;
            keys.extend(
                parse_keys_file(&text)
                    .map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?,
            );
        }
        let mut names: Vec<&str> = keys.iter().map(|(name, _, _)| name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            anyhow::bail!("API key name {:?} is used twice", pair[0]);
        }
        Ok(Self::new(keys))
    }

    /// The configured key among `given`, if any. Every candidate is compared with every key
    /// (no early exit), so the time taken says nothing about which key matched.
    fn find<'a>(&self, given: impl Iterator<Item = &'a str>) -> Option<&ApiKey> {
        let mut found = None;
        for candidate in given {
            let digest = blake3::hash(candidate.as_bytes());
            for key in self.keys.iter() {
                if key.digest == digest && found.is_none() {
                    found = Some(key);
                }
            }
        }
        found
    }

    /// Admits a call carrying `given` keys: the key's name (`"open"` when no keys are
    /// configured), after taking one request from its rate limit.
    pub fn admit<'a>(&self, given: impl Iterator<Item = &'a str>) -> Result<String, Refusal> {
        if self.keys.is_empty() {
            return Ok(OPEN_NAME.into());
        }
        let key = self.find(given).ok_or(Refusal::Unauthenticated)?;
        if let Some(bucket) = &key.limit {
            let taken = bucket.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now());
            if let Err(retry_after) = taken {
                return Err(Refusal::RateLimited { name: key.name.clone(), retry_after });
            }
        }
        Ok(key.name.clone())
    }

    /// Whether the headers carry a configured key (no rate limit taken).
    pub fn accepts_headers(&self, headers: &HeaderMap) -> bool {
        self.keys.is_empty() || self.find(grpc_keys(headers).into_iter()).is_some()
    }

    /// [`Self::admit`] on a gRPC (or gRPC-Web) call's headers.
    pub fn admit_headers(&self, headers: &HeaderMap) -> Result<String, Refusal> {
        self.admit(grpc_keys(headers).into_iter())
    }
}

/// The keys a gRPC call may carry: `authorization: Bearer KEY` and `x-api-key: KEY`.
fn grpc_keys(headers: &HeaderMap) -> Vec<&str> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = value("authorization").and_then(|v| v.strip_prefix("Bearer "));
    bearer.into_iter().chain(value("x-api-key")).collect()
}

/// `--api-keys-file`: one key a line, `NAME:KEY` or `NAME:KEY:PER_SECOND:BURST` (a rate limit);
/// blank lines and lines starting with `#` are skipped. Names and keys hold no `:` or spaces.
pub fn parse_keys_file(text: &str) -> Result<Vec<(String, String, Option<RateLimit>)>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate().map(|(i, line)| (i + 1, line.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let bad = |problem: &str| {
            Err(format!("line {n}: {problem} (expected NAME:KEY or NAME:KEY:PER_SECOND:BURST)"))
        };
        let (name, key, limit) = match fields.as_slice() {
            [name, key] => (name, key, None),
            [name, key, per_second, burst] => {
                let (Ok(per_second), Ok(burst)) = (per_second.parse::<f64>(), burst.parse::<f64>()) else {
                    return bad("the rate limit is not two numbers");
                };
                if !(per_second.is_finite() && per_second > 0.0 && burst.is_finite() && burst >= 1.0) {
                    return bad("the rate must be above 0 and the burst at least 1");
                }
                (name, key, Some(RateLimit { per_second, burst }))
            }
            _ => return bad("wrong number of fields"),
        };
        if name.is_empty()
            || key.is_empty()
            || name.contains(char::is_whitespace)
            || key.contains(char::is_whitespace)
        {
            return bad("empty name or key, or one with spaces");
        }
        keys.push((name.to_string(), key.to_string(), limit));
    }
    Ok(keys)
}

/// Counts a call of key `name` that ended (or began answering) with `status`.
pub fn count(name: &str, status: Code) {
    metrics::counter!("osprey_gateway_requests_total", "key" => name.to_string(), "status" => osprey_common::error::code_label(status))
        .increment(1);
}

/// A gRPC service behind the key check: refused calls are answered here; admitted ones are
/// counted under their key's name with the status they are answered with (a call refused before
/// answering carries it in its headers; a call that starts answering counts as OK, so a stream
/// that fails midway is not counted again).
#[derive(Clone)]
pub struct KeyedService<S> {
    inner: S,
    keys: ApiKeyCheck,
}

impl<S> KeyedService<S> {
    pub fn new(inner: S, keys: ApiKeyCheck) -> Self {
        Self { inner, keys }
    }
}

impl<S: NamedService> NamedService for KeyedService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for KeyedService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.keys.admit_headers(request.headers()) {
            Err(refusal) => {
                count(&refusal.key_label(), refusal.code());
                let response = refusal.into_status().into_http();
                Box::pin(std::future::ready(Ok(response)))
            }
            Ok(name) => {
                let answered = self.inner.call(request);
                Box::pin(async move {
                    let response = answered.await?;
                    let status = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(Code::Ok, Code::from);
                    count(&name, status);
                    Ok(response)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, http::HeaderValue::from_static(value));
        }
        headers
    }

    fn single(key: &str) -> ApiKeyCheck {
        ApiKeyCheck::from_flags(Some(key), None).unwrap()
    }

    #[test]
    fn only_the_key_opens() {
        let check = single("sesame");
        assert_eq!(
            check.admit_headers(&headers(&[("authorization", "Bearer sesame")])),
            Ok("default".into())
        );
        assert_eq!(check.admit_headers(&headers(&[("x-api-key", "sesame")])), Ok("default".into()));
        for (header, value) in [
            ("authorization", "sesame"),
            ("authorization", "Bearer sesam"),
            ("x-api-key", "sesame2"),
            ("x-api-key", ""),
        ] {
            let refusal = check.admit_headers(&headers(&[(header, value)])).unwrap_err();
            assert_eq!(refusal, Refusal::Unauthenticated, "{header}: {value}");
            let counted = osprey_test_support::counted(|| {
                assert_eq!(refusal.into_status().code(), Code::Unauthenticated);
            });
            assert_eq!(counted, [("osprey_request_failures_total{code=UNAUTHENTICATED}".to_string(), 1)]);
        }
        assert!(check.admit_headers(&HeaderMap::new()).is_err());
        assert!(!check.accepts_headers(&headers(&[("x-api-key", "sesam")])));
        assert!(check.accepts_headers(&headers(&[("x-api-key", "sesame")])));
        assert_eq!(ApiKeyCheck::open().admit_headers(&HeaderMap::new()), Ok("open".into()));
        assert!(ApiKeyCheck::open().accepts_headers(&HeaderMap::new()));
    }

    #[test]
    fn each_named_key_is_known_by_its_name() {
        let file = "# team keys\nalice:a-key\n\nbob:b-key:2:1\n";
        let check = ApiKeyCheck::new(parse_keys_file(file).unwrap());
        assert_eq!(check.admit(["a-key"].into_iter()), Ok("alice".into()));
        assert_eq!(check.admit(["b-key"].into_iter()), Ok("bob".into()));
        // One of several candidates (the integrations read several headers) is enough.
        assert_eq!(check.admit(["nope", "a-key"].into_iter()), Ok("alice".into()));
        assert_eq!(check.admit(["c-key"].into_iter()), Err(Refusal::Unauthenticated));
        // --api-key and the file together; a name used twice is refused.
        let dir = std::env::temp_dir().join(format!("osprey-keys-{}", std::process::id()));
        std::fs::write(&dir, "default:other\n").unwrap();
        let both = ApiKeyCheck::from_flags(Some("k"), Some(&dir));
        std::fs::write(&dir, file).unwrap();
        let ok = ApiKeyCheck::from_flags(Some("k"), Some(&dir)).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(both.err().unwrap().to_string().contains("\"default\" is used twice"));
        assert_eq!(ok.admit(["k"].into_iter()), Ok("default".into()));
        assert_eq!(ok.admit(["a-key"].into_iter()), Ok("alice".into()));
    }

    #[test]
    fn bad_key_files_say_which_line() {
        for (text, line) in [
            ("alice\n", "line 1"),
            ("ok:k\nbob:b:x:1\n", "line 2"),
            ("bob:b:0:1", "line 1"),
            ("bob:b:1:0.5", "line 1"),
            (":k", "line 1"),
            ("a b:k", "line 1"),
            ("a:b:c", "line 1"),
        ] {
            let error = parse_keys_file(text).unwrap_err();
            assert!(error.starts_with(line), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_rate_limited_key_is_refused_with_a_retry_hint() {
        let check = ApiKeyCheck::new([
            ("slow".to_string(), "s".to_string(), Some(RateLimit { per_second: 0.5, burst: 2.0 })),
            ("free".to_string(), "f".to_string(), None),
        ]);
        assert!(check.admit(["s"].into_iter()).is_ok());
        assert!(check.admit(["s"].into_iter()).is_ok());
        let refusal = check.admit(["s"].into_iter()).unwrap_err();
        let Refusal::RateLimited { name, retry_after } = &refusal else { panic!("{refusal:?}") };
        assert_eq!(name, "slow");
        // Two tokens spent at 0.5/s: the next is about 2 s away (less what the test took).
        assert!(
            *retry_after > Duration::from_secs(1) && *retry_after <= Duration::from_secs(2),
            "{retry_after:?}"
        );
        let mut status = None;
        let counted = osprey_test_support::counted(|| status = Some(refusal.clone().into_status()));
        let status = status.unwrap();
        assert_eq!(counted, [("osprey_request_failures_total{code=RESOURCE_EXHAUSTED}".to_string(), 1)]);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.get_error_details().retry_info().and_then(|r| r.retry_delay), Some(*retry_after));
        assert_eq!(refusal.http_status(), StatusCode::TOO_MANY_REQUESTS);
        // Other keys are not limited by it.
        for _ in 0..10 {
            assert!(check.admit(["f"].into_iter()).is_ok());
        }
    }

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_the_burst() {
        let start = Instant::now();
        let mut bucket =
            TokenBucket { limit: RateLimit { per_second: 10.0, burst: 3.0 }, tokens: 3.0, last: start };
        for _ in 0..3 {
            assert!(bucket.take(start).is_ok());
        }
        let wait = bucket.take(start).unwrap_err();
        assert!(wait.abs_diff(Duration::from_millis(100)) < Duration::from_micros(1), "{wait:?}");
        assert!(bucket.take(start + Duration::from_millis(100)).is_ok());
        // A long pause refills the burst, not more.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.take(later).is_ok());
        }
        assert!(bucket.take(later).is_err());
    }
}
