//! The smallest useful actix-web service with `idempotent`: one protected route on the in-memory
//! store. Copy this file to start; `cargo run -p idempotent-actix --example actix_minimal`, then
//!
//! ```text
//! curl -si -X POST localhost:3002/orders -H 'Idempotency-Key: k1' \
//!   -H 'Content-Type: application/json' -d '{"item": "book", "quantity": 1}'
//! ```
//!
//! and send it again: the same answer, with `Idempotent-Replayed: true`.

use actix_web::{post, web, App, HttpResponse, HttpServer};
use idempotent_actix::core::store::MemoryStore;
use idempotent_actix::enforce::Enforce;
use idempotent_actix::{idempotent, Idempotency};
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
#[post("/orders")]
async fn create_order(order: web::Json<NewOrder>) -> HttpResponse {
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body(format!("order {id}: {} x {}", order.quantity, order.item))
}

/// The runtime, built once and shared by every worker.
pub fn idempotency() -> Idempotency {
    Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .build()
        .expect("valid policies")
}

/// The application's routes, data and enforcement (a mutating route without a policy is refused).
pub fn configure(cfg: &mut web::ServiceConfig, idempotency: &Idempotency) {
    cfg.app_data(idempotency.data()).service(create_order);
}

#[allow(dead_code)]
#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let idempotency = idempotency();
    HttpServer::new(move || {
        let idempotency = idempotency.clone();
        App::new().wrap(Enforce::refuse()).configure(move |c| configure(c, &idempotency))
    })
    .bind("127.0.0.1:3002")?
    .run()
    .await
}
