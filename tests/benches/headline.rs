//! The headline at full size: the real gateway, vision and LLM workers (separate processes on
//! loopback, SAM off, masks given) on a checkpoint with ConvNeXt-L at 512 and a LLaMA of hidden
//! 2048 x 8 layers (`tools/bench_headline.py checkpoint`), against the official per-mask loop in
//! PyTorch on the same weights (`tools/bench_headline.py reference`: encode, pool, prefill and
//! generate for every mask). Prints a Markdown section for docs/BENCHMARKS.md.
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p osprey-e2e --bench headline -- --weights DIR [--reference FILE.json]
//!     [--ns 1,16,64,256] [--runs 2] [--in-flight 4] [--max-new-tokens 8]
//! ```
//!
//! Every cold run sends a fresh image (one pixel changed), so its features and the LLM's prefix
//! are computed in that request; the warm run repeats the request (features resident on the vision
//! worker, prefix cached in the LLM worker; no result cache). The per-mask loop does the same work
//! for every mask, so its regions/s is 1 / (median seconds per mask).

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use osprey_common::image::{ImageLimits, decode_image};
use osprey_e2e::*;
use osprey_proto::v1::{self, CacheTier};

struct Options {
    weights: PathBuf,
    reference: Option<PathBuf>,
    ns: Vec<usize>,
    runs: usize,
    in_flight: usize,
    max_new_tokens: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        weights: PathBuf::from(FIXTURES).join("../../.cache/headline"),
        reference: None,
        ns: vec![1, 16, 64, 256],
        runs: 2,
        in_flight: 4,
        max_new_tokens: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--weights" => options.weights = value()?.into(),
            "--reference" => options.reference = Some(value()?.into()),
            "--ns" => options.ns = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--runs" => options.runs = value()?.parse()?,
            "--in-flight" => options.in_flight = value()?.parse()?,
            "--max-new-tokens" => options.max_new_tokens = value()?.parse()?,
            "--bench" => {} // cargo bench passes it to harness-less benches
            other => anyhow::bail!(
                "unknown argument {other:?} (--weights, --reference, --ns, --runs, --in-flight, --max-new-tokens)"
            ),
        }
    }
    anyhow::ensure!(
        options.weights.join("model.safetensors").is_file(),
        "no checkpoint in {}: run `tools/bench_headline.py checkpoint {}` first",
        options.weights.display(),
        options.weights.display()
    );
    Ok(options)
}

/// The sample photo with pixel (0, 0) set from `nonce`: a new image key, the same work.
fn fresh_image(nonce: u32) -> anyhow::Result<TestImage> {
    let photo = photo();
    let mut rgb = image::load_from_memory(&photo.bytes)?.to_rgb8();
    let [r, g, b] = nonce.to_le_bytes()[..3].try_into()?;
    rgb.put_pixel(0, 0, image::Rgb([r, g, b]));
    let mut bytes = Vec::new();
    rgb.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    let decoded = decode_image(&bytes, &ImageLimits::default())?;
    Ok(TestImage {
        name: format!("photo.png (pixel 0,0 = {nonce})"),
        key: decoded.key(MODEL_REVISION),
        height: decoded.height(),
        width: decoded.width(),
        bytes,
    })
}

/// One Describe's wall time, its stage times (ms, first answer's metadata) and the gateway's bytes
/// to and from the workers during it.
struct Timed {
    seconds: f64,
    encode_ms: f64,
    pool_ms: f64,
    llm_ms: f64,
    bytes: [f64; 4],
}

/// `osprey_gateway_worker_bytes_total` for vision sent/received, LLM sent/received.
async fn worker_bytes(gateway: &Process) -> anyhow::Result<[f64; 4]> {
    let text = gateway.metrics().await?;
    let get = |kind, direction| {
        metric_sum(&text, "osprey_gateway_worker_bytes_total", &[("kind", kind), ("direction", direction)])
    };
    Ok([get("vision", "sent"), get("vision", "received"), get("llm", "sent"), get("llm", "received")])
}

