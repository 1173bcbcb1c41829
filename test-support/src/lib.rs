//! Helpers the workspace's tests share, written once. A dev-dependency only: nothing here ships.
//!
//! - [`fixtures`] / [`fixture`]: the committed fixtures under `tests/fixtures/`.
//! - [`rel_l2`]: the relative L2 error every parity test measures against a reference.
//! - [`RedisServer`]: a throwaway `redis-server` (no persistence) on a loopback port.
//! - [`serve_in_process`]: a gRPC server started in the test's own process on a free loopback
//!   port, waited on until its health service reports SERVING, stopped when dropped.
//! - [`counted`]: the metric counters some code increments.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// `tests/fixtures/` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A path under `tests/fixtures/`, e.g. `fixture("vision/photo.png")`.
pub fn fixture(relative: &str) -> PathBuf {
    fixtures().join(relative)
}

/// ‖got − want‖₂ / ‖want‖₂ in f64, or the absolute ‖got − want‖₂ when `want` is all zeros.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if norm > 0.0 { diff.sqrt() / norm.sqrt() } else { diff.sqrt() }
}

/// A throwaway `redis-server` on 127.0.0.1, killed when dropped.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts one on `port` (to bring a stopped server back where clients expect it).
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// Starts one on `port` with more `redis-server` flags (e.g. `--requirepass`).
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (`apt-get install redis-server`; tools/setup_test_env.sh installs it)");
        let server = Self { child, port };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server running in this process until [`InProcess::stop`] is called or it is dropped.
pub struct InProcess {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl InProcess {
    /// Asks the server to shut down (it drains, then its task ends).
    pub fn stop(&mut self) {
        self.stop.take();
    }
}

/// Binds a free loopback port, runs `start(listener, stopped)` on a task (the server shuts down
/// when `stopped` resolves) and returns once the server's health service reports SERVING.
/// Panics if the server fails or is not serving within two minutes.
pub async fn serve_in_process<F, Fut>(start: F) -> InProcess
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    serve_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), start).await
}

/// As [`serve_in_process`], on a listener bound beforehand (when a test needs the server's
/// address before it starts it, e.g. to pick which replica owns an image).
pub async fn serve_on<F, Fut>(listener: TcpListener, start: F) -> InProcess
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let server = start(listener, stopped);
    tokio::spawn(async move { server.await.unwrap() });
    osprey_common::grpc::connect_when_serving(&url, "", Duration::from_secs(120)).await.unwrap();
    InProcess { url, stop: Some(stop) }
}

/// The counters `work` increments on this thread, in order: each as `name{label=value,...}` with
/// the amount (a recorder local to the call, so tests running beside it do not interfere).
pub fn counted(work: impl FnOnce()) -> Vec<(String, u64)> {
    type Seen = Arc<Mutex<Vec<(String, u64)>>>;
    struct Increments(String, Seen);
    impl metrics::CounterFn for Increments {
        fn increment(&self, amount: u64) {
            self.1.lock().unwrap().push((self.0.clone(), amount));
        }
        fn absolute(&self, _: u64) {}
    }
    struct Recorder(Seen);
    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            metrics::Counter::from_arc(Arc::new(Increments(name, self.0.clone())))
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }
    let seen = Seen::default();
    metrics::with_local_recorder(&Recorder(seen.clone()), work);
    seen.lock().unwrap().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_is_relative_and_absolute_against_zeros() {
        assert_eq!(rel_l2(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_l2(&[3.0, 4.5], &[3.0, 4.0]) - 0.1).abs() < 1e-12);
        assert!((rel_l2(&[0.3, 0.4], &[0.0, 0.0]) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn counted_sees_each_increment_with_its_labels() {
        let seen = counted(|| {
            metrics::counter!("a_total", "kind" => "x").increment(2);
            metrics::counter!("b_total").increment(1);
        });
        assert_eq!(seen, [("a_total{kind=x}".to_string(), 2), ("b_total{}".to_string(), 1)]);
    }

    #[test]
    fn fixtures_are_the_committed_ones() {
        assert!(fixture("vision/photo.png").is_file());
    }
}
