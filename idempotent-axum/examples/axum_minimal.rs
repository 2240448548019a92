//! The smallest useful axum service with `idempotent`: one protected route on the in-memory
//! store. Copy this file to start; `cargo run -p idempotent-axum --example axum_minimal`, then
//!
//! ```text
//! curl -si -X POST localhost:3001/orders -H 'Idempotency-Key: k1' \
//!   -H 'Content-Type: application/json' -d '{"item": "book", "quantity": 1}'
//! ```
//!
//! and send it again: the same answer, with `Idempotent-Replayed: true`.

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::enforce::Enforce;
use idempotent_axum::{idempotent, Idempotency};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Deserialize, Serialize)]
struct NewOrder {
    item: String,
    quantity: u32,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Runs once per `Idempotency-Key`; a retry gets the stored answer back.
#[idempotent(scope = "orders.create", fields = [item, quantity], ttl = "24h")]
async fn create_order(Json(order): Json<NewOrder>) -> (StatusCode, String) {
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, format!("order {id}: {} x {}", order.quantity, order.item))
}

/// The application: the route, enforcement (a mutating route without a policy is refused), and
/// the idempotency runtime on an in-memory store.
pub fn app() -> Router {
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .expect("valid policies");
    Router::new().route("/orders", post(create_order)).layer(Enforce::refuse()).layer(idempotency.layer())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await.expect("port 3001 is free");
    axum::serve(listener, app()).await.expect("server runs");
}
