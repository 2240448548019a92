use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreateDeposit {
    amount: u64,
}

#[idempotent(scope = "deposits.create", key = "optional", transactional = true)]
async fn create_deposit(Json(req): Json<CreateDeposit>) -> String {
    format!("{}", req.amount)
}

fn main() {}
