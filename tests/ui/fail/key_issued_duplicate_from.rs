use axum::Form;
use idempotent_axum::idempotent;

#[derive(serde::Deserialize, serde::Serialize)]
struct Checkout {
    amount: u64,
}

#[idempotent(scope = "checkout.create", key = issued(from = form("a"), from = form("b")))]
async fn checkout(Form(c): Form<Checkout>) -> String {
    c.amount.to_string()
}

fn main() {}
