//! RabbitMQ (AMQP 0-9-1) consumers of `idempotent`: the `#[idempotent]` attribute on a message
//! handler, and a worker that takes a queue's messages through it, so that each message key's
//! effects happen once however often RabbitMQ delivers it.
//!
//! ```no_run
//! use idempotent_rabbitmq::{idempotent, CancellationToken, ConsumeError, Json, Settings, Worker};
//! use idempotent_rabbitmq::core::store::MemoryStore;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Settle { payment: String, amount: u64 }
//!
//! // Runs once per payment, on every delivery of every message that names it.
//! #[idempotent(scope = "settlements.create", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "10s")]
//! async fn settle(msg: Json<Settle>) -> Result<String, ConsumeError> {
//!     Ok(format!("{} settled {}", msg.0.payment, msg.0.amount))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = idempotent_rabbitmq::start(Arc::new(MemoryStore::new()))?;
//! let stop = CancellationToken::new(); // cancel it on SIGTERM
//! let settings = Settings {
//!     declare: true, // a quorum queue, its dead-letter exchange and queue
//!     dead_letter: Some("payments.dead".into()),
//!     delivery_limit: Some(20),
//!     max_processing: Duration::from_secs(60),
//!     ..Settings::default()
//! };
//! Worker::new(runtime, "amqp://guest:guest@127.0.0.1:5672/%2f", "payments.settle", settings)
//!     .run(settle, stop)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What happens to a message
//! The decisions are core's ([`idempotent_core::protocol::consume`], one table for every broker);
//! this crate only carries them out on RabbitMQ, each delivery settled exactly once (a second
//! acknowledgement of a delivery tag would close the channel):
//! - `basic.ack` once its outcome is stored, never before; when it asks for a reply (`reply_to`),
//!   the stored reply is first published to the default exchange with the request's
//!   `correlation_id`, again (with `Idempotent-Replayed: true`) to every duplicate;
//! - `basic.reject` with requeue, after a delay the worker waits out holding the message (AMQP
//!   has no delayed requeue), while another worker holds its key, when the store fails, or on a
//!   [`ConsumeError::Retry`]. A reject, not a nack: a quorum queue counts it in
//!   `x-delivery-count`, so its `delivery-limit` bounds a handler that always fails;
//! - dead-lettered when it can never succeed (a key used by another message, no key, a body the
//!   handler cannot decode, a [`ConsumeError::DeadLetter`], a retry on the last delivery the
//!   queue's limit allows). A `basic.reject` cannot carry a header, so with a dead-letter
//!   exchange named ([`Settings::dead_letter`]) the message is published there with its
//!   properties, headers and `Idempotent-Reason`, confirmed by the broker, then acknowledged (an
//!   unconfirmed dead letter requeues it instead); without one it is rejected without requeue,
//!   to whatever dead-lettering the queue has.
//!
//! Keys: `key = header("message-id")` reads the `message_id` property; `correlation-id`, `type`,
//! `app-id`, `user-id` and `content-type` are the other properties, every entry of the header
//! table is a header of its name; `key = field(..)` reads the body. Record keys are namespaced
//! by the queue's name, so two queues bound to one exchange (fan-out) each process a message once.
//!
//! A connection or channel lost mid-handler does not stop the handler: its outcome is still
//! stored, the worker connects again, and the redelivery is answered from the store. While a
//! handler runs the engine renews its lease; RabbitMQ's own deadline cannot be extended, so
//! start-up refuses a handler whose [`Settings::max_processing`] plus lease does not fit the
//! queue's consumer timeout ([`Settings::consumer_timeout`]), or whose ttl is shorter than
//! `consumer timeout × (delivery limit + 1)`, or a queue without a delivery limit.
//!
//! # Dependencies and why
//! `lapin`: the AMQP 0-9-1 client of the Rust ecosystem, maintained, on tokio, with publisher
//! confirms and single-use ackers that cannot acknowledge a delivery twice (`amqprs` is the other
//! maintained client; lapin has the wider use and its ackers are poisoned when their channel
//! closes, which is what keeps a reconnecting worker from acknowledging a stale tag). Also
//! `idempotent-core` and `idempotent-macros` (the protocol and the attribute),
//! `tokio`/`tokio-util` (tasks and the stop token), `futures-util` (the delivery stream), `bytes`
//! (the body core reads), `thiserror` and `tracing`. Built without lapin's TLS (its default is
//! rustls): a broker on a private network needs none; `amqps://` is not supported yet.

