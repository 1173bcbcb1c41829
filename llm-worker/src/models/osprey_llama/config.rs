//! The model configuration, parsed from a Hugging Face `config.json` (LLaMA fields plus Osprey's
//! projector and region-token ids).

use serde::Deserialize;

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

    /// Osprey-7b (Vicuna-7B v1.5 + projector from ConvNeXt-L res4), docs/MODEL.md, "LLaMA decoder".
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

#[cfg(test)]
mod tests {
    use super::*;

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
