use axum::Json;
use idempotent_axum::idempotent;

#[idempotent(scope = "notifications.send", key = derived("optional"))]
async fn send(Json(body): Json<serde_json::Value>) -> String {
    body.to_string()
}

fn main() {}
