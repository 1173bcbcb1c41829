//! `gateway local`: the whole pipeline on this machine — vision, LLM and SAM workers as child
//! processes, the gateway in this process, the in-memory feature cache (or `--redis-url`) —
//! then a sample image with several regions through the public API, printing the answers, the
//! regions' areas and per-stage timings.
//!
//! Without real weights it uses small random demo weights generated in the official key layout
//! (`tools/make_vision_fixtures.py`, `tools/make_llm_fixtures.py`): the answers are meaningless,
//! the machinery is real. SAM uses the official MobileSAM weights, fetched into the git-ignored
//! `.cache/` on first use, or a generated tiny SAM when the fetch fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, CacheTier, DescribeTask};

/// Where the generated demo weights and the sample photo live in the source tree.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// The source tree, for the MobileSAM fetch script and its git-ignored cache.
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// `gateway local` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalArgs {
    /// An Osprey checkpoint directory used by both stages (a real checkpoint holds the vision
    /// tower, the mask extractor, the projector, the LLM and the tokenizer).
    #[arg(long, env = "OSPREY_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Checkpoint for the vision stage only (overrides --weights); default: demo weights.
    #[arg(long, env = "OSPREY_VISION_WEIGHTS")]
    pub vision_weights: Option<PathBuf>,
    /// Checkpoint for the LLM stage only (overrides --weights); default: demo weights.
    #[arg(long, env = "OSPREY_LLM_WEIGHTS")]
    pub llm_weights: Option<PathBuf>,
    /// SAM checkpoint (`.pth` or safetensors; ViT-B/L/H); default: demo weights.
    #[arg(long, env = "OSPREY_SAM_WEIGHTS")]
    pub sam_weights: Option<PathBuf>,
    /// JSON config of a reduced SAM (only for non-official sizes).
    #[arg(long, env = "OSPREY_SAM_CONFIG")]
    pub sam_config: Option<PathBuf>,
    /// Image to describe (PNG, JPEG or WebP); default: the bundled sample photo.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Share features through this Redis instead of the in-memory cache.
    #[arg(long, env = "OSPREY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Address of the public API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// After the demo, keep serving until ctrl-c (with the annotation page on `--http-listen`).
    #[arg(long)]
    pub serve: bool,
    /// Address of the annotation page and gRPC-Web, served with `--serve`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// New tokens per answer.
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: u32,
    /// Seconds each worker, then the gateway, may take to report SERVING (a first start with
    /// weights given by repo id downloads them in this time).
    #[arg(long, default_value_t = 600.0, value_parser = crate::config::positive_seconds)]
    pub start_timeout: f64,
}

/// Child processes, killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a sibling binary (`vision-worker`, `llm-worker`) with `serve`.
fn spawn_worker(name: &str, weights: &Path, port: u16, extra: &[String]) -> anyhow::Result<Child> {
    let binary = std::env::current_exe()?.with_file_name(name);
    if !binary.exists() {
        anyhow::bail!("{} not found: build the workspace first (cargo build --release)", binary.display());
    }
    let child = Command::new(&binary)
        .args(["serve", "--weights"])
        .arg(weights)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        // The workers' TLS flags read the same variables as the gateway's public TLS: the local
        // workers talk to this gateway in plaintext.
        .env_remove("OSPREY_TLS_CERT")
        .env_remove("OSPREY_TLS_KEY")
        .env_remove("OSPREY_TLS_CLIENT_CA")
        // Every process here would bind the same metrics port: only the gateway keeps it.
        .env_remove("OSPREY_PROMETHEUS_PORT")
        .env("OSPREY_LOG_LEVEL", std::env::var("OSPREY_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .spawn()?;
    Ok(child)
}

async fn wait_serving(url: &str, children: &mut Children, timeout: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while Instant::now() < deadline {
        for child in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("a worker exited during start-up ({status})");
            }
        }
        if osprey_common::grpc::is_serving(url, "").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} did not become SERVING within {timeout} s (--start-timeout)")
}

/// The real MobileSAM checkpoint (40 MB), fetched into the git-ignored cache by
/// `tools/fetch_mobile_sam.sh` (which also checks the hash of a cached copy).
fn fetch_mobile_sam() -> Result<PathBuf, String> {
    let repo = Path::new(REPO);
    let script = repo.join("tools/fetch_mobile_sam.sh");
    let output =
        Command::new("bash").arg(&script).output().map_err(|e| format!("{}: {e}", script.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("fetch failed: {}", stderr.trim().lines().last().unwrap_or("no message")));
    }
    Ok(repo.join(".cache/weights/mobile_sam.pt"))
}

