//! The metrics against reference computations on synthetic predictions
//! (`tests/fixtures/eval/metrics_reference.json` from
//! `clients/osprey-eval/reference/make_metric_fixtures.py`): pycocotools' COCOeval for mask AP,
//! panopticapi's PQ logic, detectron2's mIoU formula, Osprey's POPE and LVIS/PACO scripts, and the
//! literal torch version of the open-vocabulary inference with its 300 queries.

use std::collections::BTreeMap;
use std::path::PathBuf;

use osprey_common::mask::Rle;
use osprey_eval::coco_ap::{self, Detection, GroundTruth, PixelSet};
use osprey_eval::panoptic::{
    self, Category, ClassifiedSegment, Confusion, Panoptic, SegmentInfo, SegmentMap,
};
use osprey_eval::{pope, text};
use serde_json::Value;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/metrics_reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn close(name: &str, ours: f64, reference: f64) {
    assert!((ours - reference).abs() < 1e-9, "{name}: ours {ours}, reference {reference}");
}

fn pixels(segmentation: &Value, height: u32, width: u32) -> PixelSet {
    let counts = segmentation["counts"].as_str().unwrap();
    PixelSet::from_values(Rle::from_compressed(height, width, counts).unwrap().to_mask().data())
}

#[test]
fn pope_matches_the_reference_script() {
    let r = &fixture()["pope"];
    let answers = r["answers"].as_array().unwrap();
    let labels = r["labels"].as_array().unwrap();
    let mut pairs = Vec::new();
    for ((a, l), parsed) in answers.iter().zip(labels).zip(r["parsed"].as_array().unwrap()) {
        let yes = pope::answer_is_yes(a.as_str().unwrap());
        assert_eq!(yes, parsed == "yes", "{a}");
        pairs.push((yes, pope::label_is_yes(l.as_str().unwrap())));
    }
    let m = pope::pope_metrics(&pairs);
    assert_eq!(
        (m.tp, m.fp, m.tn, m.fn_),
        (
            r["tp"].as_u64().unwrap() as usize,
            r["fp"].as_u64().unwrap() as usize,
            r["tn"].as_u64().unwrap() as usize,
            r["fn"].as_u64().unwrap() as usize
        )
    );
    for (name, ours) in [
        ("accuracy", m.accuracy),
        ("precision", m.precision),
        ("recall", m.recall),
        ("f1", m.f1),
        ("yes_ratio", m.yes_ratio),
    ] {
        close(name, ours, f(&r[name]));
    }
}

#[test]
fn category_clean_up_and_semantic_iou_match_the_reference_script() {
    for row in fixture()["category"].as_array().unwrap() {
        let prediction = text::category_prediction(row["raw"].as_str().unwrap());
        let truth = text::category_ground_truth(row["name"].as_str().unwrap());
        assert_eq!(prediction, row["prediction"].as_str().unwrap());
        assert_eq!(truth, row["ground_truth"].as_str().unwrap());
        close("s_iou", text::semantic_iou(&prediction, &truth), f(&row["s_iou"]));
    }
}

fn summary_values(s: &coco_ap::ApSummary) -> [f64; 6] {
    [s.ap, s.ap50, s.ap75, s.ap_small, s.ap_medium, s.ap_large]
}

