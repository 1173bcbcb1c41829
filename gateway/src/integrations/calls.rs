//! What the tool adapters share: the API key as each tool sends it, the calls on
//! [`OspreyService`] (so validation, limits, deadlines, caches and metrics are the gRPC ones),
//! gRPC codes as HTTP statuses, and JSON responses.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use osprey_common::lru::ByteLru;
use osprey_proto::v1;
use osprey_proto::v1::osprey_server::Osprey;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::auth::{ApiKeyCheck, Refusal};
use crate::handlers::OspreyService;

/// The gateway as the adapters see it.
pub struct Backend {
    pub osprey: OspreyService,
    pub api_key: ApiKeyCheck,
    /// Image keys of recently seen encoded images (by the BLAKE3 of their bytes), so a tool that
    /// sends the same image on every click skips decoding it again.
    registered: Mutex<ByteLru<[u8; 32], Registered>>,
}

/// An image the gateway has decoded: its key and size (after EXIF orientation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub key: String,
    pub width: u32,
    pub height: u32,
}

impl Registered {
    pub fn image(&self) -> v1::Image {
        v1::Image { source: Some(v1::image::Source::Key(self.key.clone())) }
    }
}

impl Backend {
    pub fn new(osprey: OspreyService, api_key: ApiKeyCheck) -> Arc<Self> {
        Arc::new(Self { osprey, api_key, registered: Mutex::new(ByteLru::new(1 << 16)) })
    }

    /// Largest image file the gateway accepts, in bytes (fetches stop there).
    pub fn max_image_bytes(&self) -> usize {
        self.osprey.0.limits.image.max_bytes
    }

    /// Decodes (or finds) an image: RegisterImage, whose validation and limits apply.
    pub async fn register(&self, encoded: Vec<u8>) -> Result<Registered, Status> {
        let digest = *blake3::hash(&encoded).as_bytes();
        if let Some(known) = self.registered.lock().unwrap_or_else(|e| e.into_inner()).get(&digest) {
            return Ok(known);
        }
        let request = v1::RegisterImageRequest { encoded, warm_features: false };
        let response = self.osprey.register_image(tonic::Request::new(request)).await?.into_inner();
        let registered = Registered { key: response.key, width: response.width, height: response.height };
        let bytes = registered.key.len() + 64;
        self.registered.lock().unwrap_or_else(|e| e.into_inner()).insert(digest, registered.clone(), bytes);
        Ok(registered)
    }

    /// Describe, every streamed result collected, in region order.
    pub async fn describe(&self, request: v1::DescribeRequest) -> Result<Vec<v1::RegionResult>, Status> {
        let mut stream = self.osprey.describe(tonic::Request::new(request)).await?.into_inner();
        let mut results = Vec::new();
        while let Some(result) = stream.next().await {
            results.push(result?);
        }
        results.sort_by_key(|r| r.region_index);
        Ok(results)
    }

    /// One region, or every region of everything mode, described with `task`.
    pub async fn describe_regions(
        &self,
        image: &Registered,
        regions: Vec<v1::Region>,
        everything: Option<v1::EverythingParams>,
        task: v1::DescribeTask,
    ) -> Result<Vec<v1::RegionResult>, Status> {
        let request = v1::DescribeRequest {
            image: Some(image.image()),
            regions,
            everything,
            task: task as i32,
            parameters: None,
        };
        self.describe(request).await
    }

    /// Admits a request carrying one of the gateway's API keys in any form a tool sends it
    /// (its rate limit applies): the key's name, for the request counts.
    pub fn admit(&self, headers: &HeaderMap) -> Result<String, Refusal> {
        self.api_key.admit(given_keys(headers).iter().map(String::as_str))
    }
}

/// Every candidate key in the headers: `Authorization: Bearer KEY`, `Token KEY` or HTTP basic
/// auth (the password, or the user name when the password is empty: Label Studio's connection
/// form has both fields), `X-API-Key: KEY` and `Token: KEY` (X-AnyLabeling's header).
pub fn given_keys(headers: &HeaderMap) -> Vec<String> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut keys = Vec::new();
    if let Some(authorization) = value("authorization") {
        let (scheme, rest) = authorization.split_once(' ').unwrap_or((authorization, ""));
        let rest = rest.trim();
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" | "token" => keys.push(rest.to_string()),
            "basic" => {
                if let Some(pair) = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                {
                    let (user, password) = pair.split_once(':').unwrap_or((pair.as_str(), ""));
                    keys.push(if password.is_empty() { user } else { password }.to_string());
                }
            }
            _ => {}
        }
    }
    keys.extend(["x-api-key", "token"].iter().filter_map(|name| value(name)).map(str::to_string));
    keys
}