/// Runs the demo; returns when it is done (or, with `--serve`, at ctrl-c).
pub async fn main(args: LocalArgs) -> anyhow::Result<()> {
    let demo = args.sam_weights.is_none()
        || args.weights.is_none() && (args.vision_weights.is_none() || args.llm_weights.is_none());
    let vision_weights = args
        .vision_weights
        .clone()
        .or_else(|| args.weights.clone())
        .unwrap_or_else(|| PathBuf::from(FIXTURES).join("vision/tiny/tiny_st"));
    let llm_weights = args
        .llm_weights
        .clone()
        .or_else(|| args.weights.clone())
        .unwrap_or_else(|| PathBuf::from(FIXTURES).join("llm/tiny"));
    if demo {
        println!(
            "Using generated demo weights (random, tiny): the answers are meaningless, the machinery is real."
        );
        println!("Point --weights at an Osprey checkpoint for real answers.\n");
    }

    let (sam_weights, sam_config) = match &args.sam_weights {
        Some(weights) => (weights.clone(), args.sam_config.clone()),
        None => match fetch_mobile_sam() {
            Ok(path) => {
                println!("SAM: the official MobileSAM weights ({}).\n", path.display());
                (path, None)
            }
            Err(why) => {
                println!("SAM: no MobileSAM weights ({why}); using a generated tiny SAM instead.\n");
                let dir = PathBuf::from(FIXTURES).join("sam");
                (dir.join("tiny_sam.pth"), Some(dir.join("tiny_config.json")))
            }
        },
    };
    let (vision_port, llm_port, sam_port) = (free_port()?, free_port()?, free_port()?);
    let mut sam_args = vec![];
    if let Some(config) = &sam_config {
        sam_args = vec!["--config".into(), config.display().to_string()];
    }
    let mut children = Children(vec![
        spawn_worker("vision-worker", &vision_weights, vision_port, &[])?,
        spawn_worker("llm-worker", &llm_weights, llm_port, &[])?,
        spawn_worker("sam-worker", &sam_weights, sam_port, &sam_args)?,
    ]);
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let (vision_url, llm_url, sam_url) = (url(vision_port), url(llm_port), url(sam_port));
    let started = Instant::now();
    for worker in [&vision_url, &llm_url, &sam_url] {
        wait_serving(worker, &mut children, args.start_timeout).await?;
    }
    println!(
        "workers ready in {:.1}s (vision {vision_url}, llm {llm_url}, sam {sam_url})",
        started.elapsed().as_secs_f64()
    );

    let mut argv = vec![
        "gateway".to_string(),
        "--listen".into(),
        args.listen.to_string(),
        "--vision-workers".into(),
        vision_url,
        "--llm-workers".into(),
        llm_url,
        "--sam-workers".into(),
        sam_url,
    ];
    if let Some(url) = &args.redis_url {
        argv.extend(["--redis-url".to_string(), url.clone()]);
    }
    if args.serve {
        argv.extend(["--http-listen".to_string(), args.http_listen.to_string()]);
    }
    let gateway_args = GatewayCli::parse_from(argv).args;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::service::run(gateway_args, listener, async {
        let _ = stopped.await;
    }));
    let url = format!("http://{}", args.listen);
    wait_serving(&url, &mut children, args.start_timeout).await?;
    println!("gateway serving the public API on {url}");
    if args.serve {
        println!("annotation page: http://{}/", args.http_listen);
    }
    println!();

    run_demo(&url, &args).await?;

    if args.serve {
        println!(
            "\nServing until ctrl-c: open http://{}/ (annotation page), or try grpcurl -plaintext {} list",
            args.http_listen, args.listen
        );
        osprey_common::grpc::shutdown_signal().await;
    }
    let _ = stop.send(());
    server.await??;
    drop(children);
    Ok(())
}

#[derive(Parser)]
struct GatewayCli {
    #[command(flatten)]
    args: crate::service::GatewayArgs,
}

