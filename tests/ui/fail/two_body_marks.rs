use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

#[idempotent(scope = "orders.create", fields = [amount])]
async fn create(#[body] a: Json<Order>, #[body] b: Json<Order>) -> String {
    format!("{} {}", a.amount, b.amount)
}

fn main() {}
