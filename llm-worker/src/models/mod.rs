//! Model code, one model per file.

pub mod osprey_llama;
