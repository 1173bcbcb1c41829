//! deploy/ against the binaries: the Kubernetes overlays render with the real `kubectl kustomize`
//! and validate against the Kubernetes schemas (tools/deploy_manifests.py, through the CI Python
//! environment that tools/setup_test_env.sh makes), and every
//! invocation in the Dockerfiles, the compose file and the manifests parses with the binary's own
//! `serve` argument parser (flags and environment variables), agrees on ports (listen, probes,
//! Services, worker addresses, metrics), and autoscales on metrics the code really emits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Args, FromArgMatches};
use osprey_deploy::{MetricKind, emitted_metrics};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    std::env::var_os("OSPREY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-ci/bin/python"))
}

/// The kubectl that renders the overlays (`KUBECTL`, else `kubectl` on PATH); a missing one fails
/// the test with what to install, since the overlays cannot be checked without it.
fn require_kubectl() {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
    let version = Command::new(&kubectl).args(["version", "--client"]).output();
    match version {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`{kubectl} version --client` failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!(
            "`{kubectl}` not runnable ({e}): the Kubernetes overlays are rendered with \
             `kubectl kustomize`; install kubectl (https://kubernetes.io/docs/tasks/tools/) or set \
             KUBECTL to it"
        ),
    }
}

fn run_tool(command: &str) -> std::process::Output {
    require_kubectl();
    let python = python();
    assert!(
        python.exists(),
        "{} missing: run tools/setup_test_env.sh (tools/requirements-ci.txt)",
        python.display()
    );
    Command::new(&python)
        .arg(root().join("tools/deploy_manifests.py"))
        .arg(command)
        .output()
        .expect("run tools/deploy_manifests.py")
}

#[test]
fn every_overlay_validates_against_the_kubernetes_schemas() {
    let out = run_tool("validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for overlay in ["cpu", "cuda"] {
        for object in [
            "Deployment/vision-worker",
            "Deployment/llm-worker",
            "Deployment/sam-worker",
            "Deployment/gateway",
        ] {
            assert!(
                stdout.contains(&format!("valid {overlay}: {object}")),
                "{overlay} {object} not rendered:\n{stdout}"
            );
        }
    }
    assert!(stdout.contains("\n0 invalid"), "{stdout}");
}

/// What parsing an invocation with the binary's parser tells us.
struct Parsed {
    listen_port: u16,
    prometheus_port: Option<u16>,
    /// `--request-timeout-seconds` of the gateway: the longest a request may drain.
    request_timeout: Option<u64>,
    /// The gateway's worker addresses by kind.
    workers: BTreeMap<&'static str, Vec<String>>,
}

/// The `serve` parser of `binary`; flags given as environment variables are turned into flags
/// (clap reads `--flag` and its `env` name the same way). Returns the parse and the environment
/// names the parser does not know.
fn parse(
    binary: &str,
    flags: &[(String, Option<String>)],
    env: &BTreeMap<String, Option<String>>,
) -> Result<(Parsed, Vec<String>), String> {
    let command = clap::Command::new("serve").no_binary_name(false);
    let command = match binary {
        "gateway" => gateway::config::GatewayArgs::augment_args(command),
        "vision-worker" => vision_worker::service::ServeArgs::augment_args(command),
        "llm-worker" => llm_worker::service::ServeArgs::augment_args(command),
        "sam-worker" => sam_worker::service::ServeArgs::augment_args(command),
        other => return Err(format!("unknown binary {other}")),
    };
    let by_env: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.get_long()?.to_string())))
        .collect();
    let mut argv = vec!["serve".to_string()];
    let mut unknown_env = Vec::new();
    for (name, value) in env {
        match (by_env.get(name), value) {
            (Some(long), Some(value)) => argv.push(format!("--{long}={value}")),
            (Some(_), None) => {} // from a Secret: the name is known, the value is the operator's
            (None, _) => unknown_env.push(name.clone()),
        }
    }
    for (flag, value) in flags {
        argv.push(match value {
            Some(value) => format!("{flag}={value}"),
            None => flag.clone(),
        });
    }
    let matches = command.try_get_matches_from(&argv).map_err(|e| format!("{argv:?}: {e}"))?;
    let parsed = match binary {
        "gateway" => {
            let a = gateway::config::GatewayArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
            Parsed {
                listen_port: a.listen.port(),
                prometheus_port: a.telemetry.prometheus_port,
                request_timeout: Some(a.request_timeout_seconds),
                workers: BTreeMap::from([
                    ("vision-worker", a.vision_workers.clone()),
                    ("llm-worker", a.llm_workers.clone()),
                    ("sam-worker", a.sam_workers.clone()),
                ]),
            }
        }
        "vision-worker" => {
            let a =
                vision_worker::service::ServeArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
            Parsed {
                listen_port: a.listen.port(),
                prometheus_port: a.telemetry.prometheus_port,
                request_timeout: None,
                workers: BTreeMap::new(),
            }
        }
        "llm-worker" => {
            let a = llm_worker::service::ServeArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
            Parsed {
                listen_port: a.listen.port(),
                prometheus_port: a.telemetry.prometheus_port,
                request_timeout: None,
                workers: BTreeMap::new(),
            }
        }
        _ => {
            let a = sam_worker::service::ServeArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
            Parsed {
                listen_port: a.listen.port(),
                prometheus_port: a.telemetry.prometheus_port,
                request_timeout: None,
                workers: BTreeMap::new(),
            }
        }
    };
    Ok((parsed, unknown_env))
}

