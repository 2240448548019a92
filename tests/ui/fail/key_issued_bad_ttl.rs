use axum::Form;
use idempotent_axum::idempotent;

#[derive(serde::Deserialize, serde::Serialize)]
struct Checkout {
    amount: u64,
}

#[idempotent(scope = "checkout.create", key = issued(ttl = "15 minutes", from = form("_idem")))]
async fn checkout(Form(c): Form<Checkout>) -> String {
    c.amount.to_string()
}

fn main() {}
