//! Errors of the SAM worker's model layer.

use std::path::PathBuf;

use osprey_common::ServiceError;
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
    pub(crate) fn prompt(prompt: &str, field: &'static str, problem: impl Into<String>) -> Self {
        SamError::InvalidPrompt { prompt: prompt.to_string(), field, problem: problem.into() }
    }
}

/// The client is blamed only for what it sent, each problem under the request field it is in
/// (`prompts[1].points`, `params.crop_n_layers`, `image`); a model or device failure is INTERNAL,
/// so the gateway tries another replica.
impl From<SamError> for ServiceError {
    fn from(err: SamError) -> Self {
        match err {
            SamError::InvalidPrompt { prompt, field, problem } => {
                ServiceError::invalid(format!("{prompt}.{}", request_field(field)), problem)
            }
            SamError::InvalidParams { field, problem } => {
                ServiceError::invalid(format!("params.{field}"), problem)
            }
            SamError::Image(_) | SamError::Resize(ResizeError::ZeroSize { .. }) => {
                ServiceError::invalid("image", err)
            }
            SamError::NoImage => ServiceError::FailedPrecondition(err.to_string()),
            SamError::Config(_)
            | SamError::Io { .. }
            | SamError::Weights { .. }
            | SamError::CudaUnavailable
            | SamError::Resize(_)
            | SamError::Inference(_) => ServiceError::Internal(err.to_string()),
        }
    }
}

/// The `SamPrompt` field a [`crate::Prompt`] field comes from (points and labels are one list there).
fn request_field(prompt_field: &str) -> &str {
    match prompt_field {
        "point_coords" | "point_labels" => "points",
        "box_xyxy" => "box",
        other => other,
    }
}
