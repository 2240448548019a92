use axum::Json;
use idempotent_axum::idempotent;

#[idempotent(scope = "webhooks.receive", key = header("webhook id"))]
async fn receive(Json(event): Json<serde_json::Value>) -> String {
    event.to_string()
}

fn main() {}