/// The sample requests: several regions of one image, described twice (the second time from
/// resident features), then one question about two regions.
async fn run_demo(url: &str, args: &LocalArgs) -> anyhow::Result<()> {
    let path = args.image.clone().unwrap_or_else(|| PathBuf::from(FIXTURES).join("vision/photo.png"));
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let image = decode_image(&bytes, &ImageLimits::default())?;
    let (h, w) = (image.height(), image.width());
    println!("image {} ({w}x{h})", path.display());

    let (fw, fh) = (w as f64, h as f64);
    let ellipse: Vec<f64> = (0..24)
        .flat_map(|i| {
            let t = i as f64 / 24.0 * std::f64::consts::TAU;
            [fw * (0.5 + 0.3 * t.cos()), fh * (0.5 + 0.3 * t.sin())]
        })
        .collect();
    let mask_region = |label: &str, mask: v1::mask::Format| v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask { format: Some(mask) })),
        label: label.into(),
    };
    let box_mask = Mask::from_bbox(h, w, [fw * 0.1, fh * 0.1, fw * 0.35, fh * 0.5])?;
    let regions = vec![
        mask_region(
            "ellipse (polygon)",
            v1::mask::Format::Polygon(v1::PolygonMask {
                height: h,
                width: w,
                polygons: vec![v1::Polygon { xy: ellipse }],
            }),
        ),
        mask_region("box (RLE)", v1::mask::Format::Rle(rle_to_proto(&box_mask.to_rle()))),
        v1::Region {
            source: Some(v1::region::Source::Prompt(v1::SamPrompt {
                points: vec![v1::Point {
                    x: w as f32 / 2.0,
                    y: h as f32 / 2.0,
                    label: v1::PointLabel::Foreground as i32,
                }],
                ..Default::default()
            })),
            label: "SAM point prompt".into(),
        },
        v1::Region {
            source: Some(v1::region::Source::Prompt(v1::SamPrompt {
                r#box: Some(v1::Box {
                    x0: fw as f32 * 0.55,
                    y0: fh as f32 * 0.2,
                    x1: fw as f32 * 0.95,
                    y1: fh as f32 * 0.9,
                }),
                ..Default::default()
            })),
            label: "SAM box prompt".into(),
        },
        mask_region(
            "whole image (RLE counts)",
            v1::mask::Format::Rle(v1::RleMask {
                height: h,
                width: w,
                counts: Some(v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts: vec![0, h * w] })),
            }),
        ),
    ];

    let options = osprey_client::ConnectOptions { endpoint: url.to_string(), ..Default::default() };
    let mut client = osprey_client::connect(&options).await?;
    let parameters =
        Some(v1::GenerationParameters { max_new_tokens: Some(args.max_new_tokens), ..Default::default() });
    for round in ["first request (cold)", "second request (warm)"] {
        println!("== Describe, {round}");
        let request = v1::DescribeRequest {
            image: Some(v1::Image { source: Some(v1::image::Source::Encoded(bytes.clone())) }),
            regions: regions.clone(),
            everything: None,
            task: DescribeTask::Short as i32,
            parameters,
        };
        let mut stream = client.describe(request).await?.into_inner();
        while let Some(result) = stream.message().await? {
            let metadata = result.metadata.unwrap_or_default();
            let timing = metadata.timing.unwrap_or_default();
            let tier = metadata.cache.map(|c| c.vision_features).and_then(|t| CacheTier::try_from(t).ok());
            println!(
                "region {} [{}]: area {} px, bbox {:?}\n  answer: {:?}\n  features {:?}; encode {:.1} ms, pool {:.1} ms, prefill {:.1} ms, decode {:.1} ms, total {:.1} ms",
                result.region_index,
                result.label,
                result.area,
                result.bbox,
                result.text,
                tier.unwrap_or(CacheTier::Unspecified),
                ms(timing.encode_ns),
                ms(timing.pool_ns),
                ms(timing.prefill_ns),
                ms(timing.decode_ns),
                ms(timing.total_ns),
            );
        }
        println!();
    }
    println!("== Describe everything SAM finds (category)");
    let request = v1::DescribeRequest {
        image: Some(v1::Image { source: Some(v1::image::Source::Encoded(bytes.clone())) }),
        regions: vec![],
        // Loose thresholds, so that the random tiny SAM (when MobileSAM is missing) finds masks too.
        everything: Some(v1::EverythingParams {
            points_per_side: Some(8),
            pred_iou_thresh: Some(0.0),
            stability_score_thresh: Some(0.0),
            max_masks: Some(5),
            ..Default::default()
        }),
        task: DescribeTask::Category as i32,
        parameters,
    };
    let mut stream = client.describe(request).await?.into_inner();
    let mut found = 0;
    while let Some(result) = stream.message().await? {
        found += 1;
        let sam_ms = result.metadata.and_then(|m| m.timing).map_or(0.0, |t| ms(t.sam_ns));
        println!(
            "region {} [{}]: area {} px, bbox {:?}, answer {:?}, sam {:.1} ms",
            result.region_index, result.label, result.area, result.bbox, result.text, sam_ms
        );
    }
    println!("everything mode: {found} regions\n");

    println!("== Ask about region1 and region2");
    let answer = client
        .ask(v1::AskRequest {
            image: Some(v1::Image { source: Some(v1::image::Source::Encoded(bytes)) }),
            regions: regions[..2].to_vec(),
            question: "What is the relationship between region1 and region2?".into(),
            parameters,
            verbatim: false,
        })
        .await?
        .into_inner();
    println!("  answer: {:?} ({} tokens)", answer.text, answer.generated_tokens);
    Ok(())
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