async fn timed(
    client: &mut Client,
    gateway: &Process,
    request: v1::DescribeRequest,
    tier: CacheTier,
) -> anyhow::Result<Timed> {
    let n = request.regions.len();
    let before = worker_bytes(gateway).await?;
    let start = Instant::now();
    let results = describe(client, request).await?;
    let seconds = start.elapsed().as_secs_f64();
    let after = worker_bytes(gateway).await?;
    anyhow::ensure!(results.len() == n, "{} of {n} regions answered", results.len());
    for result in &results {
        anyhow::ensure!(result.generated_tokens > 0, "region {} has no answer", result.region_index);
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
        bytes: std::array::from_fn(|i| after[i] - before[i]),
    })
}

/// Median of one field over runs.
fn med(runs: &[Timed], f: impl Fn(&Timed) -> f64) -> f64 {
    median(&runs.iter().map(f).collect::<Vec<_>>())
}

/// The per-mask loop's JSON (tools/bench_headline.py reference).
struct Reference {
    per_mask_s: f64,
    encode_s: f64,
    llm_s: f64,
    masks_timed: u64,
    versions: String,
}

fn reference(path: &PathBuf) -> anyhow::Result<Reference> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let num = |k: &str| json[k].as_f64().ok_or_else(|| anyhow::anyhow!("{} has no {k}", path.display()));
    Ok(Reference {
        per_mask_s: num("per_mask_s")?,
        encode_s: num("encode_s")?,
        llm_s: num("llm_s")?,
        masks_timed: json["masks_timed"].as_u64().unwrap_or(0),
        versions: format!(
            "torch {}, timm {}, transformers {}, {} threads",
            json["torch"].as_str().unwrap_or("?"),
            json["timm"].as_str().unwrap_or("?"),
            json["transformers"].as_str().unwrap_or("?"),
            json["threads"]
        ),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let reference = options.reference.as_ref().map(reference).transpose()?;
    let weights = options.weights.display().to_string();
    let started = Instant::now();
    let mut vision = worker_with_weights("vision-worker", loopback(71), &weights, &[])?;
    let mut llm = worker_with_weights("llm-worker", loopback(72), &weights, &[])?;
    wait_all(&mut [&mut vision, &mut llm]).await?;
    let no_results = ["--result-cache-ttl-seconds", "0", "--request-timeout-seconds", "3600"];
    let mut gateway =
        gateway(loopback(73), &Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] }, &no_results)?;
    wait_all(&mut [&mut gateway]).await?;
    let mut client = client(&gateway, None).await?;
    eprintln!("workers ready after {:.0} s", started.elapsed().as_secs_f64());

    let tokens = options.max_new_tokens;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut nonce = 1;
    let mut next_image = || -> anyhow::Result<TestImage> {
        nonce += 1;
        fresh_image(nonce)
    };
    // Warm-up: one small request (first allocations, thread pools).
    let image = next_image()?;
    describe(
        &mut client,
        describe_request(&image, mask_regions(&box_masks(image.height, image.width, 1)), tokens),
    )
    .await?;

    let mut rows = Vec::new();
    for &n in &options.ns {
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for _ in 0..options.runs {
            let image = next_image()?;
            let request =
                || describe_request(&image, mask_regions(&box_masks(image.height, image.width, n)), tokens);
            cold.push(timed(&mut client, &gateway, request(), CacheTier::Computed).await?);
            warm.push(timed(&mut client, &gateway, request(), CacheTier::Resident).await?);
        }
        eprintln!(
            "N = {n}: cold {:.2} s, warm {:.2} s",
            med(&cold, |t| t.seconds),
            med(&warm, |t| t.seconds)
        );
        rows.push((n, cold, warm));
    }

    // Several images in flight at once: K fresh images, 16 regions each, sent together.
    let per_image = 16;
    let mut in_flight_s = Vec::new();
    for _ in 0..options.runs {
        let images = (0..options.in_flight).map(|_| next_image()).collect::<anyhow::Result<Vec<_>>>()?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for image in images {
            let mut client = client.clone();
            let request = describe_request(
                &image,
                mask_regions(&box_masks(image.height, image.width, per_image)),
                tokens,
            );
            tasks.push(tokio::spawn(async move { describe(&mut client, request).await }));
        }
        for task in tasks {
            let results = task.await??;
            anyhow::ensure!(results.len() == per_image, "{} of {per_image} regions answered", results.len());
        }
        in_flight_s.push(start.elapsed().as_secs_f64());
    }
    let in_flight_rps = (options.in_flight * per_image) as f64 / median(&in_flight_s);

    println!("## Headline: full size, end to end (`cargo bench -p osprey-e2e --bench headline`)\n");
    println!(
        "The real binaries as separate processes on loopback (release build, SAM off, masks given): `gateway serve`, \
         `vision-worker serve`, `llm-worker serve` on the checkpoint of `tools/bench_headline.py checkpoint` \
         (random weights, official key layout): ConvNeXt-L at 512 (depths 3/3/27/3), the mask extractor, a LLaMA of \
         hidden 2048, 8 layers, 16 heads, intermediate 5632, vocabulary 32000 + 2. Image: `vision/photo.png` \
         (157x103), a fresh copy (one pixel changed) for every cold request; N box masks as compressed RLE; task \
         SHORT, greedy, {tokens} new tokens per region; medians of {} runs; load average before: {}.\n",
        options.runs,
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    match &reference {
        Some(r) => println!(
            "Baseline: the official per-mask loop ({}) on the same checkpoint: for every mask encode the image, \
             pool, splice, prefill and generate {tokens} tokens: {:.2} s per mask (encode {:.2} s, LLM {:.2} s; \
             median of {} masks), so {:.4} regions/s at any N.\n",
            r.versions,
            r.per_mask_s,
            r.encode_s,
            r.llm_s,
            r.masks_timed,
            1.0 / r.per_mask_s
        ),
        None => println!("Baseline: not measured in this run (no --reference).\n"),
    }
    println!(
        "| regions per image | cold s | cold regions/s | warm s | warm regions/s | per-mask loop regions/s | cold / loop | warm / loop |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, cold, warm) in &rows {
        let (cs, ws) = (med(cold, |t| t.seconds), med(warm, |t| t.seconds));
        let (crps, wrps) = (*n as f64 / cs, *n as f64 / ws);
        let (base, cr, wr) = match &reference {
            Some(r) => {
                let b = 1.0 / r.per_mask_s;
                (format!("{b:.4}"), format!("{:.1}x", crps / b), format!("{:.1}x", wrps / b))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("| {n} | {cs:.2} | {crps:.2} | {ws:.2} | {wrps:.2} | {base} | {cr} | {wr} |");
    }
    println!(
        "\n{} images in flight at once, {per_image} regions each (fresh images, sent together): {:.2} regions/s \
         (median wall {:.2} s of {} runs).\n",
        options.in_flight,
        in_flight_rps,
        median(&in_flight_s),
        options.runs
    );
    println!(
        "Where a request's time goes (medians, ms; first answer's metadata: features = the gateway's wait for the \
         image's features, LLM = prefill + decode of the batch until that answer; other = wall - the three, i.e. \
         transport, serialisation, copies and the answers after the first) and the bytes between the gateway and \
         its workers (`osprey_gateway_worker_bytes_total`, per request):\n"
    );
    println!(
        "| regions | run | wall ms | features | pool | LLM | other | to vision B | from vision B | to LLM B | from LLM B |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, cold, warm) in &rows {
        for (name, runs) in [("cold", cold), ("warm", warm)] {
            let wall = 1e3 * med(runs, |t| t.seconds);
            let (f, p, l) = (med(runs, |t| t.encode_ms), med(runs, |t| t.pool_ms), med(runs, |t| t.llm_ms));
            let b: [f64; 4] = std::array::from_fn(|i| med(runs, |t| t.bytes[i]));
            println!(
                "| {n} | {name} | {wall:.0} | {f:.0} | {p:.0} | {l:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                wall - f - p - l,
                b[0],
                b[1],
                b[2],
                b[3]
            );
        }
    }
    println!();
    Ok(())
}
