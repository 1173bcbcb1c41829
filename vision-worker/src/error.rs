//! Errors of the vision worker's model side.

use std::path::PathBuf;

use osprey_common::ServiceError;
use osprey_common::resize::ResizeError;

use crate::weights::WeightsError;

/// Everything that can go wrong between a checkpoint directory, an image, masks and the tokens.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Image(#[from] osprey_common::image::ImageError),
    #[error(transparent)]
    Resize(#[from] osprey_common::resize::ResizeError),
    /// A mask whose size differs from the image's.
    #[error("mask {index} is {mask_height}x{mask_width} (HxW) but the image is {image_height}x{image_width}")]
    MaskSize { index: usize, mask_height: usize, mask_width: usize, image_height: usize, image_width: usize },
    /// Input of the wrong rank, dtype or content.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A failure inside candle; with valid inputs this is a bug or an out-of-memory.
    #[error("model: {0}")]
    Candle(#[source] Box<candle_core::Error>),
    /// A failure of the worker itself (not of the request).
    #[error("{0}")]
    Internal(String),
}

impl From<candle_core::Error> for VisionError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

/// The client is blamed only for what it sent: a bad image or mask is INVALID_ARGUMENT; a model,
/// device or start-up failure is INTERNAL, so the gateway tries another replica.
impl From<VisionError> for ServiceError {
    fn from(err: VisionError) -> Self {
        match err {
            VisionError::MaskSize { index, .. } => ServiceError::invalid(format!("masks[{index}]"), &err),
            VisionError::Image(_) | VisionError::Resize(ResizeError::ZeroSize { .. }) => {
                ServiceError::invalid("image", &err)
            }
            VisionError::InvalidInput(_) => ServiceError::InvalidArgument(err.to_string()),
            VisionError::Io { .. }
            | VisionError::Config { .. }
            | VisionError::Weights(_)
            | VisionError::Resize(_)
            | VisionError::Candle(_)
            | VisionError::Internal(_) => ServiceError::Internal(err.to_string()),
        }
    }
}
