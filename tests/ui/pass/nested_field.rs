//! Dotted field paths reach into nested structs.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Customer {
    id: String,
    name: String,
}

#[derive(Deserialize, Serialize)]
struct Subscribe {
    customer: Customer,
    plan: String,
}

#[idempotent(scope = "subscriptions.create", fields = [customer.id, plan])]
async fn subscribe(Json(req): Json<Subscribe>) -> String {
    format!("{} ({}) on {}", req.customer.id, req.customer.name, req.plan)
}

fn main() {
    let _app: Router = Router::new().route("/p", post(subscribe));
    let routes = idempotent_axum::core::registry::routes();
    assert_eq!(routes[0].policy.unwrap().fields(), ["customer.id", "plan"]);
}
