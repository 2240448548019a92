use idempotent_axum::idempotent;

#[idempotent(scope = "payments.create")]
struct CreatePayment {
    amount: u64,
}

fn main() {}
