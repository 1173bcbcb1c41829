//! Server start: `gateway serve` builds the gateway from its flags, finds the workers and serves
//! `osprey.v1.Osprey` (behind the API key check, over TLS if configured) until shutdown.

use std::sync::Arc;

use crate::auth::ApiKeyCheck;
pub use crate::config::GatewayArgs;
use crate::handlers::OspreyService;
use crate::state::Gateway;

/// Serves the public API until `shutdown`, then drains.
pub async fn run(
    args: GatewayArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = tls_config(&args)?;
    let (routes, health) = osprey_common::grpc::standard_routes(&["osprey.v1.Osprey"]).await;
    let gateway = Arc::new(Gateway::new(&args)?);
    gateway.discover_workers().await;
    let server = osprey_proto::v1::osprey_server::OspreyServer::new(OspreyService(gateway))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let api_key = ApiKeyCheck::new(args.api_key.as_deref());
    let routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(server, api_key));
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "serving");
    match tls {
        None => osprey_common::grpc::serve(listener, routes, &health, shutdown).await?,
        Some(tls) => {
            // As osprey_common::grpc::serve, over TLS.
            let drain = async move {
                shutdown.await;
                health.set_not_serving().await;
            };
            tonic::transport::Server::builder()
                .tls_config(tls)?
                .add_routes(routes)
                .serve_with_incoming_shutdown(osprey_common::grpc::incoming(listener), drain)
                .await?
        }
    }
    Ok(())
}

/// The server TLS configuration from `--tls-cert` and `--tls-key`, if given.
fn tls_config(args: &GatewayArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    Ok(Some(tonic::transport::ServerTlsConfig::new().identity(identity)))
}

/// `gateway serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: GatewayArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "gateway")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, osprey_common::grpc::shutdown_signal()).await
}
