//! End-to-end throughput through the real gateway and workers (separate processes on loopback,
//! demo weights): regions/s for N regions of one image per Describe request, with the image's
//! features cold (encoded during the request) and warm (resident on the routed vision replica),
//! against re-encoding the image for every region (N one-region requests with no feature cache
//! anywhere), all measured in the same run. Prints a Markdown section for docs/BENCHMARKS.md.
//!
//! Needs the release binaries: `cargo build --release --bins`, then
//! `cargo bench -p osprey-e2e --bench e2e -- [--ns 1,16,64] [--runs 5] [--max-new-tokens 8]`.

use std::time::Instant;

use osprey_e2e::*;
use osprey_proto::v1::{self, CacheTier};

struct Options {
    ns: Vec<usize>,
    runs: usize,
    max_new_tokens: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options { ns: vec![1, 16, 64], runs: 5, max_new_tokens: 8 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--ns" => options.ns = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--runs" => options.runs = value()?.parse()?,
            "--max-new-tokens" => options.max_new_tokens = value()?.parse()?,
            "--bench" => {} // cargo bench passes it to harness-less benches
            other => anyhow::bail!("unknown argument {other:?} (--ns, --runs, --max-new-tokens)"),
        }
    }
    Ok(options)
}

/// Wall time of one Describe and the gateway's stage times (ms) in its first result.
struct Timed {
    seconds: f64,
    encode_ms: f64,
    pool_ms: f64,
    llm_ms: f64,
}

/// One timed Describe; checks that every region was answered and where the features came from.
async fn timed(client: &mut Client, request: v1::DescribeRequest, tier: CacheTier) -> anyhow::Result<Timed> {
    let n = request.regions.len();
    let start = Instant::now();
    let results = describe(client, request).await?;
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(results.len() == n, "{} of {n} regions answered", results.len());
    for result in &results {
        let got = features_tier(result);
        anyhow::ensure!(got == tier, "features {got:?}, expected {tier:?}");
    }
    let timing = results[0].metadata.as_ref().and_then(|m| m.timing).unwrap_or_default();
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(Timed {
        seconds,
        encode_ms: ms(timing.encode_ns),
        pool_ms: ms(timing.pool_ns),
        llm_ms: ms(timing.prefill_ns + timing.decode_ns),
    })
}

