//! The gateway's HTTP side (`--http-listen`): the annotation page (assets embedded in the
//! binary), gRPC-Web for `osprey.v1.Osprey` (the page's only API) and the annotation-tool
//! integrations, with the same TLS certificate and API key as the gRPC side.

use std::future::Future;
use std::sync::Arc;

use axum::http::{HeaderValue, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use osprey_proto::v1::osprey_server::OspreyServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tonic::service::LayerExt;

use crate::auth::{ApiKeyCheck, KeyedService};
use crate::config::GatewayArgs;
use crate::handlers::OspreyService;
use crate::state::Gateway;

/// A file of the annotation page, embedded at build time (the bundle is committed, so building
/// the gateway needs no Node).
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_bytes!("../web/index.html") },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/dist/app.js"),
    },
    Asset {
        path: "/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../web/app.css"),
    },
];

/// Every HTTP route: the page's assets (open: they hold nothing secret), gRPC-Web for
/// `osprey.v1.Osprey` and the integrations (both behind the API key, which each integration
/// reads from the headers its tool sends).
pub fn router(gateway: Arc<Gateway>, args: &GatewayArgs, api_key: &ApiKeyCheck) -> axum::Router {
    let osprey = OspreyServer::new(OspreyService(gateway.clone()))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let grpc_web = tonic_web::GrpcWebLayer::new().named_layer(KeyedService::new(osprey, api_key.clone()));
    // A base64 (grpc-web-text) message is 4/3 of its size; twice the limit covers any we accept.
    let refused =
        RefusedCall { api_key: api_key.clone(), drain_limit: args.max_message_bytes.saturating_mul(2) };
    // Each integration checks the key as its tool sends it (basic auth, a Token header...).
    let integrations = crate::integrations::router(OspreyService(gateway), api_key.clone());
    let mut router = axum::Router::new()
        .route_service("/osprey.v1.Osprey/{*method}", grpc_web)
        .route_layer(axum::middleware::from_fn_with_state(refused, read_refused_body));
    for asset in ASSETS {
        let headers = [
            (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
            // Revalidate every time: a new gateway build may serve a new page.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ];
        router = router.route(asset.path, axum::routing::get(move || async move { (headers, asset.body) }));
    }
    router.merge(integrations)
}

#[derive(Clone)]
struct RefusedCall {
    api_key: ApiKeyCheck,
    /// Bytes read from a refused call's body at most; past them the connection just closes.
    drain_limit: usize,
}

/// Reads (and drops) the body of a gRPC-Web call whose key is refused before the refusal is
/// sent. Answering first and closing the connection while the upload still arrives makes the
/// client's TCP stack see a reset, and a browser then reports "Failed to fetch" instead of the
/// UNAUTHENTICATED answer. The refusal itself still comes from the key check behind.
async fn read_refused_body(
    axum::extract::State(refused): axum::extract::State<RefusedCall>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tokio_stream::StreamExt;
    if refused.api_key.accepts_headers(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let mut chunks = body.into_data_stream();
    let mut read = 0usize;
    while let Some(Ok(chunk)) = chunks.next().await {
        read += chunk.len();
        if read > refused.drain_limit {
            break;
        }
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::empty())).await
}

/// The rustls server configuration from `--tls-cert` and `--tls-key` (the files the gRPC side
/// reads), offering HTTP/2 and HTTP/1.1.
pub fn tls_config(args: &GatewayArgs) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert, "certificate")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key, "key")?)
        .map_err(|e| anyhow::anyhow!("TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Serves `router` on `listener` (HTTP/1.1 and HTTP/2, over TLS when `tls` is given) until
/// `shutdown`; then stops accepting and lets open connections finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // As the gRPC side: no Nagle delay on small responses.
        let _ = stream.set_nodelay(true);
        let (router, watcher) = (router.clone(), graceful.watcher());
        match acceptor.clone() {
            None => {
                tokio::spawn(serve_connection(stream, router, watcher));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(stream) => serve_connection(stream, router, watcher).await,
                        Err(error) => tracing::debug!(%error, "TLS handshake failed"),
                    }
                });
            }
        }
    }
    graceful.shutdown().await;
    Ok(())
}

async fn serve_connection<I>(io: I, router: axum::Router, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}
