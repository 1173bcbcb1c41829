//! Label Studio itself (from PyPI, in `.venv-labelstudio`, installed by tools/setup_test_env.sh)
//! with the gateway connected as a project's ML back end: a project and an uploaded image task made
//! through label-studio-sdk, an interactive prediction from a smart keypoint and stored predictions
//! read back through the SDK (tools/label_studio_roundtrip.py), compared with the same prompt over
//! gRPC. With Chromium present, a screenshot of the task showing the predicted region and its text
//! is written to `$TMPDIR/osprey-e2e/label_studio_prediction.png` (docs/INTEGRATIONS.md shows one).
//!
//! Skipped, saying so, when Label Studio is not installed. Its own process (Label Studio's
//! settings travel in the environment, which the gateway child must inherit).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use osprey_common::mask::rle_from_proto;
use osprey_e2e::{
    TestImage, Workers, client, gateway, llm_worker, loopback, mobile_sam_worker, vision_worker, wait_all,
};
use osprey_proto::v1;
use serde_json::Value;

const KEY: &str = "label-studio-key";
const LS_TOKEN: &str = "osprey-e2e-label-studio-token-0123456789";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A process group killed when dropped (Label Studio's server starts helpers of its own).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test started.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_http(url: &str, within: Duration, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("Label Studio exited ({status}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        if ureq::get(url).timeout(Duration::from_secs(5)).call().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{url} did not answer within {within:?}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_shows_the_predicted_region_and_its_text() {
    let label_studio = root().join(".venv-labelstudio/bin/label-studio");
    let python = root().join(".venv-labelstudio/bin/python");
    if !label_studio.is_file() {
        eprintln!(
            "skipped: {} is missing (tools/setup_test_env.sh installs Label Studio)",
            label_studio.display()
        );
        return;
    }
    let ip = loopback(175);
    let http_port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
    let http_listen = format!("{ip}:{http_port}");
    let mut vision = vision_worker(ip, &[]).unwrap();
    let mut llm = llm_worker(ip, &[]).unwrap();
    let mut sam = mobile_sam_worker(ip, &[]).unwrap();
    wait_all(&mut [&mut vision, &mut llm, &mut sam]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![&sam] };
    let mut gateway = gateway(ip, &workers, &["--api-key", KEY, "--http-listen", &http_listen]).unwrap();
    gateway.wait_ready().await.unwrap();

    let data = tempdir("label-studio");
    // The database setup migrated once (tools/setup_test_env.sh): a start on a copy takes seconds.
    let requirements = std::fs::read_to_string(root().join("tools/requirements-labelstudio.txt")).unwrap();
    let version = requirements.lines().find_map(|l| l.strip_prefix("label-studio==")).unwrap().trim();
    let template = root().join(format!(".cache/label-studio-{version}"));
    if template.join("label_studio.sqlite3").is_file() {
        copy_dir(&template, &data);
    } else {
        eprintln!("{} is missing: Label Studio migrates its database first (minutes)", template.display());
    }
    let log = data.join("label-studio.log");
    let port = free_port();
    let mut command = Command::new(&label_studio);
    command
        .args(["start", "--no-browser", "--internal-host", "127.0.0.1", "--port", &port.to_string()])
        .env("LABEL_STUDIO_BASE_DATA_DIR", &data)
        .env("LABEL_STUDIO_USERNAME", "osprey@example.com")
        .env("LABEL_STUDIO_PASSWORD", "osprey-e2e-password")
        .env("LABEL_STUDIO_USER_TOKEN", LS_TOKEN)
        // The token above authenticates the SDK and the gateway's image fetches.
        .env("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "true")
        .env("LATEST_VERSION_CHECK", "false")
        // The gateway listens on loopback, which Label Studio's SSRF guards refuse by default.
        .env("ML_BLOCK_LOCAL_IP", "false")
        .env("SSRF_PROTECTION_ENABLED", "false")
        .env("USE_DEFAULT_BANNED_SUBNETS", "false")
        .env("SENTRY_DSN", "")
        .env("FRONTEND_SENTRY_DSN", "")
        .current_dir(&data)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(data.join("label-studio.err.log")).unwrap())
        .process_group(0);
    let mut server = Group(command.spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_http(
        &format!("{base}/health"),
        Duration::from_secs(300),
        &mut server.0,
        &data.join("label-studio.err.log"),
    );

    let image = TestImage::load("images/chelsea_exif_orient6.jpg").unwrap();
    let output = Command::new(&python)
        .arg(root().join("tools/label_studio_roundtrip.py"))
        .args(["--label-studio", &base, "--token", LS_TOKEN, "--key", KEY])
        .args(["--backend", &format!("http://{http_listen}/label-studio")])
        .arg("--image")
        .arg(root().join("tests/fixtures/images/chelsea_exif_orient6.jpg"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(data.join("label-studio.err.log")).unwrap_or_default()
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(answer["image"].as_str().unwrap().starts_with("/data/upload/"), "{answer}");

    // The keypoint at 45 %, 40 % of the shown (EXIF-rotated) image, over gRPC.
    let mut grpc = client(&gateway, Some(KEY)).await.unwrap();
    let (w, h) = (image.width as f32, image.height as f32);
    let point = v1::Point { x: 0.45 * w, y: 0.40 * h, label: v1::PointLabel::Foreground as i32 };
    let region = v1::Region {
        source: Some(v1::region::Source::Prompt(v1::SamPrompt { points: vec![point], ..Default::default() })),
        label: String::new(),
    };
    let request =
        v1::DescribeRequest { parameters: None, ..osprey_e2e::describe_request(&image, vec![region], 1) };
    let expected = osprey_e2e::describe(&mut grpc, request).await.unwrap();
    let expected_mask = rle_from_proto(expected[0].mask.as_ref().unwrap()).unwrap().to_mask();

    let interactive = &answer["interactive"];
    assert!(interactive.get("errors").is_none(), "Label Studio reported: {interactive}");
    let items = interactive["data"]["result"].as_array().unwrap_or_else(|| panic!("{interactive}"));
    let brush = items.iter().find(|i| i["type"] == "brushlabels").unwrap_or_else(|| panic!("{interactive}"));
    let text = items.iter().find(|i| i["type"] == "textarea").unwrap_or_else(|| panic!("{interactive}"));
    assert_eq!(text["id"], brush["id"]);
    assert_eq!(text["value"]["text"][0], expected[0].text.as_str());
    let size = (brush["original_width"].as_u64(), brush["original_height"].as_u64());
    assert_eq!(size, (Some(image.width as u64), Some(image.height as u64)), "the shown (EXIF-rotated) size");
    let rle: Vec<u8> =
        brush["value"]["rle"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let rgba = gateway::integrations::brush_rle::decode(&rle).unwrap();
    let alpha: Vec<u8> = rgba.chunks_exact(4).map(|px| (px[3] != 0) as u8).collect();
    assert_eq!(alpha, expected_mask.data(), "the mask Label Studio passed on is the gRPC mask");

    // Stored predictions (everything mode), read back through the SDK.
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 1, "{answer}");
    let stored = predictions[0]["result"].as_array().unwrap();
    let regions = stored.iter().filter(|i| i["type"] == "brushlabels").count();
    let texts: Vec<&str> = stored
        .iter()
        .filter(|i| i["type"] == "textarea")
        .map(|i| i["value"]["text"][0].as_str().unwrap())
        .collect();
    assert!(regions >= 1 && texts.len() == regions, "{regions} regions, {} texts", texts.len());
    assert!(predictions[0]["model_version"].as_str().unwrap().starts_with("osprey-"), "{}", predictions[0]);

    screenshot(&base, &answer, &data);
}

/// With Chromium and playwright-core (the annotation page's test installs both), the task's
/// page in Label Studio with the prediction shown.
fn screenshot(base: &str, answer: &Value, data: &Path) {
    let script = root().join("tools/label_studio_screenshot.mjs");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).is_file() || !root().join("gateway/web/node_modules/playwright-core").is_dir() {
        eprintln!("no screenshot: Chromium or playwright-core is missing");
        return;
    }
    let out = std::env::temp_dir().join("osprey-e2e/label_studio_prediction.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status = Command::new("node")
        .arg(&script)
        .args([base, "osprey@example.com", "osprey-e2e-password"])
        .args([&answer["project"].to_string(), &answer["task"].to_string()])
        .arg(&out)
        .env("CHROMIUM", &chromium)
        .stdout(std::fs::File::create(data.join("screenshot.log")).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(data.join("screenshot.log")).unwrap_or_default());
    assert!(std::fs::metadata(&out).unwrap().len() > 10_000, "an empty screenshot");
    eprintln!("screenshot: {}", out.display());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
