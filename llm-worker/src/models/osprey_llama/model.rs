//! The model: the `mlp2x_gelu` projector, then a LLaMA-2 decoder (embeddings, decoder layers of
//! attention and MLP, final norm, LM head) run over batches of sequences with their own caches.
//!
//! - **Batches of sequences** at different positions run in one [`OspreyLlama::forward`]: the new
//!   tokens of every sequence are stacked into one `[N, hidden]` matrix for all the linear layers
//!   (where the weights' memory traffic is), and attention runs per sequence against its own keys
//!   and values. A sequence may bring one token (decoding) or many (prefill) in the same step, so
//!   new requests join a running batch between decode steps.
//! - Logits for every new position ([`LogitsMode::All`], parity and scoring) or only the last one
//!   ([`LogitsMode::Last`], decoding).
//!
//! Speed notes: attention is a loop over sequences (two small matmuls per cache block); that is
//! fine on CPU and correct everywhere, but a fused paged-attention kernel is the GPU path.

use candle_core::{CpuStorage, D, DType, Device, InplaceOp1, Layout, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use osprey_kernels::Simd;
use rayon::prelude::*;

use super::linear::QLinear;
use super::weights::WeightSource;

use super::config::Config;
use super::kv_cache::{PrefixKv, SeqCache};
use crate::error::LlmError;
use crate::sampling::{FinishReason, Sampler, SamplingParams};

/// `mlp2x_gelu`: Linear(mm_hidden, hidden), exact GELU, Linear(hidden, hidden).
#[derive(Debug, Clone)]
pub struct MmProjector {
    fc1: Linear,
    fc2: Linear,
}

impl MmProjector {
    /// `model.mm_projector.{0,2}` of `w`.
    pub fn load(
        w: &WeightSource,
        mm_hidden_size: Option<usize>,
        hidden_size: usize,
    ) -> candle_core::Result<Self> {
        let p = "model.mm_projector";
        let w0 = match mm_hidden_size {
            Some(m) => w.get(&[hidden_size, m], &format!("{p}.0.weight"))?,
            None => {
                let w0 = w.get_unchecked(&format!("{p}.0.weight"))?;
                let (out, _) = w0.dims2()?;
                if out != hidden_size {
                    candle_core::bail!("{p}.0.weight is {:?}, expected [{hidden_size}, _]", w0.dims());
                }
                w0
            }
        };
        let fc1 = Linear::new(w0, Some(w.get(&[hidden_size], &format!("{p}.0.bias"))?));
        let fc2 = Linear::new(
            w.get(&[hidden_size, hidden_size], &format!("{p}.2.weight"))?,
            Some(w.get(&[hidden_size], &format!("{p}.2.bias"))?),
        );
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

/// What every layer of one batched forward shares: the RoPE tables of the `N` stacked positions,
/// each sequence's number of new positions, its cache and its causal mask (`None` for one token).
struct Batch<'a> {
    cos: Tensor,
    sin: Tensor,
    lens: Vec<usize>,
    caches: Vec<&'a SeqCache>,
    masks: Vec<Option<Tensor>>,
    fused_softmax: bool,
}

/// Self-attention with rotate-half RoPE and grouped key/value heads.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `{prefix}.{q,k,v,o}_proj`.
    fn load(w: &WeightSource, prefix: &str, cfg: &Config) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: w.linear(h, heads * d, &format!("{prefix}.q_proj"))?,
            k_proj: w.linear(h, kv_heads * d, &format!("{prefix}.k_proj"))?,
            v_proj: w.linear(h, kv_heads * d, &format!("{prefix}.v_proj"))?,
            o_proj: w.linear(heads * d, h, &format!("{prefix}.o_proj"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        })
    }

    /// `x` `[N, hidden]` (the batch's new positions, stacked) to `[N, hidden]`; writes each
    /// sequence's new keys and values into its cache tail for `layer`.
    fn forward(&self, layer: usize, x: &Tensor, batch: &Batch) -> candle_core::Result<Tensor> {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = x.dim(0)?;
        let q = self.q_proj.forward(x)?.reshape((1, n, h, d))?;
        let k = self.k_proj.forward(x)?.reshape((1, n, kvh, d))?;
        let v = self.v_proj.forward(x)?.reshape((n, kvh, d))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, &batch.cos, &batch.sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, &batch.cos, &batch.sin)?.squeeze(0)?;
        let offsets: Vec<usize> =
            batch.lens.iter().scan(0, |off, &t| Some(std::mem::replace(off, *off + t))).collect();
        // The sequences of a decode batch attend in parallel: each is a few small products
        // against its own cache, too small for gemm to spread over the threads.
        let outs = (0..batch.lens.len())
            .into_par_iter()
            .map(|i| {
                let (off, t) = (offsets[i], batch.lens[i]);
                let (qi, ki, vi) = (q.narrow(0, off, t)?, k.narrow(0, off, t)?, v.narrow(0, off, t)?);
                self.attend(
                    layer,
                    &qi,
                    &ki,
                    &vi,
                    batch.caches[i],
                    batch.masks[i].as_ref(),
                    batch.fused_softmax,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.o_proj.forward(&Tensor::cat(&outs, 0)?)
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
        fused_softmax: bool,
    ) -> candle_core::Result<Tensor> {
        let (t, h, d) = q.dims3()?;
        let kvh = self.num_kv_heads;
        let rep = h / kvh;
        let start = cache.tail_len;
        let (tail_k, tail_v) = &cache.tail[layer];
        tail_k.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, start)?;
        tail_v.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, start)?;
        // GQA without copying keys: query head `g * rep + r` uses kv head `g`, so the queries of
        // one kv head are stacked as rows: [KVH, rep, T, D].
        let q = q.transpose(0, 1)?.contiguous()?.reshape((kvh, rep, t, d))?;
        // On the CPU in f32 the mask, the scale and the softmax are one pass over the scores, in
        // place (`CausalSoftmax`); elsewhere they are candle ops.
        let fused = fused_softmax && matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32;
        // A long causal prefill goes in blocks of query rows, each against the keys up to its
        // last row only: the masked upper triangle of the scores is mostly neither computed nor
        // stored (about 40% of the attention's work at 1100 positions).
        let block = if mask.is_some() && fused { QUERY_BLOCK } else { t };
        let mut outs = Vec::with_capacity(t.div_ceil(block));
        for first in (0..t).step_by(block) {
            let rows = block.min(t - first);
            let qb = if rows == t { q.clone() } else { q.narrow(2, first, rows)?.contiguous()? };
            let qb = qb.reshape((kvh, rep * rows, d))?;
            let out = self.attend_rows(layer, &qb, cache, first, rows, mask, fused)?;
            outs.push(out.reshape((kvh, rep, rows, d))?);
        }
        let out = if outs.len() == 1 { outs.pop().expect("one block") } else { Tensor::cat(&outs, 2)? };
        out.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))
    }

    /// Attention of the new positions `first..first + rows` (of T; all of them without the
    /// fused softmax): q `[KVH, rep * rows, D]` against the prefix and the cache tail up to the
    /// last of those positions (the new keys are in the tail already). Returns `[KVH, rep * rows, D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(
        &self,
        layer: usize,
        q: &Tensor,
        cache: &SeqCache,
        first: usize,
        rows: usize,
        mask: Option<&Tensor>,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let (kvh, d) = (self.num_kv_heads, self.head_dim);
        let rep = self.num_heads / kvh;
        let start = cache.tail_len;
        let (tail_k, tail_v) = &cache.tail[layer];
        let own = start + first + rows;
        let mut scores = Vec::with_capacity(cache.prefix.blocks.len() + 1);
        let mut values = Vec::with_capacity(cache.prefix.blocks.len() + 1);
        for block in &cache.prefix.blocks {
            let (bk, bv) = &block.layers[layer];
            scores.push(q.matmul(&bk.t()?)?);
            values.push(bv.clone());
        }
        let (ok, ov) = (tail_k.narrow(1, 0, own)?, tail_v.narrow(1, 0, own)?);
        let mut s = q.matmul(&ok.t()?)?;
        if let (Some(mask), false) = (mask, fused) {
            // Unfused, the rows are all T new positions (see `attend`) and `mask` is [T, own].
            s = s.reshape((kvh, rep, rows, own))?.broadcast_add(mask)?.reshape((kvh, rep * rows, own))?;
        }
        scores.push(s);
        values.push(ov);
        let s = if scores.len() == 1 {
            scores.pop().expect("one score block")
        } else {
            Tensor::cat(&scores, D::Minus1)?
        };
        let scale = 1.0 / (d as f64).sqrt();
        let p = if fused {
            let cols = s.dim(D::Minus1)?;
            let causal = mask.map(|_| CausalStart { t: rows, first_masked: cols - own + start + first + 1 });
            s.inplace_op1(&CausalSoftmax { scale: scale as f32, causal })?;
            s
        } else {
            let s = (s * scale)?;
            let dtype = s.dtype();
            candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(dtype)?
        };
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
        Ok(out.expect("at least the tail block. This is a bug."))
    }
}

