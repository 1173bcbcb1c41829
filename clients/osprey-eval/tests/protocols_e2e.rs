//! Every protocol end to end on the bundled samples (`tests/fixtures/eval/samples/`, from
//! `clients/osprey-eval/reference/make_samples.py`) against the one-command pipeline
//! (`gateway local --serve`, demo weights: the scores are meaningless, the machinery is real), then
//! reruns that must resume from the answer logs without asking again and without duplicates.
//! Needs the workspace's binaries (`cargo build --workspace`; `cargo test --workspace` builds them)
//! and the MiniLM weights (`tools/fetch_minilm.sh`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// `gateway local --serve` with its workers; stopped with SIGTERM so it takes its workers down.
struct Pipeline {
    child: Child,
    endpoint: String,
}

impl Pipeline {
    fn start() -> Self {
        let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
        let gateway = dir.join("gateway");
        assert!(
            gateway.exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            gateway.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(&gateway)
            .args(["local", "--serve", "--listen", &format!("127.0.0.1:{port}"), "--max-new-tokens", "4"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready, serving) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Serving until ctrl-c") {
                    let _ = ready.send(());
                }
            }
        });
        let pipeline = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        serving.recv_timeout(Duration::from_secs(600)).expect("gateway local did not start serving");
        pipeline
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn embedder() -> PathBuf {
    let dir = std::env::var_os("OSPREY_EMBEDDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ROOT).join(".cache/weights/all-MiniLM-L6-v2"));
    assert!(dir.join("model.safetensors").exists(), "{}: run tools/fetch_minilm.sh", dir.display());
    dir
}

/// One CLI run; returns the printed metrics.
fn eval(protocol: &str, endpoint: &str, data: &str, out: &Path, extra: &[&str]) -> Value {
    let samples = PathBuf::from(ROOT).join("tests/fixtures/eval/samples");
    let output = Command::new(env!("CARGO_BIN_EXE_osprey-eval"))
        .arg(protocol)
        .args(["--endpoint", endpoint, "--images"])
        .arg(&samples)
        .arg("--data")
        .arg(samples.join(data))
        .arg("--out")
        .arg(out)
        .arg("--embedder")
        .arg(embedder())
        .args(["--max-new-tokens", "4"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{protocol}: exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{protocol}: {e}: {stdout}"))
}

/// The ids of the log, checking that each line parses and no id repeats.
fn logged_ids(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{}: duplicate ids", path.display());
    ids
}

fn percent(metrics: &Value, keys: &[&str]) {
    for key in keys {
        let v = metrics[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {metrics}"));
        assert!((0.0..=100.0).contains(&v) || v == -1.0, "{key} = {v}");
    }
}

/// A protocol run: protocol, data file, extra flags, items in the sample, metrics in percent.
type Run<'a> = (&'a str, &'a str, Vec<&'a str>, usize, Vec<&'a str>);

#[test]
fn every_protocol_runs_end_to_end_and_resumes_without_duplicates() {
    let dir = std::env::temp_dir().join(format!("osprey-eval-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pipeline = Pipeline::start();
    let live = pipeline.endpoint.as_str();
    // Nothing listens here: a rerun with every answer logged must not need the gateway.
    let dead = "http://127.0.0.1:1";
    let masks = PathBuf::from(ROOT).join("tests/fixtures/eval/samples/panoptic");
    let masks = masks.to_str().unwrap();
    let classes = PathBuf::from(ROOT).join("tests/fixtures/eval/samples/panoptic_classes.txt");
    let classes = classes.to_str().unwrap();

    // (protocol, data file, extra flags, items in the sample, metric keys in percent)
    let runs: Vec<Run> = vec![
        ("lvis", "lvis_sample.json", vec![], 5, vec!["semantic_similarity", "semantic_iou"]),
        (
            "paco",
            "paco_sample.json",
            vec!["--temperature", "0"],
            3,
            vec!["semantic_similarity", "semantic_iou"],
        ),
        (
            "pope",
            "pope_sample.jsonl",
            vec!["--seed", "7"],
            6,
            vec!["accuracy", "precision", "recall", "f1", "yes_ratio"],
        ),
        ("refcocog", "refcocog_sample.json", vec![], 3, vec!["cider_d_approx"]),
        (
            "cityscapes",
            "panoptic_sample.json",
            vec!["--masks", masks],
            19,
            vec!["pq", "sq", "rq", "miou", "ap", "ap50"],
        ),
        (
            "ade20k",
            "panoptic_sample.json",
            vec!["--masks", masks, "--class-names", classes, "--temperature", "0"],
            19,
            vec!["pq", "pq_things", "pq_stuff", "miou", "macc", "pacc", "ap"],
        ),
    ];
    for (protocol, data, extra, items, keys) in &runs {
        let out = dir.join(format!("{protocol}.jsonl"));
        let first = eval(protocol, live, data, &out, extra);
        assert_eq!(first["answered"].as_u64().unwrap() as usize, *items, "{protocol}: {first}");
        assert_eq!(logged_ids(&out).len(), *items, "{protocol}");
        percent(&first, keys);
        // Resume: everything is logged, so the rerun asks nothing and scores the same answers.
        let again = eval(protocol, dead, data, &out, extra);
        assert_eq!(again, first, "{protocol}: a rerun from the log must give the same metrics");
        assert_eq!(logged_ids(&out).len(), *items, "{protocol}: the rerun must not append");
    }

    // An interrupted run: the log keeps two answers and half a line; the rerun asks only the rest.
    let out = dir.join("cityscapes.jsonl");
    let text = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&out, format!("{}\n{{\"id\":\"voc/", kept.join("\n"))).unwrap();
    let resumed = eval("cityscapes", live, "panoptic_sample.json", &out, &["--masks", masks]);
    assert_eq!(resumed["answered"], 19);
    let ids = logged_ids(&out);
    assert_eq!(ids.len(), 19);
    assert_eq!(
        ids[..2],
        kept.iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()[..]
    );

    // RefCOCOg writes the two files pycocoevalcap reads.
    let captions: Value =
        serde_json::from_slice(&std::fs::read(dir.join("refcocog.captions.json")).unwrap()).unwrap();
    let references: Value =
        serde_json::from_slice(&std::fs::read(dir.join("refcocog.references.json")).unwrap()).unwrap();
    assert_eq!(captions.as_array().unwrap().len(), 3);
    assert_eq!(references["annotations"].as_array().unwrap().len(), 3);
    assert_eq!(references["annotations"][0]["caption"], "a person sitting at the table");

    drop(pipeline);
    std::fs::remove_dir_all(&dir).unwrap();
}
