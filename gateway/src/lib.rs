//! Osprey's gateway: the only public endpoint. It validates requests, computes image keys, keeps
//! image features in a cache shared by every replica so that many regions share one encoding,
//! and routes work over sharded worker replicas (docs/ARCHITECTURE.md).
//!
//! Modules, bottom to top (each uses only those above it in this list):
//! - [`config`]: the `gateway serve` flags.
//! - [`deadline`]: one deadline per request; worker calls get the time left.
//! - [`request`]: validated request shapes; every check on a public request.
//! - [`cache`]: the shared cache store (Redis, or process memory); [`cache_entries`]: its keys and
//!   byte formats.
//! - [`routing`]: rendezvous hashing of image keys; [`workers`]: replica discovery, health, failover.
//! - [`clients`]: typed worker clients (resident first, then payload; bytes counted).
//! - [`images`]: a request's image: key and size, pixels on demand.
//! - [`state`]: the gateway's shared state.
//! - [`prepare`], [`features`], [`answers`], [`pipeline`]: the pipeline stages and the RPCs' pipelines.
//! - [`auth`]: the API key check; [`handlers`]: the RPC handlers; [`service`]: server start.
//! - [`http`]: the HTTP side (`--http-listen`): the annotation page, gRPC-Web, [`integrations`].
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
