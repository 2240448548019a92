use idempotent_nats::{idempotent, ConsumeError};

#[idempotent(scope = "ui.settle", key = "required", route = "POST /settle", on_conflict = "wait", fields = [path(id)])]
async fn settle(body: bytes::Bytes) -> Result<(), ConsumeError> {
    let _ = body;
    Ok(())
}

fn main() {}
