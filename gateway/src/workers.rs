//! Sharded worker replicas: one list per worker kind, lazily connected channels, calls routed by
//! rendezvous hashing on the image key and retried on the next replica when one is down or
//! overloaded.

use std::collections::HashMap;
use std::sync::Mutex;

use osprey_common::ServiceError;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::routing::rank;

/// The replicas of one worker kind.
pub struct Replicas {
    kind: &'static str,
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Replicas {
    /// `endpoints` are URLs such as `http://vision-0.vision:50052`; they are checked here and
    /// connected on first use.
    pub fn new(kind: &'static str, endpoints: Vec<String>) -> Result<Self, String> {
        for endpoint in &endpoints {
            Endpoint::from_shared(endpoint.clone())
                .map_err(|e| format!("{kind} worker {endpoint:?}: {e}"))?;
        }
        Ok(Self { kind, endpoints, channels: Mutex::new(HashMap::new()) })
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    fn channel(&self, endpoint: &str) -> Channel {
        let mut channels = self.channels.lock().expect("channel map poisoned. This is a bug.");
        channels
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                Endpoint::from_shared(endpoint.to_string())
                    .expect("endpoints are validated in new(). This is a bug.")
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .connect_lazy()
            })
            .clone()
    }

    /// Runs `call` on the replica preferred for `image_key`, moving on to the next replica when
    /// one is unreachable or overloaded. Other errors are final.
    pub async fn call<T, F, Fut>(&self, image_key: &str, mut call: F) -> Result<T, ServiceError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        if self.endpoints.is_empty() {
            return Err(ServiceError::Unavailable(format!("no {} workers are configured", self.kind)));
        }
        let mut last = None;
        for endpoint in rank(image_key, &self.endpoints) {
            match call(self.channel(endpoint)).await {
                Ok(value) => return Ok(value),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::ResourceExhausted | Code::Unknown
                    ) =>
                {
                    tracing::warn!(kind = self.kind, endpoint, %status, "replica failed; trying the next one");
                    metrics::counter!("osprey_gateway_replica_failures_total", "kind" => self.kind)
                        .increment(1);
                    last = Some(status);
                }
                Err(status) => return Err(status.into()),
            }
        }
        let status = last.expect("at least one replica was tried. This is a bug.");
        Err(ServiceError::Unavailable(format!(
            "every {} worker failed; last: {}",
            self.kind,
            status.message()
        )))
    }
}
