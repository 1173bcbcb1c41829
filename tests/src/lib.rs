//! The end-to-end harness: the real `vision-worker`, `llm-worker`, `sam-worker` and `gateway`
//! binaries as child processes on loopback addresses with the demo weights of `tests/fixtures`, a
//! real `redis-server`, and helpers that drive the public API and read the services' Prometheus
//! metrics. Used by the tests in `tests/tests/` and the benchmark in `tests/benches/`.
//!
//! A child is killed when its [`Process`] is dropped (also when a test panics), and the kernel
//! kills it should the test process itself die first (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
pub use osprey_client::Client;
use osprey_client::ConnectOptions;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, CacheTier, DescribeTask};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The demo weights, sample images and masks.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

/// The gateway's default `--model-revision`, part of every image key.
pub const MODEL_REVISION: &str = "osprey-7b";

/// How long a service may take to become SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// `127.0.0.{n}`: every test gets its own loopback addresses.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// The built binary `name` of this workspace, next to the test or bench executable
/// (`target/<profile>/deps/…` → `target/<profile>/name`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("the test executable has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the binaries first (`cargo build --bins` for the tests, \
             `cargo build --release --bins` for the benchmark; `cargo test --workspace` does it)",
            path.display()
        );
    }
    Ok(path)
}

/// A port free on `ip` right now (and on every address, for the Prometheus listeners that bind
/// 0.0.0.0).
fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?.local_addr()?.port();
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on {ip}")
}

/// One service as a child process, restartable on the same address.
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The address it serves on (gRPC, or Redis' port).
    pub addr: SocketAddr,
    /// Its Prometheus `/metrics` port (gRPC services only).
    pub metrics_port: Option<u16>,
}

impl Process {
    fn spawn(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        addr: SocketAddr,
        metrics_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join("osprey-e2e");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{name}-{}-{}.log", addr.ip(), addr.port()));
        let mut process =
            Self { name: name.to_string(), program, args, log, child: None, addr, metrics_port };
        process.start()?;
        Ok(process)
    }

    /// Starts the process again (after [`Self::kill`]) with the same flags and address. Call it
    /// from the thread that owns the test: the kernel's parent-death signal follows that thread.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("OSPREY_LOG_LEVEL", std::env::var("OSPREY_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap: the abrupt death of a crashed or preempted machine.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` for the drain to finish (SIGKILL after that): how an
    /// orchestrator scales a replica down.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else { return };
        // SAFETY: signalling our own child by its pid, which is not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, `libc::SIGTERM`, …) to the running
    /// process and returns at once.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let child = self.child.as_ref().with_context(|| format!("{} is not running", self.name))?;
        // SAFETY: signalling our own child by its pid, which is not reaped yet.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            bail!("signal {signal} to {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself (nothing is sent to it): its exit
    /// status, or `None` if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://ip:port`, as the gateway's replica lists name it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `grpc.health.v1` says SERVING (or, for Redis, the port accepts connections).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if !self.is_running() {
                bail!("{} exited during start-up; its log ends:\n{}", self.name, self.log_tail());
            }
            let ready = if self.metrics_port.is_some() {
                self.is_serving().await
            } else {
                tokio::net::TcpStream::connect(self.addr).await.is_ok()
            };
            if ready {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} did not become ready in {START_TIMEOUT:?}; its log ends:\n{}", self.name, self.log_tail())
    }

    /// Whether its overall `grpc.health.v1` status is SERVING.
    pub async fn is_serving(&self) -> bool {
        osprey_common::grpc::is_serving(&self.url(), "").await
    }

    /// Its Prometheus text exposition.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let port = self.metrics_port.with_context(|| format!("{} has no metrics port", self.name))?;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("GET /metrics on {}: {head}", self.name);
        }
        Ok(body.to_string())
    }

    /// The sum of the samples of `name` whose labels include `labels` (0 when there are none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics().await?, name, labels))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sums the samples of metric `name` carrying every label in `labels` in a Prometheus text
/// exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels.iter().all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\"")));
            if wanted { value.parse::<f64>().ok() } else { None }
        })
        .fold(0.0, |sum, v| sum + v)
}

fn weights(path: &str) -> String {
    Path::new(FIXTURES).join(path).display().to_string()
}

/// A gRPC service binary with `serve --listen ip:port --prometheus-port P` and `args`.
fn grpc_service(
    name: &str,
    binary_name: &str,
    ip: IpAddr,
    args: Vec<String>,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let addr = SocketAddr::new(ip, free_port(ip)?);
    let metrics_port = free_port(ip)?;
    let mut argv = vec!["serve".to_string()];
    argv.extend(args);
    argv.extend(["--listen".into(), addr.to_string(), "--prometheus-port".into(), metrics_port.to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn(name, binary(binary_name)?, argv, addr, Some(metrics_port))
}

/// `vision-worker serve` with the demo vision weights.
pub fn vision_worker(ip: IpAddr, extra: &[&str]) -> anyhow::Result<Process> {
    let args = vec!["--weights".into(), weights("vision/tiny/tiny_st")];
    grpc_service("vision-worker", "vision-worker", ip, args, extra)
}

/// `llm-worker serve` with the demo LLM weights.
pub fn llm_worker(ip: IpAddr, extra: &[&str]) -> anyhow::Result<Process> {
    let args = vec!["--weights".into(), weights("llm/tiny")];
    grpc_service("llm-worker", "llm-worker", ip, args, extra)
}

/// `{binary} serve --weights DIR`: a vision or LLM worker on another checkpoint (the benchmarks').
pub fn worker_with_weights(
    binary: &str,
    ip: IpAddr,
    weights: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    grpc_service(binary, binary, ip, vec!["--weights".into(), weights.into()], extra)
}

/// `sam-worker serve` with the demo SAM weights.
pub fn sam_worker(ip: IpAddr, extra: &[&str]) -> anyhow::Result<Process> {
    let args = vec![
        "--weights".into(),
        weights("sam/tiny_sam.pth"),
        "--config".into(),
        weights("sam/tiny_config.json"),
    ];
    grpc_service("sam-worker", "sam-worker", ip, args, extra)
}

/// The official MobileSAM checkpoint, fetched into the git-ignored `.cache/` by
/// `tools/fetch_mobile_sam.sh` (tools/setup_test_env.sh runs it).
pub fn mobile_sam_weights() -> PathBuf {
    Path::new(FIXTURES).join("../../.cache/weights/mobile_sam.pt")
}

/// `sam-worker serve` with the real MobileSAM weights: masks that follow the objects clicked.
pub fn mobile_sam_worker(ip: IpAddr, extra: &[&str]) -> anyhow::Result<Process> {
    let weights = mobile_sam_weights();
    if !weights.is_file() {
        bail!("{} is missing: run tools/setup_test_env.sh (it fetches MobileSAM)", weights.display());
    }
    let args = vec!["--weights".into(), weights.display().to_string()];
    grpc_service("sam-worker", "sam-worker", ip, args, extra)
}

/// The worker replicas a gateway is pointed at.
#[derive(Default)]
pub struct Workers<'a> {
    pub vision: Vec<&'a Process>,
    pub llm: Vec<&'a Process>,
    pub sam: Vec<&'a Process>,
}

/// `gateway serve` in front of `workers`, with `extra` flags (`--redis-url`, `--api-key`, …).
pub fn gateway(ip: IpAddr, workers: &Workers, extra: &[&str]) -> anyhow::Result<Process> {
    let urls = |list: &[&Process]| list.iter().map(|p| p.url()).collect::<Vec<_>>().join(",");
    gateway_for_urls(ip, &urls(&workers.vision), &urls(&workers.llm), &urls(&workers.sam), extra)
}

/// `gateway serve` with replica lists given as comma-separated URLs (some may not be running yet).
pub fn gateway_for_urls(
    ip: IpAddr,
    vision: &str,
    llm: &str,
    sam: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let mut args = vec!["--vision-workers".into(), vision.into(), "--llm-workers".into(), llm.into()];
    if !sam.is_empty() {
        args.extend(["--sam-workers".into(), sam.into()]);
    }
    grpc_service("gateway", "gateway", ip, args, extra)
}

/// A throwaway `redis-server` (no persistence) on `ip`.
pub fn redis_server(ip: IpAddr) -> anyhow::Result<Process> {
    let addr = SocketAddr::new(ip, free_port(ip)?);
    let program = which("redis-server").context("redis-server must be on PATH (.ci/run installs it)")?;
    let args =
        ["--port", &addr.port().to_string(), "--bind", &ip.to_string(), "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
    Process::spawn("redis-server", program, args, addr, None)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A TCP proxy on loopback in front of one service, adding latency on demand: every chunk of
/// bytes, in either direction, is passed on `latency` after it arrived (in order; throughput is
/// not limited). Point a gateway's replica list at [`Self::url`] to slow that replica down
/// without touching it. Stops when dropped.
pub struct LatencyProxy {
    /// The address clients connect to.
    pub addr: SocketAddr,
    latency_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    /// Starts one on a free port of `ip`, forwarding to `upstream` (no latency until set).
    pub async fn start(ip: IpAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let latency_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let latency = latency_ms.clone();
        let task = tokio::spawn(async move {
            // Aborting the accept loop drops the set, which aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let latency = latency.clone();
                connections.spawn(async move {
                    // Upstream down: dropping the client's connection tells it at once.
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    // Either side closing ends the connection (after what was in transit).
                    tokio::select! {
                        _ = delayed_copy(client_read, server_write, latency.clone()) => {}
                        _ = delayed_copy(server_read, client_write, latency) => {}
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, latency_ms, task })
    }

    /// `http://ip:port`, for a gateway's replica list.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The latency added to bytes that arrive from now on, each way.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk held until `latency` after it was read.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer).await {
            let latency = Duration::from_millis(latency_ms.load(std::sync::atomic::Ordering::SeqCst));
            if tx.send((tokio::time::Instant::now() + latency, buffer[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Waits until every one of `processes` is ready.
pub async fn wait_all(processes: &mut [&mut Process]) -> anyhow::Result<()> {
    for process in processes.iter_mut() {
        process.wait_ready().await?;
    }
    Ok(())
}

/// Connects to the gateway `process` with the client library, sending `api_key` when given.
pub async fn client(process: &Process, api_key: Option<&str>) -> anyhow::Result<Client> {
    let options =
        ConnectOptions { endpoint: process.url(), api_key: api_key.map(String::from), ..Default::default() };
    osprey_client::connect(&options).await
}

/// An encoded image with its decoded size and image key.
#[derive(Clone)]
pub struct TestImage {
    pub name: String,
    pub bytes: Vec<u8>,
    pub height: u32,
    pub width: u32,
    pub key: String,
}

impl TestImage {
    pub fn load(relative: &str) -> anyhow::Result<Self> {
        let path = Path::new(FIXTURES).join(relative);
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let image = decode_image(&bytes, &ImageLimits::default())?;
        Ok(Self {
            name: relative.to_string(),
            height: image.height(),
            width: image.width(),
            key: image.key(MODEL_REVISION),
            bytes,
        })
    }
}

/// The sample photo (157x103) the vision fixtures were made from.
pub fn photo() -> TestImage {
    TestImage::load("vision/photo.png").expect("the sample photo is in tests/fixtures")
}

/// A dozen small images with distinct pixels (so distinct image keys): the photo and variants of
/// scikit-image's Chelsea in several formats and orientations.
pub fn images() -> Vec<TestImage> {
    let names = [
        "vision/photo.png",
        "images/chelsea_rgba.png",
        "images/chelsea_exif_orient8.jpg",
        "images/chelsea_q90_422.jpg",
        "images/chelsea_gray_alpha.png",
        "images/chelsea_q90_444.jpg",
        "images/chelsea_q90_420.jpg",
        "images/chelsea_q50_restart.jpg",
        "images/chelsea_gray_q90.jpg",
        "images/chelsea_exif_orient6.jpg",
        "images/chelsea_exif_orient3.jpg",
        "images/chelsea_lossy_q80.webp",
    ];
    let images: Vec<TestImage> =
        names.iter().map(|n| TestImage::load(n).expect("fixture images are in tests/fixtures")).collect();
    let mut keys: Vec<&str> = images.iter().map(|i| i.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), images.len(), "the test images must have distinct pixels");
    images
}

/// `n` distinct box masks tiling an image of `height` x `width`, of varying sizes.
pub fn box_masks(height: u32, width: u32, n: usize) -> Vec<Mask> {
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (cell_w, cell_h) = (width as f64 / cols as f64, height as f64 / rows as f64);
    (0..n)
        .map(|k| {
            let (x, y) = ((k % cols) as f64 * cell_w, (k / cols) as f64 * cell_h);
            // Every other box spans two cells, so the masks differ in size as well as place.
            let span = 1.0 + (k % 2) as f64;
            let w = (cell_w * span).min(width as f64 - x);
            let h = (cell_h * span).min(height as f64 - y);
            Mask::from_bbox(height, width, [x, y, w, h]).expect("boxes inside the image")
        })
        .collect()
}

/// Mask regions of the public API (compressed COCO RLE), labelled `box-{k}`.
pub fn mask_regions(masks: &[Mask]) -> Vec<v1::Region> {
    masks
        .iter()
        .enumerate()
        .map(|(k, mask)| v1::Region {
            source: Some(v1::region::Source::Mask(v1::Mask {
                format: Some(v1::mask::Format::Rle(rle_to_proto(&mask.to_rle()))),
            })),
            label: format!("box-{k}"),
        })
        .collect()
}

/// A greedy SHORT describe of `regions` of `image` with answers of at most `max_new_tokens`.
pub fn describe_request(
    image: &TestImage,
    regions: Vec<v1::Region>,
    max_new_tokens: u32,
) -> v1::DescribeRequest {
    v1::DescribeRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Encoded(image.bytes.clone())) }),
        regions,
        everything: None,
        task: DescribeTask::Short as i32,
        parameters: Some(v1::GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
    }
}

/// Runs a describe to the end; results in region order.
pub async fn describe(
    client: &mut Client,
    request: v1::DescribeRequest,
) -> Result<Vec<v1::RegionResult>, tonic::Status> {
    let mut stream = client.describe(request).await?.into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await? {
        results.push(result);
    }
    results.sort_by_key(|r| r.region_index);
    Ok(results)
}

/// Where a result's image features came from.
pub fn features_tier(result: &v1::RegionResult) -> CacheTier {
    result
        .metadata
        .as_ref()
        .and_then(|m| m.cache.as_ref())
        .and_then(|c| CacheTier::try_from(c.vision_features).ok())
        .unwrap_or(CacheTier::Unspecified)
}

/// Median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_matches_name_and_labels() {
        let text = "# TYPE a counter\na_total{tier=\"redis\",hit=\"true\"} 3\na_total{tier=\"redis\",hit=\"false\"} 2\n\
                    a_total_x 7\nb 1.5\n";
        assert_eq!(metric_sum(text, "a_total", &[]), 5.0);
        assert_eq!(metric_sum(text, "a_total", &[("hit", "true")]), 3.0);
        assert_eq!(metric_sum(text, "a_total", &[("hit", "maybe")]), 0.0);
        assert_eq!(metric_sum(text, "b", &[]), 1.5);
    }

    #[test]
    fn box_masks_are_distinct_and_inside() {
        for n in [1, 16, 64] {
            let masks = box_masks(103, 157, n);
            assert_eq!(masks.len(), n);
            assert!(masks.iter().all(|m| m.area() > 0));
            let mut rles: Vec<String> = masks.iter().map(|m| m.to_rle().to_compressed()).collect();
            rles.sort();
            rles.dedup();
            assert_eq!(rles.len(), n);
        }
    }
}
