//! Errors of the LLM worker's model side.

use std::path::PathBuf;

use crate::prompt::PromptError;
use crate::tokenizer::TokenizerError;

/// Everything that can go wrong between a checkpoint directory, a prompt and the generated tokens.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A checkpoint layout this crate cannot read (yet).
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The prompt ids do not fit the image and regions sent with them (the client's fault).
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// Input tensors or parameters of the wrong shape, dtype or value (the client's fault).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The engine's queue is full; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The engine thread has stopped (it panicked or was shut down).
    #[error("the generation engine has stopped")]
    EngineStopped,
    /// A failure inside candle; with valid inputs this is a bug or an out-of-memory.
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

impl LlmError {
    /// True when the request was at fault (maps to INVALID_ARGUMENT at the gRPC edge).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::Prompt(_) | Self::InvalidInput(_))
    }
}
