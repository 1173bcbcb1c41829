//! `osprey-annotate` against the real gateway and workers (the end-to-end harness, demo weights):
//! resuming after a kill, everything mode over a folder, TLS with a private CA. Needs the
//! workspace's binaries (`cargo build --bins`; `cargo test --workspace` builds them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use osprey_e2e::*;
use serde_json::{Value, json};

/// Runs `osprey-annotate` with `args` to completion (off the async runtime's threads).
async fn annotate(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_osprey-annotate")).args(args).output().unwrap()
    })
    .await
    .unwrap()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-annotate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_photo(to: &Path) {
    std::fs::copy(Path::new(FIXTURES).join("vision/photo.png"), to).unwrap();
}

/// Box masks on the sample photo (103x157) as COCO compressed RLE.
fn compressed_rles(n: usize) -> Vec<Value> {
    box_masks(103, 157, n)
        .iter()
        .map(|mask| json!({"size": [103, 157], "counts": mask.to_rle().to_compressed()}))
        .collect()
}

/// The demo LLM answers in at most 5 tokens.
fn llm(ip: u8) -> Process {
    llm_worker(loopback(ip), &["--default-max-new-tokens", "5"]).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_kill_without_duplicates_or_losses() {
    let mut vision = vision_worker(loopback(201), &[]).unwrap();
    let mut llm = llm(202);
    wait_all(&mut [&mut vision, &mut llm]).await.unwrap();
    // No result cache: every image costs real work, so the kill lands mid-run.
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    let mut gateway = gateway(loopback(203), &workers, &["--result-cache-ttl-seconds", "0"]).unwrap();
    gateway.wait_ready().await.unwrap();
    let dir = scratch("resume");
    const IMAGES: usize = 30;
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..IMAGES {
        let name = format!("photo-{i:02}.png");
        copy_photo(&dir.join(&name));
        images.push(json!({"id": 100 + i, "file_name": name, "height": 103, "width": 157}));
        for (k, segmentation) in compressed_rles(3).into_iter().enumerate() {
            let id = 1000 + 10 * i + k;
            annotations
                .push(json!({"id": id, "image_id": 100 + i, "category_id": 1, "segmentation": segmentation}));
        }
        let polygon = [[20.0, 20.0, 120.0, 20.0, 120.0, 90.0, 20.0, 90.0]];
        annotations.push(
            json!({"id": 1000 + 10 * i + 5, "image_id": 100 + i, "category_id": 1, "segmentation": polygon}),
        );
    }
    let coco =
        json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]});
    let coco_path = dir.join("coco.json");
    std::fs::write(&coco_path, serde_json::to_vec(&coco).unwrap()).unwrap();
    let endpoint = gateway.url();
    let args = |out: &str| {
        [
            "--endpoint",
            &endpoint,
            "--coco",
            coco_path.to_str().unwrap(),
            "--out",
            dir.join(out).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    // Reference: one uninterrupted run.
    let reference = annotate(args("reference.json")).await;
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference = read_json(&dir.join("reference.json"));
    assert_eq!(reference["images"].as_array().unwrap().len(), IMAGES);
    let answered = reference["annotations"].as_array().unwrap();
    assert_eq!(answered.len(), 4 * IMAGES);
    assert!(answered.iter().all(|a| a["answer"].is_string() && a["generated_tokens"].as_u64().unwrap() >= 1));
    assert_eq!(reference["categories"], coco["categories"]);

    // Killed mid-run (SIGKILL: no chance to clean up), with a record cut in half as a kill in
    // the middle of a write would leave it.
    let journal = dir.join("out.json.journal.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_osprey-annotate"))
        .args(args("out.json"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = |path: &PathBuf| std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
    while lines(&journal) < 1 + 5 {
        assert!(child.try_wait().unwrap().is_none(), "finished before it could be interrupted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = lines(&journal) - 1;
    assert!(at_kill < IMAGES, "the run finished before the kill ({at_kill} images)");
    let mut file = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    std::io::Write::write_all(&mut file, br#"{"item":"1"#).unwrap();
    drop(file);
    assert!(!dir.join("out.json").exists());

    // The rerun does only the rest and writes the same output.
    let rerun = annotate(args("out.json")).await;
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{at_kill} already done")), "{stderr}");
    assert_eq!(read_json(&dir.join("out.json")), reference);
    let records: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|record| record["item"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(records.len(), IMAGES, "one journal record per image");
    assert_eq!(records.iter().collect::<BTreeSet<_>>().len(), IMAGES, "no image twice");

    // Another run with the same options has nothing left to do; other options are refused.
    let again = annotate(args("out.json")).await;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("{IMAGES} already done")));
    let mut other = args("out.json");
    other.extend(["--task", "category"].map(String::from));
    let refused = annotate(other).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("other options"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Journal records (finished images) in `journal`, a cut last line aside.
fn journaled(journal: &Path) -> usize {
    std::fs::read_to_string(journal)
        .map(|text| text.lines().skip(1).filter(|l| serde_json::from_str::<Value>(l).is_ok()).count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_gateway_restart_redoing_only_unfinished_images() {
    let mut vision = vision_worker(loopback(231), &[]).unwrap();
    let mut llm = llm_worker(loopback(232), &["--default-max-new-tokens", "16"]).unwrap();
    wait_all(&mut [&mut vision, &mut llm]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    let mut gateway = gateway(loopback(233), &workers, &["--result-cache-ttl-seconds", "0"]).unwrap();
    gateway.wait_ready().await.unwrap();

    // Twelve images with distinct pixels (so nothing one image computed serves another), three
    // box regions each.
    const REGIONS: usize = 3;
    let dir = scratch("gateway-restart");
    let test_images = images();
    let mut coco_images = Vec::new();
    let mut annotations = Vec::new();
    for (i, image) in test_images.iter().enumerate() {
        let extension = Path::new(&image.name).extension().unwrap().to_str().unwrap();
        let name = format!("image-{i:02}.{extension}");
        std::fs::write(dir.join(&name), &image.bytes).unwrap();
        coco_images
            .push(json!({"id": i + 1, "file_name": name, "height": image.height, "width": image.width}));
        for (k, mask) in box_masks(image.height, image.width, REGIONS).iter().enumerate() {
            let segmentation =
                json!({"size": [image.height, image.width], "counts": mask.to_rle().to_compressed()});
            annotations
                .push(json!({"id": 100 * (i + 1) + k, "image_id": i + 1, "segmentation": segmentation}));
        }
    }
    let coco = json!({"images": coco_images, "annotations": annotations});
    let coco_path = dir.join("coco.json");
    std::fs::write(&coco_path, serde_json::to_vec(&coco).unwrap()).unwrap();
    let endpoint = gateway.url();
    let args = |out: &str| {
        [
            "--endpoint",
            &endpoint,
            "--coco",
            coco_path.to_str().unwrap(),
            "--out",
            dir.join(out).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    let reference = annotate(args("reference.json")).await;
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference = read_json(&dir.join("reference.json"));
    assert_eq!(reference["annotations"].as_array().unwrap().len(), REGIONS * test_images.len());

    // The gateway dies (SIGKILL) with the stream midway; the CLI fails, keeping its journal.
    let journal = dir.join("out.json.journal.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_osprey-annotate"))
        .args(args("out.json"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while journaled(&journal) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the gateway could be killed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gateway.kill();
    let cut = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    let cut = tokio::time::timeout(Duration::from_secs(30), cut).await.expect("the CLI hung").unwrap();
    assert!(!cut.status.success(), "the run went on without its gateway");
    let at_kill = journaled(&journal);
    assert!(at_kill < test_images.len(), "the run finished before the gateway died");
    assert!(!dir.join("out.json").exists());

    // The gateway comes back on the same address (no memory of the run); the rerun sends only the
    // images without a journal record, and its output is the uninterrupted run's.
    gateway.start().unwrap();
    gateway.wait_ready().await.unwrap();
    let rerun = annotate(args("out.json")).await;
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{at_kill} already done")), "{stderr}");
    assert_eq!(read_json(&dir.join("out.json")), reference);
    let regions = gateway.metric("osprey_gateway_regions_total", &[]).await.unwrap();
    assert_eq!(
        regions as usize,
        REGIONS * (test_images.len() - at_kill),
        "the rerun asked about the {} unfinished images only",
        test_images.len() - at_kill
    );
    println!(
        "annotate across a gateway SIGKILL: {} of {} images journaled at the kill; the rerun asked about \
         {regions} regions ({} images), output equal to the uninterrupted run's",
        at_kill,
        test_images.len(),
        regions as usize / REGIONS
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describes_everything_in_a_folder() {
    let mut vision = vision_worker(loopback(211), &[]).unwrap();
    let mut llm = llm(212);
    let mut sam = sam_worker(loopback(213), &[]).unwrap();
    wait_all(&mut [&mut vision, &mut llm, &mut sam]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![&sam] };
    let mut gateway = gateway(loopback(214), &workers, &[]).unwrap();
    gateway.wait_ready().await.unwrap();
    let dir = scratch("everything");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["b.png", "a.png"] {
        copy_photo(&images.join(name));
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let out = dir.join("out.json");
    let endpoint = gateway.url();
    let args =
        ["--endpoint", &endpoint, "--images", images.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let mut everything = args.map(String::from).to_vec();
    // Loose thresholds for the random SAM.
    let loose =
        ["--everything", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"];
    everything.extend(loose.map(String::from));

    let refused = annotate(args.map(String::from).to_vec()).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--images needs --everything"));

    let run = annotate(everything).await;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out = read_json(&out);
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0], json!({"id": 1, "file_name": "a.png", "width": 157, "height": 103}));
    let annotations = out["annotations"].as_array().unwrap();
    assert!(!annotations.is_empty());
    for (k, annotation) in annotations.iter().enumerate() {
        assert_eq!(annotation["id"], k + 1);
        assert_eq!(annotation["segmentation"]["size"], json!([103, 157]));
        assert!(annotation["segmentation"]["counts"].is_string());
        assert!(annotation["answer"].is_string());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_tls_with_a_private_ca() {
    let tls = Path::new(FIXTURES).join("tls");
    let mut vision = vision_worker(loopback(221), &[]).unwrap();
    let mut llm = llm(222);
    wait_all(&mut [&mut vision, &mut llm]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![] };
    let (cert, key) = (tls.join("server.pem"), tls.join("server.key"));
    let flags = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    // 127.0.0.1: the certificate is for localhost. The harness's readiness check speaks plaintext,
    // so wait for the port instead (the CLI retries while the gateway is UNAVAILABLE).
    let gateway = gateway(loopback(1), &workers, &flags).unwrap();
    while tokio::net::TcpStream::connect(gateway.addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = scratch("tls");
    copy_photo(&dir.join("photo.png"));
    let coco = json!({
        "images": [{"id": 7, "file_name": "photo.png", "height": 103, "width": 157}],
        "annotations": [{"id": 70, "image_id": 7, "segmentation": compressed_rles(1)[0]}],
    });
    std::fs::write(dir.join("coco.json"), coco.to_string()).unwrap();
    let out = dir.join("out.json");
    let args = vec![
        "--endpoint".to_string(),
        format!("https://localhost:{}", gateway.addr.port()),
        "--ca-cert".into(),
        tls.join("ca.pem").display().to_string(),
        "--coco".into(),
        dir.join("coco.json").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    let trusting = annotate(args).await;
    assert!(trusting.status.success(), "{}", String::from_utf8_lossy(&trusting.stderr));
    assert!(read_json(&out)["annotations"][0]["answer"].is_string());
    let _ = std::fs::remove_dir_all(&dir);
}
