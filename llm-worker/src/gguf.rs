//! GGUF files for the language stage: llama.cpp's tensor names and `llama.*` metadata for the
//! LLaMA part, Osprey's own names and keys for the rest, and a reader the model loads from.
//!
//! Layout of a file written by `llm-worker quantize` (docs/BENCHMARK_HISTORY.md, "Quantized LLM"):
//!
//! - `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
//!   ffn_up, ffn_down}`, `output_norm`, `output` (`.weight`), as llama.cpp names them. The linear
//!   weights are quantized; embeddings are f16, norms f32.
//! - `model.mm_projector.{0,2}.{weight,bias}`: the projector under its checkpoint name (f16
//!   weights, f32 biases).
//! - `attn_q` / `attn_k` rows are in llama.cpp's order: its converter permutes them so that its
//!   RoPE rotates adjacent pairs `(2i, 2i + 1)`, where the checkpoint (transformers) rotates
//!   `(i, i + head_dim / 2)`. A row of a quantized tensor is a whole number of blocks, so the
//!   reader puts the rows back in checkpoint order by moving bytes, and the decoder keeps one
//!   RoPE for both sources.
//! - Metadata: `general.architecture = llama`, `llama.*` hyper-parameters, `tokenizer.ggml.*` (the
//!   SentencePiece pieces, scores and types, for llama.cpp), and `osprey.*`: the region-token ids
//!   and `osprey.tokenizer_json`, the worker's exact tokenizer (with `<mask>`/`<pos>`).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::error::LlmError;
use crate::models::osprey_llama::Config;

pub const KEY_TOKENIZER_JSON: &str = "osprey.tokenizer_json";
pub const KEY_MASK_TOKEN: &str = "osprey.mask_token_id";
pub const KEY_POS_TOKEN: &str = "osprey.pos_token_id";
pub const KEY_MM_HIDDEN: &str = "osprey.mm_hidden_size";

/// True for a path ending in `.gguf` or a file starting with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// llama.cpp's name for a checkpoint (transformers) tensor name; other names are kept.
pub fn gguf_name(hf: &str) -> String {
    let simple = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = simple.iter().find(|(h, _)| *h == hf) {
        return (*g).to_string();
    }
    if let Some(rest) = hf.strip_prefix("model.layers.")
        && let Some((layer, part)) = rest.split_once('.')
    {
        let parts = [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ];
        if let Some((_, g)) = parts.iter().find(|(h, _)| *h == part) {
            return format!("blk.{layer}.{g}");
        }
    }
    hf.to_string()
}

/// The number of heads whose rows llama.cpp permutes for RoPE in checkpoint tensor `hf`
/// (`q_proj`: attention heads, `k_proj`: key/value heads), or `None`.
pub fn rope_permuted_heads(hf: &str, cfg: &Config) -> Option<usize> {
    if hf.ends_with(".self_attn.q_proj.weight") {
        Some(cfg.num_attention_heads)
    } else if hf.ends_with(".self_attn.k_proj.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// Row `r` of the llama.cpp layout is row `source_row(r)` of the checkpoint layout: within each
/// head of `head_dim` rows, llama.cpp's row `2i + j` is the checkpoint's row `j * head_dim/2 + i`.
fn checkpoint_row(gguf_row: usize, head_dim: usize) -> usize {
    let (head, r) = (gguf_row / head_dim, gguf_row % head_dim);
    head * head_dim + (r % 2) * (head_dim / 2) + r / 2
}

/// Permutes the rows of a checkpoint `q_proj`/`k_proj` weight `[heads * head_dim, in]` into
/// llama.cpp's order (what its converter does before quantizing).
pub fn to_gguf_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// The inverse of [`to_gguf_rope_rows`] on a (possibly quantized) tensor, by moving row bytes.
fn from_gguf_rope_rows(q: QTensor, heads: usize, device: &Device) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let (rows, cols) = (dims[0], dims[1]);
    let head_dim = rows / heads;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; data.len()];
    for g in 0..rows {
        let c = checkpoint_row(g, head_dim);
        out[c * row_bytes..(c + 1) * row_bytes].copy_from_slice(&data[g * row_bytes..(g + 1) * row_bytes]);
    }
    qtensor_from_ggml(dtype, &out, dims, device)
}