fn expect(failures: &mut Vec<String>, at: &str, what: &str, got: Option<u64>, want: Option<u64>) {
    if got != want {
        failures.push(format!("{at}: {what} is {got:?}, the binary says {want:?}"));
    }
}

/// An invocation's flags as (name, value) pairs.
fn flags_of(invocation: &Value) -> Vec<(String, Option<String>)> {
    invocation["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_str().map(str::to_string)))
        .collect()
}

fn crate_dir(binary: &str) -> PathBuf {
    root().join(binary)
}

/// Every Rust source file of the workspace's crates, concatenated (to check that an environment
/// variable deploy/ sets is read somewhere).
fn workspace_source() -> String {
    ["common", "checkpoint", "gateway", "vision-worker", "llm-worker", "sam-worker"]
        .into_iter()
        .map(crate_source)
        .collect()
}

/// The Rust sources under `crate_dir/src`, concatenated.
fn crate_source(crate_dir: &str) -> String {
    let mut text = String::new();
    let mut stack = vec![root().join(crate_dir).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    text
}

fn host_port(address: &str) -> (String, u16) {
    let address = address.trim_start_matches("http://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    (host.to_string(), port.parse().expect("port"))
}

#[test]
fn deploy_matches_the_binaries() {
    let out = run_tool("references");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = workspace_source();
    let invocations = refs["invocations"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    let mut listen_ports: BTreeMap<String, u16> = BTreeMap::new();
    let mut failures = Vec::new();

    for inv in invocations {
        let at = inv["source"].as_str().unwrap().to_string();
        let binary = inv["binary"].as_str().unwrap();
        seen.insert((at.split(':').next().unwrap().to_string(), binary.to_string()));
        assert_eq!(inv["subcommand"], "serve", "{at}");
        let flags = flags_of(inv);
        let env: BTreeMap<String, Option<String>> = inv["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
            .collect();
        let (parsed, unknown_env) = match parse(binary, &flags, &env) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{at}: {binary} serve rejects the invocation: {e}"));
                continue;
            }
        };
        // Variables that are no flag of the binary must be read by our code (OSPREY_LOG_LEVEL, HF_*)
        // or by the NVIDIA container runtime.
        for name in unknown_env {
            if !name.starts_with("NVIDIA_") && !source.contains(&format!("\"{name}\"")) {
                failures.push(format!("{at}: environment variable {name} is read by nothing"));
            }
        }
        let listen = parsed.listen_port;
        if let Some(previous) = listen_ports.insert(binary.to_string(), listen)
            && previous != listen
        {
            failures.push(format!("{at}: {binary} listens on {listen} here and on {previous} elsewhere"));
        }
        let prometheus = parsed.prometheus_port;
        if prometheus.is_none() {
            failures.push(format!(
                "{at}: no --prometheus-port / OSPREY_PROMETHEUS_PORT, so no metrics to scale on"
            ));
        }
        // `standard_routes` registers grpc.health.v1 and reflection; the workers' shared
        // `serve_worker` calls it for them.
        let code = crate_source(binary);
        if !code.contains("standard_routes(") && !code.contains("serve_worker(") {
            failures.push(format!("{at}: {binary} does not serve grpc.health.v1 (standard_routes)"));
        }
        // Kubernetes: container ports, probes, Service, scrape annotation, graceful termination.
        if at.starts_with("kubernetes/") {
            expect(
                &mut failures,
                &at,
                "the grpc containerPort",
                inv["grpc_port"].as_u64(),
                Some(listen.into()),
            );
            expect(
                &mut failures,
                &at,
                "the metrics containerPort",
                inv["metrics_port"].as_u64(),
                prometheus.map(u64::from),
            );
            expect(
                &mut failures,
                &at,
                "prometheus.io/port",
                inv["scrape_port"].as_u64(),
                prometheus.map(u64::from),
            );
            let probes = inv["probes"].as_array().unwrap();
            if probes.len() < 2 {
                failures.push(format!("{at}: readiness and liveness probes are required"));
            }
            for probe in probes {
                expect(
                    &mut failures,
                    &at,
                    &format!("the {} port", probe["kind"]),
                    probe["port"].as_u64(),
                    Some(listen.into()),
                );
                // The whole-server status ("") is what standard_routes reports for every server.
                if !probe["service"].is_null() {
                    failures.push(format!("{at}: probe service {} is not reported", probe["service"]));
                }
            }
            let service = &inv["service"];
            let ports = service["ports"].as_array().unwrap();
            if ports.len() != 1
                || ports[0]["port"].as_u64() != Some(listen.into())
                || ports[0]["targetPort"] != "grpc"
            {
                failures
                    .push(format!("{at}: Service ports {ports:?} must expose {listen} as targetPort grpc"));
            }
            if binary != "gateway" && service["headless"] != true {
                failures.push(format!("{at}: worker Services must be headless (one address per pod)"));
            }
            let grace = inv["termination_grace_seconds"].as_u64().unwrap();
            let pre_stop = inv["prestop_sleep_seconds"].as_u64().unwrap();
            let drain = parsed.request_timeout.unwrap_or(60);
            if pre_stop == 0 || grace < pre_stop + drain {
                failures.push(format!("{at}: grace {grace}s < preStop {pre_stop}s + drain {drain}s"));
            }
        }
        if at.starts_with("Dockerfile") {
            let expose: Vec<u64> =
                inv["expose"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
            for port in [Some(listen), prometheus].into_iter().flatten() {
                if !expose.contains(&port.into()) {
                    failures.push(format!("{at}: EXPOSE {expose:?} lacks {port}"));
                }
            }
            let health = inv["health_addr"].as_str().map(host_port);
            expect(
                &mut failures,
                &at,
                "the HEALTHCHECK port",
                health.map(|(_, p)| p.into()),
                Some(listen.into()),
            );
        }
        // The gateway's worker addresses name a Service (Kubernetes) or a service/alias (compose)
        // of the right binary, on that binary's port; the image's defaults must hold in both.
        let place = at.split(':').next().unwrap();
        let places: Vec<&str> = if place.starts_with("Dockerfile") {
            vec!["compose", "kubernetes/cpu", "kubernetes/cuda"]
        } else {
            vec![place]
        };
        for (kind, addresses) in &parsed.workers {
            for address in addresses {
                let (host, port) = host_port(address);
                for place in &places {
                    let target = invocations.iter().find(|other| {
                        other["source"].as_str().unwrap().split(':').next() == Some(place)
                            && (other["service"]["name"] == host.as_str()
                                || other["names"]
                                    .as_array()
                                    .is_some_and(|n| n.iter().any(|n| n == host.as_str())))
                    });
                    let Some(target) = target.filter(|t| t["binary"] == *kind) else {
                        failures.push(format!("{at}: {address} names no {kind} service in {place}"));
                        continue;
                    };
                    let flags = flags_of(target);
                    // An invocation the parser rejects is reported on its own.
                    let Ok((target_parsed, _)) = parse(kind, &flags, &BTreeMap::new()) else { continue };
                    if target_parsed.listen_port != port {
                        failures.push(format!(
                            "{at}: {address} but {kind} listens on {} in {place}",
                            target_parsed.listen_port
                        ));
                    }
                }
            }
        }
    }
    for place in ["kubernetes/cpu", "kubernetes/cuda", "compose", "Dockerfile", "Dockerfile.cuda"] {
        for binary in ["vision-worker", "llm-worker", "sam-worker"] {
            if !seen.contains(&(place.to_string(), binary.to_string())) {
                failures.push(format!("{place}: no {binary}"));
            }
        }
    }

    // Autoscaling: each HPA metric is published by an adapter rule whose series the binary emits.
    let rules = refs["adapter_rules"].as_array().unwrap();
    for inv in invocations.iter().filter(|i| i["hpa_metrics"].is_array()) {
        let binary = inv["binary"].as_str().unwrap();
        let mut emitted = emitted_metrics(&crate_dir(binary).join("src")).unwrap();
        emitted.extend(emitted_metrics(&root().join("common/src")).unwrap());
        for metric in inv["hpa_metrics"].as_array().unwrap() {
            let Some(rule) = rules.iter().find(|r| r["published_as"] == *metric) else {
                failures
                    .push(format!("{}: HPA metric {metric} is published by no adapter rule", inv["source"]));
                continue;
            };
            let series = rule["series"].as_str().unwrap();
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| series.strip_suffix(s));
            let ok = match base {
                Some(base) if emitted.get(base) == Some(&MetricKind::Histogram) => true,
                _ => emitted.contains_key(series) && emitted.get(series) != Some(&MetricKind::Histogram),
            };
            if !ok {
                failures.push(format!(
                    "{}: {series} is not emitted by {binary} (emits {:?})",
                    inv["source"],
                    emitted.keys()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "deploy/ disagrees with the binaries:\n{}", failures.join("\n"));
}

#[test]
fn metric_names_follow_prometheus_conventions() {
    // Counters end in `_total`; a duration carries its unit (`_seconds`); every name has the
    // `osprey_` prefix. Checked over every crate that serves metrics.
    let mut bad = Vec::new();
    let mut seen = 0;
    for dir in ["common", "gateway", "vision-worker", "sam-worker", "llm-worker"] {
        for (name, kind) in emitted_metrics(&root().join(dir).join("src")).unwrap() {
            seen += 1;
            let counter_ok = (kind == MetricKind::Counter) == name.ends_with("_total");
            let unit_ok = !["_duration", "_time", "_latency"].iter().any(|s| name.ends_with(s));
            if !(name.starts_with("osprey_") && counter_ok && unit_ok) {
                bad.push(format!("{dir}: {name} ({kind:?})"));
            }
        }
    }
    assert!(seen >= 20, "the scan found only {seen} metrics");
    assert!(bad.is_empty(), "metric names against the Prometheus conventions:\n{}", bad.join("\n"));
}

#[test]
fn the_cross_check_catches_a_bad_flag_and_a_made_up_metric() {
    // The parser really rejects what the binary would reject, and the metric scan is not a
    // catch-all: guards against a check that cannot fail.
    let flags = vec![("--no-such-flag".to_string(), Some("1".to_string()))];
    let weights = BTreeMap::from([("OSPREY_WEIGHTS".to_string(), Some("/models/x".to_string()))]);
    assert!(parse("vision-worker", &flags, &weights).is_err());
    let (parsed, unknown) = parse("llm-worker", &[], &weights).unwrap();
    assert_eq!(parsed.listen_port, 50053);
    assert!(unknown.is_empty());
    let emitted = emitted_metrics(&root().join("llm-worker/src")).unwrap();
    assert_eq!(emitted.get("osprey_llm_queue_size"), Some(&MetricKind::Gauge));
    assert!(!emitted.contains_key("osprey_llm_made_up_total"));
}

#[test]
fn the_image_build_context_holds_every_workspace_member() {
    // `cargo chef prepare` and `cargo build --locked` need every member's manifest and sources.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members_line = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"gateway") && members.contains(&"deploy"), "{members:?}");
    for ignore in ["Dockerfile.dockerignore", "Dockerfile.cuda.dockerignore"] {
        let text = std::fs::read_to_string(root().join("deploy").join(ignore)).unwrap();
        let patterns: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        for needed in members.iter().copied().chain(["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"]) {
            for pattern in &patterns {
                let pattern = pattern.trim_start_matches("**/").trim_end_matches('/');
                let excluded = match pattern.strip_suffix('*') {
                    Some(prefix) => needed.starts_with(prefix),
                    None => needed == pattern || needed.starts_with(&format!("{pattern}/")),
                };
                assert!(!excluded, "{ignore}: `{pattern}` leaves {needed} out of the build context");
            }
        }
    }
}
