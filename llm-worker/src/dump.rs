//! `llm-worker dump`: run the spliced prompt of a safetensors input through the model and write
//! every position's logits and a greedy continuation, for parity checks against the reference.
//!
//! Input tensors: `input_ids` i64 `[L]` (one -200 sentinel, `<mask><pos>` id pairs),
//! `image_features` f32 `[T, mm_hidden]` (res4 tokens before the projector), `mask_tokens` and
//! `pos_tokens` f32 `[N, hidden]` (may be absent when N = 0).
//! Output tensors: `logits` f32 `[L - 1 + T, vocab]`, `greedy_ids` i64 `[K]` (no EOS stop).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::checkpoint::load_model;
use crate::error::LlmError;
use crate::models::osprey_llama::{LogitsMode, PrefixKv, SeqCache, SeqStep};
use crate::sampling::argmax;

pub fn run(weights: &Path, inputs: &Path, out: &Path, max_new_tokens: usize) -> Result<(), LlmError> {
    let device = Device::Cpu;
    let model = load_model(weights, DType::F32, &device)?;
    let cfg = model.config().clone();
    let tensors = candle_core::safetensors::load(inputs, &device)?;
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| LlmError::InvalidInput(format!("{}: no tensor {name:?}", inputs.display())))
    };
    let ids_t = get("input_ids")?;
    if ids_t.dtype() != DType::I64 || ids_t.rank() != 1 {
        return Err(LlmError::InvalidInput(format!(
            "input_ids must be i64 [L], got {:?} {:?}",
            ids_t.dtype(),
            ids_t.dims()
        )));
    }
    let ids: Vec<i64> = ids_t.to_vec1()?;
    let image = model.project_image(&get("image_features")?.to_dtype(DType::F32)?)?;
    let hidden = cfg.hidden_size;
    let region = |name: &str| -> Result<Tensor, LlmError> {
        match tensors.get(name) {
            Some(t) => Ok(t.to_dtype(DType::F32)?),
            None => Ok(Tensor::zeros((0, hidden), DType::F32, &device)?),
        }
    };
    let embeds = model.splice(&ids, Some(&image), &region("mask_tokens")?, &region("pos_tokens")?)?;

    // One prefill gives every position's logits; greedy decoding continues from its last row.
    let mut cache = SeqCache::new(PrefixKv::default());
    let logits = model
        .forward(&mut [SeqStep { cache: &mut cache, embeds, logits: LogitsMode::All }])?
        .pop()
        .flatten()
        .expect("All logits were asked for. This is a bug.");
    let mut greedy: Vec<i64> = Vec::with_capacity(max_new_tokens);
    let mut row = logits.i(logits.dim(0)? - 1)?;
    while greedy.len() < max_new_tokens {
        let token = argmax(&row.to_dtype(DType::F32)?.to_vec1()?);
        greedy.push(i64::from(token));
        if greedy.len() == max_new_tokens {
            break;
        }
        let embeds = model.embed_ids(&[token])?;
        row = model
            .forward(&mut [SeqStep { cache: &mut cache, embeds, logits: LogitsMode::Last }])?
            .pop()
            .flatten()
            .expect("Last logits were asked for. This is a bug.")
            .squeeze(0)?;
    }
    let mut out_tensors: HashMap<String, Tensor> = HashMap::new();
    out_tensors.insert("greedy_ids".into(), Tensor::from_vec(greedy, max_new_tokens, &device)?);
    out_tensors.insert("logits".into(), logits.to_dtype(DType::F32)?);
    candle_core::safetensors::save(&out_tensors, out)?;
    Ok(())
}