/// How a GGUF model is loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufOptions {
    /// Dequantize every linear weight to f32 at load and multiply in f32 (what candle's
    /// `CANDLE_DEQUANTIZE_ALL=1` does), to separate quantization error from kernel error.
    pub dequantize: bool,
}

/// An open GGUF file: its header, and the tensors read on demand.
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<BufReader<File>>,
    cfg: Config,
    pub options: GgufOptions,
}

fn bad(path: &Path, msg: impl Into<String>) -> LlmError {
    LlmError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

impl GgufModel {
    /// Reads the header and the configuration; refuses a file that is not a LLaMA GGUF.
    pub fn open(path: &Path, options: GgufOptions) -> Result<Self, LlmError> {
        let file = File::open(path).map_err(|source| LlmError::Io { path: path.to_path_buf(), source })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(path, format!("not a readable GGUF file: {e}")))?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok());
        if arch.map(String::as_str) != Some("llama") {
            return Err(bad(path, format!("general.architecture is {arch:?}, only \"llama\" is supported")));
        }
        let cfg = config_from_metadata(&content).map_err(|msg| bad(path, msg))?;
        Ok(Self { path: path.to_path_buf(), content, file: Mutex::new(reader), cfg, options })
    }

    /// The configuration from the `llama.*` and `osprey.*` keys (`vocab_size` from `token_embd`).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A string metadata value.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.content.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    pub fn has_tensor(&self, hf: &str) -> bool {
        self.content.tensor_infos.contains_key(&gguf_name(hf))
    }

    /// The tensor stored for checkpoint name `hf`, checked against `shape` (checkpoint order,
    /// `[out, in]` for weights) when given, with `q_proj`/`k_proj` rows in checkpoint order.
    pub fn qtensor(
        &self,
        hf: &str,
        shape: Option<&[usize]>,
        device: &Device,
    ) -> candle_core::Result<QTensor> {
        let name = gguf_name(hf);
        let Some(info) = self.content.tensor_infos.get(&name) else {
            candle_core::bail!("{}: missing tensor {name} (checkpoint name {hf})", self.path.display());
        };
        if let Some(shape) = shape
            && info.shape.dims() != shape
        {
            candle_core::bail!(
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                self.path.display(),
                info.shape.dims()
            );
        }
        let q = {
            let mut file = self.file.lock().expect("a GGUF reader panicked. This is a bug.");
            info.read(&mut *file, self.content.tensor_data_offset, &Device::Cpu).map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor {name}: {e}", self.path.display()))
            })?
        };
        match rope_permuted_heads(hf, &self.cfg) {
            Some(heads) => from_gguf_rope_rows(q, heads, device),
            None if device.is_cpu() => Ok(q),
            None => qtensor_from_ggml(q.dtype(), &q.data()?, q.shape().dims().to_vec(), device),
        }
    }

    /// The tensor for `hf`, dequantized to `dtype`.
    pub fn tensor(
        &self,
        hf: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.qtensor(hf, shape, device)?.dequantize(device)?.to_dtype(dtype)
    }
}

