use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Customer {
    id: String,
}

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    customer: Customer,
}

#[idempotent(scope = "payments.create", fields = [customer.email])]
async fn create_payment(Json(req): Json<CreatePayment>) -> String {
    req.customer.id
}

fn main() {}
