use axum::http::StatusCode;
use axum::routing::post;
use axum::{Form, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::{idempotent, ActorSource, Idempotency, Mint};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, Serialize)]
struct Checkout {
    amount: u64,
    currency: String,
}

#[idempotent(scope = "issued.form", key = issued(ttl = "15m", from = form("_idem")), fields = [amount, currency], on_conflict = "wait")]
async fn by_form(Form(c): Form<Checkout>) -> (StatusCode, String) {
    (StatusCode::SEE_OTHER, c.currency)
}

#[idempotent(scope = "issued.header", key = issued(from = header("X-Form-Token")))]
async fn by_header(Form(c): Form<Checkout>) -> String {
    c.currency
}

async fn form(mint: Mint) -> String {
    match mint.token("issued.form").await {
        Ok(token) => format!("<input type=hidden name=_idem value={}>", token.token),
        Err(problem) => problem.detail,
    }
}

fn main() {
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(ActorSource::Anonymous)
        .token_secret(b"a secret of the service, 32 bytes or more")
        .build()
        .unwrap();
    let _app: Router = Router::new()
        .route("/a", post(by_form).get(form))
        .route("/b", post(by_header))
        .route("/_idempotency/tokens", post(idempotent_axum::mint_token))
        .layer(idempotency.layer());
}
