//! `?` and early `return` inside the handler keep their meaning: they leave the user's function.
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Refund {
    payment: String,
    amount: u64,
}

fn parse_id(id: &str) -> Result<u64, StatusCode> {
    id.strip_prefix("pay_").and_then(|n| n.parse().ok()).ok_or(StatusCode::BAD_REQUEST)
}

#[idempotent(scope = "refunds.create", fields = [payment, amount])]
async fn create_refund(Json(refund): Json<Refund>) -> Result<String, StatusCode> {
    let id = parse_id(&refund.payment)?;
    if refund.amount == 0 {
        return Ok("nothing to refund".to_owned());
    }
    for attempt in 0..3 {
        if attempt == id {
            return Err(StatusCode::CONFLICT);
        }
    }
    Ok(format!("refunded {} of {id}", refund.amount))
}

fn main() {
    let _app: Router = Router::new().route("/p", post(create_refund));
}
