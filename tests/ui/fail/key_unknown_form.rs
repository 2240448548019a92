use axum::Json;
use idempotent_axum::idempotent;

#[idempotent(scope = "events.receive", key = body(id))]
async fn receive(Json(event): Json<serde_json::Value>) -> String {
    event.to_string()
}

fn main() {}
