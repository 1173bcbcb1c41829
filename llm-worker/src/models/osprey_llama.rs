//! Osprey's language model: the `mlp2x_gelu` projector on the image tokens and a LLaMA-2 decoder
//! (Vicuna-7B v1.5) fed with spliced embeddings, with a KV cache made for serving.
//!
//! - Paper: Yuan et al., "Osprey: Pixel Understanding with Visual Instruction Tuning", CVPR 2024,
//!   <https://arxiv.org/abs/2312.10032>; LLaMA 2: <https://arxiv.org/abs/2307.09288>.
//! - Upstream code: <https://github.com/CircleRadon/Osprey> `osprey/model/osprey_arch.py`
//!   (`prepare_inputs_labels_for_multimodal`), `osprey/model/multimodal_projector/builder.py`;
//!   transformers `models/llama/modeling_llama.py` (eager attention, rotate-half RoPE).
//! - Spec: docs/osprey-model.md §3 (projector), §4.1 (LLaMA), §4.3 (splicing).
//!
//! candle-transformers' `llama` returns last-position logits only and keeps one sequence per cache,
//! so this file has its own decoder around a cache that supports serving:
//!
//! - **Batches of sequences** at different positions run in one [`OspreyLlama::forward`]: the
//!   new tokens of every sequence are stacked into one `[N, hidden]` matrix for all the linear
//!   layers (where the weights' memory traffic is), and attention runs per sequence against its
//!   own keys and values. A sequence may bring one token (decoding) or many (prefill) in the same
//!   step, so new requests join a running batch between decode steps.
//! - **Shared prefixes**: a [`SeqCache`] is a chain of immutable, reference-counted [`KvBlock`]s
//!   (a [`PrefixKv`], e.g. system prompt + image tokens) followed by the sequence's own growable
//!   tail. Attention scores are computed block by block and soft-maxed together, so a prefix is
//!   computed once and read in place by every sequence that starts with it; nothing is copied.
//! - Logits for every new position ([`LogitsMode::All`], parity and scoring) or only the last one
//!   ([`LogitsMode::Last`], decoding).
//!
//! Speed notes: attention is a loop over sequences (two small matmuls per cache block); that is
//! fine on CPU and correct everywhere, but a fused paged-attention kernel is the GPU path.

use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use serde::Deserialize;

use crate::error::LlmError;
use crate::prompt::{Location, PromptError};
use crate::sampling::{FinishReason, Sampler, SamplingParams};
use crate::tokenizer::IMAGE_TOKEN_INDEX;

/// The resolved model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// Input width of the projector (res4 channels); `None`: read from the weight's shape (the
    /// real Osprey config has no `mm_hidden_size`; the code default is 768).
    pub mm_hidden_size: Option<usize>,
    /// Placeholder ids in prompts (32000/32001 in the real vocabulary; never embedded).
    pub mask_token_id: u32,
    pub pos_token_id: u32,
}

/// The fields of a Hugging Face `config.json` that matter here.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    mm_hidden_size: Option<usize>,
    mm_projector_type: Option<String>,
    mask_token_id: Option<u32>,
    pos_token_id: Option<u32>,
}

/// First integer of a JSON int or list of ints (`eos_token_id` may be either).
fn first_id(v: &Option<serde_json::Value>, default: u32) -> Result<u32, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Array(a)) => first_id(&a.first().cloned(), default),
        Some(v) => v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| format!("bad token id {v}")),
    }
}

impl Config {
    /// Parses a Hugging Face LLaMA / Osprey `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(format!("hidden_act {act:?} is not supported (only silu)"));
        }
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            return Err("attention_bias / mlp_bias are not supported".into());
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported (Osprey has none)".into());
        }
        if let Some(t) = &hf.mm_projector_type
            && t != "mlp2x_gelu"
        {
            return Err(format!("mm_projector_type {t:?} is not supported (only mlp2x_gelu)"));
        }
        // transformers <= 4.x writes `rope_theta`, 5.x `rope_parameters.rope_theta`; 4.31 defaults
        // to 10000 when neither is present.
        let rope_type = hf.rope_parameters.as_ref().and_then(|p| p.get("rope_type")).and_then(|v| v.as_str());
        if rope_type.is_some_and(|t| t != "default") {
            return Err(format!("rope_type {rope_type:?} is not supported (only default)"));
        }
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        let heads = hf.num_attention_heads;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!("{heads} attention heads cannot share {kv_heads} key/value heads"));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even and positive"));
        }
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: first_id(&hf.bos_token_id, 1)?,
            eos_token_id: first_id(&hf.eos_token_id, 2)?,
            mm_hidden_size: hf.mm_hidden_size,
            mask_token_id: hf.mask_token_id.unwrap_or(32000),
            pos_token_id: hf.pos_token_id.unwrap_or(32001),
        })
    }

    /// Osprey-7b (Vicuna-7B v1.5 + projector from ConvNeXt-L res4), docs/osprey-model.md §4.1.
    pub fn osprey_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: 1,
            eos_token_id: 2,
            mm_hidden_size: Some(768),
            mask_token_id: 32000,
            pos_token_id: 32001,
        }
    }
}

