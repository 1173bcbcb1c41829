//! What every Osprey service shares: image decoding and image keys, mask codecs (COCO RLE, PNG,
//! polygons, boxes), resizing with the reference libraries' exact arithmetic, the error type that
//! maps onto gRPC status codes, telemetry (logs, traces, metrics), gRPC server plumbing and the
//! model workers' skeleton ([`worker`]: model thread with batching, `ask`, serve / warm-up / drain).

pub mod error;
pub mod grpc;
pub mod image;
pub mod lru;
pub mod mask;
pub mod memory;
pub mod resize;
pub mod telemetry;
pub mod tensor;
pub mod worker;

pub use error::ServiceError;
