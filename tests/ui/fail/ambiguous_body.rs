use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

#[idempotent(scope = "orders.create", fields = [amount])]
async fn create(note: String, Json(order): Json<Order>) -> String {
    format!("{note} {}", order.amount)
}

fn main() {}
