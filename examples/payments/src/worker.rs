//! `payments-worker`: settles payments from a broker, each payment once however often it is
//! published or delivered.
//!
//! A message is `{"payment": string, "amount": int > 0}`, keyed by its `payment`. Each executed
//! settlement is appended to the ledger after its processing time, before the message is
//! acknowledged. The same payment with another amount, or a body that is not such a message, is
//! dead-lettered without being executed.
//!
//! NATS (`PAYMENTS_BROKER=nats://HOST:PORT`): the stream `PAYMENTS` on `payments.>` is created if
//! missing, the durable pull consumer `settler` on `payments.settle` created or updated (explicit
//! acks, AckWait from `PAYMENTS_ACK_WAIT_MS`, at most [`MAX_DELIVER`] deliveries), and dead
//! letters go to `payments.dead` with an `Idempotent-Reason` header. On SIGTERM it stops
//! fetching, finishes and acknowledges the settlements in flight, and exits 0.

use crate::ledger::{Entry, Ledger};
use idempotent_nats::core::engine::Fence;
use idempotent_nats::{idempotent, CancellationToken, ConsumeError, Json, State};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The JetStream stream the worker reads.
pub const STREAM: &str = "PAYMENTS";
/// The subject settlements are published to.
pub const SUBJECT: &str = "payments.settle";
/// The durable consumer's name.
pub const DURABLE: &str = "settler";
/// Where dead letters go.
pub const DEAD_LETTERS: &str = "payments.dead";
/// What the worker binds its handler to at start-up, for reports.
pub fn binding() -> idempotent_nats::core::registry::ConsumerBinding {
    idempotent_nats::core::registry::ConsumerBinding {
        source: STREAM.into(),
        filter: SUBJECT.into(),
        consumer: DURABLE.into(),
    }
}

/// How many deliveries JetStream makes of one message at most.
pub const MAX_DELIVER: i64 = 10;

/// A settlement order.
#[derive(Debug, Deserialize, Serialize)]
pub struct Settle {
    /// The payment to settle: the key.
    pub payment: String,
    /// Its amount, > 0.
    pub amount: i64,
}

/// A settlement done: the reply, and the ledger line's operation.
#[derive(Debug, Serialize)]
pub struct Settled {
    /// The payment.
    pub payment: String,
    /// Its amount.
    pub amount: i64,
    /// When it was settled.
    pub settled_at: String,
}

/// What the handler needs.
#[derive(Debug)]
pub struct Settler {
    ledger: Ledger,
    delay: Duration,
}

/// One ledger line of a settlement: an [`Entry`] (account `settler`) whose `payment` and `amount`
/// are also at the top level.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    entry: Entry,
    payment: &'a str,
    amount: i64,
}

/// Settles one payment: waits its processing time, then, if its claim still holds, appends the
/// ledger line.
#[idempotent(scope = "settlements.create", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "6s")]
pub async fn settle(
    State(settler): State<Arc<Settler>>,
    fence: Fence,
    msg: Json<Settle>,
) -> Result<Json<Settled>, ConsumeError> {
    let Settle { payment, amount } = msg.0;
    if amount <= 0 {
        return Err(ConsumeError::DeadLetter(format!("amount must be greater than 0, got {amount}")));
    }
    tokio::time::sleep(settler.delay).await;
    // A worker stalled past its lease does not settle: another one has taken the payment over.
    if fence.check().is_err() {
        return Err(ConsumeError::retry(Duration::from_secs(1)));
    }
    let settled = Settled { payment, amount, settled_at: crate::domain::now() };
    let operation = serde_json::to_value(&settled).map_err(|e| ConsumeError::Final(e.to_string()))?;
    let entry = Entry { kind: "settlement".into(), account: DURABLE.into(), operation };
    let line = Line { entry, payment: &settled.payment, amount };
    let mut text = serde_json::to_vec(&line).map_err(|e| ConsumeError::Final(e.to_string()))?;
    text.push(b'\n');
    if let Err(e) = settler.ledger.append_raw(&text) {
        tracing::error!("cannot append to the ledger: {e}");
        return Err(ConsumeError::retry(Duration::from_secs(1)));
    }
    Ok(Json(settled))
}

/// The broker `PAYMENTS_BROKER` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// `nats://HOST:PORT`: JetStream.
    Nats(String),
    /// `amqp://USER:PASS@HOST:PORT/VHOST`: RabbitMQ.
    Amqp(String),
}