/// Query rows per block of a long causal prefill's attention (see `Attention::attend`).
const QUERY_BLOCK: usize = 128;

/// Where the causal mask starts in each row of a sequence's scores `[KVH, rep * T, cols]`: row
/// `i` holds new position `i % t` and sees columns `..first_masked + i % t`.
#[derive(Debug, Clone, Copy)]
struct CausalStart {
    t: usize,
    first_masked: usize,
}

/// `softmax(scale * scores + causal mask)` over the last axis, in place on contiguous f32 CPU
/// scores: one pass per row instead of a fresh full-size tensor for the mask, the scale and the
/// softmax each. Masked columns come out as exact zeros, as `exp(-inf)` gives.
struct CausalSoftmax {
    scale: f32,
    causal: Option<CausalStart>,
}

impl CausalSoftmax {
    fn row(&self, simd: Simd, i: usize, row: &mut [f32]) {
        let valid = self.causal.map_or(row.len(), |c| (c.first_masked + i % c.t).min(row.len()));
        let (seen, masked) = row.split_at_mut(valid);
        masked.fill(0.0);
        osprey_kernels::softmax_scaled(simd, seen, self.scale);
    }
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "osprey-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("causal softmax: f32 scores only") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal softmax: contiguous scores only")
        };
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let rows = &mut data[start..end];
        let n_rows = rows.len() / cols;
        // Threads only for prefills: a decode step's few rows cost less than starting them.
        let threads = candle_core::utils::get_num_threads().min(n_rows * cols / 65_536).max(1);
        let per = n_rows.div_ceil(threads);
        let simd = Simd::detect();
        std::thread::scope(|scope| {
            for (chunk_index, chunk) in rows.chunks_mut(per * cols).enumerate() {
                let mut work = move || {
                    for (k, row) in chunk.chunks_exact_mut(cols).enumerate() {
                        self.row(simd, chunk_index * per + k, row);
                    }
                };
                if threads == 1 {
                    work();
                } else {
                    scope.spawn(work);
                }
            }
        });
        Ok(())
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
}