#[test]
fn mask_ap_matches_pycocotools() {
    let r = &fixture()["ap"];
    let (h, w) = (r["height"].as_u64().unwrap() as u32, r["width"].as_u64().unwrap() as u32);
    let gts: Vec<GroundTruth> = r["ground_truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| GroundTruth {
            image_id: g["image_id"].as_u64().unwrap(),
            category_id: g["category_id"].as_u64().unwrap() as u32,
            mask: pixels(&g["segmentation"], h, w),
            area: f(&g["area"]),
            iscrowd: g["iscrowd"].as_u64().unwrap() == 1,
        })
        .collect();
    let dts: Vec<Detection> = r["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| Detection {
            image_id: d["image_id"].as_u64().unwrap(),
            category_id: d["category_id"].as_u64().unwrap() as u32,
            mask: pixels(&d["segmentation"], h, w),
            score: f(&d["score"]),
        })
        .collect();
    let images: Vec<u64> = r["image_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let ours = summary_values(&coco_ap::evaluate_segm(&images, &gts, &dts));
    let reference: Vec<f64> = r["stats"].as_array().unwrap().iter().map(f).collect();
    println!("mask AP (AP, AP50, AP75, S, M, L): ours {ours:?}, pycocotools {reference:?}");
    for (i, (o, r)) in ours.iter().zip(&reference).enumerate() {
        close(&format!("stats[{i}]"), *o, *r);
    }
}

fn categories(r: &Value) -> Vec<Category> {
    r["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Category {
            id: c["id"].as_u64().unwrap() as u32,
            isthing: c["isthing"].as_u64().unwrap() == 1,
        })
        .collect()
}

fn segments(v: &Value) -> Vec<SegmentInfo> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| SegmentInfo {
            id: s["id"].as_u64().unwrap() as u32,
            category_id: s["category_id"].as_u64().unwrap() as u32,
            iscrowd: s.get("iscrowd").and_then(Value::as_u64) == Some(1),
            area: s.get("area").and_then(Value::as_u64),
        })
        .collect()
}

fn map(v: &Value, h: u32, w: u32) -> SegmentMap {
    SegmentMap {
        height: h,
        width: w,
        ids: v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
    }
}

fn check_pq(ours: &panoptic::PqResult, reference: &Value) {
    for (part, s) in [("all", ours.all), ("things", ours.things), ("stuff", ours.stuff)] {
        let r = &reference[part];
        close(&format!("{part} pq"), s.pq, f(&r["pq"]));
        close(&format!("{part} sq"), s.sq, f(&r["sq"]));
        close(&format!("{part} rq"), s.rq, f(&r["rq"]));
        assert_eq!(s.n as u64, r["n"].as_u64().unwrap());
    }
}

fn check_semseg(ours: &panoptic::SemSegSummary, reference: &Value) {
    close("miou", ours.miou, f(&reference["miou"]));
    close("fwiou", ours.fwiou, f(&reference["fwiou"]));
    close("macc", ours.macc, f(&reference["macc"]));
    close("pacc", ours.pacc, f(&reference["pacc"]));
}

#[test]
fn pq_matches_panopticapi_logic() {
    let r = &fixture()["panoptic"];
    let (h, w) = (r["height"].as_u64().unwrap() as u32, r["width"].as_u64().unwrap() as u32);
    let categories = categories(r);
    let mut stats = BTreeMap::new();
    for image in r["images"].as_array().unwrap() {
        let gt = Panoptic { map: map(&image["gt"], h, w), segments: segments(&image["gt_segments"]) };
        let pred = Panoptic { map: map(&image["pred"], h, w), segments: segments(&image["pred_segments"]) };
        panoptic::pq_accumulate(&mut stats, &gt, &pred, &categories).unwrap();
    }
    for (category, s) in r["stats"].as_object().unwrap() {
        let ours = stats[&category.parse::<u32>().unwrap()];
        close("iou", ours.iou, f(&s[0]));
        assert_eq!(
            [ours.tp, ours.fp, ours.fn_],
            [1, 2, 3].map(|i| s[i].as_u64().unwrap()),
            "category {category}"
        );
    }
    let summary = panoptic::pq_summary(&stats, &categories);
    println!("PQ all/things/stuff: {:.6} {:.6} {:.6}", summary.all.pq, summary.things.pq, summary.stuff.pq);
    check_pq(&summary, &r["summary"]);
}

