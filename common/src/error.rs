//! The one error type every service answers with, and its single mapping onto gRPC status codes
//! (docs/ARCHITECTURE.md#error-model). Each crate keeps its own `thiserror` enum and converts into
//! this at the gRPC edge.

use tonic::{Code, Status};

/// A failure as the client should see it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// The request is malformed; the message says what is wrong and where.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is well formed but cannot be served in the current state (e.g. features that
    /// are neither resident nor sent along).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Missing or wrong API key.
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// Too much work in flight; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// Not ready, or every replica is down.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The request was cancelled by the client.
    #[error("{0}")]
    Cancelled(String),
    /// A bug or a failed computation.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// An `INVALID_ARGUMENT` about the request field at `field` (e.g. `regions[2].mask.rle`).
    pub fn invalid(field: impl std::fmt::Display, problem: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {problem}"))
    }

    /// Short label for metrics (`osprey_request_failure{err=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "validation",
            Self::FailedPrecondition(_) => "precondition",
            Self::Unauthenticated => "unauthenticated",
            Self::Overloaded(_) => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::DeadlineExceeded(_) => "deadline",
            Self::Cancelled(_) => "cancelled",
            Self::Internal(_) => "backend",
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::Overloaded(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl ServiceError {
    /// The status to answer with, counting the failure in `osprey_request_failure{err}`.
    pub fn into_status(self) -> Status {
        metrics::counter!("osprey_request_failure", "err" => self.error_type()).increment(1);
        self.into()
    }
}

/// A handler's outcome as a gRPC answer; failures are counted by error type.
pub fn respond<T>(result: Result<T, ServiceError>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(ServiceError::into_status)
}

/// Checks an `image_key` field: 1 to 128 characters.
pub fn check_image_key(key: &str) -> Result<(), ServiceError> {
    if key.is_empty() || key.len() > 128 {
        return Err(ServiceError::invalid("image_key", "must be 1 to 128 characters"));
    }
    Ok(())
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// A status received from another service, kept with its code so that a worker's
/// `INVALID_ARGUMENT` stays one when the gateway passes it on.
impl From<Status> for ServiceError {
    fn from(status: Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument(message),
            Code::FailedPrecondition => Self::FailedPrecondition(message),
            Code::Unauthenticated | Code::PermissionDenied => Self::Unauthenticated,
            Code::ResourceExhausted => Self::Overloaded(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            Code::Cancelled => Self::Cancelled(message),
            _ => Self::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code_and_back() {
        let cases = [
            (ServiceError::invalid("regions[1].mask", "bad"), Code::InvalidArgument),
            (ServiceError::FailedPrecondition("x".into()), Code::FailedPrecondition),
            (ServiceError::Unauthenticated, Code::Unauthenticated),
            (ServiceError::Overloaded("x".into()), Code::ResourceExhausted),
            (ServiceError::Unavailable("x".into()), Code::Unavailable),
            (ServiceError::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (ServiceError::Cancelled("x".into()), Code::Cancelled),
            (ServiceError::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = Status::from(err.clone());
            assert_eq!(status.code(), code, "{err:?}");
            assert_eq!(ServiceError::from(status), err);
        }
    }

    #[test]
    fn invalid_names_the_field() {
        let status = Status::from(ServiceError::invalid("regions[3].mask.rle", "counts sum to 5"));
        assert_eq!(status.message(), "regions[3].mask.rle: counts sum to 5");
    }
}