#![cfg_attr(docsrs, feature(doc_cfg))]

use futures_util::StreamExt;
use idempotent_core::engine::{Config, Runtime, StartupError};
use idempotent_core::protocol::consume::{check_deadline, check_redelivery, headers, Action, Delivery, DeliveryInfo};
use idempotent_core::protocol::consume::{Handler, Redelivery, SettingNames};
use idempotent_core::registry::{bind_consumer, ConsumerBinding, Framework};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::{any::Any, collections::BTreeMap, sync::Arc, time::Duration, time::Instant};

pub use idempotent_core as core;
pub use idempotent_core::protocol::consume::{ConsumeError, Json, RedeliveryError, State};
pub use idempotent_macros::idempotent_rabbitmq as idempotent;
pub use lapin;
pub use tokio_util::sync::CancellationToken;

/// The header of a dead letter, or of a reply carrying a [`ConsumeError::Final`], with the reason.
pub const REASON: &str = "Idempotent-Reason";
/// RabbitMQ's default consumer timeout (its `consumer_timeout` setting): 30 minutes.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Items used by the code `#[idempotent]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use ::core::time::Duration;
    pub use idempotent_core::inventory;
    pub use idempotent_core::policy::StoredOutcomes;
    pub use idempotent_core::policy::{ConflictMode, Identity, KeyRequirement, KeySource, Part, Policy};
    pub use idempotent_core::protocol::consume::{Delivery, FromDelivery, Handler, Settling};
    pub use idempotent_core::protocol::field::{Field, KeyField, PlainField, SetField};
    pub use idempotent_core::registry::{Framework, RouteRecord};
}

/// Starts the runtime of this binary's RabbitMQ handlers on `store`: validates their registry
/// (one scope each, leases of at least six store timeouts) and refuses to start on error.
pub fn start(store: Arc<dyn idempotent_core::store::Store>) -> Result<Runtime, StartupError> {
    Runtime::start(store, Config::default(), Framework::RabbitMq)
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue's settings cannot keep the promise (see [`RedeliveryError`]).
    #[error(transparent)]
    Refused(#[from] RedeliveryError),
    /// Connecting, declaring or checking the queue failed at start-up.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Where a worker's queue comes from and what it promises: [`Worker::new`] takes them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many messages are handled at once, the channel's prefetch (default 8). A message
    /// waiting out its requeue delay holds its place.
    pub concurrency: u16,
    /// Declare the queue at start-up (default `false`): durable and quorum, with the dead-letter
    /// exchange, delivery limit and consumer timeout below (`x-consumer-timeout`, which servers
    /// before 3.12 ignore: there the server's `consumer_timeout` must be at least as long), and
    /// the dead-letter exchange (fanout, durable) with a durable queue of its name bound to it.
    /// Otherwise the queue must exist, and the settings below say how it was declared.
    pub declare: bool,
    /// An existing exchange and routing key to bind the queue to at start-up; reports show it.
    pub bind: Option<(String, String)>,
    /// The exchange dead letters are published to, with the `Idempotent-Reason` header.
    pub dead_letter: Option<String>,
    /// The quorum queue's `delivery-limit`: how many times a message is returned before the
    /// broker drops or dead-letters it. Required: an unbounded queue can redeliver a message
    /// after its record's ttl.
    pub delivery_limit: Option<u32>,
    /// How long a delivery may stay unacknowledged before the broker closes the channel and
    /// delivers it again (default [`DEFAULT_CONSUMER_TIMEOUT`]).
    pub consumer_timeout: Duration,
    /// The longest the handler runs (default 5 minutes), checked at start-up against the
    /// consumer timeout. Not enforced: a handler that runs longer is not cut short.
    pub max_processing: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            declare: false,
            bind: None,
            dead_letter: None,
            delivery_limit: None,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            max_processing: Duration::from_secs(5 * 60),
        }
    }
}

/// Runs one queue's messages through one `#[idempotent]` handler.
pub struct Worker {
    runtime: Runtime,
    uri: String,
    queue: String,
    settings: Settings,
    state: Option<Arc<dyn Any + Send + Sync>>,
}

impl Worker {
    /// A worker of `queue` on the broker at `uri` (`amqp://USER:PASS@HOST:PORT/VHOST`), on `runtime`.
    pub fn new(runtime: Runtime, uri: &str, queue: &str, settings: Settings) -> Self {
        Self { runtime, uri: uri.to_owned(), queue: queue.to_owned(), settings, state: None }
    }

