//! The README's first command, `gateway local`, as real processes: it starts the vision, LLM and
//! SAM worker binaries, serves the public API, sends the sample image through it, prints the answers
//! and timings, and exits 0. (`cargo test --workspace` builds the worker binaries next to this
//! package's.)

use std::process::Command;

#[test]
fn local_pipeline_runs_the_sample_and_exits_cleanly() {
    let gateway = env!("CARGO_BIN_EXE_gateway");
    let workers = std::path::Path::new(gateway).with_file_name("vision-worker");
    assert!(workers.exists(), "build the workspace first: {} is missing", workers.display());
    let port = osprey_test_support::free_port();
    let output = Command::new(gateway)
        .args(["local", "--listen", &format!("127.0.0.1:{port}"), "--max-new-tokens", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Using generated demo weights"), "{stdout}");
    // The given regions, described twice (everything mode's regions are listed as `[everything k]`).
    for region in 1..5 {
        let given = stdout
            .lines()
            .filter(|line| line.starts_with(&format!("region {region} [")) && !line.contains("[everything"))
            .count();
        assert_eq!(given, 2, "{stdout}");
    }
    assert_eq!(stdout.matches("features Computed").count(), 5, "{stdout}");
    assert_eq!(stdout.matches("features Resident").count(), 5, "{stdout}");
    assert_eq!(stdout.matches("[SAM point prompt]").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("[SAM box prompt]").count(), 2, "{stdout}");
    assert!(stdout.contains("== Describe everything SAM finds"), "{stdout}");
    // The real MobileSAM weights (fetched into .cache/ by tools/fetch_mobile_sam.sh when missing).
    assert!(stdout.contains("SAM: the official MobileSAM weights"), "{stdout}");
    assert!(stdout.contains("== Ask about region1 and region2"), "{stdout}");
}
