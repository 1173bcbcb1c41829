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

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use osprey_checkpoint::{Checkpoint, WeightsError, var_builder};

use crate::error::LlmError;
use crate::models::osprey_llama::Config;

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
