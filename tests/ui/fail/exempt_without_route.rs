use idempotent_axum::idempotent;

#[idempotent(exempt = "read-only search")]
async fn search() -> &'static str {
    "results"
}

fn main() {}
