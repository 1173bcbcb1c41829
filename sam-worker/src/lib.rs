//! Osprey's SAM worker: Segment Anything (ViT-B/L/H) as a synchronous predictor, plus the `dump`
//! debugging command. Automatic mask generation and the gRPC service come later.

pub mod dump;
pub mod error;
pub mod models;
pub mod predictor;
pub mod prompt;

pub use error::SamError;
pub use models::sam::{Sam, SamConfig};
pub use predictor::{Prediction, SamPredictor, load_sam, select_device};
pub use prompt::Prompt;
