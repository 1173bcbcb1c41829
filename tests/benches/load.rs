//! Closed-loop load ramp through the real gateway and workers (release build, separate processes on
//! loopback, demo weights, a real Redis): 1, 4, 16, 64 and 256 concurrent clients, each sending
//! greedy Describe calls (masks given) one after the other over a dozen images. For each level:
//! throughput, latency (p50/p99) of answered calls, RESOURCE_EXHAUSTED refusals (how fast, and
//! whether they carry a retry hint) and other failures; then a sustained run at one level. The RSS
//! of every process is sampled from /proc throughout (start, peak, end). Prints a Markdown section
//! for docs/RELIABILITY.md. Not run in CI (`cargo bench --no-run` only compiles it).
//!
//! `cargo build --release --bins`, then
//! `cargo bench -p osprey-e2e --bench load -- [--levels 1,4,16,64,256] [--seconds 20]
//! [--soak-clients 16] [--soak-seconds 120] [--regions 4] [--max-new-tokens 8]
//! [--gateway-limit 512]`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_common::error::StatusExt;
use osprey_e2e::*;
use osprey_proto::v1;
use tonic::Code;

struct Options {
    levels: Vec<usize>,
    seconds: u64,
    soak_clients: usize,
    soak_seconds: u64,
    regions: usize,
    max_new_tokens: u32,
    gateway_limit: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        levels: vec![1, 4, 16, 64, 256],
        seconds: 20,
        soak_clients: 16,
        soak_seconds: 120,
        regions: 4,
        max_new_tokens: 8,
        gateway_limit: 512,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--levels" => options.levels = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seconds" => options.seconds = value()?.parse()?,
            "--soak-clients" => options.soak_clients = value()?.parse()?,
            "--soak-seconds" => options.soak_seconds = value()?.parse()?,
            "--regions" => options.regions = value()?.parse()?,
            "--max-new-tokens" => options.max_new_tokens = value()?.parse()?,
            "--gateway-limit" => options.gateway_limit = value()?.parse()?,
            "--bench" => {} // cargo bench passes it to harness-less benches
            other => anyhow::bail!(
                "unknown argument {other:?} (--levels, --seconds, --soak-clients, --soak-seconds, --regions, \
                 --max-new-tokens, --gateway-limit)"
            ),
        }
    }
    Ok(options)
}

/// How one call ended, and after how long.
enum Ending {
    Answered,
    /// RESOURCE_EXHAUSTED; whether it carried a retry hint (`google.rpc.RetryInfo`).
    Refused {
        hinted: bool,
    },
    Failed(Code),
}

