use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Event {
    code: String,
}

#[idempotent(scope = "events.receive", key = [field(code), derived])]
async fn receive(Json(event): Json<Event>) -> String {
    event.code
}

fn main() {}
