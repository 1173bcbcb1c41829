//! Reading a checkpoint directory: `config.json` and the weights as a candle `VarBuilder`.
//!
//! [`load_checkpoint`] is the single place that opens weight files, through the shared
//! [`osprey_checkpoint`] reader: safetensors (`model.safetensors` or shards listed by
//! `model.safetensors.index.json`) and torch pickles (`pytorch_model.bin` or shards listed by
//! `pytorch_model.bin.index.json`, as the official bf16 Osprey checkpoints are), any of
//! f32/f16/bf16, converted to the requested dtype as they are read. Names map onto checkpoint keys
//! unchanged. Keys the model never asks for are left unread: the `*.rotary_emb.inv_freq` buffers
//! transformers 4.31 saved (the rotary tables are computed from `rope_theta`), and the vision
//! tower and mask extractor tensors of a full Osprey checkpoint.
//!
//! [`load_model`] and [`load_tokenizer`] also take a GGUF file written by `llm-worker quantize`
//! ([`crate::gguf`]) in place of the directory.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use osprey_checkpoint::{Checkpoint, WeightsError, var_builder};

use crate::error::LlmError;
use crate::gguf::{GgufModel, GgufOptions, KEY_TOKENIZER_JSON, is_gguf};
use crate::models::osprey_llama::{Config, OspreyLlama, WeightSource};
use crate::tokenizer::OspreyTokenizer;

/// Parses `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<Config, LlmError> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|source| LlmError::Io { path: path.clone(), source })?;
    Config::from_hf_json(&text).map_err(|msg| LlmError::Config { path, msg })
}

/// The weights of `dir` as a `VarBuilder` producing `dtype` tensors on `device`.
///
/// Tensors are read when the model asks for them; a missing or mis-shaped one fails the model's
/// load with an error naming the key and the file(s) searched.
pub fn load_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, LlmError> {
    let checkpoint = Checkpoint::open_dir(dir).map_err(|e| checkpoint_error(dir, e))?;
    // The typed errors are not needed: their messages (key and file) reach the caller as the
    // candle error of the failed load.
    let (vb, _errors) = var_builder(checkpoint, dtype, device);
    Ok(vb)
}

fn checkpoint_error(dir: &Path, err: WeightsError) -> LlmError {
    match err {
        WeightsError::Io { path, source } => LlmError::Io { path, source },
        WeightsError::BadFile { path, msg } => LlmError::Checkpoint { path, msg },
        WeightsError::NotFound { .. } => LlmError::Checkpoint {
            path: dir.to_path_buf(),
            msg: "no model.safetensors, model.safetensors.index.json or pytorch_model.bin[.index.json]"
                .into(),
        },
        other => LlmError::Checkpoint { path: dir.to_path_buf(), msg: other.to_string() },
    }
}

/// The model at `path`: a checkpoint directory, or a GGUF file written by `llm-worker quantize`
/// (recognised by its `.gguf` extension or its magic), whose linear layers stay quantized.
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<OspreyLlama, LlmError> {
    load_model_with(path, dtype, device, GgufOptions::default())
}

/// [`load_model`] with the GGUF options (ignored for a checkpoint directory).
pub fn load_model_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    options: GgufOptions,
) -> Result<OspreyLlama, LlmError> {
    if is_gguf(path) {
        let file = GgufModel::open(path, options)?;
        let cfg = file.config().clone();
        let source = WeightSource::Gguf { file: &file, dtype, device: device.clone() };
        Ok(OspreyLlama::load_from(&source, &cfg)?)
    } else {
        let cfg = load_config(path)?;
        Ok(OspreyLlama::load(load_checkpoint(path, dtype, device)?, &cfg)?)
    }
}

/// The tokenizer of a checkpoint directory, or the one a GGUF file carries.
pub fn load_tokenizer(path: &Path) -> Result<OspreyTokenizer, LlmError> {
    if !is_gguf(path) {
        return Ok(OspreyTokenizer::from_dir(path)?);
    }
    let file = GgufModel::open(path, GgufOptions::default())?;
    let json = file.metadata_str(KEY_TOKENIZER_JSON).ok_or_else(|| LlmError::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("no {KEY_TOKENIZER_JSON} metadata (not written by llm-worker quantize?)"),
    })?;
    Ok(OspreyTokenizer::from_json(json)?)
}
