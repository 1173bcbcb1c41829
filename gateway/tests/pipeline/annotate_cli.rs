//! `gateway annotate`: resuming after a kill, and everything mode over a folder.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_cli_resumes_after_a_kill_without_duplicates_or_losses() {
    let (vision, llm) = (vision().await, llm().await);
    // No result cache (the default): every image costs real work, so the kill lands mid-run.
    let (gateway, _client) = gateway(&[&vision], &llm, &[]).await;
    let dir = scratch("annotate");
    const IMAGES: usize = 30;
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..IMAGES {
        let name = format!("photo-{i:02}.png");
        std::fs::copy(fixtures().join("vision/photo.png"), dir.join(&name)).unwrap();
        images.push(serde_json::json!({"id": 100 + i, "file_name": name, "height": 103, "width": 157}));
        for (k, region) in [1, 4, 8].into_iter().enumerate() {
            let id = 1000 + 10 * i + k;
            let segmentation = compressed_rle(region);
            annotations.push(serde_json::json!({"id": id, "image_id": 100 + i, "category_id": 1, "segmentation": segmentation}));
        }
        let polygon = [[20.0, 20.0, 120.0, 20.0, 120.0, 90.0, 20.0, 90.0]];
        annotations.push(serde_json::json!({"id": 1000 + 10 * i + 5, "image_id": 100 + i, "category_id": 1, "segmentation": polygon}));
    }
    let coco = serde_json::json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]});
    let coco_path = dir.join("coco.json");
    std::fs::write(&coco_path, serde_json::to_vec(&coco).unwrap()).unwrap();
    let args = |out: &str| {
        [
            "--endpoint",
            &gateway.url,
            "--coco",
            coco_path.to_str().unwrap(),
            "--out",
            dir.join(out).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    // Reference: one uninterrupted run.
    let reference = annotate_cli(args("reference.json")).await;
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    assert_eq!(reference["images"].as_array().unwrap().len(), IMAGES);
    let answered = reference["annotations"].as_array().unwrap();
    assert_eq!(answered.len(), 4 * IMAGES);
    assert!(answered.iter().all(|a| a["answer"].is_string() && a["generated_tokens"].as_u64().unwrap() >= 1));
    assert_eq!(reference["categories"], coco["categories"]);

    // Killed mid-run (SIGKILL: no chance to clean up), with a record cut in half as a kill in
    // the middle of a write would leave it.
    let journal = dir.join("out.json.journal.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("annotate")
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
    let rerun = annotate_cli(args("out.json")).await;
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{at_kill} already done")), "{stderr}");
    let out: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out.json")).unwrap()).unwrap();
    assert_eq!(out, reference);
    let records: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|record| record["item"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(records.len(), IMAGES, "one journal record per image");
    assert_eq!(records.iter().collect::<BTreeSet<_>>().len(), IMAGES, "no image twice");

    // Another run with the same options has nothing left to do; other options are refused.
    let again = annotate_cli(args("out.json")).await;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("{IMAGES} already done")));
    let mut other = args("out.json");
    other.extend(["--task", "category"].map(String::from));
    let refused = annotate_cli(other).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("other options"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_cli_describes_everything_in_a_folder() {
    let (vision, llm, sam) = (vision().await, llm().await, sam().await);
    let (gateway, _client) = gateway(&[&vision], &llm, &["--sam-workers", &sam.url]).await;
    let dir = scratch("annotate-everything");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["b.png", "a.png"] {
        std::fs::copy(fixtures().join("vision/photo.png"), images.join(name)).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let out = dir.join("out.json");
    let args =
        ["--endpoint", &gateway.url, "--images", images.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let mut everything = args.map(String::from).to_vec();
    // Loose thresholds for the random SAM.
    let loose =
        ["--everything", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"];
    everything.extend(loose.map(String::from));

    let refused = annotate_cli(args.map(String::from).to_vec()).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--images needs --everything"));

    let run = annotate_cli(everything).await;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0], serde_json::json!({"id": 1, "file_name": "a.png", "width": 157, "height": 103}));
    let annotations = out["annotations"].as_array().unwrap();
    assert!(!annotations.is_empty());
    for (k, annotation) in annotations.iter().enumerate() {
        assert_eq!(annotation["id"], k + 1);
        assert_eq!(annotation["segmentation"]["size"], serde_json::json!([103, 157]));
        assert!(annotation["segmentation"]["counts"].is_string());
        assert!(annotation["answer"].is_string());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
