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

    /// Whether the `authorization` and `x-api-key` header values carry the key.
    fn accepts(&self, authorization: Option<&str>, x_api_key: Option<&str>) -> bool {
        let Some(expected) = &self.expected else { return true };
        let bearer = authorization.and_then(|v| v.strip_prefix("Bearer "));
        bearer.or(x_api_key).is_some_and(|given| blake3::hash(given.as_bytes()) == *expected)
    }

    /// Whether any of `given` is the key (the integrations read keys from each tool's headers).
    pub fn accepts_any<'a>(&self, mut given: impl Iterator<Item = &'a str>) -> bool {
        let Some(expected) = &self.expected else { return true };
        given.any(|key| blake3::hash(key.as_bytes()) == *expected)
    }

    /// The same check on plain HTTP headers (the gateway's HTTP side).
    pub fn accepts_headers(&self, headers: &axum::http::HeaderMap) -> bool {
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        self.accepts(value("authorization"), value("x-api-key"))
    }
}

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata();
        let value = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        if self.accepts(value("authorization"), value("x-api-key")) {
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

    #[test]
    fn http_headers_are_checked_the_same_way() {
        let check = ApiKeyCheck::new(Some("sesame"));
        let headers = |name: &'static str, value: &'static str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(name, axum::http::HeaderValue::from_static(value));
            headers
        };
        assert!(check.accepts_headers(&headers("authorization", "Bearer sesame")));
        assert!(check.accepts_headers(&headers("x-api-key", "sesame")));
        assert!(!check.accepts_headers(&headers("x-api-key", "sesam")));
        assert!(!check.accepts_headers(&axum::http::HeaderMap::new()));
        assert!(ApiKeyCheck::new(None).accepts_headers(&axum::http::HeaderMap::new()));
    }
}
