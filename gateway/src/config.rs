//! `gateway serve` flags: where the workers are, the limits on requests, TLS, the API key, the
//! cache and telemetry.

use std::net::SocketAddr;
use std::time::Duration;

use osprey_common::telemetry::TelemetryArgs;

use crate::cache::CacheArgs;

/// `gateway serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address to serve the public gRPC API on.
    #[arg(long, env = "OSPREY_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Also serve HTTP on this address: the annotation page, gRPC-Web for `osprey.v1.Osprey`
    /// and the annotation-tool integrations, with the same TLS and API key. Off when unset.
    #[arg(long, env = "OSPREY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Vision workers, comma-separated `host:port` names (an `http://` prefix is accepted). Each
    /// name is re-resolved every `--resolve-interval` and every address it resolves to is a
    /// replica (a Kubernetes headless Service gives one per pod), e.g. `vision.osprey.svc:50052`.
    #[arg(long, env = "OSPREY_VISION_WORKERS", value_delimiter = ',', required = true)]
    pub vision_workers: Vec<String>,
    /// LLM workers, comma-separated `host:port` names, as `--vision-workers`.
    #[arg(long, env = "OSPREY_LLM_WORKERS", value_delimiter = ',', required = true)]
    pub llm_workers: Vec<String>,
    /// SAM workers, comma-separated `host:port` names, as `--vision-workers`; needed for Segment,
    /// prompt regions and everything mode.
    #[arg(long, env = "OSPREY_SAM_WORKERS", value_delimiter = ',')]
    pub sam_workers: Vec<String>,
    /// Seconds between re-resolutions of the worker names (new addresses join, vanished ones leave).
    #[arg(long, env = "OSPREY_RESOLVE_INTERVAL", default_value_t = 10.0, value_parser = positive_seconds)]
    pub resolve_interval: f64,
    /// Seconds between `grpc.health.v1` checks of every replica; one that is not SERVING is
    /// skipped until a check passes again.
    #[arg(long, env = "OSPREY_HEALTH_INTERVAL", default_value_t = 2.0, value_parser = positive_seconds)]
    pub health_interval: f64,
    /// Serve TLS with this PEM certificate (chain); needs `--tls-key`. Plaintext when unset.
    #[arg(long, env = "OSPREY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "OSPREY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Connect to the workers over TLS, trusting this PEM CA (the workers' `--tls-cert` must be
    /// signed by it). Plaintext when unset.
    #[arg(long, env = "OSPREY_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<std::path::PathBuf>,
    /// The name the workers' certificates are checked against (default: the address dialled,
    /// which after resolution is an IP address).
    #[arg(long, env = "OSPREY_WORKER_TLS_DOMAIN", requires = "worker_tls_ca")]
    pub worker_tls_domain: Option<String>,
    /// The gateway's client certificate for mutual TLS with workers given `--tls-client-ca`;
    /// needs `--worker-tls-key` and `--worker-tls-ca`.
    #[arg(long, env = "OSPREY_WORKER_TLS_CERT", requires_all = ["worker_tls_key", "worker_tls_ca"])]
    pub worker_tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--worker-tls-cert`.
    #[arg(long, env = "OSPREY_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<std::path::PathBuf>,
    /// Clients must send this key as `authorization: Bearer KEY` or `x-api-key: KEY`. Open when
    /// neither this nor `--api-keys-file` is given. Named `default` in metrics.
    #[arg(long, env = "OSPREY_API_KEY")]
    pub api_key: Option<String>,
    /// Several named keys, one a line: `NAME:KEY`, or `NAME:KEY:PER_SECOND:BURST` to limit that
    /// key's requests (over it: RESOURCE_EXHAUSTED with a retry hint); `#` starts a comment. Sent
    /// as `--api-key`'s; requests are counted by key name and status in
    /// `osprey_gateway_requests_total`.
    #[arg(long, env = "OSPREY_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Model revision mixed into image keys; change it when any model's weights change.
    #[arg(long, env = "OSPREY_MODEL_REVISION", default_value = "osprey-7b")]
    pub model_revision: String,
    /// Most regions in one request.
    #[arg(long, env = "OSPREY_MAX_REGIONS", default_value_t = 256)]
    pub max_regions: usize,
    /// Most points per side of everything mode's grid (`everything.points_per_side`; SAM runs
    /// the square of it per crop).
    #[arg(long, env = "OSPREY_MAX_POINTS_PER_SIDE", default_value_t = 64)]
    pub max_points_per_side: u32,
    /// Most tokens one Describe (or Annotate item) may ask to generate: regions (everything
    /// mode: `everything.max_masks`) times `parameters.max_new_tokens` (the LLM worker's default,
    /// 512, when unset).
    #[arg(long, env = "OSPREY_MAX_REQUEST_TOKENS", default_value_t = 256 * 512)]
    pub max_request_tokens: u64,
    /// Largest image file accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_IMAGE_BYTES", default_value_t = 32 << 20)]
    pub max_image_bytes: usize,
    /// Largest decoded image accepted, in pixels.
    #[arg(long, env = "OSPREY_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Longest question accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_QUESTION_BYTES", default_value_t = 4096)]
    pub max_question_bytes: usize,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OSPREY_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Deadline of a request whose client sets none (a client's `grpc-timeout` shorter than this
    /// wins); past it the request ends with DEADLINE_EXCEEDED.
    #[arg(long, env = "OSPREY_REQUEST_TIMEOUT_SECONDS", default_value_t = 600)]
    pub request_timeout_seconds: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl GatewayArgs {
    /// The TLS configuration of the gateway's worker channels, if TLS to workers is on.
    pub fn worker_tls(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        use osprey_common::grpc::read_pem;
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let Some(ca) = &self.worker_tls_ca else { return Ok(None) };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca, "worker CA")?));
        if let Some(domain) = &self.worker_tls_domain {
            config = config.domain_name(domain.clone());
        }
        if let (Some(cert), Some(key)) = (&self.worker_tls_cert, &self.worker_tls_key) {
            let identity =
                Identity::from_pem(read_pem(cert, "client certificate")?, read_pem(key, "client key")?);
            config = config.identity(identity);
        }
        Ok(Some(config))
    }

    /// The deadline of a request whose client sets none.
    pub fn default_deadline(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds.max(1))
    }
}

/// A clap parser for intervals given in seconds.
pub(crate) fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("expected a positive number of seconds, got {text:?}")),
    }
}
