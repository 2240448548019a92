use idempotent_axum::idempotent;

struct Receipt;

#[idempotent(scope = "payments.create")]
async fn create_payment() -> Receipt {
    Receipt
}

fn main() {}
