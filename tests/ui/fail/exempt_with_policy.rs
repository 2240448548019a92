use idempotent_axum::idempotent;

#[idempotent(exempt = "read-only search", route = "POST /search", scope = "search", ttl = "1h")]
async fn search() -> &'static str {
    "results"
}

fn main() {}
