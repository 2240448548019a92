use idempotent_nats::{idempotent, ConsumeError};

struct Database;

#[idempotent(scope = "ui.settle", key = header("Nats-Msg-Id"))]
async fn settle(db: Database, body: bytes::Bytes) -> Result<(), ConsumeError> {
    let _ = (db, body);
    Ok(())
}

fn main() {}
