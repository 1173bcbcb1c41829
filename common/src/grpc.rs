//! gRPC server plumbing every service shares: `grpc.health.v1`, server reflection (so `grpcurl`
//! works without `.proto` files), serving on a listener with graceful shutdown on SIGTERM/ctrl-c.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Channel, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// Fail-fast admission control: at most `limit` requests in flight; more are refused with
/// RESOURCE_EXHAUSTED instead of queueing without bound.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    server: &'static str,
}

impl Admission {
    pub fn new(server: &'static str, limit: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit.max(1))), server }
    }

    /// A permit held for the life of the request.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, crate::ServiceError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            crate::ServiceError::Overloaded(format!(
                "the {} is at its concurrency limit; retry later",
                self.server
            ))
        })
    }
}

/// Health status of a server, reported for the whole server (`""`) and for each named service.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
}

impl Health {
    /// SERVING: the model is loaded and warmed up.
    pub async fn set_serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// NOT_SERVING: starting up or draining.
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// The routes every Osprey server starts from: health (NOT_SERVING until `set_serving`) and
/// reflection (v1 and v1alpha). `services` are the fully qualified names of the services this
/// server adds to the routes, e.g. `osprey.worker.v1.Vision`: their health is reported, and
/// reflection lists exactly them plus health and both reflection services (the descriptor sets
/// hold every Osprey service, but listing one a server does not serve invites UNIMPLEMENTED).
pub async fn standard_routes(services: &[&str]) -> (Routes, Health) {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health { reporter, services: services.iter().map(|s| s.to_string()).collect() };
    health.set_not_serving().await;
    let names = listed_services(services);
    let reflection_v1 = reflection_builder(&names)
        .build_v1()
        .expect("the embedded descriptor sets are valid. This is a bug.");
    let reflection_v1alpha = reflection_builder(&names)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid. This is a bug.");
    let routes = Routes::new(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);
    (routes, health)
}

/// What reflection lists on a server serving `services` (with [`standard_routes`]), sorted.
fn listed_services(services: &[&str]) -> Vec<String> {
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let mut names: Vec<String> = services.iter().chain(&standard).map(|s| s.to_string()).collect();
    names.sort();
    names.dedup();
    names
}

/// One builder per reflection version, both given the same descriptors (each version's own
/// reflection descriptor included by default only, which made v1 and v1alpha disagree) and the
/// same service names.
fn reflection_builder(names: &[String]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(osprey_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in names {
        builder = builder.with_service_name(name.clone());
    }
    builder
}

/// Accepted connections of `listener` with Nagle's algorithm off: tonic only sets TCP_NODELAY on
/// listeners it binds itself, and with Nagle on, a response following a large message waits for
/// the peer's delayed ACK (about 40 ms per call on Linux).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A worker's TLS flags: TLS with `--tls-cert`/`--tls-key`, and mutual TLS (only clients with a
/// certificate signed by `--tls-client-ca`, i.e. gateways given `--worker-tls-cert`) with all three.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// Serve TLS with this PEM certificate (chain); needs `--tls-key`. Plaintext when unset.
    #[arg(long, env = "OSPREY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "OSPREY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Accept only clients presenting a certificate signed by this PEM CA (mutual TLS); needs
    /// `--tls-cert`.
    #[arg(long, env = "OSPREY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl ServerTlsArgs {
    /// The server TLS configuration, if TLS is on.
    pub fn config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let identity = Identity::from_pem(read_pem(cert, "certificate")?, read_pem(key, "key")?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(ca, "client CA")?));
        }
        Ok(Some(config))
    }
}

/// A PEM file named in a TLS flag; the error names the file.
pub fn read_pem(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
}

/// Serves `routes` on `listener` (over TLS when `tls` is given) until `shutdown` completes; then
/// reports NOT_SERVING (so load balancers stop sending), stops accepting and lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health: &Health,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let health = health.clone();
    let drain = async move {
        shutdown.await;
        health.set_not_serving().await;
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server.add_routes(routes).serve_with_incoming_shutdown(incoming(listener), drain).await
}

/// Whether the server at `url` answers SERVING for `service` (`""`: the server as a whole).
pub async fn is_serving(url: &str, service: &str) -> bool {
    let Ok(endpoint) = Channel::from_shared(url.to_string()) else { return false };
    let Ok(channel) = endpoint.connect_timeout(Duration::from_secs(1)).connect().await else {
        return false;
    };
    let request = HealthCheckRequest { service: service.to_string() };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    HealthClient::new(channel).check(request).await.is_ok_and(|r| r.into_inner().status == serving)
}

/// Polls [`is_serving`] until it holds (then returns a channel to `url`) or `timeout` passes.
pub async fn connect_when_serving(url: &str, service: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if is_serving(url, service).await {
            return Ok(Channel::from_shared(url.to_string())?.connect().await?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("{url} did not report SERVING within {timeout:?}")
}

/// Completes on SIGTERM (how Kubernetes stops a pod) or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        _ = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
