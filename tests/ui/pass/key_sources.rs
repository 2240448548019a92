use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::{idempotent, ActorSource, Idempotency};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, Serialize)]
struct Event {
    id: String,
    code: String,
    reference: u64,
    inner: Inner,
}

#[derive(Deserialize, Serialize)]
struct Inner {
    id: Option<String>,
}

#[idempotent(scope = "keys.header", key = header("Webhook-Id"), ttl = "72h")]
async fn by_header(Json(event): Json<Event>) -> String {
    event.id
}

#[idempotent(scope = "keys.field", key = field(inner.id))]
async fn by_field(Json(event): Json<Event>) -> String {
    event.code
}

#[idempotent(scope = "keys.composite", key = [field(code), field(reference)], fields = [code, reference])]
async fn by_fields(Json(event): Json<Event>) -> String {
    event.code
}

#[idempotent(scope = "keys.derived", key = derived, ttl = "10m")]
async fn derived(Json(event): Json<Event>) -> String {
    event.code
}

fn main() {
    let idempotency =
        Idempotency::builder(Arc::new(MemoryStore::new())).actor(ActorSource::Anonymous).build().unwrap();
    let _app: Router = Router::new()
        .route("/a", post(by_header))
        .route("/b", post(by_field))
        .route("/c", post(by_fields))
        .route("/d", post(derived))
        .layer(idempotency.layer());
}