    /// The application's state, for the handler's `State<S>` arguments.
    pub fn state<S: Clone + Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// Checks the queue's settings against `handler`'s policy, declares or checks the queue,
    /// then runs its messages through the handler until `stop` is cancelled, connecting again
    /// whenever the connection or channel is lost; then lets the messages in flight settle,
    /// closes the connection and returns.
    pub async fn run(self, handler: Handler, stop: CancellationToken) -> Result<(), Error> {
        let set = &self.settings;
        let (max_deliver, names) = (set.delivery_limit.map(|limit| u64::from(limit) + 1), SettingNames::RABBITMQ);
        let (consumer, backoff, ack_wait) = (self.queue.clone(), Vec::new(), set.consumer_timeout);
        let redelivery =
            Redelivery { consumer, explicit_ack: true, ack_wait, max_deliver, backoff, duplicate_window: None, names };
        let checks = [
            check_redelivery(handler.policy, &redelivery),
            check_deadline(handler.policy, &self.queue, set.consumer_timeout, set.max_processing),
        ];
        let problems: Vec<String> = checks.into_iter().filter_map(Result::err).flat_map(|e| e.0).collect();
        if !problems.is_empty() {
            return Err(RedeliveryError(problems).into());
        }
        let mut open = Some(self.open(true).await?);
        let filter = set.bind.as_ref().map(|(e, k)| format!("{e}:{k}")).unwrap_or_default();
        let binding = ConsumerBinding { source: self.queue.clone(), filter, consumer: self.queue.clone() };
        bind_consumer(Framework::RabbitMq, handler.handler, binding);
        let shared = Arc::new(Shared { worker: self, handler, max_deliver, stop: stop.clone() });
        let (tasks, queue) = (tokio_util::task::TaskTracker::new(), shared.worker.queue.as_str());
        while !stop.is_cancelled() {
            let Some((connection, channel)) = open.take() else {
                let reopened = shared.worker.open(false).await;
                open = reopened.inspect_err(|e| tracing::warn!(queue, error = %e, "cannot connect")).ok();
                tokio::select! { () = stop.cancelled() => {}, () = tokio::time::sleep(Duration::from_millis(500)) => {} }
                continue;
            };
            let consumer =
                channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default());
            if let Ok(mut consumer) = consumer.await {
                loop {
                    let next = tokio::select! { () = stop.cancelled() => break, next = consumer.next() => next };
                    let Some(Ok(delivery)) = next else { break };
                    let (shared, channel) = (shared.clone(), channel.clone());
                    tasks.spawn(async move { shared.handle(channel, delivery).await });
                }
            }
            if stop.is_cancelled() {
                // Settle what is in flight on this channel before closing it: deliveries not
                // begun go back to the queue.
                tasks.close();
                tasks.wait().await;
            } else {
                tracing::warn!(queue, "connection or channel lost; connecting again");
            }
            let _ = connection.close(200, "OK".into()).await;
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    /// A connection and a channel with publisher confirms and the prefetch; at start-up declares
    /// the topology or checks the queue exists.
    async fn open(&self, first: bool) -> Result<(Connection, Channel), lapin::Error> {
        let (set, q, none) = (&self.settings, self.queue.as_str(), FieldTable::default);
        let name = format!("idempotent-rabbitmq {q}");
        let connection =
            Connection::connect(&self.uri, ConnectionProperties::default().with_connection_name(name.into())).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        channel.basic_qos(set.concurrency, BasicQosOptions::default()).await?;
        let (durable, declare) = (QueueDeclareOptions { durable: true, ..Default::default() }, first && set.declare);
        let mut args = FieldTable::default();
        if declare {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            if let Some(dead) = set.dead_letter.as_deref() {
                let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
                channel.exchange_declare(dead.into(), ExchangeKind::Fanout, options, none()).await?;
                channel.queue_declare(dead.into(), durable, none()).await?;
                channel.queue_bind(dead.into(), dead.into(), "".into(), Default::default(), none()).await?;
                args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dead.into()));
            }
            if let Some(limit) = set.delivery_limit {
                args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit.into()));
            }
            let timeout = i64::try_from(set.consumer_timeout.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-consumer-timeout".into(), AMQPValue::LongLongInt(timeout));
        }
        channel.queue_declare(q.into(), QueueDeclareOptions { passive: !declare, ..durable }, args).await?;
        if let (Some((exchange, key)), true) = (&set.bind, first) {
            channel
                .queue_bind(q.into(), exchange.as_str().into(), key.as_str().into(), Default::default(), none())
                .await?;
        }
        Ok((connection, channel))
    }
}

