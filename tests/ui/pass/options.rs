//! Every option at a non-default value.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::policy::{ConflictMode, KeyRequirement, StoredOutcomes};
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Deserialize, Serialize)]
struct Order {
    sku: String,
    quantity: u32,
}

#[idempotent(
    scope = "orders.place_v2",
    fields = [sku, quantity],
    ttl = "7d",
    lease = "1m30s",
    key = "optional",
    on_conflict = "wait",
    wait_timeout = "2500ms",
    store = "success",
    fail_open = true,
)]
async fn place_order(Json(order): Json<Order>) -> String {
    format!("{} x {}", order.quantity, order.sku)
}

#[idempotent(scope = "orders.cancel", store = "all", fail_open = false, key = "required", on_conflict = "reject")]
async fn cancel_order(Json(order): Json<Order>) -> String {
    order.sku
}

fn main() {
    let _app: Router = Router::new().route("/p", post(place_order)).route("/c", post(cancel_order));

    let routes = idempotent_axum::core::registry::routes();
    let p = routes.iter().find(|r| r.scope() == Some("orders.place_v2")).unwrap().policy.unwrap();
    assert_eq!(p.ttl, Duration::from_secs(7 * 24 * 60 * 60));
    assert_eq!(p.lease, Duration::from_secs(90));
    assert_eq!(p.wait_timeout, Duration::from_millis(2500));
    assert_eq!(p.key, KeyRequirement::Optional);
    assert_eq!(p.on_conflict, ConflictMode::Wait);
    assert_eq!(p.outcomes, StoredOutcomes::Success);
    assert!(p.fail_open);
    let c = routes.iter().find(|r| r.scope() == Some("orders.cancel")).unwrap().policy.unwrap();
    assert_eq!(c.outcomes, StoredOutcomes::All);
    assert!(c.fields().is_empty());
}
