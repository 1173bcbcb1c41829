//! Osprey language stage (docs/MODEL.md, sections "Projector" to "Generation and
//! post-processing"): tokenizer, prompt template, the `mm_projector` + LLaMA decoder with image and
//! region tokens spliced in, and a generation engine with prefix caching and continuous batching.
//!
//! - [`tokenizer`]: the fast LLaMA tokenizer rebuilt from `tokenizer.model`, `tokenizer_image_token`.
//! - [`prompt`]: the `osprey_v1` template, task prompts, region validation, post-processing.
//! - [`models::osprey_llama`]: projector, splicing, decoder and KV cache.
//! - [`sampling`]: greedy / temperature / top-k / top-p selection.
//! - [`engine`]: the model thread: requests in, per-question token streams out.
//! - [`checkpoint`]: `config.json` and weights; [`dump`]: the `llm-worker dump` command.

pub mod checkpoint;
pub mod dump;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod models;
pub mod prompt;
pub mod quantize;
pub mod sampling;
pub mod service;
pub mod tokenizer;

pub use error::LlmError;
pub use models::osprey_llama::{Config, OspreyLlama};
