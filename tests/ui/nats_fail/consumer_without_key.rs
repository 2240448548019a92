use idempotent_nats::{idempotent, ConsumeError, Json};

#[derive(serde::Deserialize)]
struct Settle {
    payment: String,
}

#[idempotent(scope = "ui.settle", fields = [payment])]
async fn settle(msg: Json<Settle>) -> Result<(), ConsumeError> {
    let _ = msg.0.payment;
    Ok(())
}

fn main() {}
