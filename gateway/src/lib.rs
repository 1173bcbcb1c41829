//! Osprey's gateway: the only public endpoint. It validates requests, computes image keys, keeps
//! image features in a cache shared by every replica so that many regions share one encoding,
//! and routes work over sharded worker replicas (docs/ARCHITECTURE.md).
//!
//! Modules, bottom to top (each uses only those above it in this list):
//! - [`cache`]: the shared cache store (Redis, or process memory); [`cache_entries`]: its keys and
//!   byte formats.
//! - [`config`]: the `gateway serve` flags.
//! - [`deadline`]: one deadline per request; worker calls get the time left.
//! - [`request`]: validated request shapes; every check on a public request.
//! - [`routing`]: rendezvous hashing of image keys; [`workers`]: replica discovery, health, failover.
//! - [`clients`]: typed worker clients (resident first, then payload; bytes counted).
//! - [`images`]: a request's image: key and size, pixels on demand.
//! - [`state`]: the gateway's shared state.
//! - [`prepare`], [`features`], [`answers`], [`pipeline`]: the pipeline stages and the RPCs' pipelines.
//! - [`auth`]: the API key check; [`handlers`]: the RPC handlers.
//! - [`integrations`]: the annotation-tool back ends; [`http`]: the HTTP side (`--http-listen`): the
//!   annotation page, gRPC-Web and the integrations.
//! - [`service`]: server start (gRPC, and the HTTP side beside it).
//! - [`local`]: the `gateway local` command.

pub mod answers;
pub mod auth;
pub mod cache;
pub mod cache_entries;
pub mod clients;
pub mod config;
pub mod deadline;
pub mod features;
pub mod handlers;
pub mod http;
pub mod images;
pub mod integrations;
pub mod local;
pub mod pipeline;
pub mod prepare;
pub mod request;
pub mod routing;
pub mod service;
pub mod state;
pub mod workers;

/// The module list above is the dependency order, checked against the sources: no module uses
/// one listed below it, so the modules form a tree, never a circle.
#[cfg(test)]
mod module_order {
    use std::path::Path;

    /// The modules in the order the crate docs list them.
    fn listed() -> Vec<String> {
        let docs: String = include_str!("lib.rs").lines().take_while(|l| l.starts_with("//!")).collect();
        docs.split("[`")
            .skip(1)
            .filter_map(|rest| rest.split_once("`]"))
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Every `crate::<module>` a module's source names.
    fn uses(module: &str) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join(format!("{module}.rs"))];
        if let Ok(dir) = std::fs::read_dir(src.join(module)) {
            files.extend(dir.map(|entry| entry.unwrap().path()));
        }
        let text: String = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
        text.split("crate::")
            .skip(1)
            .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
            .collect()
    }

    #[test]
    fn no_module_uses_one_listed_below_it() {
        let order = listed();
        let declared: Vec<&str> = include_str!("lib.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, declared, "the crate docs list every module once");
        for (rank, module) in order.iter().enumerate() {
            for used in uses(module) {
                let at = order.iter().position(|m| *m == used);
                assert!(at.is_some_and(|at| at <= rank), "{module} uses {used}, listed below it");
            }
        }
    }
}