#[test]
fn miou_matches_detectron2_formula() {
    let r = &fixture()["semseg"];
    let mut confusion = Confusion::new(r["classes"].as_u64().unwrap() as usize);
    for image in r["images"].as_array().unwrap() {
        let values =
            |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
        confusion.add(&values(&image["pred"]), &values(&image["gt"]), 255).unwrap();
    }
    check_semseg(&confusion.summary(), &r["summary"]);
}

#[test]
fn open_vocabulary_inference_matches_the_reference_pipeline() {
    let r = &fixture()["openvocab"];
    let (h, w) = (r["height"].as_u64().unwrap() as u32, r["width"].as_u64().unwrap() as u32);
    let categories = categories(r);
    let class_of: BTreeMap<u32, u32> = categories.iter().enumerate().map(|(i, c)| (c.id, i as u32)).collect();
    let mut stats = BTreeMap::new();
    let mut confusion = Confusion::new(categories.len());
    let (mut gts, mut dts, mut images) = (Vec::new(), Vec::new(), Vec::new());
    for (n, image) in r["images"].as_array().unwrap().iter().enumerate() {
        let image_id = n as u64 + 1;
        images.push(image_id);
        let gt_map = map(&image["gt"], h, w);
        let gt_segments = segments(&image["gt_segments"]);
        let classified: Vec<ClassifiedSegment> = image["segment_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(image["cosines"].as_array().unwrap())
            .map(|(id, cos)| ClassifiedSegment {
                segment_id: id.as_u64().unwrap() as u32,
                cosines: cos.as_array().unwrap().iter().map(f).collect(),
            })
            .collect();
        let prediction = panoptic::open_vocab_inference(image_id, &gt_map, &classified, &categories);
        let gt = Panoptic { map: gt_map.clone(), segments: gt_segments.clone() };
        panoptic::pq_accumulate(&mut stats, &gt, &prediction.panoptic, &categories).unwrap();
        let semantic_gt: Vec<u32> = gt_map
            .ids
            .iter()
            .map(|i| gt_segments.iter().find(|s| s.id == *i).map_or(255, |s| class_of[&s.category_id]))
            .collect();
        confusion.add(&prediction.semantic, &semantic_gt, 255).unwrap();
        for s in gt_segments.iter().filter(|s| categories[class_of[&s.category_id] as usize].isthing) {
            let values: Vec<u8> = gt_map.ids.iter().map(|&i| (i == s.id) as u8).collect();
            gts.push(GroundTruth {
                image_id,
                category_id: s.category_id,
                mask: PixelSet::from_values(&values),
                area: s.area.unwrap() as f64,
                iscrowd: s.iscrowd,
            });
        }
        dts.extend(prediction.instances);
    }
    check_pq(&panoptic::pq_summary(&stats, &categories), &r["pq"]);
    check_semseg(&confusion.summary(), &r["semseg"]);
    let ours = summary_values(&coco_ap::evaluate_segm(&images, &gts, &dts));
    for (i, (o, reference)) in ours.iter().zip(r["ap"].as_array().unwrap()).enumerate() {
        close(&format!("ap stats[{i}]"), *o, f(reference));
    }
}

#[test]
fn cider_d_matches_pycocoevalcap_on_the_same_tokens() {
    let r = &fixture()["cider"];
    let tokens =
        |v: &Value| v.as_str().unwrap().split(' ').filter(|w| !w.is_empty()).map(str::to_string).collect();
    let references: Vec<Vec<Vec<String>>> = r["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|refs| refs.as_array().unwrap().iter().map(tokens).collect())
        .collect();
    let hypotheses: Vec<Vec<String>> = r["hypotheses"].as_array().unwrap().iter().map(tokens).collect();
    let (score, scores) = osprey_eval::cider::cider_d(&references, &hypotheses);
    println!("CIDEr-D: ours {score}, pycocoevalcap {}", f(&r["score"]));
    close("cider", score, f(&r["score"]));
    for (i, (ours, reference)) in scores.iter().zip(r["scores"].as_array().unwrap()).enumerate() {
        close(&format!("cider[{i}]"), *ours, f(reference));
    }
}
