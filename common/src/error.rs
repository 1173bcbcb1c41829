//! The one error type every service answers with, and its single mapping onto gRPC status codes
//! (docs/ARCHITECTURE.md, "Error model"). Each crate keeps its own `thiserror` enum and converts
//! into this at the gRPC edge. A problem with one request field travels as a structured
//! `google.rpc.BadRequest` field violation beside the readable message, and an overload refusal
//! carries a `google.rpc.RetryInfo` hint, so that no service parses another's message text.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::ErrorDetails;
/// Reads a status's details (`get_error_details().bad_request()`); re-exported so that services
/// and tests need no dependency of their own.
pub use tonic_types::StatusExt;

/// How long an overloaded service asks its callers to wait before trying it again.
pub const RETRY_AFTER_OVERLOAD: Duration = Duration::from_millis(100);

/// A failure as the client should see it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// The request is malformed in a way no single field explains.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request field at `field` (e.g. `regions[2].mask.rle`) is wrong, and `problem` says how.
    #[error("{field}: {problem}")]
    InvalidField { field: String, problem: String },
    /// The request is well formed but cannot be served in the current state (e.g. features that
    /// are neither resident nor sent along).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Missing or wrong API key.
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// Too much work in flight; retry later (the status carries [`RETRY_AFTER_OVERLOAD`]).
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
    /// A bug or a failed computation (a model or device failure: another replica may succeed).
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// An `INVALID_ARGUMENT` about the request field at `field` (e.g. `regions[2].mask.rle`).
    pub fn invalid(field: impl std::fmt::Display, problem: impl std::fmt::Display) -> Self {
        Self::InvalidField { field: field.to_string(), problem: problem.to_string() }
    }

    /// The field path of an [`ServiceError::InvalidField`].
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::InvalidField { .. } => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::Overloaded(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The status to answer with, the failure counted by [`count_failure`].
    pub fn into_status(self) -> Status {
        count_failure(self.code());
        self.into()
    }
}

/// Counts a failure answered with `code` in `osprey_request_failures_total{code}`: the one place
/// failures are counted, admission and API-key refusals included.
pub fn count_failure(code: Code) {
    metrics::counter!("osprey_request_failures_total", "code" => code_label(code)).increment(1);
}

/// The canonical name of a gRPC code, as a metric label (`INVALID_ARGUMENT`).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A handler's outcome as a gRPC answer; failures are counted by code.
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
        let (code, message) = (err.code(), err.to_string());
        match err {
            ServiceError::InvalidField { field, problem } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_bad_request_violation(field, problem),
            ),
            ServiceError::Overloaded(_) => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(RETRY_AFTER_OVERLOAD)),
            ),
            _ => Status::new(code, message),
        }
    }
}

/// A status received from another service, kept with its code (and its field, when it names
/// one) so that a worker's `INVALID_ARGUMENT` stays one when the gateway passes it on.
impl From<Status> for ServiceError {
    fn from(status: Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                let details = status.get_error_details();
                match details.bad_request().and_then(|b| b.field_violations.first()) {
                    Some(v) => Self::InvalidField { field: v.field.clone(), problem: v.description.clone() },
                    None => Self::InvalidArgument(message),
                }
            }
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
            (ServiceError::InvalidArgument("x".into()), Code::InvalidArgument),
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
    fn a_field_travels_as_a_bad_request_violation_beside_the_message() {
        let status = Status::from(ServiceError::invalid("regions[3].mask.rle", "counts sum to 5"));
        assert_eq!(status.message(), "regions[3].mask.rle: counts sum to 5");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("a BadRequest detail").field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "regions[3].mask.rle");
        assert_eq!(violations[0].description, "counts sum to 5");
        let back = ServiceError::from(status);
        assert_eq!(back.field(), Some("regions[3].mask.rle"));
        assert_eq!(back.to_string(), "regions[3].mask.rle: counts sum to 5");
    }

    #[test]
    fn an_overload_refusal_carries_a_retry_hint() {
        let status = Status::from(ServiceError::Overloaded("full".into()));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(RETRY_AFTER_OVERLOAD));
    }
}
