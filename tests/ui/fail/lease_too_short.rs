use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
    currency: String,
}

#[idempotent(scope = "payments.create", lease = "10ms")]
async fn create_payment(Json(req): Json<CreatePayment>) -> String {
    format!("{} {}", req.amount, req.currency)
}

fn main() {}
