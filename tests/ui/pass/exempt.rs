//! An exempt route is left as written and registered with its reason, method and path.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;

#[idempotent(exempt = "read-only search that uses POST for its large body", route = "POST /search")]
async fn search(Json(query): Json<serde_json::Value>) -> String {
    query.to_string()
}

fn main() {
    let _app: Router = Router::new().route("/search", post(search));
    let record = idempotent_axum::core::registry::routes()[0];
    assert_eq!(record.exempt, Some("read-only search that uses POST for its large body"));
    assert_eq!(record.policy, None);
    assert_eq!(record.route().as_deref(), Some("POST /search"));
}
