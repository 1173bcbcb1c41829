//! The sentence embedder of the evaluation scripts: sentence-transformers' `all-MiniLM-L6-v2`
//! (BERT, 6 layers, 384 wide), mean pooling over the tokens, then L2 normalisation.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

/// `max_seq_length` of the model's `sentence_bert_config.json`: longer inputs are truncated.
const MAX_SEQ_LENGTH: usize = 256;

pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl SentenceEmbedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a sentence-transformers
    /// model directory (as `tools/fetch_minilm.sh` lays it out).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .with_context(|| format!("{}: missing; run tools/fetch_minilm.sh", dir.join(name).display()))
        };
        let config: Config = serde_json::from_slice(&read("config.json")?).context("config.json")?;
        let weights = read("model.safetensors")?;
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
        let model = BertModel::load(vb, &config)?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_SEQ_LENGTH, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
        tokenizer.with_padding(None);
        Ok(Self { model, tokenizer, device })
    }

    /// The unit-length embedding of one sentence (`SentenceTransformer.encode`). Sentences are
    /// encoded one at a time, so no padding enters the mean.
    pub fn embed(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
        let ids = Tensor::new(encoding.get_ids(), &self.device)?.unsqueeze(0)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, None)?; // [1, L, 384]
        let mean: Vec<f32> = hidden.mean(1)?.squeeze(0)?.to_vec1()?;
        // torch.nn.functional.normalize: x / max(|x|, 1e-12).
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        Ok(mean.into_iter().map(|v| v / norm).collect())
    }
}

/// Cosine similarity (`sentence_transformers.util.cos_sim` of two vectors), in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    dot / (norm(a) * norm(b))
}