impl Mlp {
    /// `{prefix}.{gate,up,down}_proj`.
    fn load(w: &WeightSource, prefix: &str, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: w.linear(h, i, &format!("{prefix}.gate_proj"))?,
            up_proj: w.linear(h, i, &format!("{prefix}.up_proj"))?,
            down_proj: w.linear(i, h, &format!("{prefix}.down_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = osprey_kernels::silu_mul(self.gate_proj.forward(xs)?, &self.up_proj.forward(xs)?)?;
        self.down_proj.forward(&gate)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `+ mlp(norm(.))`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `model.layers.{layer}`.
    fn load(w: &WeightSource, layer: usize, cfg: &Config) -> candle_core::Result<Self> {
        let p = format!("model.layers.{layer}");
        let norm = |name: &str| -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm::new(w.get(&[cfg.hidden_size], &format!("{p}.{name}.weight"))?, cfg.rms_norm_eps))
        };
        Ok(Self {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
        })
    }

    fn forward(&self, layer: usize, x: &Tensor, batch: &Batch) -> candle_core::Result<Tensor> {
        let x = (x + self.self_attn.forward(layer, &self.input_layernorm.forward(x)?, batch)?)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + mlp
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
    lm_head: QLinear,
    mm_projector: MmProjector,
    /// RoPE inverse frequencies, `1 / theta^(2i / head_dim)` in f32 like transformers.
    inv_freq: Vec<f32>,
    cfg: Config,
    device: Device,
    dtype: DType,
    /// Whether attention may use [`CausalSoftmax`] (CPU, f32); off only to compare with the
    /// candle-ops formulation ([`OspreyLlama::with_candle_ops_softmax`]).
    fused_softmax: bool,
}

impl OspreyLlama {
    /// Loads from Hugging Face names (`model.embed_tokens`, `model.layers.{i}.…`, `model.norm`,
    /// `lm_head`, `model.mm_projector.{0,2}`), in `vb`'s dtype and device.
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        Self::load_from(&WeightSource::Checkpoint(vb), cfg)
    }

    /// Loads from a checkpoint or a GGUF file (see [`WeightSource`]).
    pub fn load_from(w: &WeightSource, cfg: &Config) -> candle_core::Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embeddings = w.get(&[v, h], "model.embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embeddings.clone(), h);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i, cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::new(w.get(&[h], "model.norm.weight")?, cfg.rms_norm_eps);
        let lm_head = if cfg.tie_word_embeddings {
            QLinear::Plain(Linear::new(embeddings, None))
        } else {
            w.linear(h, v, "lm_head")?
        };
        let mm_projector = MmProjector::load(w, cfg.mm_hidden_size, h)?;
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
            device: w.device().clone(),
            dtype: w.dtype(),
            fused_softmax: true,
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

    /// Runs new positions of several sequences together. Each step's embeddings `[T_i, hidden]`
    /// continue its cache at positions `cache.len()..cache.len() + T_i`; the caches are extended.
    /// Returns per step the logits asked for (`None` for [`LogitsMode::Skip`]).
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> candle_core::Result<Vec<Option<Tensor>>> {
        let cfg = &self.cfg;
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
        let kv_shape = (cfg.num_key_value_heads, cfg.head_dim);
        for (s, &t) in steps.iter_mut().zip(&lens) {
            positions.extend(s.cache.len()..s.cache.len() + t);
            s.cache.reserve(t, self.layers.len(), kv_shape, self.dtype, &self.device)?;
            masks.push(if t > 1 { Some(self.causal_mask(s.cache.tail_len, t)?) } else { None });
        }
        let (cos, sin) = self.rope_tables(&positions)?;
        let embeds: Vec<Tensor> =
            steps.iter().map(|s| s.embeds.to_dtype(self.dtype)).collect::<candle_core::Result<_>>()?;
        let mut x = Tensor::cat(&embeds, 0)?;
        {
            let caches = steps.iter().map(|s| &*s.cache).collect();
            let batch =
                Batch { cos, sin, lens: lens.clone(), caches, masks, fused_softmax: self.fused_softmax };
            for (li, layer) in self.layers.iter().enumerate() {
                x = layer.forward(li, &x, &batch)?;
            }
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

    /// The same model with attention's mask, scale and softmax as separate candle ops on every
    /// device (the formulation before [`CausalSoftmax`]), for comparisons.
    pub fn with_candle_ops_softmax(mut self) -> Self {
        self.fused_softmax = false;
        self
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
