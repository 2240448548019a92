//! Your first service: orders that can be created and cancelled, each at most once per key, on the
//! embedded SQLite store, with callers told apart by their bearer token and the policy report one
//! subcommand away. The README walks through it.
//!
//! ```text
//! cargo run -p idempotent-axum --features sqlite --example first_service
//! cargo run -p idempotent-axum --features sqlite --example first_service -- policies
//! curl -si -X POST localhost:3002/orders -H 'Authorization: Bearer acct_1' \
//!   -H 'Idempotency-Key: k1' -H 'Content-Type: application/json' -d '{"item": "book", "quantity": 1}'
//! curl -si -X POST localhost:3002/orders/1/cancel -H 'Authorization: Bearer acct_1' -H 'Idempotency-Key: k2'
//! ```

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::{self, Store};
use idempotent_axum::{idempotent, policies_command, ActorSource, Idempotency};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Deserialize, Serialize)]
struct NewOrder {
    item: String,
    quantity: u32,
}

/// The orders, in memory for the example (a real service keeps them in its database).
#[derive(Clone, Default)]
pub struct Orders(Arc<Mutex<HashMap<u64, String>>>);

/// `POST /orders`: one order per key. `route` names the route in the policy report before it
/// has served a request (axum does not tell the attribute where a handler is mounted).
#[idempotent(scope = "orders.create", fields = [item, quantity], ttl = "24h", route = "POST /orders")]
async fn create_order(State(orders): State<Orders>, Json(order): Json<NewOrder>) -> (StatusCode, String) {
    let mut orders = orders.0.lock().unwrap();
    let id = orders.len() as u64 + 1;
    orders.insert(id, format!("{} x {}", order.quantity, order.item));
    (StatusCode::CREATED, format!("order {id}"))
}

/// `POST /orders/{id}/cancel`: the order id in the path is part of the request's identity, so a
/// key reused to cancel another order is refused (422) rather than answered with this one's result.
#[idempotent(scope = "orders.cancel", ttl = "24h", route = "POST /orders/{id}/cancel")]
async fn cancel_order(State(orders): State<Orders>, Path(id): Path<u64>) -> (StatusCode, String) {
    match orders.0.lock().unwrap().remove(&id) {
        Some(order) => (StatusCode::OK, format!("cancelled order {id} ({order})")),
        None => (StatusCode::NOT_FOUND, format!("no order {id}")), // final: stored and replayed
    }
}

/// The application on `store`: the routes, and the runtime that protects them. Callers are told
/// apart by their bearer token (`ActorSource::BearerToken`): one caller's key never replays
/// another's answer. Building fails, with every problem listed, if a policy is impossible.
pub fn app(store: Arc<dyn Store>) -> Router {
    let idempotency = Idempotency::builder(store).actor(ActorSource::BearerToken).build().expect("valid policies");
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .layer(idempotency.layer())
        .with_state(Orders::default())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `first_service policies [--format md|json|html]` prints the policy report and exits.
    if let Some(code) = policies_command() {
        return code;
    }
    // The embedded store: a file next to the binary's working directory, replays surviving restarts.
    let store = store::connect("sqlite:first-service.sqlite").await.expect("the SQLite store opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3002").await.expect("port 3002 is free");
    axum::serve(listener, app(store)).await.expect("server runs");
    std::process::ExitCode::SUCCESS
}
