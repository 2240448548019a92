use idempotent_axum::idempotent;

#[idempotent(scope = "events.receive", key = field(id))]
async fn receive() -> &'static str {
    "ok"
}

fn main() {}