impl Broker {
    /// Parses `PAYMENTS_BROKER`; an unknown scheme is an error naming the ones known.
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("nats://") {
            Ok(Broker::Nats(url.to_owned()))
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Broker::Amqp(url.to_owned()))
        } else {
            Err(format!("PAYMENTS_BROKER `{url}` is neither nats://HOST:PORT nor amqp://USER:PASS@HOST:PORT/VHOST"))
        }
    }
}

/// The worker's settings, from the environment.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `PAYMENTS_BROKER`, default `nats://127.0.0.1:4222`.
    pub broker: Broker,
    /// `IDEMPOTENCY_STORE` (as for the API).
    pub store: String,
    /// `PAYMENTS_LEDGER` (as for the API).
    pub ledger: std::path::PathBuf,
    /// `PAYMENTS_SETTLE_DELAY_MS`, default 200.
    pub settle_delay: Duration,
    /// `PAYMENTS_ACK_WAIT_MS`, default 30000.
    pub ack_wait: Duration,
}

fn millis(name: &str, default: &str) -> Result<Duration, String> {
    let value = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    value.parse().map(Duration::from_millis).map_err(|e| format!("{name} `{value}` is not a number of ms: {e}"))
}

impl WorkerConfig {
    /// Reads the environment; a malformed value is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        let broker =
            Broker::parse(&std::env::var("PAYMENTS_BROKER").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()))?;
        let ledger = std::path::PathBuf::from(
            std::env::var("PAYMENTS_LEDGER").unwrap_or_else(|_| "payments-ledger.jsonl".into()),
        );
        let store = std::env::var("IDEMPOTENCY_STORE").unwrap_or_else(|_| crate::config::default_store(&ledger));
        let settle_delay = millis("PAYMENTS_SETTLE_DELAY_MS", "200")?;
        let ack_wait = millis("PAYMENTS_ACK_WAIT_MS", "30000")?;
        Ok(Self { broker, store, ledger, settle_delay, ack_wait })
    }
}

/// Runs the worker until `stop` is cancelled; `ready` is called once it consumes. Errors are one
/// line for stderr.
pub async fn run(config: WorkerConfig, stop: CancellationToken, ready: impl FnOnce(&str)) -> Result<(), String> {
    let url = match &config.broker {
        Broker::Nats(url) => url,
        Broker::Amqp(url) => {
            // RabbitMQ: the quorum queue `payments.settle`, dead letters to `payments.dead`.
            let api = crate::config::Config::new(config.store.clone(), config.ledger.clone(), Duration::ZERO);
            ready(&format!("consuming {} over AMQP", crate::worker_amqp::QUEUE));
            return crate::worker_amqp::run_amqp(&api, url, config.settle_delay, async move { stop.cancelled().await })
                .await;
        }
    };
    let store = idempotent_nats::core::store::connect(&config.store).await.map_err(|e| {
        format!("idempotency store `{}`: {e}", idempotent_nats::core::store::spec::Redacted(&config.store))
    })?;
    let (ledger, _) = Ledger::open(&config.ledger)?;
    let settler = Arc::new(Settler { ledger, delay: config.settle_delay });
    let runtime = idempotent_nats::start(store).map_err(|e| e.to_string())?;
    let jetstream = nats(url, config.ack_wait).await?;
    ready(&format!("consuming {STREAM}/{DURABLE} ({SUBJECT}) on {url}"));
    idempotent_nats::Worker::new(runtime, jetstream, STREAM, DURABLE)
        .concurrency(16)
        .dead_letter(DEAD_LETTERS)
        .state(settler)
        .run(settle, stop)
        .await
        .map_err(|e| e.to_string())
}

/// Connects to JetStream at `url` and sets up the stream and the durable.
async fn nats(url: &str, ack_wait: Duration) -> Result<async_nats::jetstream::Context, String> {
    use async_nats::jetstream::{consumer, stream};
    let client = async_nats::connect(url).await.map_err(|e| format!("NATS at {url}: {e}"))?;
    let jetstream = async_nats::jetstream::new(client);
    let config = stream::Config { name: STREAM.into(), subjects: vec!["payments.>".into()], ..Default::default() };
    let stream = jetstream.get_or_create_stream(config).await.map_err(|e| format!("stream {STREAM}: {e}"))?;
    let consumer = consumer::pull::Config {
        durable_name: Some(DURABLE.into()),
        filter_subject: SUBJECT.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: MAX_DELIVER,
        ..Default::default()
    };
    stream.create_consumer(consumer).await.map_err(|e| format!("consumer {DURABLE}: {e}"))?;
    Ok(jetstream)
}
