//! `exempt` registers a route as deliberately unprotected and leaves the handler as written.
use axum::routing::put;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde_json::Value;

#[idempotent(exempt = "natural key: PUT replaces the resource", route = "PUT /profile")]
async fn put_profile(Json(profile): Json<Value>) -> Json<Value> {
    Json(profile)
}

/// Not even `async`: an exempt handler is not rewritten.
#[idempotent(exempt = "read-only: POST only carries the query", route = "POST /search")]
fn search_handler() -> axum::routing::MethodRouter {
    axum::routing::post(|| async { "[]" })
}

fn main() {
    let _app: Router = Router::new().route("/profile", put(put_profile)).route("/search", search_handler());
    let routes = idempotent_axum::core::registry::routes();
    assert_eq!(routes.len(), 2);
    let profile = routes.iter().find(|r| r.path == Some("/profile")).unwrap();
    assert_eq!(profile.exempt, Some("natural key: PUT replaces the resource"));
    assert_eq!(profile.method, Some("PUT"));
    assert!(profile.policy.is_none());
    assert_eq!(idempotent_axum::core::registry::validate(&routes), Ok(()));
}
