//! `route` records the method and path in the registry.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
}

#[idempotent(scope = "payments.create", fields = [amount], route = "POST /payments")]
async fn create_payment(Json(req): Json<CreatePayment>) -> String {
    req.amount.to_string()
}

fn main() {
    let _app: Router = Router::new().route("/payments", post(create_payment));
    let record = idempotent_axum::core::registry::routes()[0];
    assert_eq!(record.method, Some("POST"));
    assert_eq!(record.path, Some("/payments"));
}
