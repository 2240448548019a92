use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Event {
    id: String,
    kind: String,
}

#[idempotent(scope = "events.receive", key = field(event_id))]
async fn receive(Json(event): Json<Event>) -> String {
    event.kind
}

fn main() {}
