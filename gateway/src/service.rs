//! Server start: `gateway serve` builds the gateway from its flags, finds the workers and serves
//! `osprey.v1.Osprey` (behind the API key check, over TLS if configured) until shutdown, and with
//! `--http-listen` the HTTP side ([`crate::http`]) beside it.

use std::sync::Arc;

use crate::auth::{ApiKeyCheck, KeyedService};
pub use crate::config::GatewayArgs;
use crate::handlers::OspreyService;
use crate::state::Gateway;

/// Serves the public API (and, with `--http-listen`, the HTTP side) until `shutdown`, then drains.
pub async fn run(
    args: GatewayArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = tls_config(&args)?;
    let http_tls = crate::http::tls_config(&args)?;
    let (routes, health) = osprey_common::grpc::standard_routes(&["osprey.v1.Osprey"]).await;
    let keys = ApiKeyCheck::from_flags(args.api_key.as_deref(), args.api_keys_file.as_deref())?;
    let gateway = Arc::new(Gateway::new(&args)?);
    gateway.discover_workers().await;
    let http = match args.http_listen {
        None => None,
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| anyhow::anyhow!("--http-listen {address}: {e}"))?;
            Some((listener, crate::http::router(gateway.clone(), &args, &keys)))
        }
    };
    let server = osprey_proto::v1::osprey_server::OspreyServer::new(OspreyService(gateway))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let routes = routes.add_service(KeyedService::new(server, keys));
    // One shutdown signal for both sides.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let http = async {
        let Some((listener, router)) = http else { return Ok(()) };
        tracing::info!(address = %listener.local_addr()?, tls = http_tls.is_some(), "serving HTTP");
        crate::http::serve(listener, router, http_tls, until_stopped()).await
    };
    let grpc = async {
        health.set_serving().await;
        tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "serving");
        osprey_common::grpc::serve(listener, routes, &health, tls, until_stopped()).await?;
        anyhow::Ok(())
    };
    tokio::try_join!(grpc, http)?;
    Ok(())
}

/// The server TLS configuration from `--tls-cert` and `--tls-key`, if given.
fn tls_config(args: &GatewayArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    use osprey_common::grpc::read_pem;
    let identity =
        tonic::transport::Identity::from_pem(read_pem(cert, "certificate")?, read_pem(key, "key")?);
    Ok(Some(tonic::transport::ServerTlsConfig::new().identity(identity)))
}

/// `gateway serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: GatewayArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "gateway")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, osprey_common::grpc::shutdown_signal()).await
}