/// The HTTP status for a gRPC code of the pipeline.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failure of an adapter: an HTTP status and a message for the tool's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self { status: http_status(status.code()), message: status.message().to_string() }
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Counts a request of `tool` by key `key` (its name) answered with `status` (beside the
/// pipeline's own metrics).
pub fn count(tool: &'static str, key: &str, status: StatusCode) {
    metrics::counter!(
        "osprey_integration_requests_total",
        "tool" => tool,
        "key" => key.to_string(),
        "status" => status.as_u16().to_string()
    )
    .increment(1);
}

/// A JSON request body, or a message saying why it is not one.
pub fn parse_body(body: &[u8]) -> Result<serde_json::Value, String> {
    if body.is_empty() {
        return Err("the request body is empty; expected a JSON object".into());
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    Ok(value)
}

/// A base64 image, bare or as a `data:` URL.
pub fn decode_base64_image(text: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => {
            let (meta, payload) = url.split_once(',').ok_or("a data URL needs a comma before its data")?;
            if !meta.ends_with(";base64") {
                return Err("only base64 data URLs are accepted (data:image/png;base64,...)".into());
            }
            payload
        }
        None => text,
    };
    let payload = payload.trim();
    // Four characters per three bytes: refuse over-long text before decoding it.
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(format!("the image is over the limit of {max_bytes} bytes"));
    }
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| format!("the image is not valid base64: {e}"))
}

/// The mask of a result (SAM's, from a prompt or everything mode), decoded.
pub fn result_mask(result: &v1::RegionResult) -> Result<osprey_common::mask::Mask, Failure> {
    let rle = result.mask.as_ref().ok_or_else(|| Failure {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "the pipeline returned a region without its mask".into(),
    })?;
    let rle = osprey_common::mask::rle_from_proto(rle)
        .map_err(|e| Failure { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string() })?;
    Ok(rle.to_mask())
}

/// A region given by its mask (for a second question about a region SAM already drew).
pub fn mask_region(result: &v1::RegionResult) -> Option<v1::Region> {
    let rle = result.mask.clone()?;
    Some(v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask { format: Some(v1::mask::Format::Rle(rle)) })),
        label: result.label.clone(),
    })
}

/// The option whose name best matches a model's category answer: equal ignoring case and
/// punctuation, else one containing the other as whole words; None when nothing matches.
pub fn match_option<'a>(answer: &str, options: &'a [String]) -> Option<&'a String> {
    let normalise = |text: &str| {
        text.to_lowercase()
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { ' ' })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let answer = normalise(answer);
    if answer.is_empty() {
        return None;
    }
    let padded = |text: &str| format!(" {text} ");
    options.iter().find(|o| normalise(o) == answer).or_else(|| {
        options.iter().find(|o| {
            let option = normalise(o);
            !option.is_empty()
                && (padded(&answer).contains(&padded(&option)) || padded(&option).contains(&padded(&answer)))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn keys_are_read_from_every_tool_header() {
        let basic = |pair: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
        for (pairs, expected) in [
            (vec![("authorization", "Bearer k1".to_string())], vec!["k1"]),
            (vec![("authorization", "Token k2".to_string())], vec!["k2"]),
            (vec![("authorization", basic("user:k3"))], vec!["k3"]),
            (vec![("authorization", basic("k4:"))], vec!["k4"]),
            (vec![("x-api-key", "k5".to_string())], vec!["k5"]),
            (vec![("token", "k6".to_string())], vec!["k6"]),
            (vec![("authorization", "Basic !!!".to_string())], vec![]),
            (vec![], vec![]),
        ] {
            let pairs: Vec<(&'static str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
            assert_eq!(given_keys(&headers(&pairs)), expected, "{pairs:?}");
        }
    }

    #[test]
    fn base64_images_bare_or_data_urls() {
        assert_eq!(decode_base64_image("aGVsbG8=", 100).unwrap(), b"hello");
        assert_eq!(decode_base64_image("data:image/png;base64,aGVsbG8=", 100).unwrap(), b"hello");
        assert_eq!(decode_base64_image("aGVsbG8", 100).unwrap(), b"hello");
        assert!(decode_base64_image("data:image/png,hello", 100).unwrap_err().contains("base64"));
        assert!(decode_base64_image("@@@", 100).unwrap_err().contains("not valid base64"));
        assert!(decode_base64_image(&"A".repeat(400), 100).unwrap_err().contains("limit of 100 bytes"));
    }

    #[test]
    fn categories_match_options_loosely_but_not_wrongly() {
        let options: Vec<String> = ["Cat", "Dog", "Traffic light"].iter().map(|s| s.to_string()).collect();
        assert_eq!(match_option("cat", &options).unwrap(), "Cat");
        assert_eq!(match_option("a traffic light.", &options).unwrap(), "Traffic light");
        assert_eq!(match_option("Dog", &options).unwrap(), "Dog");
        assert_eq!(match_option("category", &options), None, "no match inside a longer word");
        assert_eq!(match_option("", &options), None);
        assert_eq!(match_option("tree", &options), None);
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(Code::DeadlineExceeded), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status(Code::Internal), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
