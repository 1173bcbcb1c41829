//! Logs, traces and metrics, set up the same way in every binary: `fmt` logs (JSON on request)
//! filtered by `OSPREY_LOG_LEVEL`, OpenTelemetry OTLP trace export when `--otlp-endpoint` is set, W3C
//! trace context carried in gRPC metadata across every hop, and a Prometheus endpoint.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Telemetry flags shared by every binary (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    /// OpenTelemetry collector endpoint (OTLP over gRPC, e.g. `http://otel-collector:4317`).
    /// Traces are exported only when this is set. Its variable and `--otlp-service-name`'s are
    /// OpenTelemetry's own (what its operators and SDKs set), not `OSPREY_*`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Service name attached to exported traces; defaults to the binary's name.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
    /// Write logs as JSON lines (for log collectors) instead of text.
    #[arg(long, env = "OSPREY_JSON_OUTPUT")]
    pub json_output: bool,
    /// Serve Prometheus metrics on this port at `/metrics`. Off when unset.
    #[arg(long, env = "OSPREY_PROMETHEUS_PORT")]
    pub prometheus_port: Option<u16>,
}

/// Flushes exported traces when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("failed to flush traces: {err}");
        }
    }
}

/// Installs logging, tracing export and the Prometheus endpoint. Call once, from inside the
/// tokio runtime (the OTLP exporter and the metrics listener run on it).
pub fn init_telemetry(args: &TelemetryArgs, binary_name: &str) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_env("OSPREY_LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_file(true).with_line_number(true);
    let fmt = if args.json_output { fmt.json().flatten_event(true).boxed() } else { fmt.boxed() };

    let provider = match &args.otlp_endpoint {
        Some(endpoint) => {
            let exporter =
                opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
            let service_name = args.otlp_service_name.clone().unwrap_or_else(|| binary_name.to_string());
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(binary_name.to_string())));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init()?;

    if let Some(port) = args.prometheus_port {
        init_prometheus(SocketAddr::from(([0, 0, 0, 0], port)))?;
    }
    Ok(TelemetryGuard { provider })
}

/// Histogram buckets for every metric whose name ends in `_seconds` (Prometheus base unit).
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Histogram buckets for every metric whose name ends in `size` (batch sizes, queue depths).
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Serves the process's `metrics` on `addr` at `/metrics`.
pub fn init_prometheus(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("size".into()), SIZE_BUCKETS)?
        .install()?;
    Ok(())
}

/// Writes the current span's trace context into outgoing gRPC metadata; call on every request
/// a service sends to another, so one trace spans all hops.
pub fn inject_trace_context<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()))
    });
    request
}

/// Makes `span` a child of the trace whose context arrived in `metadata`, if any.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &MetadataMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(metadata))
    });
    // Fails only when the span is disabled, which needs no parent.
    let _ = span.set_parent(parent);
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    #[test]
    fn trace_context_crosses_grpc_metadata() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let caller_trace = caller.context().span().span_context().trace_id();
            let request = caller.in_scope(|| inject_trace_context(tonic::Request::new(())));
            assert!(request.metadata().get("traceparent").is_some(), "no traceparent injected");

            let handler = tracing::info_span!("handler");
            set_parent_from_metadata(&handler, request.metadata());
            assert_eq!(handler.context().span().span_context().trace_id(), caller_trace);

            let unrelated = tracing::info_span!("unrelated");
            assert_ne!(unrelated.context().span().span_context().trace_id(), caller_trace);
        });
    }
}

#[cfg(test)]
mod prometheus_tests {
    use std::io::{Read, Write};

    #[tokio::test]
    async fn metrics_are_served_with_buckets() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        super::init_prometheus(([127, 0, 0, 1], port).into()).unwrap();
        metrics::histogram!("osprey_test_request_duration_seconds").record(0.02);
        metrics::counter!("osprey_test_requests_total").increment(3);
        let body = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).unwrap();
            body
        })
        .await
        .unwrap();
        assert!(body.contains("osprey_test_requests_total 3"), "{body}");
        assert!(body.contains("osprey_test_request_duration_seconds_bucket{le=\"0.025\"} 1"), "{body}");
    }
}
