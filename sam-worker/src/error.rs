//! Errors of the SAM worker's model layer.

use std::path::PathBuf;

use osprey_common::image::ImageError;
use osprey_common::resize::ResizeError;

/// Everything that can go wrong between a request and its masks. Bad prompts name the prompt and
/// field; nothing in this crate panics on user input.
#[derive(Debug, thiserror::Error)]
pub enum SamError {
    #[error("prompt {prompt:?}: field `{field}`: {problem}")]
    InvalidPrompt { prompt: String, field: &'static str, problem: String },
    #[error("params.{field}: {problem}")]
    InvalidParams { field: &'static str, problem: String },
    #[error("no image is set: call set_image before predict")]
    NoImage,
    #[error("invalid SAM config: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load SAM weights from {path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("CUDA was requested but this binary was built without the `cuda` feature")]
    CudaUnavailable,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Resize(#[from] ResizeError),
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
}

impl SamError {
    /// Short label for metrics (`osprey_request_failure{err=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            SamError::InvalidPrompt { .. }
            | SamError::InvalidParams { .. }
            | SamError::NoImage
            | SamError::Image(_) => "validation",
            SamError::Config(_)
            | SamError::Io { .. }
            | SamError::Weights { .. }
            | SamError::CudaUnavailable => "start",
            SamError::Resize(_) | SamError::Inference(_) => "inference",
        }
    }

    pub(crate) fn prompt(prompt: &str, field: &'static str, problem: impl Into<String>) -> Self {
        SamError::InvalidPrompt { prompt: prompt.to_string(), field, problem: problem.into() }
    }
}
