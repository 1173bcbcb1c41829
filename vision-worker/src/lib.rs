//! Osprey vision stage: CLIP ConvNeXt-L features of an image and the mask extractor's `<mask>` and
//! `<pos>` tokens for regions of it (docs/MODEL.md, sections "CLIP ConvNeXt-L trunk" and "Mask
//! extractor").
//!
//! - [`models`]: the trunk ([`models::clip_convnext`]), the extractor
//!   ([`models::mask_extractor`]) and [`models::VisionModel`], which loads both from a checkpoint
//!   directory.
//! - [`preprocess`]: image to tower input, bit-exact with the PIL/PyTorch reference.
//! - [`pooling`]: the mask-pooling custom ops (CPU reference, CUDA with the `cuda` feature).
//! - [`weights`]: checkpoint reading (safetensors and torch pickles, sharded or not).
//! - [`engine`]: the model core the worker serves (batched encodes, pooling, feature blobs).
//! - [`service`]: the gRPC edge (`osprey.worker.v1.Vision`) on the shared worker skeleton.
//! - [`dump`]: the `vision-worker dump` command.

pub mod config;
pub mod dump;
pub mod engine;
pub mod error;
pub mod models;
pub mod pooling;
pub mod preprocess;
pub mod service;
pub mod weights;

pub use config::VisionConfig;
pub use engine::VisionCore;
pub use error::VisionError;
pub use models::VisionModel;
