//! `llm-worker quantize`: a checkpoint directory to one GGUF file (layout in [`crate::gguf`]).
//!
//! Every tensor is read through the same loader as `serve` (safetensors or torch `.bin` shards,
//! any of f32/f16/bf16) as f32, one at a time, and quantized with candle's quantizers. The
//! decoder's linear weights get the chosen type; the LM head gets q6_k when the chosen type is a
//! k-quant, as llama.cpp does; embeddings and projector weights are f16, norms and biases f32.
//!
//! A quantized type packs each row in blocks (32 values for q8_0/q5_0/q5_1, 256 for the
//! k-quants), so a row length that is not a multiple of the block cannot take it. Such a tensor
//! falls back the way llama.cpp's quantizer does: q4_k to q5_0, q5_k to q5_1, q6_k to q8_0;
//! q5_0/q5_1 also need an even number of blocks per row (candle's CPU kernels pair them), so a
//! shorter row takes q8_0, and f16 when even that block does not fit. The count of fallbacks is
//! printed at the end.
//!
//! The file is written to `<out>.partial` and renamed when complete, so an interrupted run
//! leaves nothing that looks like a finished model.
//!
//! With `text_only` the projector is left out: llama.cpp's loader refuses a file holding tensors
//! it does not use, so the text-only file is the one llama.cpp runs, the full one the one `serve`
//! runs (same LLaMA bytes in both).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file::Value};
use candle_core::{DType, Device};

use crate::checkpoint::{load_checkpoint, load_config};
use crate::error::LlmError;
use crate::gguf::{KEY_TOKENIZER_JSON, gguf_name, llama_metadata, rope_permuted_heads, to_gguf_rope_rows};
use crate::models::osprey_llama::Config;
use crate::tokenizer::{OspreyTokenizer, SentencePieceModel, TokenizerError};

/// The quantization types `quantize` offers for the decoder's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantType {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

impl QuantType {
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q5K => GgmlDType::Q5K,
            QuantType::Q6K => GgmlDType::Q6K,
        }
    }
}

/// The type a tensor with rows of `row_len` gets when `wanted` is asked for: `wanted` when the
/// row is a whole number of its blocks, else llama.cpp's fallback, else q8_0, else f16.
pub fn type_for_row(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    let fallback = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    };
    [wanted, fallback, GgmlDType::Q8_0]
        .into_iter()
        .find(|&t| row_len.is_multiple_of(row_multiple(t)))
        .unwrap_or(GgmlDType::F16)
}

/// The row lengths a type can take: a whole number of blocks, and for q4_1/q5_0/q5_1 an even
/// number of them (candle's CPU dot products for those types work on block pairs).
fn row_multiple(t: GgmlDType) -> usize {
    match t {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2 * t.block_size(),
        _ => t.block_size(),
    }
}

/// What `quantize` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Linear weights that could not take their intended type (see [`type_for_row`]).
    pub fallbacks: usize,
    /// How many tensors were written with each type.
    pub types: Vec<(GgmlDType, usize)>,
    pub bytes: u64,
}

/// What `quantize` writes besides the chosen type.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizeOptions {
    /// Leave out the projector (`model.mm_projector.*`): a file llama.cpp loads, `serve` does not.
    pub text_only: bool,
}

