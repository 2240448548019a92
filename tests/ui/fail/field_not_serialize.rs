use axum::Json;
use idempotent_axum::idempotent;
use serde::Deserialize;

#[derive(Deserialize)]
struct Money(u64);

#[derive(Deserialize)]
struct CreatePayment {
    amount: Money,
    currency: String,
}

#[idempotent(scope = "payments.create", fields = [amount, currency])]
async fn create_payment(Json(req): Json<CreatePayment>) -> String {
    format!("{} {}", req.amount.0, req.currency)
}

fn main() {}
