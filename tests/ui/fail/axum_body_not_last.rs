use axum::extract::Path;
use axum::Json;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

#[idempotent(scope = "orders.create", fields = [amount])]
async fn create(Json(order): Json<Order>, Path(id): Path<u64>) -> String {
    format!("{id} {}", order.amount)
}

fn main() {}
