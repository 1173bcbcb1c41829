//! What every Osprey service shares: image decoding and image keys, mask codecs (COCO RLE, PNG,
//! polygons, boxes), resizing with the reference libraries' exact arithmetic, the error type that
//! maps onto gRPC status codes, telemetry (logs, traces, metrics) and gRPC server plumbing.

pub mod error;
pub mod grpc;
pub mod image;
pub mod lru;
pub mod mask;
pub mod resize;
pub mod telemetry;
pub mod tensor;

pub use error::ServiceError;
