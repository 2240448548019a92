//! Without `fields` the whole body is fingerprinted as received (canonical JSON here), so the
//! body type need not be `Serialize`.
use axum::Json;
use idempotent_axum::idempotent;
use serde::Deserialize;

#[derive(Deserialize)]
struct CreatePayment {
    amount: u64,
}

#[idempotent(scope = "payments.create")]
async fn create_payment(Json(req): Json<CreatePayment>) -> String {
    req.amount.to_string()
}

fn main() {}
