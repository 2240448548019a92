use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
}

struct Payments;

impl Payments {
    #[idempotent(scope = "payments.create")]
    async fn create_payment(self, Json(req): Json<CreatePayment>) -> String {
        req.amount.to_string()
    }
}

fn main() {}
