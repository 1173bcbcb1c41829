//! Generated gRPC code for Osprey: the public `osprey.v1` API (served by the gateway) and the
//! internal `osprey.worker.v1` APIs (served by the sam, vision and llm workers).
//!
//! The code is generated into OUT_DIR by `build.rs`; nothing generated is committed. The two
//! packages share no message; [`convert`] maps between them.

pub mod codec;
pub mod convert;

/// The public API.
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("osprey.v1");
}

/// The internal worker APIs.
pub mod worker {
    pub mod v1 {
        #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
        tonic::include_proto!("osprey.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("osprey_descriptor");
