//! The API key check on every public call (health and reflection stay open for probes).

use osprey_common::ServiceError;
use tonic::{Request, Status};

/// Accepts calls carrying the key as `authorization: Bearer KEY` or `x-api-key: KEY`; open when
/// no key is configured.
#[derive(Clone)]
pub struct ApiKeyCheck {
    /// The key's BLAKE3 digest: comparing digests takes the same time whatever the key given,
    /// its length included (`blake3::Hash` compares in constant time).
    expected: Option<blake3::Hash>,
}

impl ApiKeyCheck {
    pub fn new(key: Option<&str>) -> Self {
        Self { expected: key.map(|key| blake3::hash(key.as_bytes())) }
    }
}

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        let metadata = request.metadata();
        let bearer = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let header = metadata.get("x-api-key").and_then(|v| v.to_str().ok());
        if bearer.or(header).is_some_and(|given| blake3::hash(given.as_bytes()) == *expected) {
            Ok(request)
        } else {
            Err(ServiceError::Unauthenticated.into_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with(header: &str, value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(header.parse::<tonic::metadata::MetadataKey<_>>().unwrap(), value.parse().unwrap());
        request
    }

    #[test]
    fn only_the_key_opens() {
        let mut check = ApiKeyCheck::new(Some("sesame"));
        assert!(check.call(with("authorization", "Bearer sesame")).is_ok());
        assert!(check.call(with("x-api-key", "sesame")).is_ok());
        for (header, value) in [
            ("authorization", "sesame"),
            ("authorization", "Bearer sesam"),
            ("x-api-key", "sesame2"),
            ("x-api-key", ""),
        ] {
            let status = check.call(with(header, value)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header}: {value}");
        }
        assert!(check.call(Request::new(())).is_err());
        assert!(ApiKeyCheck::new(None).call(Request::new(())).is_ok());
    }
}
