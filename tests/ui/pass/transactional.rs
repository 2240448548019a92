use axum::extract::State;
use axum::Json;
use idempotent_axum::{idempotent, Tx};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreateDeposit {
    amount: i64,
}

// The handler writes in the route's transaction; the engine commits it with the outcome.
#[idempotent(scope = "deposits.create", fields = [amount], transactional = true)]
async fn create_deposit(State(label): State<&'static str>, tx: Tx, Json(req): Json<CreateDeposit>) -> String {
    match tx.sqlite().await {
        Ok(mut t) => {
            let done = idempotent_axum::core::sqlx::query("INSERT INTO deposits (amount) VALUES (?1)")
                .bind(req.amount)
                .execute(&mut **t)
                .await;
            format!("{label}: {}", done.is_ok())
        }
        Err(e) => e.to_string(),
    }
}

fn main() {
    let _: axum::Router = axum::Router::new().route("/deposits", axum::routing::post(create_deposit)).with_state("demo");
}
