//! `exempt` registers a route as deliberately unprotected and leaves the handler as written, but
//! for one extractor in front that tells enforcement the handler is there; a route is optional.
use axum::routing::put;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde_json::Value;

#[idempotent(exempt = "natural key: PUT replaces the resource", route = "PUT /profile")]
async fn put_profile(Json(profile): Json<Value>) -> Json<Value> {
    Json(profile)
}

/// Not even `async`: an exempt handler is not rewritten.
#[idempotent(exempt = "read-only: POST only carries the query")]
fn search(Json(query): Json<Value>) -> std::future::Ready<Json<Value>> {
    std::future::ready(Json(query))
}

fn main() {
    let _app: Router = Router::new().route("/profile", put(put_profile)).route("/search", axum::routing::post(search));
    let routes = idempotent_axum::core::registry::routes();
    assert_eq!(routes.len(), 2);
    let profile = routes.iter().find(|r| r.path == Some("/profile")).unwrap();
    let search = routes.iter().find(|r| r.handler.ends_with("::search")).unwrap();
    assert_eq!((search.method, search.path), (None, None));
    assert_eq!(profile.exempt, Some("natural key: PUT replaces the resource"));
    assert_eq!(profile.method, Some("PUT"));
    assert!(profile.policy.is_none());
    assert_eq!(idempotent_axum::core::registry::validate(&routes), Ok(()));
}