/// `mlp2x_gelu`: Linear(mm_hidden, hidden), exact GELU, Linear(hidden, hidden).
#[derive(Debug, Clone)]
pub struct MmProjector {
    fc1: Linear,
    fc2: Linear,
}

impl MmProjector {
    /// `vb` at `model.mm_projector`.
    pub fn load(
        vb: VarBuilder,
        mm_hidden_size: Option<usize>,
        hidden_size: usize,
    ) -> candle_core::Result<Self> {
        let vb0 = vb.pp("0");
        let w0 = match mm_hidden_size {
            Some(m) => vb0.get((hidden_size, m), "weight")?,
            None => {
                let w = vb0.get_unchecked("weight")?;
                let (out, _) = w.dims2()?;
                if out != hidden_size {
                    candle_core::bail!(
                        "model.mm_projector.0.weight is {:?}, expected [{hidden_size}, _]",
                        w.dims()
                    );
                }
                w
            }
        };
        let fc1 = Linear::new(w0, Some(vb0.get(hidden_size, "bias")?));
        let fc2 = candle_nn::linear(hidden_size, hidden_size, vb.pp("2"))?;
        Ok(Self { fc1, fc2 })
    }

    pub fn input_size(&self) -> usize {
        self.fc1.weight().dim(1).expect("projector weight is 2-D. This is a bug.")
    }
}

