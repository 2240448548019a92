//! NATS JetStream consumers of `idempotent`: the `#[idempotent]` attribute on a message handler,
//! and a runner that takes a durable pull consumer's messages through it, so that each message
//! key's effects happen once however often JetStream delivers it.
//!
//! ```no_run
//! use idempotent_nats::{idempotent, CancellationToken, ConsumeError, Json, State, Worker};
//! use idempotent_nats::core::store::MemoryStore;
//! use std::sync::Arc;
//!
//! #[derive(serde::Deserialize)]
//! struct Settle { payment: String, amount: u64 }
//!
//! // Runs once per payment, on every delivery of every message that names it.
//! #[idempotent(scope = "settlements.create", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "10s")]
//! async fn settle(State(bank): State<&'static str>, msg: Json<Settle>) -> Result<String, ConsumeError> {
//!     Ok(format!("{} settled {} at {bank}", msg.0.payment, msg.0.amount))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let jetstream = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
//! let runtime = idempotent_nats::start(Arc::new(MemoryStore::new()))?;
//! let stop = CancellationToken::new(); // cancel it on SIGTERM
//! Worker::new(runtime, jetstream, "PAYMENTS", "settler")
//!     .concurrency(16)
//!     .dead_letter("payments.dead")
//!     .state("bank-1")
//!     .run(settle, stop)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What happens to a message
//! The decisions are core's ([`idempotent_core::protocol::consume`], one table for every broker);
//! this crate only carries them out on JetStream:
//! - acknowledged with `double_ack` (waiting for the server's confirmation) once its outcome is
//!   stored, never before; a lost acknowledgement's redelivery is acknowledged without running;
//! - negatively acknowledged with a delay while another worker holds its key, when the store
//!   fails, or when the claim was taken over before its outcome was stored;
//! - terminated (`+TERM`) and published to the dead-letter subject, with its headers and an
//!   `Idempotent-Reason` header, when it can never succeed: a key used by another message, no
//!   key, a body the handler cannot decode, a [`ConsumeError::DeadLetter`], or a retry on the
//!   consumer's last delivery (`max_deliver`). Without a dead-letter subject it is only terminated.
//!   The subject must be captured by a stream: the dead letter is published through JetStream,
//!   and a message whose dead letter is not confirmed is redelivered instead of terminated.
//!
//! While a handler runs, its lease is renewed in the store and JetStream's deadline extended with
//! a progress acknowledgement (`+WPI`) every third of the consumer's AckWait; both stop once the
//! claim cannot be vouched for. A message that carries a [`REPLY_TO`] header asks for a reply: the
//! handler's reply is stored with its outcome and published to that subject, again (with
//! `Idempotent-Replayed: true`) to every duplicate.
//!
//! Record keys include the durable's name, so two durables of one stream (fan-out) each process a
//! message once. Start-up ([`Worker::run`]) reads the consumer's configuration and refuses to
//! start, naming the consumer and the numbers, unless its ack policy is explicit, `max_deliver`
//! is bounded and the handler's ttl outlives `ack_wait × max_deliver + Σ backoff` and the stream's
//! duplicate window. [`Worker::run`] returns when its stop token is cancelled: it fetches no more,
//! lets the handlers in flight finish and settle their messages, and returns.
//!
//! # Dependencies and why
//! `async-nats` (the NATS client, with JetStream), `idempotent-core` and `idempotent-macros` (the
//! protocol and the attribute), `tokio`/`tokio-util` (tasks, a semaphore and the stop token),
//! `futures-util` (the message stream), `http` and `bytes` (the headers and body core reads),
//! `thiserror` and `tracing`.

#![cfg_attr(docsrs, feature(doc_cfg))]

use async_nats::jetstream::{self, consumer::AckPolicy, AckKind};
use futures_util::StreamExt;
use idempotent_core::engine::{Config, Runtime, StartupError};
use idempotent_core::protocol::consume::{
    check_redelivery, Action, Delivery, DeliveryInfo, Handler, Redelivery, SettingNames,
};
use idempotent_core::registry::{bind_consumer, ConsumerBinding, Framework};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

