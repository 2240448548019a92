use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
    currency: String,
}

#[idempotent(scope = "payments.create", fields = [amount])]
async fn create_payment(axum::extract::Path(id): axum::extract::Path<u64>) -> String {
    id.to_string()
}

fn main() {}