impl Module for MmProjector {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.gelu_erf()?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let att = vb.pp("self_attn");
        let self_attn = Attention {
            q_proj: candle_nn::linear_no_bias(h, cfg.num_attention_heads * d, att.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(h, cfg.num_key_value_heads * d, att.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(h, cfg.num_key_value_heads * d, att.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(cfg.num_attention_heads * d, h, att.pp("o_proj"))?,
        };
        let m = vb.pp("mlp");
        let mlp = Mlp {
            gate_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, m.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, m.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(cfg.intermediate_size, h, m.pp("down_proj"))?,
        };
        Ok(Self {
            self_attn,
            mlp,
            input_layernorm: candle_nn::rms_norm(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                h,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }
}

/// Keys and values of a run of consecutive positions for every layer (`[kv_heads, len,
/// head_dim]` each). Immutable once built, shared through `Arc`.
#[derive(Debug)]
pub struct KvBlock {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

/// A computed prompt prefix (positions `0..len`) that sequences can start from.
#[derive(Debug, Clone, Default)]
pub struct PrefixKv {
    blocks: Vec<Arc<KvBlock>>,
    len: usize,
}

impl PrefixKv {
    /// Number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` positions (views into the same blocks; nothing is copied).
    pub fn truncate(&self, len: usize) -> candle_core::Result<PrefixKv> {
        if len >= self.len {
            return Ok(self.clone());
        }
        let mut out = PrefixKv::default();
        for block in &self.blocks {
            let keep = (len - out.len).min(block.len);
            if keep == 0 {
                break;
            }
            if keep == block.len {
                out.blocks.push(block.clone());
            } else {
                let layers = block
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((k.narrow(1, 0, keep)?, v.narrow(1, 0, keep)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                out.blocks.push(Arc::new(KvBlock { layers, len: keep }));
            }
            out.len += keep;
        }
        Ok(out)
    }

    /// Bytes held by the keys and values (shared blocks counted fully).
    pub fn size_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.layers.iter())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// One sequence's cache: a shared prefix followed by the sequence's own positions, kept in
/// per-layer buffers that grow by doubling (`[kv_heads, capacity, head_dim]`, written in place).
#[derive(Debug)]
pub struct SeqCache {
    prefix: PrefixKv,
    tail: Vec<(Tensor, Tensor)>,
    tail_len: usize,
    capacity: usize,
}

impl SeqCache {
    /// An empty cache, or one continuing `prefix`.
    pub fn new(prefix: PrefixKv) -> Self {
        Self { prefix, tail: Vec::new(), tail_len: 0, capacity: 0 }
    }

    /// Number of positions (the position of the next token).
    pub fn len(&self) -> usize {
        self.prefix.len + self.tail_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shared prefix this cache starts with.
    pub fn prefix(&self) -> &PrefixKv {
        &self.prefix
    }

    /// Freezes this cache into a prefix other sequences can share (its own positions become a
    /// new block after the existing ones).
    pub fn into_prefix(self) -> candle_core::Result<PrefixKv> {
        let mut prefix = self.prefix;
        if self.tail_len > 0 {
            let layers = self
                .tail
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.narrow(1, 0, self.tail_len)?.contiguous()?,
                        v.narrow(1, 0, self.tail_len)?.contiguous()?,
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            prefix.blocks.push(Arc::new(KvBlock { layers, len: self.tail_len }));
            prefix.len += self.tail_len;
        }
        Ok(prefix)
    }
}

/// Which logits a forward returns for a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// None (prefix prefill).
    Skip,
    /// Every new position: `[T, vocab]`.
    All,
    /// The last new position: `[1, vocab]`.
    Last,
}

/// One sequence's part of a batched forward: its cache and its new input embeddings `[T, hidden]`.
#[derive(Debug)]
pub struct SeqStep<'a> {
    pub cache: &'a mut SeqCache,
    pub embeds: Tensor,
    pub logits: LogitsMode,
}

/// A piece of a prompt after splicing (docs/osprey-model.md §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Ordinary token ids at `ids[range]`.
    Text(std::ops::Range<usize>),
    /// The image tokens (at the -200 sentinel).
    Image,
    /// Region `k`'s `<mask>` then `<pos>` token.
    Region(usize),
}

/// Splits prompt ids into text runs, the image and region pairs, checking the structure: every
/// `<mask>` is immediately followed by `<pos>`, no `<pos>` stands alone, every other id is in the
/// vocabulary. Counts are checked by the caller against what was sent.
pub fn splice_plan(ids: &[i64], cfg: &Config) -> Result<Vec<Segment>, PromptError> {
    let (mask, pos) = (i64::from(cfg.mask_token_id), i64::from(cfg.pos_token_id));
    let mut segments = Vec::new();
    let mut regions = 0;
    let mut start = 0;
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let special = id == IMAGE_TOKEN_INDEX || id == mask || id == pos;
        if !special {
            if id < 0 || id as u64 >= cfg.vocab_size as u64 {
                return Err(PromptError::TokenOutOfRange {
                    id,
                    at: Location::Token(i),
                    vocab_size: cfg.vocab_size,
                });
            }
            i += 1;
            continue;
        }
        if start < i {
            segments.push(Segment::Text(start..i));
        }
        if id == IMAGE_TOKEN_INDEX {
            segments.push(Segment::Image);
            i += 1;
        } else if id == mask {
            if ids.get(i + 1) != Some(&pos) {
                return Err(PromptError::MaskWithoutPos { at: Location::Token(i) });
            }
            segments.push(Segment::Region(regions));
            regions += 1;
            i += 2;
        } else {
            return Err(PromptError::PosWithoutMask { at: Location::Token(i) });
        }
        start = i;
    }
    if start < ids.len() {
        segments.push(Segment::Text(start..ids.len()));
    }
    Ok(segments)
}

/// Number of images and regions in a plan.
pub fn plan_counts(plan: &[Segment]) -> (usize, usize) {
    let images = plan.iter().filter(|s| **s == Segment::Image).count();
    let regions = plan.iter().filter(|s| matches!(s, Segment::Region(_))).count();
    (images, regions)
}

/// Result of [`OspreyLlama::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// The logits each token was chosen from, `[tokens, vocab]` (when asked for).
    pub logits: Option<Tensor>,
    pub finish: FinishReason,
}

/// The Osprey LLM: projector, embeddings, decoder layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct OspreyLlama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    mm_projector: MmProjector,
    /// RoPE inverse frequencies, `1 / theta^(2i / head_dim)` in f32 like transformers.
    inv_freq: Vec<f32>,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl OspreyLlama {
    /// Loads from Hugging Face names (`model.embed_tokens`, `model.layers.{i}.…`, `model.norm`,
    /// `lm_head`, `model.mm_projector.{0,2}`), in `vb`'s dtype and device.
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(m.pp(format!("layers.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let mm_projector = MmProjector::load(m.pp("mm_projector"), cfg.mm_hidden_size, cfg.hidden_size)?;
        let d = cfg.head_dim;
        let theta = cfg.rope_theta as f32;
        let inv_freq = (0..d / 2).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / d as f32)).collect();
        let mut cfg = cfg.clone();
        cfg.mm_hidden_size = Some(mm_projector.input_size());
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            mm_projector,
            inv_freq,
            cfg,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration, with `mm_hidden_size` filled in from the weights.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Token embeddings `[n, hidden]` (ids must be in the vocabulary).
    pub fn embed_ids(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(&Tensor::new(ids, &self.device)?)
    }

    /// `mm_projector(image_features)`: `[T, mm_hidden]` res4 tokens to `[T, hidden]`.
    pub fn project_image(&self, image_features: &Tensor) -> Result<Tensor, LlmError> {
        let m = self.mm_projector.input_size();
        match image_features.dims() {
            [_, c] if *c == m => {}
            dims => {
                return Err(LlmError::InvalidInput(format!("image_features must be [T, {m}], got {dims:?}")));
            }
        }
        let x = image_features.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.mm_projector.forward(&x)?)
    }

    /// Input embeddings for prompt `ids` (docs/osprey-model.md §4.3): text ids embedded, the
    /// projected image tokens `[T, hidden]` at the -200 sentinel, region `k`'s `mask_tokens[k]`
    /// and `pos_tokens[k]` (`[N, hidden]`, not projected) at its `<mask><pos>` pair. The number of
    /// sentinels must equal whether `image` is given and the pairs must equal N.
    pub fn splice(
        &self,
        ids: &[i64],
        image: Option<&Tensor>,
        mask_tokens: &Tensor,
        pos_tokens: &Tensor,
    ) -> Result<Tensor, LlmError> {
        let plan = splice_plan(ids, &self.cfg)?;
        let (images, regions) = plan_counts(&plan);
        let hidden = self.cfg.hidden_size;
        if images != usize::from(image.is_some()) {
            return Err(
                PromptError::ImageCount { found: images, expected: usize::from(image.is_some()) }.into()
            );
        }
        let n = check_regions(mask_tokens, pos_tokens, hidden)?;
        if regions != n {
            return Err(PromptError::RegionCount { pairs: regions, regions: n }.into());
        }
        if let Some(img) = image
            && !matches!(img.dims(), [_, h] if *h == hidden)
        {
            return Err(LlmError::InvalidInput(format!(
                "projected image must be [T, {hidden}], got {:?}",
                img.dims()
            )));
        }
        let cast =
            |t: &Tensor| -> candle_core::Result<Tensor> { t.to_device(&self.device)?.to_dtype(self.dtype) };
        let (mask_tokens, pos_tokens) = (cast(mask_tokens)?, cast(pos_tokens)?);
        let mut parts = Vec::with_capacity(plan.len() * 2);
        for seg in &plan {
            match seg {
                Segment::Text(r) => {
                    let t: Vec<u32> = ids[r.clone()].iter().map(|&i| i as u32).collect();
                    parts.push(self.embed_ids(&t)?);
                }
                Segment::Image => parts.push(cast(image.expect("checked above. This is a bug."))?),
                Segment::Region(k) => {
                    parts.push(mask_tokens.narrow(0, *k, 1)?);
                    parts.push(pos_tokens.narrow(0, *k, 1)?);
                }
            }
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, hidden), self.dtype, &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Runs new positions of several sequences together. Each step's embeddings `[T_i, hidden]`
    /// continue its cache at positions `cache.len()..cache.len() + T_i`; the caches are extended.
    /// Returns per step the logits asked for (`None` for [`LogitsMode::Skip`]).
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> candle_core::Result<Vec<Option<Tensor>>> {
        let cfg = &self.cfg;
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let lens: Vec<usize> = steps.iter().map(|s| s.embeds.dim(0)).collect::<candle_core::Result<_>>()?;
        for (s, &t) in steps.iter().zip(&lens) {
            if t == 0 {
                candle_core::bail!("a sequence step needs at least one new position");
            }
            if s.embeds.dims() != [t, cfg.hidden_size] {
                candle_core::bail!(
                    "step embeddings must be [T, {}], got {:?}",
                    cfg.hidden_size,
                    s.embeds.dims()
                );
            }
        }
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let n: usize = lens.iter().sum();
        let mut positions = Vec::with_capacity(n);
        let mut masks = Vec::with_capacity(steps.len());
        for (s, &t) in steps.iter_mut().zip(&lens) {
            positions.extend(s.cache.len()..s.cache.len() + t);
            self.reserve(&mut *s.cache, t)?;
            masks.push(if t > 1 { Some(self.causal_mask(s.cache.tail_len, t)?) } else { None });
        }
        let (cos, sin) = self.rope_tables(&positions)?;
        let embeds: Vec<Tensor> =
            steps.iter().map(|s| s.embeds.to_dtype(self.dtype)).collect::<candle_core::Result<_>>()?;
        let mut x = Tensor::cat(&embeds, 0)?;
        let scale = 1.0 / (d as f64).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let hs = layer.input_layernorm.forward(&x)?;
            let att = &layer.self_attn;
            let q = att.q_proj.forward(&hs)?.reshape((1, n, h, d))?;
            let k = att.k_proj.forward(&hs)?.reshape((1, n, kvh, d))?;
            let v = att.v_proj.forward(&hs)?.reshape((n, kvh, d))?;
            let q = candle_nn::rotary_emb::rope_thd(&q, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_thd(&k, &cos, &sin)?.squeeze(0)?;
            let mut outs = Vec::with_capacity(steps.len());
            let mut off = 0;
            for ((s, &t), mask) in steps.iter().zip(&lens).zip(&masks) {
                let (qi, ki, vi) = (q.narrow(0, off, t)?, k.narrow(0, off, t)?, v.narrow(0, off, t)?);
                outs.push(self.attend(li, &qi, &ki, &vi, &*s.cache, mask.as_ref(), scale)?);
                off += t;
            }
            let attn = Tensor::cat(&outs, 0)?;
            let x1 = (residual + att.o_proj.forward(&attn)?)?;
            let mlp = layer.mlp.forward(&layer.post_attention_layernorm.forward(&x1)?)?;
            x = (x1 + mlp)?;
        }
        for (s, &t) in steps.iter_mut().zip(&lens) {
            s.cache.tail_len += t;
        }
        // Only the rows whose logits are wanted go through the final norm and the LM head.
        let mut rows: Vec<u32> = Vec::new();
        let mut off = 0;
        for (s, &t) in steps.iter().zip(&lens) {
            match s.logits {
                LogitsMode::Skip => {}
                LogitsMode::All => rows.extend((off..off + t).map(|r| r as u32)),
                LogitsMode::Last => rows.push((off + t - 1) as u32),
            }
            off += t;
        }
        let logits = if rows.is_empty() {
            None
        } else {
            let sel = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
            Some(self.lm_head.forward(&self.norm.forward(&sel)?)?)
        };
        let mut out = Vec::with_capacity(steps.len());
        let mut at = 0;
        for (s, &t) in steps.iter().zip(&lens) {
            let take = match s.logits {
                LogitsMode::Skip => 0,
                LogitsMode::All => t,
                LogitsMode::Last => 1,
            };
            out.push(match &logits {
                Some(l) if take > 0 => Some(l.narrow(0, at, take)?),
                _ => None,
            });
            at += take;
        }
        Ok(out)
    }

    /// Computes `embeds` as a shareable prefix, continuing `parent` (empty for a fresh prompt).
    pub fn prefill_prefix(&self, parent: PrefixKv, embeds: &Tensor) -> candle_core::Result<PrefixKv> {
        let mut cache = SeqCache::new(parent);
        self.forward(&mut [SeqStep { cache: &mut cache, embeds: embeds.clone(), logits: LogitsMode::Skip }])?;
        cache.into_prefix()
    }

    /// Decodes one sequence: prefill `prompt_embeds` on `cache`, then pick tokens until EOS (when
    /// asked) or `max_new_tokens`. Keeps each step's logits when `keep_logits`.
    pub fn generate(
        &self,
        cache: &mut SeqCache,
        prompt_embeds: &Tensor,
        params: &SamplingParams,
        keep_logits: bool,
    ) -> candle_core::Result<Generation> {
        let mut sampler = Sampler::new(params.clone());
        let mut tokens = Vec::new();
        let mut kept = Vec::new();
        let mut embeds = prompt_embeds.clone();
        let finish = loop {
            let logits = self
                .forward(&mut [SeqStep { cache: &mut *cache, embeds, logits: LogitsMode::Last }])?
                .pop()
                .flatten()
                .expect("Last logits were asked for. This is a bug.")
                .squeeze(0)?;
            let token = sampler.sample(&logits.to_dtype(DType::F32)?.to_vec1()?);
            if params.stop_at_eos && token == self.cfg.eos_token_id {
                break FinishReason::Eos;
            }
            tokens.push(token);
            if keep_logits {
                kept.push(logits);
            }
            if tokens.len() >= params.max_new_tokens {
                break FinishReason::Length;
            }
            embeds = self.embed_ids(&[token])?;
        };
        let logits = if keep_logits && !kept.is_empty() { Some(Tensor::stack(&kept, 0)?) } else { None };
        Ok(Generation { tokens, logits, finish })
    }

    /// Makes room for `extra` more positions in the cache's tail buffers.
    fn reserve(&self, cache: &mut SeqCache, extra: usize) -> candle_core::Result<()> {
        let needed = cache.tail_len + extra;
        if needed <= cache.capacity {
            return Ok(());
        }
        let cap = needed.max(2 * cache.capacity).max(16);
        let shape = (self.cfg.num_key_value_heads, cap, self.cfg.head_dim);
        let mut tail = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let (k, v) = (
                Tensor::zeros(shape, self.dtype, &self.device)?,
                Tensor::zeros(shape, self.dtype, &self.device)?,
            );
            if cache.tail_len > 0 {
                let (ok, ov) = &cache.tail[li];
                k.slice_set(&ok.narrow(1, 0, cache.tail_len)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, cache.tail_len)?.contiguous()?, 1, 0)?;
            }
            tail.push((k, v));
        }
        cache.tail = tail;
        cache.capacity = cap;
        Ok(())
    }

    /// `[T, start + T]` additive mask for T new tail positions after `start` cached ones.
    fn causal_mask(&self, start: usize, t: usize) -> candle_core::Result<Tensor> {
        let cols = start + t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|row| (0..cols).map(move |col| if col > start + row { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, cols), &self.device)?.to_dtype(self.dtype)
    }

    /// RoPE `cos`/`sin` `[N, head_dim / 2]` for arbitrary positions (f32 math, like transformers).
    fn rope_tables(&self, positions: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// Attention of one sequence's T new positions: q `[T, H, D]`, k/v `[T, KVH, D]` (RoPE done).
    /// Appends k/v to the cache tail (the tail length is advanced by the caller after all layers)
    /// and returns `[T, H * D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &SeqCache,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (t, h, d) = q.dims3()?;
        let kvh = self.cfg.num_key_value_heads;
        let rep = h / kvh;
        let start = cache.tail_len;
        let (tail_k, tail_v) = &cache.tail[layer];
        tail_k.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, start)?;
        tail_v.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, start)?;
        let own = start + t;
        // GQA without copying keys: query head `g * rep + r` uses kv head `g`, so the queries of
        // one kv head are stacked as rows: [KVH, rep * T, D].
        let q = q.transpose(0, 1)?.contiguous()?.reshape((kvh, rep * t, d))?;
        let mut scores = Vec::with_capacity(cache.prefix.blocks.len() + 1);
        let mut values = Vec::with_capacity(cache.prefix.blocks.len() + 1);
        for block in &cache.prefix.blocks {
            let (bk, bv) = &block.layers[layer];
            scores.push(q.matmul(&bk.t()?)?);
            values.push(bv.clone());
        }
        let (ok, ov) = (tail_k.narrow(1, 0, own)?, tail_v.narrow(1, 0, own)?);
        let mut s = q.matmul(&ok.t()?)?;
        if let Some(mask) = mask {
            s = s.reshape((kvh, rep, t, own))?.broadcast_add(mask)?.reshape((kvh, rep * t, own))?;
        }
        scores.push(s);
        values.push(ov);
        let s = if scores.len() == 1 {
            scores.pop().expect("one score block")
        } else {
            Tensor::cat(&scores, D::Minus1)?
        };
        let s = (s * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let single = values.len() == 1;
        let mut out: Option<Tensor> = None;
        let mut off = 0;
        for v in &values {
            let len = v.dim(1)?;
            let pv = if single { p.clone() } else { p.narrow(D::Minus1, off, len)?.contiguous()? };
            let o = pv.matmul(v)?;
            out = Some(match out {
                None => o,
                Some(acc) => (acc + o)?,
            });
            off += len;
        }
        let out = out.expect("at least the tail block. This is a bug.");
        out.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))
    }

