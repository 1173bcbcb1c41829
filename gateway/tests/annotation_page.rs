//! The annotation page (gateway/web) in a real browser: the committed bundle matches a fresh build
//! of its sources, the page's RLE code gives pycocotools' strings, and
//! `gateway/web/test/browser.mjs` drives Debian's Chromium through the page against
//! `gateway local --serve` (real worker binaries, real MobileSAM). Node, the npm packages and
//! Chromium come from tools/setup_test_env.sh. (`cargo test --workspace` builds the worker
//! binaries next to this package's.)

use std::path::Path;
use std::process::Command;

const WEB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web");

fn node(args: &[&str]) -> std::process::Output {
    assert!(
        Path::new(WEB).join("node_modules/playwright-core").exists()
            && Path::new("/usr/bin/chromium").exists(),
        "the page's test needs Node, the npm packages and Chromium: run tools/setup_test_env.sh"
    );
    Command::new("node").args(args).current_dir(WEB).output().expect("node runs (tools/setup_test_env.sh)")
}

#[test]
fn committed_bundle_matches_a_fresh_build() {
    let output = node(&["build.mjs", "--check"]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn page_rle_codec_matches_pycocotools() {
    let output = node(&["test/rle.mjs"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn the_page_works_in_a_real_browser() {
    let gateway = env!("CARGO_BIN_EXE_gateway");
    let workers = Path::new(gateway).with_file_name("sam-worker");
    assert!(workers.exists(), "build the workspace first: {} is missing", workers.display());
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("annotation-page.png");
    let output = node(&["test/browser.mjs", gateway, &screenshot.display().to_string()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The latency and check count, visible with --nocapture.
    println!("{stdout}");
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    println!("screenshot: {}", screenshot.display());
}