/// What every message's task needs.
struct Shared {
    worker: Worker,
    handler: Handler,
    max_deliver: Option<u64>,
    stop: CancellationToken,
}

/// A header table's value as a header's text, where it has one.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// A header table value of text.
fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

impl Shared {
    async fn handle(&self, channel: Channel, message: lapin::message::Delivery) {
        let (started, props, queue) = (Instant::now(), &message.properties, self.worker.queue.as_str());
        let table = props.headers().iter().flat_map(|t| t.inner()).filter_map(|(n, v)| Some((n.as_str(), text(v)?)));
        let properties = [
            ("message-id", props.message_id()),
            ("correlation-id", props.correlation_id()),
            ("type", props.kind()),
            ("app-id", props.app_id()),
            ("user-id", props.user_id()),
            ("content-type", props.content_type()),
        ];
        let properties = properties.into_iter().filter_map(|(n, v)| Some((n, v.as_ref()?.to_string())));
        let headers = headers(table.chain(properties));
        // A quorum queue counts the returns of a message; a classic queue only tells a redelivery.
        let returned = headers.get("x-delivery-count").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let reply_to = props.reply_to().as_ref().map(|r| r.to_string());
        let info = DeliveryInfo {
            consumer: queue.to_owned(),
            attempt: returned.map_or(1 + u64::from(message.redelivered), |n| n + 1),
            max_attempts: self.max_deliver,
            wants_reply: reply_to.is_some(),
        };
        let body = bytes::Bytes::copy_from_slice(&message.data);
        let mut delivery = Delivery::new(self.worker.runtime.clone(), headers, body, info);
        if let Some(state) = &self.worker.state {
            delivery = delivery.with_state(state.clone());
        }
        let (acker, requeue) = (&message.acker, |requeue| BasicRejectOptions { requeue });
        let settled = match (self.handler.call)(delivery).await.action {
            Action::Ack { reply } => {
                if let (Some(reply), Some(to)) = (reply, reply_to) {
                    let table = reply.headers().into_iter().map(|(n, v)| (n.into(), long(&v)));
                    let base = BasicProperties::default().with_headers(table.collect::<BTreeMap<_, _>>().into());
                    let reply_props =
                        props.correlation_id().iter().fold(base, |p, id| p.with_correlation_id(id.clone()));
                    if !publish(&channel, "", &to, &reply.body, reply_props).await {
                        tracing::warn!(queue, "reply not confirmed");
                    }
                }
                acker.ack(Default::default()).await
            }
            Action::Nak { delay } => {
                // AMQP requeues at once: the delay is waited out here, within the consumer timeout.
                // Stopping returns it to the queue at once, for another worker.
                let hold = delay.min(self.worker.settings.consumer_timeout.saturating_sub(started.elapsed()) / 2);
                tokio::select! { () = tokio::time::sleep(hold) => {}, () = self.stop.cancelled() => {} }
                acker.reject(requeue(true)).await
            }
            Action::Terminate { reason } => match self.worker.settings.dead_letter.as_deref() {
                Some(exchange) => {
                    let mut table = props.headers().clone().unwrap_or_default();
                    table.insert(REASON.into(), long(&reason));
                    table.insert("Idempotent-Queue".into(), long(queue));
                    let dead = props.clone().with_headers(table);
                    if publish(&channel, exchange, message.routing_key.as_str(), &message.data, dead).await {
                        acker.ack(Default::default()).await
                    } else {
                        tracing::warn!(queue, "dead letter not confirmed; requeueing");
                        acker.reject(requeue(true)).await
                    }
                }
                None => acker.reject(requeue(false)).await,
            },
        };
        if !matches!(settled, Ok(true)) {
            // Its channel is gone: the broker delivers it again, and the store answers that.
            tracing::info!(queue, "delivery not settled: channel lost");
        }
    }
}

/// Publishes and waits for the broker's confirmation.
async fn publish(channel: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) -> bool {
    let confirm = channel.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, props);
    matches!(async { confirm.await?.await }.await, Ok(c) if c.is_ack())
}
