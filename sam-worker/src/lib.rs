//! Osprey's SAM worker: Segment Anything (ViT-B/L/H) as a synchronous predictor, plus the `dump`
//! debugging command, automatic mask generation ([`amg`]) and the gRPC service ([`service`]).

pub mod amg;
pub mod dump;
pub mod error;
pub mod models;
pub mod predictor;
pub mod prompt;
pub mod service;

pub use error::SamError;
pub use models::sam::{Sam, SamConfig};
pub use predictor::{ImageEmbedding, Prediction, SamPredictor, load_sam, select_device};
pub use prompt::Prompt;