/// The checkpoint tensors the LLM stage needs, in file order: `(name, shape, is_linear)`. The
/// first projector weight's input width is read from the file when the config lacks it.
fn tensor_plan(cfg: &Config, options: QuantizeOptions) -> Vec<(String, Option<Vec<usize>>, bool)> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut plan = vec![("model.embed_tokens.weight".to_string(), Some(vec![cfg.vocab_size, h]), false)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        plan.push((format!("{p}.input_layernorm.weight"), Some(vec![h]), false));
        plan.push((format!("{p}.self_attn.q_proj.weight"), Some(vec![q, h]), true));
        plan.push((format!("{p}.self_attn.k_proj.weight"), Some(vec![kv, h]), true));
        plan.push((format!("{p}.self_attn.v_proj.weight"), Some(vec![kv, h]), true));
        plan.push((format!("{p}.self_attn.o_proj.weight"), Some(vec![h, q]), true));
        plan.push((format!("{p}.post_attention_layernorm.weight"), Some(vec![h]), false));
        plan.push((format!("{p}.mlp.gate_proj.weight"), Some(vec![i, h]), true));
        plan.push((format!("{p}.mlp.up_proj.weight"), Some(vec![i, h]), true));
        plan.push((format!("{p}.mlp.down_proj.weight"), Some(vec![h, i]), true));
    }
    plan.push(("model.norm.weight".to_string(), Some(vec![h]), false));
    if !cfg.tie_word_embeddings {
        plan.push(("lm_head.weight".to_string(), Some(vec![cfg.vocab_size, h]), true));
    }
    if options.text_only {
        return plan;
    }
    let m0 = cfg.mm_hidden_size.map(|m| vec![h, m]);
    plan.push(("model.mm_projector.0.weight".to_string(), m0, false));
    plan.push(("model.mm_projector.0.bias".to_string(), Some(vec![h]), false));
    plan.push(("model.mm_projector.2.weight".to_string(), Some(vec![h, h]), false));
    plan.push(("model.mm_projector.2.bias".to_string(), Some(vec![h]), false));
    plan
}

/// Quantizes the checkpoint in `dir` into `out` (see the module docs).
pub fn run(dir: &Path, out: &Path, quant: QuantType) -> Result<QuantizeReport, LlmError> {
    run_with(dir, out, quant, QuantizeOptions::default())
}

/// [`run`] with options.
pub fn run_with(
    dir: &Path,
    out: &Path,
    quant: QuantType,
    options: QuantizeOptions,
) -> Result<QuantizeReport, LlmError> {
    let mut cfg = load_config(dir)?;
    let vb = load_checkpoint(dir, DType::F32, &Device::Cpu)?;
    let plan = tensor_plan(&cfg, options);
    let wanted = quant.ggml();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(plan.len());
    let mut fallbacks = 0;
    let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
    for (n, (name, shape, linear)) in plan.iter().enumerate() {
        let w = match shape {
            Some(s) => vb.get(s.as_slice(), name)?,
            None => vb.get_unchecked(name)?,
        };
        if name == "model.mm_projector.0.weight" {
            cfg.mm_hidden_size = Some(w.dim(1)?);
        }
        let ty = if *linear {
            let intended =
                if name == "lm_head.weight" && wanted != GgmlDType::Q8_0 { GgmlDType::Q6K } else { wanted };
            let ty = type_for_row(intended, w.dim(1)?);
            if ty != intended {
                fallbacks += 1;
            }
            ty
        } else if w.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
        let w = match rope_permuted_heads(name, &cfg) {
            Some(heads) => to_gguf_rope_rows(&w, heads)?,
            None => w,
        };
        tensors.push((gguf_name(name), QTensor::quantize(&w, ty)?));
        *counts.entry(ty).or_default() += 1;
        eprintln!("quantize: {}/{} {} -> {} {ty:?}", n + 1, plan.len(), name, gguf_name(name));
    }

    let mut metadata = llama_metadata(&cfg, wanted);
    metadata.extend(tokenizer_metadata(dir, &cfg)?);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let partial = partial_path(out);
    let file = File::create(&partial).map_err(|source| LlmError::Io { path: partial.clone(), source })?;
    let mut w = Progress::new(BufWriter::new(file));
    candle_core::quantized::gguf_file::write(&mut w, &md, &ts)?;
    let bytes = w.finish().map_err(|source| LlmError::Io { path: partial.clone(), source })?;
    std::fs::rename(&partial, out).map_err(|source| LlmError::Io { path: out.to_path_buf(), source })?;
    let mut types: Vec<(GgmlDType, usize)> = counts.into_iter().collect();
    types.sort_by_key(|(t, _)| format!("{t:?}"));
    eprintln!(
        "quantize: wrote {} ({:.1} MB, {} tensors: {types:?}); {fallbacks} linear weight(s) fell back from {wanted:?}",
        out.display(),
        bytes as f64 / 1e6,
        tensors.len()
    );
    Ok(QuantizeReport { tensors: tensors.len(), fallbacks, types, bytes })
}

