//! Annotation-tool integrations served on the gateway's HTTP side.

/// The integrations' routes, merged into the gateway's HTTP router.
pub fn router(osprey: crate::handlers::OspreyService) -> axum::Router {
    let _ = osprey;
    axum::Router::new()
}
