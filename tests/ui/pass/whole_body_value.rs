//! Without `fields`, the whole body is fingerprinted; any `Serialize` body works.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;

#[idempotent(scope = "events.ingest")]
async fn ingest(Json(event): Json<serde_json::Value>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "received": event }))
}

fn main() {
    let _app: Router = Router::new().route("/p", post(ingest));
}