/// `FILE.gguf` -> `FILE.gguf.partial`.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// `tokenizer.ggml.*` for llama.cpp and the worker's own tokenizer as JSON (nothing when the
/// checkpoint has no tokenizer, as some test models).
///
/// The pieces come from `tokenizer.model` (SentencePiece) when present, else from the
/// tokenizer's vocabulary with zero scores. llama.cpp wants exactly one piece per embedding row,
/// so ids past `vocab_size` (Osprey's `<mask>`/`<pos>` are 32000/32001 over a 32000-row table)
/// are only in `osprey.tokenizer_json`; missing ids are padded as `[PAD{id}]` (unused).
fn tokenizer_metadata(dir: &Path, cfg: &Config) -> Result<Vec<(String, Value)>, LlmError> {
    let tok = match OspreyTokenizer::from_dir(dir) {
        Ok(tok) => tok,
        Err(TokenizerError::NotFound { .. }) => {
            eprintln!(
                "quantize: no tokenizer in {}: the file gets no tokenizer (serve and llama.cpp need one)",
                dir.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let json = tok.inner().to_string(false).map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    let spm = dir.join("tokenizer.model");
    let pieces: Vec<(String, f32)> = if spm.is_file() {
        let bytes = std::fs::read(&spm).map_err(|source| LlmError::Io { path: spm.clone(), source })?;
        SentencePieceModel::from_bytes(&bytes, &spm)?.pieces
    } else {
        let vocab = tok.inner().get_vocab(true);
        let mut by_id = vec![None; vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
        for (piece, id) in vocab {
            by_id[id as usize] = Some(piece);
        }
        by_id.into_iter().enumerate().map(|(i, p)| (p.unwrap_or_else(|| format!("[PAD{i}]")), 0.0)).collect()
    };
    let special = [tok.bos_id(), tok.eos_id()];
    let region = [tok.mask_id(), tok.pos_id()];
    let (mut tokens, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for id in 0..cfg.vocab_size {
        let (piece, score) = pieces.get(id).cloned().unwrap_or_else(|| (format!("[PAD{id}]"), 0.0));
        // SentencePiece piece types as llama.cpp numbers them.
        let ty = if id == 0 {
            2 // unknown
        } else if special.contains(&(id as u32)) {
            3 // control
        } else if region.contains(&(id as u32)) {
            4 // user defined
        } else if piece.starts_with("[PAD") && id >= pieces.len() {
            5 // unused
        } else if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
            6 // byte
        } else {
            1 // normal
        };
        tokens.push(Value::String(piece));
        scores.push(Value::F32(score));
        types.push(Value::I32(ty));
    }
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(tok.bos_id())),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(tok.eos_id())),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (KEY_TOKENIZER_JSON.into(), Value::String(json)),
    ])
}

/// A writer that reports every 256 MB written on stderr.
struct Progress<W> {
    inner: W,
    written: u64,
    reported: u64,
}

impl<W: Write + Seek> Progress<W> {
    fn new(inner: W) -> Self {
        Self { inner, written: 0, reported: 0 }
    }

    fn finish(mut self) -> std::io::Result<u64> {
        self.inner.flush()?;
        let end = self.inner.seek(SeekFrom::End(0))?;
        Ok(end)
    }
}

impl<W: Write> Write for Progress<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.reported >= 256 << 20 {
            self.reported = self.written;
            eprintln!("quantize: {} MB written", self.written >> 20);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Seek> Seek for Progress<W> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}