    /// Logits of every position of a fresh prompt (`[L, vocab]`), e.g. for parity checks.
    pub fn prompt_logits(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        let mut cache = SeqCache::new(PrefixKv::default());
        let out = self.forward(&mut [SeqStep {
            cache: &mut cache,
            embeds: embeds.clone(),
            logits: LogitsMode::All,
        }])?;
        Ok(out.into_iter().next().flatten().expect("All logits were asked for. This is a bug."))
    }
}

/// Checks region tokens `[N, hidden]` (mask and pos alike) and returns N.
fn check_regions(mask_tokens: &Tensor, pos_tokens: &Tensor, hidden: usize) -> Result<usize, LlmError> {
    match (mask_tokens.dims(), pos_tokens.dims()) {
        ([n, a], [m, b]) if n == m && *a == hidden && *b == hidden => Ok(*n),
        (a, b) => Err(LlmError::InvalidInput(format!(
            "mask_tokens and pos_tokens must both be [N, {hidden}], got {a:?} and {b:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config { vocab_size: 40, mask_token_id: 38, pos_token_id: 39, ..Config::osprey_7b() }
    }

    #[test]
    fn splice_plan_segments_and_errors() {
        let c = cfg();
        let plan = splice_plan(&[1, 5, -200, 6, 38, 39, 7, 38, 39], &c).unwrap();
        assert_eq!(
            plan,
            vec![
                Segment::Text(0..2),
                Segment::Image,
                Segment::Text(3..4),
                Segment::Region(0),
                Segment::Text(6..7),
                Segment::Region(1)
            ]
        );
        assert_eq!(plan_counts(&plan), (1, 2));
        assert_eq!(splice_plan(&[1, 38, 5], &c), Err(PromptError::MaskWithoutPos { at: Location::Token(1) }));
        assert_eq!(splice_plan(&[1, 38], &c), Err(PromptError::MaskWithoutPos { at: Location::Token(1) }));
        assert_eq!(splice_plan(&[1, 39], &c), Err(PromptError::PosWithoutMask { at: Location::Token(1) }));
        assert_eq!(
            splice_plan(&[1, 40], &c),
            Err(PromptError::TokenOutOfRange { id: 40, at: Location::Token(1), vocab_size: 40 })
        );
        assert_eq!(
            splice_plan(&[-3], &c),
            Err(PromptError::TokenOutOfRange { id: -3, at: Location::Token(0), vocab_size: 40 })
        );
        // The real ids 32000/32001 are outside the 32000-row vocabulary but are placeholders.
        let real = Config::osprey_7b();
        assert_eq!(plan_counts(&splice_plan(&[1, -200, 32000, 32001], &real).unwrap()), (1, 1));
    }

    #[test]
    fn config_parsing() {
        let text = r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "rms_norm_eps": 1e-05, "rope_scaling": null, "max_position_embeddings": 4096,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "mm_projector_type": "mlp2x_gelu",
            "tie_word_embeddings": false}"#;
        let c = Config::from_hf_json(text).unwrap();
        assert_eq!(c, Config { mm_hidden_size: None, ..Config::osprey_7b() });
        let v5 = text.replace(
            "\"rope_scaling\": null",
            "\"rope_parameters\": {\"rope_theta\": 5e5, \"rope_type\": \"default\"}",
        );
        assert_eq!(Config::from_hf_json(&v5).unwrap().rope_theta, 5e5);
        let bad = text
            .replace("\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}");
        assert!(Config::from_hf_json(&bad).is_err());
        let gqa = text.replace("\"num_key_value_heads\": 32", "\"num_key_value_heads\": 5");
        assert!(Config::from_hf_json(&gqa).is_err());
    }
}