pub use idempotent_core as core;
pub use idempotent_core::protocol::consume::{ConsumeError, Json, RedeliveryError, State, REASON_HEADER};
pub use idempotent_macros::idempotent_nats as idempotent;
pub use tokio_util::sync::CancellationToken;

/// The header of a message that asks for a reply: the subject to publish it to.
pub const REPLY_TO: &str = "Idempotent-Reply-To";

/// Items used by the code `#[idempotent]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use ::core::time::Duration;
    pub use idempotent_core::inventory;
    pub use idempotent_core::policy::{
        ConflictMode, Identity, KeyRequirement, KeySource, Part, Policy, StoredOutcomes,
    };
    pub use idempotent_core::protocol::consume::{Delivery, FromDelivery, Handler, Settling};
    pub use idempotent_core::protocol::field::{Field, KeyField, PlainField, SetField};
    pub use idempotent_core::registry::{Framework, RouteRecord};
}

/// Starts the runtime of this binary's NATS handlers on `store`: validates their registry (one
/// scope each, leases of at least six store timeouts) and refuses to start on error.
pub fn start(store: Arc<dyn idempotent_core::store::Store>) -> Result<Runtime, StartupError> {
    Runtime::start(store, Config::default(), Framework::Nats)
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The consumer's configuration cannot keep the promise (see [`RedeliveryError`]).
    #[error(transparent)]
    Refused(#[from] RedeliveryError),
    /// The stream or consumer could not be read, or fetching failed.
    #[error("JetStream: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> Error {
    Error::Nats(e.to_string())
}

/// Runs a durable pull consumer's messages through one `#[idempotent]` handler.
pub struct Worker {
    runtime: Runtime,
    jetstream: jetstream::Context,
    stream: String,
    durable: String,
    concurrency: usize,
    dead_letter: Option<String>,
    progress: bool,
    state: Option<Arc<dyn Any + Send + Sync>>,
}

impl Worker {
    /// A worker of the existing durable pull consumer `durable` of `stream`, on `runtime`.
    pub fn new(runtime: Runtime, jetstream: jetstream::Context, stream: &str, durable: &str) -> Self {
        let (stream, durable) = (stream.to_owned(), durable.to_owned());
        Self { runtime, jetstream, stream, durable, concurrency: 8, dead_letter: None, progress: true, state: None }
    }

    /// How many messages are handled at once (default 8); as many are fetched at a time.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The subject terminated messages are published to, with an `Idempotent-Reason` header.
    pub fn dead_letter(mut self, subject: &str) -> Self {
        self.dead_letter = Some(subject.to_owned());
        self
    }

    /// Whether progress acknowledgements extend AckWait while a handler runs (default on). Off,
    /// a handler that outlives AckWait is redelivered meanwhile, and its claim keeps the
    /// redelivery from running it again.
    pub fn progress_acks(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// The application's state, for the handler's `State<S>` arguments.
    pub fn state<S: Clone + Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// Checks the consumer's configuration against `handler`'s policy, then runs its messages
    /// through it until `stop` is cancelled; then lets the messages in flight settle and returns.
    pub async fn run(self, handler: Handler, stop: CancellationToken) -> Result<(), Error> {
        let mut stream = self.jetstream.get_stream(&self.stream).await.map_err(nats)?;
        let window = stream.info().await.map_err(nats)?.config.duplicate_window;
        let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(&self.durable).await.map_err(nats)?;
        let config = consumer.info().await.map_err(nats)?.config.clone();
        let max_deliver = u64::try_from(config.max_deliver).ok().filter(|m| *m > 0);
        let redelivery = Redelivery {
            consumer: self.durable.clone(),
            explicit_ack: config.ack_policy == AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver,
            backoff: config.backoff.clone(),
            duplicate_window: Some(window).filter(|w| !w.is_zero()),
            names: SettingNames::JETSTREAM,
        };
        check_redelivery(handler.policy, &redelivery)?;
        let filter = [config.filter_subject.clone()].into_iter().chain(config.filter_subjects.clone());
        let filter = filter.filter(|f| !f.is_empty()).collect::<Vec<_>>().join(", ");
        let binding = ConsumerBinding { source: self.stream.clone(), filter, consumer: self.durable.clone() };
        bind_consumer(Framework::Nats, handler.handler, binding);
        let every = (self.progress && !config.ack_wait.is_zero()).then_some(config.ack_wait / 3);
        let shared = Arc::new(Shared { worker: self, handler, max_deliver, every });
        let permits = Arc::new(tokio::sync::Semaphore::new(shared.worker.concurrency));
        let tasks = tokio_util::task::TaskTracker::new();
        while !stop.is_cancelled() {
            // Fetch only once a handler is free, as many as are free.
            drop(permits.acquire().await.map_err(nats)?);
            let batch = consumer.batch().max_messages(permits.available_permits()).expires(Duration::from_millis(500));
            let mut messages = batch.messages().await.map_err(nats)?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(nats)?;
                if stop.is_cancelled() {
                    // Fetched but not begun: back to the consumer at once, for another worker.
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                let permit = permits.clone().acquire_owned().await.map_err(nats)?;
                let shared = shared.clone();
                tasks.spawn(async move {
                    shared.handle(message).await;
                    drop(permit);
                });
            }
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }
}

/// What every message's task needs.
struct Shared {
    worker: Worker,
    handler: Handler,
    max_deliver: Option<u64>,
    every: Option<Duration>,
}

impl Shared {
    async fn handle(&self, message: jetstream::Message) {
        let attempt = message.info().map_or(1, |i| u64::try_from(i.delivered).unwrap_or(1));
        let (message, acker) = message.split();
        let acker = Arc::new(acker);
        let mut headers = http::HeaderMap::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            for value in values {
                if let (Ok(n), Ok(v)) = (name.to_string().parse::<http::HeaderName>(), value.as_str().parse()) {
                    headers.append(n, v);
                }
            }
        }
        let reply_to = headers.get(REPLY_TO).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let info = DeliveryInfo {
            consumer: self.worker.durable.clone(),
            attempt,
            max_attempts: self.max_deliver,
            wants_reply: reply_to.is_some(),
        };
        let mut delivery = Delivery::new(self.worker.runtime.clone(), headers, message.payload.clone(), info);
        if let Some(state) = &self.worker.state {
            delivery = delivery.with_state(state.clone());
        }
        if let Some(every) = self.every {
            let acker = acker.clone();
            delivery = delivery.with_progress(
                every,
                Arc::new(move || {
                    let acker = acker.clone();
                    Box::pin(async move {
                        let _ = acker.ack_with(AckKind::Progress).await;
                    })
                }),
            );
        }
        let client = self.worker.jetstream.client();
        match (self.handler.call)(delivery).await.action {
            Action::Ack { reply } => {
                if let (Some(reply), Some(to)) = (reply, reply_to) {
                    let mut h = async_nats::HeaderMap::new();
                    if let Some(error) = &reply.error {
                        h.insert(REASON_HEADER, error.as_str());
                    }
                    if reply.replayed {
                        h.insert("Idempotent-Replayed", "true");
                    }
                    let _ = client.publish_with_headers(to, h, reply.body).await;
                }
                // An acknowledgement that is lost redelivers the message, which then replays.
                if let Err(e) = acker.double_ack().await {
                    tracing::warn!(consumer = %self.worker.durable, error = %e, "acknowledgement not confirmed");
                }
            }
            Action::Nak { delay } => {
                let _ = acker.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Action::Terminate { reason } => {
                if let Some(subject) = &self.worker.dead_letter {
                    let mut h = message.headers.clone().unwrap_or_default();
                    h.insert("Idempotent-Reason", reason.as_str());
                    h.insert("Idempotent-Subject", message.subject.as_str());
                    let published = self.worker.jetstream.publish_with_headers(subject.clone(), h, message.payload);
                    if let Err(e) = async { published.await?.await.map(drop) }.await {
                        tracing::warn!(consumer = %self.worker.durable, error = %e, "dead letter not confirmed; redelivering");
                        let _ = acker.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        return;
                    }
                }
                let _ = acker.ack_with(AckKind::Term).await;
            }
        }
    }
}
