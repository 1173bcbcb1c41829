//! Osprey's gateway: the only public endpoint. It validates requests, computes image keys, keeps
//! image features in a cache shared by every replica so that many regions share one encoding,
//! and routes work over sharded worker replicas (architecture.md §1–§6).
//!
//! - [`cache`]: the shared feature cache (Redis, or process memory when no Redis is configured).
//! - [`routing`]: rendezvous hashing of image keys over worker replicas.
//! - [`workers`]: worker replicas: discovery, health checks, failover.
//! - [`annotate`]: the `gateway annotate` client for folders and COCO files.

pub mod annotate;
pub mod cache;
pub mod local;
pub mod routing;
pub mod service;
pub mod workers;
