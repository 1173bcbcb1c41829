//! Annotation-tool integrations on the gateway's HTTP side: each tool's model back-end protocol,
//! translated into calls on [`OspreyService`] (the `osprey.v1.Osprey` handlers), so validation,
//! limits, deadlines, caches and metrics are the gRPC side's. No model logic lives here.
//!
//! - `/label-studio/...`: [`label_studio`], Label Studio's ML back end.
//! - `/x-anylabeling/...`: [`xanylabeling`], X-AnyLabeling's remote server; CVAT's serverless
//!   function (`deploy/cvat/`) forwards to it too.
//!
//! Each tool sends the gateway's API key its own way ([`calls::given_keys`]) and gets errors in
//! its own shape. Helpers: [`calls`] (shared calls and responses), [`fetch`] (Label Studio's
//! image references), [`label_config`] (labeling configs), [`coords`] (percent, pixels, boxes),
//! [`brush_rle`] (Label Studio's brush RLE), [`contours`] (masks as polygons).

pub mod brush_rle;
pub mod calls;
pub mod contours;
pub mod coords;
pub mod fetch;
pub mod label_config;
pub mod label_studio;
pub mod xanylabeling;

use axum::extract::DefaultBodyLimit;

use crate::auth::ApiKeyCheck;
use crate::handlers::OspreyService;

/// The integrations' routes, merged into the gateway's HTTP router. Each checks the API key
/// itself, as its tool sends it.
pub fn router(osprey: OspreyService, api_key: ApiKeyCheck) -> axum::Router {
    // Base64 images take 4/3 of their size, plus the rest of the JSON.
    let body_limit = osprey.0.limits.image.max_bytes / 3 * 4 + (1 << 20);
    let backend = calls::Backend::new(osprey, api_key);
    axum::Router::new()
        .nest("/label-studio", label_studio::router(backend.clone()))
        .nest("/x-anylabeling", xanylabeling::router(backend))
        .layer(DefaultBodyLimit::max(body_limit))
}