/// Median regions/s and median stage times (ms) of runs of `n` regions.
fn summary(n: usize, runs: &[Timed]) -> [f64; 4] {
    let med = |f: fn(&Timed) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    [n as f64 / med(|t| t.seconds), med(|t| t.encode_ms), med(|t| t.pool_ms), med(|t| t.llm_ms)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    // The system as deployed: feature cache in the gateway, resident features in the worker.
    let mut vision = vision_worker(loopback(61), &[])?;
    let mut llm = llm_worker(loopback(62), &[])?;
    // The cold runs' and the baseline's system: no resident features, no shared cache and no LLM
    // prefix cache, so every request starts from nothing.
    let mut vision_uncached = vision_worker(loopback(63), &["--max-resident-bytes", "0"])?;
    let mut llm_uncached = llm_worker(loopback(66), &["--prefix-cache-entries", "0"])?;
    wait_all(&mut [&mut vision, &mut llm, &mut vision_uncached, &mut llm_uncached]).await?;
    // No result cache anywhere: repeated questions must really be answered.
    let no_results = ["--result-cache-ttl-seconds", "0"];
    let mut cached =
        gateway(loopback(64), &Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] }, &no_results)?;
    let uncached_flags = ["--result-cache-ttl-seconds", "0", "--memory-cache-bytes", "0"];
    let workers = Workers { vision: vec![&vision_uncached], llm: vec![&llm_uncached], sam: vec![] };
    let mut uncached = gateway(loopback(65), &workers, &uncached_flags)?;
    wait_all(&mut [&mut cached, &mut uncached]).await?;
    let mut cached_client = client(&cached, None).await?;
    let mut uncached_client = client(&uncached, None).await?;

    let image = photo();
    let tokens = options.max_new_tokens;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rows = Vec::new();
    for &n in &options.ns {
        let masks = box_masks(image.height, image.width, n);
        let request = || describe_request(&image, mask_regions(&masks), tokens);
        let singles: Vec<v1::DescribeRequest> =
            mask_regions(&masks).into_iter().map(|r| describe_request(&image, vec![r], tokens)).collect();
        // Warm-up (and the warm runs' features): one request through each system.
        timed(&mut uncached_client, request(), CacheTier::Computed).await?;
        describe(&mut cached_client, request()).await?;
        let (mut cold, mut warm, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..options.runs {
            cold.push(timed(&mut uncached_client, request(), CacheTier::Computed).await?);
            warm.push(timed(&mut cached_client, request(), CacheTier::Resident).await?);
            let mut seconds = 0.0;
            for single in &singles {
                seconds += timed(&mut uncached_client, single.clone(), CacheTier::Computed).await?.seconds;
            }
            baseline.push(n as f64 / seconds);
        }
        let row = (n, summary(n, &cold), summary(n, &warm), median(&baseline));
        eprintln!(
            "N = {n}: cold {:.1}, warm {:.1}, re-encode per region {:.1} regions/s",
            row.1[0], row.2[0], row.3
        );
        rows.push(row);
    }

    // The vision worker's own view of the cold runs: time inside Encode and Pool, without transport.
    let mean_ms = |text: &str, name: &str| {
        1e3 * metric_sum(text, &format!("{name}_sum"), &[]) / metric_sum(text, &format!("{name}_count"), &[])
    };
    let worker_metrics = vision_uncached.metrics().await?;
    let worker_encode_ms = mean_ms(&worker_metrics, "osprey_vision_encode_duration_seconds");
    let worker_pool_ms = mean_ms(&worker_metrics, "osprey_vision_pool_duration_seconds");

    println!("## End-to-end (`cargo bench -p osprey-e2e --bench e2e`)\n");
    println!(
        "The real binaries as separate processes on loopback (release build): `gateway serve`, `vision-worker serve`, \
         `llm-worker serve`, with the **demo weights** of `tests/fixtures` (a 64-pixel vision trunk and a 2-layer LLM), \
         so encoding is cheap here and the ratios understate what caching saves with ConvNeXt-L at 512. Image: \
         `vision/photo.png` (157x103); N box masks as compressed RLE; task SHORT, greedy, {tokens} new tokens per \
         region; medians of {} runs; load average before: {}.\n",
        options.runs,
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "- **cold**: one request with N regions and nothing cached anywhere (features, LLM prefix): one encoding, the N regions pooled together, the N questions batched with one shared prefix."
    );
    println!(
        "- **warm**: the same request when the features are resident on the routed vision worker (no encoding) and the LLM has the image's prefix cached."
    );
    println!(
        "- **re-encode per region** (baseline): N one-region requests in sequence through the uncached system, so the image is encoded (and its prefix computed) N times.\n"
    );
    println!(
        "| regions per image | cold regions/s | warm regions/s | re-encode per region regions/s | cold / baseline | warm / baseline |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, cold, warm, baseline) in &rows {
        let (cold, warm) = (cold[0], warm[0]);
        println!(
            "| {n} | {cold:.1} | {warm:.1} | {baseline:.1} | {:.2}x | {:.2}x |",
            cold / baseline,
            warm / baseline
        );
    }
    println!(
        "\nStage times in the first answer's metadata (medians, ms; features = the gateway's wait for the image's \
         features, LLM = prefill + decode of the batch until that answer):\n"
    );
    println!(
        "| regions per image | cold: features | cold: pool | cold: LLM | warm: features | warm: pool | warm: LLM |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, cold, warm, _) in &rows {
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            cold[1], cold[2], cold[3], warm[1], warm[2], warm[3]
        );
    }
    println!(
        "\nInside the uncached vision worker (its Prometheus histograms, mean over every call of the run): \
         Encode {worker_encode_ms:.1} ms, Pool {worker_pool_ms:.1} ms."
    );
    println!();
    Ok(())
}
