//! Osprey's evaluation protocols (`osprey/eval/` upstream, docs/EVAL.md) run through the
//! public gateway API, and the metrics the paper reports.

pub mod answers;
pub mod cider;
pub mod coco_ap;
pub mod data;
pub mod embed;
pub mod panoptic;
pub mod pope;
pub mod protocols;
pub mod text;
