//! Helpers the workspace's tests share, written once. A dev-dependency only: nothing here ships.
//!
//! - [`fixtures`] / [`fixture`]: the committed fixtures under `tests/fixtures/`.
//! - [`rel_l2`]: the relative L2 error every parity test measures against a reference.
//! - [`RedisServer`]: a throwaway `redis-server` (no persistence) on a loopback port.
//! - [`serve_in_process`]: a gRPC server started in the test's own process on a free loopback
//!   port, waited on until its health service reports SERVING, stopped when dropped.
//! - [`parse_args`]: a binary's flags (a worker's `ServeArgs`, the gateway's) from a test's
//!   command line.
//! - [`counted`]: the metric counters some code increments.
//! - [`assert_env_names`]: every flag that reads the environment reads `OSPREY_<FLAG>`.

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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

    /// SIGSTOP: the server hangs (its port still accepts connections, nothing is answered).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal} redis-server");
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

/// Resolves when an [`InProcess`] server is asked to stop (or its handle is dropped): the shutdown
/// future to hand to the server's `run`.
pub struct Stopped(oneshot::Receiver<()>);

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// Binds a free loopback port, runs `start(listener, stopped)` on a task (the server shuts down
/// when `stopped` resolves) and returns once the server's health service reports SERVING.
/// Panics if the server fails or is not serving within two minutes.
pub async fn serve_in_process<F, Fut>(start: F) -> InProcess
where
    F: FnOnce(TcpListener, Stopped) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    serve_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), start).await
}

/// As [`serve_in_process`], on a listener bound beforehand (when a test needs the server's
/// address before it starts it, e.g. to pick which replica owns an image).
pub async fn serve_on<F, Fut>(listener: TcpListener, start: F) -> InProcess
where
    F: FnOnce(TcpListener, Stopped) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let server = start(listener, Stopped(stopped));
    tokio::spawn(async move { server.await.unwrap() });
    osprey_common::grpc::connect_when_serving(&url, "", Duration::from_secs(120)).await.unwrap();
    InProcess { url, stop: Some(stop) }
}

/// Parses `argv` (a program name first) into the flags `A` as the binary would, panicking with the
/// parser's message on a bad command line: `parse_args::<ServeArgs>(["vision-worker", "--weights", dir])`.
pub fn parse_args<A, I, T>(argv: I) -> A
where
    A: clap::Args + clap::FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let command = A::augment_args(clap::Command::new("test"));
    let matches = command.try_get_matches_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    A::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
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

/// Flags that read a variable named by another project's convention instead of `OSPREY_<FLAG>`:
/// OpenTelemetry's exporter settings, which its operators and SDKs already set.
pub const FOREIGN_ENV: &[(&str, &str)] =
    &[("otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"), ("otlp-service-name", "OTEL_SERVICE_NAME")];

/// What is wrong with the environment variables `command` and its subcommands read, one line a
/// problem: an argument reading a variable other than `OSPREY_<FLAG>` (its long flag upper-cased,
/// `-` as `_`) and not in [`FOREIGN_ENV`], or two arguments of one command reading the same one.
pub fn env_name_problems(command: &clap::Command) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stack = vec![(command.get_name().to_string(), command)];
    while let Some((path, command)) = stack.pop() {
        let mut readers: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let env = env.to_string_lossy().into_owned();
            let flag = arg.get_long().map(str::to_string).unwrap_or_else(|| arg.get_id().to_string());
            let own = format!("OSPREY_{}", flag.to_uppercase().replace('-', "_"));
            if env != own && !FOREIGN_ENV.contains(&(flag.as_str(), env.as_str())) {
                problems.push(format!("{path} --{flag} reads {env}, not {own}"));
            }
            readers.entry(env).or_default().push(format!("--{flag}"));
        }
        for (env, flags) in readers.into_iter().filter(|(_, flags)| flags.len() > 1) {
            problems.push(format!("{path}: {} read the same variable {env}", flags.join(", ")));
        }
        for sub in command.get_subcommands() {
            stack.push((format!("{path} {}", sub.get_name()), sub));
        }
    }
    problems
}

/// Panics listing [`env_name_problems`] of `command` (a binary's `CommandFactory::command()`).
pub fn assert_env_names(command: &clap::Command) {
    let problems = env_name_problems(command);
    assert!(problems.is_empty(), "environment variable names:\n{}", problems.join("\n"));
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

    #[test]
    fn parse_args_reads_flags_and_defaults() {
        #[derive(clap::Args)]
        struct Flags {
            #[arg(long, default_value_t = 1)]
            size: u32,
            #[arg(long)]
            name: Option<String>,
        }
        let flags: Flags = parse_args(["tool", "--size", "7"]);
        assert_eq!((flags.size, flags.name), (7, None));
    }

    #[test]
    fn env_names_are_osprey_flag_names_read_once_per_command() {
        use clap::{Arg, Command};
        let ok = Command::new("worker")
            .arg(Arg::new("max_batch_size").long("max-batch-size").env("OSPREY_MAX_BATCH_SIZE"))
            .arg(Arg::new("otlp_endpoint").long("otlp-endpoint").env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .arg(Arg::new("image").long("image"));
        assert_eq!(env_name_problems(&ok), Vec::<String>::new());

        let bad = Command::new("tool").subcommand(
            Command::new("serve")
                .arg(Arg::new("listen").long("listen").env("LISTEN"))
                .arg(Arg::new("weights").long("weights").env("OSPREY_WEIGHTS"))
                .arg(Arg::new("sam_weights").long("sam-weights").env("OSPREY_WEIGHTS"))
                .arg(Arg::new("device").long("device").env("OTEL_SERVICE_NAME")),
        );
        assert_eq!(
            env_name_problems(&bad),
            [
                "tool serve --listen reads LISTEN, not OSPREY_LISTEN",
                "tool serve --sam-weights reads OSPREY_WEIGHTS, not OSPREY_SAM_WEIGHTS",
                "tool serve --device reads OTEL_SERVICE_NAME, not OSPREY_DEVICE",
                "tool serve: --weights, --sam-weights read the same variable OSPREY_WEIGHTS",
            ]
        );
    }
}