/// The figures of one level.
struct Level {
    clients: usize,
    seconds: f64,
    answered: Vec<f64>,
    refused: Vec<f64>,
    refused_hinted: usize,
    failed: Vec<Code>,
    load_average: String,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `clients` closed-loop clients for `seconds`, over `channels` connections.
async fn run_level(
    channels: &[Client],
    requests: &Arc<Vec<v1::DescribeRequest>>,
    clients: usize,
    seconds: u64,
) -> Level {
    let stop = Arc::new(AtomicBool::new(false));
    let endings = Arc::new(Mutex::new(Vec::<(f64, Ending)>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = channels[c % channels.len()].clone();
        let (requests, stop, endings) = (requests.clone(), stop.clone(), endings.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                let request = requests[k % requests.len()].clone();
                k += 1;
                let start = Instant::now();
                let ending = match describe(&mut client, request).await {
                    Ok(_) => Ending::Answered,
                    Err(status) if status.code() == Code::ResourceExhausted => Ending::Refused {
                        hinted: status.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some(),
                    },
                    Err(status) => Ending::Failed(status.code()),
                };
                let refused = matches!(ending, Ending::Refused { .. });
                endings.lock().unwrap().push((start.elapsed().as_secs_f64(), ending));
                if refused {
                    // The client honours the hint (100 ms) instead of hammering.
                    tokio::time::sleep(osprey_common::error::RETRY_AFTER_OVERLOAD).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut level = Level {
        clients,
        seconds,
        answered: vec![],
        refused: vec![],
        refused_hinted: 0,
        failed: vec![],
        load_average: load_average(),
    };
    for (latency, ending) in std::mem::take(&mut *endings.lock().unwrap()) {
        match ending {
            Ending::Answered => level.answered.push(latency),
            Ending::Refused { hinted } => {
                level.refused.push(latency);
                level.refused_hinted += usize::from(hinted);
            }
            Ending::Failed(code) => level.failed.push(code),
        }
    }
    level
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = text.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model}, {cores} cores")
}

/// VmRSS of `pid` in MiB (None once it is gone).
fn rss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 =
        text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

/// RSS samples of each named process, every 250 ms until stopped.
struct RssSampler {
    samples: Arc<Mutex<Vec<Vec<f64>>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let samples = Arc::new(Mutex::new(vec![Vec::new(); pids.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (i, pid) in pids.iter().enumerate() {
                        if let Some(mib) = rss_mib(*pid) {
                            samples.lock().unwrap()[i].push(mib);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        Self { samples, stop, thread }
    }

    /// The current sample index of each process (to split the run into parts).
    fn marks(&self) -> Vec<usize> {
        self.samples.lock().unwrap().iter().map(Vec::len).collect()
    }

    fn finish(self) -> Vec<Vec<f64>> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let mut redis = redis_server(loopback(71))?;
    let mut vision = vision_worker(loopback(72), &[])?;
    let mut llm = llm_worker(loopback(73), &[])?;
    wait_all(&mut [&mut redis, &mut vision, &mut llm]).await?;
    let redis_url = format!("redis://{}/0", redis.addr);
    let limit = options.gateway_limit.to_string();
    // No result cache: every call is answered by the LLM.
    let flags =
        ["--redis-url", &redis_url, "--result-cache-ttl-seconds", "0", "--max-concurrent-requests", &limit];
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    let mut gateway = gateway(loopback(74), &workers, &flags)?;
    gateway.wait_ready().await?;

    let requests: Arc<Vec<v1::DescribeRequest>> = Arc::new(
        images()
            .iter()
            .map(|image| {
                let masks = box_masks(image.height, image.width, options.regions);
                describe_request(image, mask_regions(&masks), options.max_new_tokens)
            })
            .collect(),
    );
    // HTTP/2 connections shared by the clients, as an application's client pool would.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(client(&gateway, None).await?);
    }
    // Warm-up: every image encoded once.
    for request in requests.iter() {
        describe(&mut channels[0], request.clone()).await?;
    }

    let processes: [(&str, &Process); 4] =
        [("gateway", &gateway), ("vision-worker", &vision), ("llm-worker", &llm), ("redis-server", &redis)];
    let pids = processes.iter().map(|(_, p)| p.pid().expect("running")).collect();
    let sampler = RssSampler::start(pids);
    let load_before = load_average();
    let mut levels = Vec::new();
    for &clients in &options.levels {
        let level = run_level(&channels, &requests, clients, options.seconds).await;
        eprintln!(
            "{clients} clients: {} answered ({:.1}/s), p50 {:.0} ms, p99 {:.0} ms, {} refused, {} failed",
            level.answered.len(),
            level.answered.len() as f64 / level.seconds,
            1e3 * percentile(&level.answered, 0.5),
            1e3 * percentile(&level.answered, 0.99),
            level.refused.len(),
            level.failed.len()
        );
        levels.push(level);
    }
    let ramp_end = sampler.marks();
    let soak = if options.soak_seconds > 0 {
        Some(run_level(&channels, &requests, options.soak_clients, options.soak_seconds).await)
    } else {
        None
    };
    let samples = sampler.finish();

    println!("## Load ramp (`cargo bench -p osprey-e2e --bench load`)\n");
    println!(
        "Release binaries on loopback: `gateway serve` (`--max-concurrent-requests {}`, Redis feature cache, no \
         result cache) in front of one `vision-worker` and one `llm-worker` with the demo weights, and \
         `redis-server`. Each client sends a greedy SHORT Describe of {} box masks ({} new tokens per region) \
         over 12 images, the next as soon as the last ends; a refused call waits the 100 ms retry hint. Each \
         level runs {} s. Machine: {}; load average {} before, per level below.\n",
        options.gateway_limit,
        options.regions,
        options.max_new_tokens,
        options.seconds,
        cpu_model(),
        load_before
    );
    println!(
        "| clients | answered | calls/s | regions/s | p50 (ms) | p99 (ms) | RESOURCE_EXHAUSTED (with retry hint) | refusal p99 (ms) | other failures | load average |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let row = |level: &Level| {
        let rate = level.answered.len() as f64 / level.seconds;
        let failed = if level.failed.is_empty() {
            "0".to_string()
        } else {
            let mut codes: Vec<String> = level.failed.iter().map(|c| format!("{c:?}")).collect();
            codes.sort();
            codes.dedup();
            format!("{} ({})", level.failed.len(), codes.join(", "))
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {} ({}) | {} | {} | {} |",
            level.clients,
            level.answered.len(),
            rate,
            rate * options.regions as f64,
            1e3 * percentile(&level.answered, 0.5),
            1e3 * percentile(&level.answered, 0.99),
            level.refused.len(),
            level.refused_hinted,
            if level.refused.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", 1e3 * percentile(&level.refused, 0.99))
            },
            failed,
            level.load_average
        );
    };
    for level in &levels {
        row(level);
    }
    if let Some(soak) = &soak {
        println!("\nSustained: {} clients for {} s:\n", soak.clients, options.soak_seconds);
        println!(
            "| clients | answered | calls/s | regions/s | p50 (ms) | p99 (ms) | RESOURCE_EXHAUSTED (with retry hint) | refusal p99 (ms) | other failures | load average |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        row(soak);
    }
    println!("\nResident memory (VmRSS, MiB, sampled every 250 ms):\n");
    println!("| process | start | peak over the ramp | end of the ramp | peak sustained | end |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, (name, _)) in processes.iter().enumerate() {
        let s = &samples[i];
        let (ramp, rest) = s.split_at(ramp_end[i].min(s.len()));
        let mib = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let peak = |v: &[f64]| mib(v.iter().copied().reduce(f64::max));
        let last = |v: &[f64]| mib(v.last().copied());
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            mib(s.first().copied()),
            peak(ramp),
            last(ramp),
            peak(rest),
            last(rest)
        );
    }
    println!();
    Ok(())
}
