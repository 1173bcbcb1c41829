//! What `deploy/` may rely on, read from the code itself: the Prometheus metrics each crate emits.
//! `tests/deploy.rs` checks the Dockerfiles, compose file and Kubernetes manifests against it and
//! against the binaries' own argument parsers.

use std::collections::BTreeMap;
use std::path::Path;

/// How a metric is exported (a histogram adds `_bucket`, `_sum` and `_count` series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// The metrics emitted by the non-test code under `src_dir`: names given as literals to the
/// `counter!`/`gauge!`/`histogram!` macros, and to `ResidentCache::new` (whose lookups metric is
/// a counter and whose size metric a gauge).
pub fn emitted_metrics(src_dir: &Path) -> std::io::Result<BTreeMap<String, MetricKind>> {
    let mut metrics = BTreeMap::new();
    for file in rust_files(src_dir)? {
        let text = std::fs::read_to_string(&file)?;
        // Unit tests sit at the end of a file, behind `#[cfg(test)]`; their metrics are not real.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (macro_name, kind) in [
            ("counter!(", MetricKind::Counter),
            ("gauge!(", MetricKind::Gauge),
            ("histogram!(", MetricKind::Histogram),
        ] {
            for (at, _) in code.match_indices(macro_name) {
                // Not `describe_counter!(`: describing a metric does not emit it.
                if code[..at].ends_with("describe_") {
                    continue;
                }
                if let Some(name) = leading_literal(&code[at + macro_name.len()..]) {
                    metrics.insert(name.to_string(), kind);
                }
            }
        }
        for (at, _) in code.match_indices("ResidentCache::new(") {
            let args = &code[at + "ResidentCache::new(".len()..];
            let args = &args[..closing_paren(args).unwrap_or(args.len())];
            let literals: Vec<&str> = args.split('"').skip(1).step_by(2).collect();
            if let [lookups, bytes] = literals[..] {
                metrics.insert(lookups.to_string(), MetricKind::Counter);
                metrics.insert(bytes.to_string(), MetricKind::Gauge);
            }
        }
    }
    Ok(metrics)
}

/// Where the call whose arguments `text` starts with closes.
fn closing_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `"name"` at the start of `text` (after whitespace), if the argument is a literal.
fn leading_literal(text: &str) -> Option<&str> {
    let rest = text.trim_start().strip_prefix('"')?;
    rest.find('"').map(|end| &rest[..end])
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_macro_and_resident_cache_metrics_but_not_descriptions_or_tests() {
        let dir = std::env::temp_dir().join(format!("osprey-deploy-scan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        std::fs::write(
            dir.join("a.rs"),
            "fn f() { metrics::counter!(\"a_total\", \"k\" => v).increment(1);\n\
             describe_gauge!(\"only_described\", \"x\");\n\
             metrics::histogram!(\n    \"a_duration\").record(1.0);\n\
             let c = ResidentCache::new(\n    f(n),\n    \"r_lookups_total\",\n    \"r_bytes\",\n);\n\
             let d = other(\"not_a_metric\"); }\n\
             #[cfg(test)]\nmod tests { fn t() { metrics::gauge!(\"test_only\").set(1.0); } }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("nested/b.rs"),
            "fn g() { metrics::gauge!(name).set(0.0); metrics::gauge!(\"b\"); }",
        )
        .unwrap();
        let found = emitted_metrics(&dir).unwrap();
        let want: BTreeMap<String, MetricKind> = [
            ("a_total", MetricKind::Counter),
            ("a_duration", MetricKind::Histogram),
            ("r_lookups_total", MetricKind::Counter),
            ("r_bytes", MetricKind::Gauge),
            ("b", MetricKind::Gauge),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_string(), k))
        .collect();
        assert_eq!(found, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
