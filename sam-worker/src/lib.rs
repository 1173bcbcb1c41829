//! Osprey's SAM worker: Segment Anything (ViT-B/L/H) as a synchronous predictor, plus the `dump`
//! debugging command, automatic mask generation ([`amg`]), the model thread ([`engine`]) and the
//! gRPC edge ([`service`]), both on the shared worker skeleton (`osprey_common::worker`).

pub mod amg;
pub mod dump;
pub mod engine;
pub mod error;
pub mod models;
pub mod predictor;
pub mod prompt;
pub mod service;

pub use error::SamError;
pub use models::sam::{Sam, SamConfig};
pub use predictor::{ImageEmbedding, Prediction, SamPredictor, load_sam, select_device};
pub use prompt::Prompt;
