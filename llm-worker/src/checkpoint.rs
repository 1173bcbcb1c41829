//! Reading a checkpoint directory: `config.json` and the weights as a candle `VarBuilder`.
//!
//! [`load_checkpoint`] is the single place that opens weight files. It reads safetensors (one file
//! or shards listed by `model.safetensors.index.json`). The official Osprey checkpoints are bf16
//! torch pickles (`pytorch_model-*.bin` + `pytorch_model.bin.index.json`); those will come from
//! the shared checkpoint loader (vision-worker's `weights.rs`, moving to a shared crate), which
//! this function is meant to call instead.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

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
pub fn load_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, LlmError> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; like every mmap reader we rely on nobody
    // truncating or rewriting a checkpoint while it is being served.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LlmError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let bad = |msg: String| LlmError::Checkpoint { path: index.clone(), msg };
        let text =
            std::fs::read_to_string(&index).map_err(|source| LlmError::Io { path: index.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map =
            json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no weight_map".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let name = file.as_str().ok_or_else(|| bad(format!("shard {file} is not a string")))?;
            if name.contains('/') || name.contains('\\') || name == ".." {
                return Err(bad(format!("shard name {name:?} must be a plain file name")));
            }
            let path = dir.join(name);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
        return Err(LlmError::Checkpoint {
            path: dir.to_path_buf(),
            msg: "torch pickle checkpoints are read by the shared checkpoint loader, not wired in yet; \
                  convert to safetensors meanwhile"
                .into(),
        });
    }
    Err(LlmError::Checkpoint {
        path: dir.to_path_buf(),
        msg: "no model.safetensors, model.safetensors.index.json or pytorch_model.bin[.index.json]".into(),
    })
}
