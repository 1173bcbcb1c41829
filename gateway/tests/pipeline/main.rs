//! The whole pipeline over real gRPC on loopback: gateway → vision worker(s) → LLM worker (and
//! SAM), with the tiny reference models, one file a topic. One test binary, so the workers are
//! linked once.

mod ask;
mod bad_input;
mod caching;
mod python_client;
mod segment;
mod support;
mod tls;
