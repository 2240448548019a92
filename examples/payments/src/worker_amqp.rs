//! The settlement worker on RabbitMQ (`PAYMENTS_BROKER=amqp://...`): the quorum queue
//! `payments.settle`, whose dead letters go to the fanout exchange `payments.dead` bound to the
//! queue `payments.dead`, consumed by one `#[idempotent]` handler keyed by the message's
//! `payment`. Each executed settlement is one ledger line, written after its processing time and
//! before the message is acknowledged; duplicates and redeliveries are acknowledged from the
//! store without a line; a mismatch or a body that is not a settlement is dead-lettered with its
//! reason. [`run_amqp`] returns once its stop future resolves and the settlements in flight are
//! settled.

use crate::config::Config;
use crate::ledger::Ledger;
use idempotent_rabbitmq::{idempotent, CancellationToken, ConsumeError, Json, Settings, State, Worker};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The queue the worker consumes.
pub const QUEUE: &str = "payments.settle";
/// The dead-letter exchange, and the queue bound to it.
pub const DEAD: &str = "payments.dead";
/// The quorum queue's delivery limit: a settlement that keeps failing is dead-lettered after
/// this many returns.
pub const DELIVERY_LIMIT: u32 = 20;

/// A settlement message.
#[derive(Debug, serde::Deserialize)]
pub struct Settle {
    /// The payment settled: the message's key.
    pub payment: String,
    /// Its amount, greater than 0.
    pub amount: i64,
}

/// One executed settlement, as the ledger line.
#[derive(Debug, serde::Serialize)]
struct Line<'a> {
    kind: &'static str,
    account: &'static str,
    payment: &'a str,
    amount: i64,
    operation: serde_json::Value,
}

/// What the handler needs: the ledger and the processing time.
#[derive(Debug, Clone)]
pub struct Settler {
    ledger: Arc<Ledger>,
    delay: Duration,
}

/// Settles a payment once: waits its processing time, then writes its ledger line. A payment
/// whose amount is not positive is dead-lettered (stored: its redelivery is too).
#[idempotent(scope = "settlements.create", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "6s")]
pub async fn settle(
    State(settler): State<Settler>,
    msg: Json<Settle>,
) -> Result<Json<serde_json::Value>, ConsumeError> {
    let Settle { payment, amount } = msg.0;
    if amount <= 0 {
        return Err(ConsumeError::DeadLetter(format!("amount must be an integer greater than 0, not {amount}")));
    }
    tokio::time::sleep(settler.delay).await;
    let operation = serde_json::json!({ "payment": payment, "amount": amount, "status": "settled" });
    let line = Line { kind: "settlement", account: "payments-worker", payment: &payment, amount, operation };
    if let Err(e) = settler.ledger.append_line(&line) {
        tracing::error!(error = %e, "cannot write the ledger; the settlement is retried");
        return Err(ConsumeError::retry(Duration::from_secs(1)));
    }
    Ok(Json(line.operation))
}

/// Runs the RabbitMQ settlement worker on `broker` (`amqp://USER:PASS@HOST:PORT/VHOST`), with
/// the store and ledger of `config`, each settlement taking `settle_delay`, until `stop`
/// resolves; then lets the settlements in flight finish and acknowledges them. Errors name what
/// failed: the store, the ledger, the broker, or a setting start-up refuses.
pub async fn run_amqp(
    config: &Config,
    broker: &str,
    settle_delay: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let store = config.open_store().await?;
    let (ledger, _) = Ledger::open(&config.ledger)?;
    let runtime = idempotent_rabbitmq::start(store).map_err(|e| e.to_string())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        stop.await;
        cancel.cancel();
    });
    let shown = idempotent_rabbitmq::core::store::spec::Redacted(broker);
    eprintln!(
        "payments-worker consuming {QUEUE} on {shown} (store: {}, ledger: {})",
        config.store_shown(),
        config.ledger.display()
    );
    let settings = Settings {
        concurrency: 16,
        declare: true,
        dead_letter: Some(DEAD.to_owned()),
        delivery_limit: Some(DELIVERY_LIMIT),
        max_processing: settle_delay + Duration::from_secs(60),
        ..Settings::default()
    };
    Worker::new(runtime, broker, QUEUE, settings)
        .state(Settler { ledger: Arc::new(ledger), delay: settle_delay })
        .run(settle, token)
        .await
        .map_err(|e| format!("RabbitMQ worker on {shown}: {e}"))
}
