//! Osprey's language model: the `mlp2x_gelu` projector on the image tokens and a LLaMA-2 decoder
//! (Vicuna-7B v1.5) fed with spliced embeddings, with a KV cache made for serving.
//!
//! - Paper: Yuan et al., "Osprey: Pixel Understanding with Visual Instruction Tuning", CVPR 2024,
//!   <https://arxiv.org/abs/2312.10032>; LLaMA 2: <https://arxiv.org/abs/2307.09288>.
//! - Upstream code: <https://github.com/CircleRadon/Osprey> `osprey/model/osprey_arch.py`
//!   (`prepare_inputs_labels_for_multimodal`), `osprey/model/multimodal_projector/builder.py`;
//!   transformers `models/llama/modeling_llama.py` (eager attention, rotate-half RoPE).
//! - Spec: docs/MODEL.md (sections on the projector, the LLaMA decoder and splicing).
//!
//! candle-transformers' `llama` returns last-position logits only and keeps one sequence per cache,
//! so this module has its own decoder around a cache that supports serving. Read top-down:
//!
//! - [`config`]: [`Config`], parsed from `config.json`.
//! - [`kv_cache`]: [`SeqCache`] and the shared [`PrefixKv`] blocks it starts from.
//! - [`splice`]: prompt ids with the image sentinel and `<mask><pos>` pairs to input embeddings.
//! - [`model`]: the projector, the decoder layers (attention, MLP) and [`OspreyLlama`].
//! - [`linear`]: the decoder's linear layers, plain or quantized ([`QLinear`]);
//!   [`weights`]: where tensors come from, a checkpoint or a GGUF file ([`WeightSource`]).

pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod splice;
pub mod weights;

pub use config::Config;
pub use kv_cache::{KvBlock, PrefixKv, SeqCache};
pub use linear::QLinear;
pub use model::{Generation, LogitsMode, MmProjector, OspreyLlama, SeqStep};
pub use splice::{Segment, plan_counts, splice_plan};
pub use weights::WeightSource;
