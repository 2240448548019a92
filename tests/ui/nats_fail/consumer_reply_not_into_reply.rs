use idempotent_nats::{idempotent, ConsumeError};

struct Receipt;

#[idempotent(scope = "ui.settle", key = header("Nats-Msg-Id"))]
async fn settle(body: bytes::Bytes) -> Result<Receipt, ConsumeError> {
    let _ = body;
    Ok(Receipt)
}

fn main() {}
