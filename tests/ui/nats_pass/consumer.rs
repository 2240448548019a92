use idempotent_nats::core::protocol::consume::DeliveryInfo;
use idempotent_nats::{idempotent, ConsumeError, Json, State};

#[derive(serde::Deserialize, serde::Serialize)]
struct Event {
    kind: String,
    id: String,
    amount: u64,
}

/// A composite key, declared fields, state and the delivery's info; a JSON reply.
#[idempotent(scope = "ui.consumer", key = [field(kind), field(id)], fields = [id, amount], ttl = "7d")]
async fn handle(State(prefix): State<String>, info: DeliveryInfo, msg: Json<Event>) -> Result<Json<String>, ConsumeError> {
    Ok(Json(format!("{prefix} {} {}", info.attempt, msg.0.amount)))
}

/// A header key and the whole body.
#[idempotent(scope = "ui.consumer.header", key = header("Nats-Msg-Id"))]
pub async fn raw(body: bytes::Bytes) -> Result<(), ConsumeError> {
    let _ = body;
    Ok(())
}

/// The message itself is its key.
#[idempotent(scope = "ui.consumer.derived", key = derived, lease = "6s")]
async fn derived(body: String) -> Result<String, ConsumeError> {
    Ok(body)
}

fn main() {
    let handlers: [idempotent_nats::core::protocol::consume::Handler; 3] = [handle, raw, derived];
    assert_eq!(handlers[0].policy.scope, "ui.consumer");
    assert!(handlers[1].handler.ends_with("::raw"));
}
