//! The one Rust client of the public `osprey.v1` API, used by the annotate CLI, osprey-eval, the
//! end-to-end tests and `gateway local`: how to reach the gateway (TLS with a private CA, the API
//! key on every call) and how to wait out a gateway that is briefly unavailable (retries with
//! exponential backoff on UNAVAILABLE). Also what the batch clients share: [`coco`] reads COCO
//! masks, [`journal`] makes long runs resumable.

pub mod coco;
pub mod journal;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use osprey_proto::v1::osprey_client::OspreyClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// A connected client; every call carries the API key, when there is one.
pub type Client = OspreyClient<InterceptedService<Channel, ApiKey>>;

/// Where the gateway is and how to prove who we are.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `http://host:port`, or `https://host:port` for TLS.
    pub endpoint: String,
    /// Sent as `authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// PEM certificate of the CA that signed the gateway's certificate (`https://` endpoints).
    pub ca_cert: Option<PathBuf>,
    /// How often to retry while the gateway is unreachable or UNAVAILABLE.
    pub retry: Retry,
}

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(bearer) = &self.0 {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Exponential backoff: `first`, doubled after each try up to `max_delay`, for `attempts` tries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 5, first: Duration::from_millis(200), max_delay: Duration::from_secs(5) }
    }
}

impl Retry {
    /// The wait before try `attempt` (1 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.first.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(self.max_delay)
    }

    /// Runs `call` until it succeeds, fails with anything but UNAVAILABLE, or the tries run out.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(status) if status.code() == Code::Unavailable && attempt + 1 < self.attempts.max(1) => {
                    attempt += 1;
                    tokio::time::sleep(self.delay(attempt)).await;
                }
                other => return other,
            }
        }
    }
}

/// Connects to the gateway (retrying while it cannot be reached) with no message size limit.
pub async fn connect(options: &ConnectOptions) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(options.endpoint.clone()).context("endpoint")?;
    if let Some(ca) = &options.ca_cert {
        let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?;
    }
    let bearer = match &options.api_key {
        Some(key) => {
            Some(format!("Bearer {key}").parse().context("the API key is not a valid header value")?)
        }
        None => None,
    };
    let channel = options
        .retry
        .run(|| async { endpoint.connect().await.map_err(|e| Status::unavailable(e.to_string())) })
        .await
        .with_context(|| format!("connecting to {}", options.endpoint))?;
    Ok(OspreyClient::with_interceptor(channel, ApiKey(bearer))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn quick(attempts: u32) -> Retry {
        Retry { attempts, first: Duration::from_millis(1), max_delay: Duration::from_millis(4) }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let retry =
            Retry { attempts: 9, first: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        let delays: Vec<u128> = (1..=6).map(|a| retry.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[tokio::test]
    async fn unavailable_is_retried_other_codes_are_not() {
        let calls = AtomicU32::new(0);
        let answer = quick(5)
            .run(|| async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 2 { Err(Status::unavailable("starting")) } else { Ok(n) }
            })
            .await;
        assert_eq!(answer.unwrap(), 2);

        calls.store(0, Ordering::SeqCst);
        let refused = quick(5)
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::invalid_argument("bad"))
            })
            .await;
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let gone = quick(3)
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Status::unavailable("down"))
            })
            .await;
        assert_eq!(gone.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "three tries in all");
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_an_error_after_the_retries() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = ConnectOptions {
            endpoint: format!("http://127.0.0.1:{port}"),
            retry: quick(2),
            ..Default::default()
        };
        let err = connect(&options).await.unwrap_err();
        assert!(format!("{err:#}").contains("connecting to"), "{err:#}");
    }
}