fn config_from_metadata(content: &gguf_file::Content) -> Result<Config, String> {
    let md = &content.metadata;
    let get = |key: &str| md.get(key).ok_or_else(|| format!("missing metadata key {key}"));
    let int = |key: &str| -> Result<usize, String> {
        let v = get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| x as usize)
            .map_err(|e| format!("metadata key {key}: {e}"))
    };
    let float = |key: &str| -> Result<f64, String> {
        let v = get(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| format!("metadata key {key}: {e}"))
    };
    let opt_int = |key: &str| if md.contains_key(key) { int(key).map(Some) } else { Ok(None) };
    let hidden = int("llama.embedding_length")?;
    let heads = int("llama.attention.head_count")?;
    let kv_heads = opt_int("llama.attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!("{heads} attention heads cannot share {kv_heads} key/value heads"));
    }
    let head_dim = opt_int("llama.rope.dimension_count")?.unwrap_or(hidden / heads.max(1));
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(format!("llama.rope.dimension_count {head_dim} must be even and positive"));
    }
    let embd = content.tensor_infos.get("token_embd.weight").ok_or("missing tensor token_embd.weight")?;
    let vocab_size = embd.shape.dims()[0];
    let token = |key: &str, default: u32| -> Result<u32, String> {
        Ok(opt_int(key)?.map(|x| x as u32).unwrap_or(default))
    };
    Ok(Config {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: if md.contains_key("llama.rope.freq_base") {
            float("llama.rope.freq_base")?
        } else {
            10000.0
        },
        max_position_embeddings: int("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token("tokenizer.ggml.bos_token_id", 1)?,
        eos_token_id: token("tokenizer.ggml.eos_token_id", 2)?,
        mm_hidden_size: opt_int(KEY_MM_HIDDEN)?,
        mask_token_id: token(KEY_MASK_TOKEN, 32000)?,
        pos_token_id: token(KEY_POS_TOKEN, 32001)?,
    })
}

/// The metadata `quantize` writes for `cfg` (tokenizer keys are added by the caller).
pub fn llama_metadata(cfg: &Config, file_type: GgmlDType) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let u32v = |x: usize| V::U32(x as u32);
    let mut md = vec![
        ("general.architecture".to_string(), V::String("llama".into())),
        ("general.name".to_string(), V::String("Osprey LLM".into())),
        ("general.file_type".to_string(), V::U32(llama_file_type(file_type))),
        ("llama.context_length".to_string(), u32v(cfg.max_position_embeddings)),
        ("llama.embedding_length".to_string(), u32v(cfg.hidden_size)),
        ("llama.block_count".to_string(), u32v(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".to_string(), u32v(cfg.intermediate_size)),
        ("llama.attention.head_count".to_string(), u32v(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv".to_string(), u32v(cfg.num_key_value_heads)),
        ("llama.rope.dimension_count".to_string(), u32v(cfg.head_dim)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), V::F32(cfg.rms_norm_eps as f32)),
        ("llama.rope.freq_base".to_string(), V::F32(cfg.rope_theta as f32)),
        ("llama.vocab_size".to_string(), u32v(cfg.vocab_size)),
        (KEY_MASK_TOKEN.to_string(), V::U32(cfg.mask_token_id)),
        (KEY_POS_TOKEN.to_string(), V::U32(cfg.pos_token_id)),
    ];
    if let Some(m) = cfg.mm_hidden_size {
        md.push((KEY_MM_HIDDEN.to_string(), u32v(m)));
    }
    md
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`) for the main quantization type.
fn llama_file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(gguf_name("model.layers.3.self_attn.o_proj.weight"), "blk.3.attn_output.weight");
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight"), "blk.12.ffn_down.weight");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight"), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
        assert_eq!(gguf_name("model.mm_projector.0.bias"), "model.mm_projector.0.bias");
    }

    #[test]
    fn rope_row_permutation_round_trips() {
        // 2 heads of head_dim 4, 8 columns (one q8_0 block needs 32: use f32 storage).
        let w = Tensor::arange(0f32, 8.0 * 32.0, &Device::Cpu).unwrap().reshape((8, 32)).unwrap();
        let g = to_gguf_rope_rows(&w, 2).unwrap();
        // llama.cpp's row 1 of head 0 is the checkpoint's row head_dim/2 = 2.
        let row = |t: &Tensor, r: usize| t.get(r).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row(&g, 1), row(&w, 2));
        assert_eq!(row(&g, 5), row(&w, 6));
        let q = QTensor::quantize(&g, GgmlDType::Q8_0).unwrap();
        let back = from_gguf_rope_rows(q, 2, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let direct = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap().dequantize(&Device::Cpu).unwrap();
        let diff = (back - direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }
}
