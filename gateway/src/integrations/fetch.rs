//! A task's image as Label Studio refers to it: a `data:` URL, an `http(s)` URL, or a path on the
//! Label Studio server (`/data/upload/...`, `/data/local-files/?d=...`) fetched from
//! `LABEL_STUDIO_URL` with `LABEL_STUDIO_API_KEY`: Label Studio's own names (those its ML backends
//! read), so they stay unprefixed rather than `OSPREY_*`.

use std::io::Read;
use std::time::Duration;

use super::calls::decode_base64_image;

/// Where Label Studio is and how to authenticate to it, from the environment.
#[derive(Debug, Clone, Default)]
pub struct LabelStudioAccess {
    /// `LABEL_STUDIO_URL`, without a trailing slash.
    pub url: Option<String>,
    /// `LABEL_STUDIO_API_KEY` (or `LABEL_STUDIO_ACCESS_TOKEN`).
    pub token: Option<String>,
}

impl LabelStudioAccess {
    pub fn from_env() -> Self {
        let var =
            |name: &str| std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Self {
            url: var("LABEL_STUDIO_URL").map(|u| u.trim_end_matches('/').to_string()),
            token: var("LABEL_STUDIO_API_KEY").or_else(|| var("LABEL_STUDIO_ACCESS_TOKEN")),
        }
    }

    /// The URL to fetch and the `Authorization` header to send (only to Label Studio itself).
    fn resolve(&self, reference: &str) -> Result<(String, Option<String>), String> {
        let absolute = if reference.starts_with("http://") || reference.starts_with("https://") {
            reference.to_string()
        } else if reference.starts_with('/') {
            let base = self.url.as_ref().ok_or_else(|| {
                format!(
                    "the task's image {reference:?} is a path on the Label Studio server: set LABEL_STUDIO_URL \
                     (and LABEL_STUDIO_API_KEY) on the gateway so that it can fetch it"
                )
            })?;
            format!("{base}{reference}")
        } else {
            return Err(format!(
                "the task's image {:?} is neither a data: URL, an http(s) URL nor a Label Studio path \
                 (cloud storage URIs are not fetched: serve them through Label Studio)",
                head(reference)
            ));
        };
        let on_label_studio = self.url.as_ref().is_some_and(|base| same_origin(&absolute, base));
        let authorization = match (&self.token, on_label_studio) {
            (Some(token), true) => {
                Some(if looks_like_jwt(token) { format!("Bearer {token}") } else { format!("Token {token}") })
            }
            _ => None,
        };
        Ok((absolute, authorization))
    }
}

fn head(text: &str) -> &str {
    let end = text.char_indices().nth(60).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// Scheme, host and port of an absolute URL.
fn origin(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&url[..scheme.len() + 3 + host_end])
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a).zip(origin(b)).is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
}

/// Label Studio's personal access tokens are JWTs (sent as Bearer); legacy tokens are not.
fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty())
}

/// The image bytes of a task, at most `max_bytes`.
pub async fn image_bytes(
    reference: &str,
    access: &LabelStudioAccess,
    max_bytes: usize,
) -> Result<Vec<u8>, String> {
    if reference.starts_with("data:") {
        return decode_base64_image(reference, max_bytes);
    }
    let (url, authorization) = access.resolve(reference)?;
    tokio::task::spawn_blocking(move || get(&url, authorization.as_deref(), max_bytes))
        .await
        .map_err(|e| format!("fetching the image failed: {e}"))?
}

/// A blocking GET of at most `max_bytes`.
fn get(url: &str, authorization: Option<&str>, max_bytes: usize) -> Result<Vec<u8>, String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).redirects(5).build();
    let mut request = agent.get(url);
    if let Some(authorization) = authorization {
        request = request.set("Authorization", authorization);
    }
    let response = request.call().map_err(|e| match e {
        ureq::Error::Status(code, _) if code == 401 || code == 403 => format!(
            "Label Studio refused the image {url} ({code}): set LABEL_STUDIO_API_KEY on the gateway to a \
             valid access token"
        ),
        ureq::Error::Status(code, _) => format!("fetching the image {url} failed with HTTP {code}"),
        other => format!("fetching the image {url} failed: {other}"),
    })?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the image {url} failed: {e}"))?;
    if bytes.len() > max_bytes {
        return Err(format!("the image {url} is over the limit of {max_bytes} bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> LabelStudioAccess {
        LabelStudioAccess { url: Some("http://ls.local:8080".into()), token: Some("abc123".into()) }
    }

    #[test]
    fn label_studio_paths_get_its_url_and_token() {
        let (url, auth) = access().resolve("/data/upload/1/cat.png").unwrap();
        assert_eq!(url, "http://ls.local:8080/data/upload/1/cat.png");
        assert_eq!(auth.as_deref(), Some("Token abc123"));
        let (_, auth) = access().resolve("http://LS.local:8080/data/local-files/?d=a.jpg").unwrap();
        assert_eq!(auth.as_deref(), Some("Token abc123"));
        let jwt = LabelStudioAccess { token: Some("aa.bb.cc".into()), ..access() };
        assert_eq!(jwt.resolve("/data/upload/1/x.png").unwrap().1.as_deref(), Some("Bearer aa.bb.cc"));
    }

    #[test]
    fn other_hosts_never_see_the_token() {
        let (url, auth) = access().resolve("https://images.example.org/cat.png").unwrap();
        assert_eq!(url, "https://images.example.org/cat.png");
        assert_eq!(auth, None);
        assert_eq!(access().resolve("http://ls.local:9999/x.png").unwrap().1, None);
    }

    #[test]
    fn unusable_references_say_why() {
        let none = LabelStudioAccess::default();
        assert!(none.resolve("/data/upload/1/cat.png").unwrap_err().contains("set LABEL_STUDIO_URL"));
        assert!(access().resolve("s3://bucket/cat.png").unwrap_err().contains("cloud storage"));
    }

    #[tokio::test]
    async fn data_urls_are_decoded_in_place() {
        let bytes = image_bytes("data:image/png;base64,aGVsbG8=", &LabelStudioAccess::default(), 10).await;
        assert_eq!(bytes.unwrap(), b"hello");
    }
}
