//! The consumer protocol: a broker's delivery through a protected handler, to one broker-neutral
//! [`Action`].
//!
//! Brokers deliver at least once: a consumer that crashes, stalls past its ack deadline or loses
//! its acknowledgement gets the same message again. A consumer handler runs under the same claim,
//! lease, fencing and stored outcome as an HTTP handler ([`Runtime::execute_on`]); what differs is
//! how the outcome becomes an acknowledgement, and that is decided here, once, for every broker:
//!
//! | claim / outcome | [`Action`] |
//! |---|---|
//! | acquired, handler `Ok` | the outcome is stored (fenced), then [`Action::Ack`], with the reply when the message asks for one |
//! | acquired, [`ConsumeError::Retry`] or a panic | the claim is released, [`Action::Nak`] with the handler's delay; on the last delivery the broker allows, [`Action::Terminate`] instead (dead-lettered with why) |
//! | acquired, [`ConsumeError::Final`] | stored, then [`Action::Ack`] (a reply carries the error) |
//! | acquired, [`ConsumeError::DeadLetter`] | stored, then [`Action::Terminate`] with the handler's reason |
//! | already completed | [`Action::Ack`] without running, with the stored reply ([`Reply::replayed`]) when the message asks for one; a stored dead-letter is terminated again |
//! | in progress elsewhere | [`Action::Nak`] with the store's retry delay; never acknowledged |
//! | same key, different message (mismatch) | [`Action::Terminate`] with the reason |
//! | no key, or a body the handler cannot decode | [`Action::Terminate`] with the reason: no delivery of it can ever succeed |
//! | store unavailable, or the claim taken over before the outcome was stored | [`Action::Nak`]; never acknowledged |
//!
//! Nothing is acknowledged before its outcome is stored: a redelivery of a message whose
//! acknowledgement was lost finds the stored outcome and is acknowledged without running; one
//! whose worker died mid-way finds the claim, and once its lease lapsed runs it once more.
//!
//! # How an adapter drives it
//! Per message the broker crate (a loop and conversions only):
//! 1. builds a [`Delivery`] from the message's headers and body, with [`DeliveryInfo`]: the
//!    consumer's name (part of every record key, so that two consumers of one stream each
//!    process a message once), which delivery this is (1 for the first) and how many the broker
//!    allows, and whether the message asks for a reply; optionally the application's state
//!    ([`Delivery::with_state`]) and a progress hook ([`Delivery::with_progress`]: JetStream's
//!    `+WPI`, which extends the broker's own deadline while the handler runs; the hook is called
//!    only while the lease is vouched for, and stops for good once it is not);
//! 2. calls the annotated handler's generated function with it, which decodes the handler's
//!    arguments ([`FromDelivery`]; a body that does not decode is [`Delivery::rejected`]), reads
//!    the key, fingerprints the message and calls [`Delivery::run`];
//! 3. carries the [`Settlement`]'s [`Action`] out: publish the reply then acknowledge (waiting for
//!    the broker's confirmation where it gives one), negative-acknowledge with the delay, or
//!    publish a dead letter carrying the reason and terminate the message.
//!
//! Start-up checks the broker's redelivery settings against each handler's ttl with
//! [`check_redelivery`].
//!
//! ```
//! use bytes::Bytes;
//! use idempotent_core::engine::{Config, Runtime};
//! use idempotent_core::policy::{KeySource, Policy};
//! use idempotent_core::protocol::consume::{Action, ConsumeError, Delivery, DeliveryInfo};
//! use idempotent_core::registry::Framework;
//! use idempotent_core::store::MemoryStore;
//! use std::sync::Arc;
//!
//! static POLICY: Policy = Policy { key_source: KeySource::NamedHeader("nats-msg-id"), ..Policy::new("orders.ship") };
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let runtime = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
//! let mut actions = Vec::new();
//! for attempt in 1..=2 {
//!     let mut headers = http::HeaderMap::new();
//!     headers.insert("nats-msg-id", "order-7".parse().unwrap());
//!     let info = DeliveryInfo { attempt, ..DeliveryInfo::new("shipper") };
//!     let delivery = Delivery::new(runtime.clone(), headers, Bytes::from("{}"), info);
//!     let fingerprint = delivery.fingerprint(&POLICY, Ok);
//!     let handler = async { Ok::<_, ConsumeError>("shipped") };
//!     actions.push(delivery.run(Framework::Nats, &POLICY, fingerprint, handler).await.action);
//! }
//! // The redelivery is acknowledged without running the handler again.
//! assert!(actions.iter().all(|a| matches!(a, Action::Ack { reply: None })));
//! # });
//! ```

use super::{Context, Incoming, KeyParts};
use crate::actor::Actor;
use crate::engine::{Captured, Outcome, Request, Runtime, Settled};
use crate::fingerprint::{Fingerprint, FingerprintBuilder, FingerprintError};
use crate::key::KeyError;
use crate::policy::Policy;
use crate::problem::{Problem, ProblemKind};
use crate::registry::Framework;
use crate::response::StoredResponse;
use crate::telemetry::{self, RequestOutcome};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// The header of a stored outcome, and of a reply or dead letter, that carries the reason of a
/// final error or a dead letter.
pub const REASON_HEADER: &str = "idempotent-reason";

/// The status a handler's `Ok` is stored under.
const OK: u16 = 200;
/// The status a [`ConsumeError::Final`] is stored under (a final outcome, like a 422).
const FINAL: u16 = 422;
/// The status a [`ConsumeError::DeadLetter`] is stored under (final, like a 410).
const DEAD: u16 = 410;
/// The status a [`ConsumeError::Retry`] is captured under: retryable, so released.
const RETRY: u16 = 503;

/// Why a consumer handler did not succeed, and what to do with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeError {
    /// A transient failure: the claim is released and the message redelivered after `after`
    /// (negative acknowledgement with that delay), up to the broker's delivery limit; on the last
    /// delivery it is dead-lettered instead.
    Retry {
        /// How long the broker waits before delivering it again.
        after: Duration,
    },
    /// A final failure: stored like a success (a redelivery does not run the handler again) and
    /// the message acknowledged; a reply carries the reason in [`REASON_HEADER`].
    Final(String),
    /// A final failure the message itself is to blame for: stored, and the message terminated
    /// and dead-lettered with this reason.
    DeadLetter(String),
}

impl ConsumeError {
    /// [`ConsumeError::Retry`] after `after`.
    pub const fn retry(after: Duration) -> Self {
        ConsumeError::Retry { after }
    }
}

/// What a successful consumer handler returns, turned into the bytes of its stored reply (sent
/// to a message that asks for one, and again to every redelivery of it).
pub trait IntoReply {
    /// The reply's body; an `Err` (a reply that cannot be serialised) is stored as a
    /// [`ConsumeError::Final`] with that reason: the handler's effects happened.
    fn into_reply(self) -> Result<Bytes, String>;
}

impl IntoReply for () {
    fn into_reply(self) -> Result<Bytes, String> {
        Ok(Bytes::new())
    }
}

impl IntoReply for Bytes {
    fn into_reply(self) -> Result<Bytes, String> {
        Ok(self)
    }
}

impl IntoReply for Vec<u8> {
    fn into_reply(self) -> Result<Bytes, String> {
        Ok(Bytes::from(self))
    }
}

impl IntoReply for String {
    fn into_reply(self) -> Result<Bytes, String> {
        Ok(Bytes::from(self))
    }
}

impl IntoReply for &'static str {
    fn into_reply(self) -> Result<Bytes, String> {
        Ok(Bytes::from_static(self.as_bytes()))
    }
}

impl<T: serde::Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Bytes, String> {
        serde_json::to_vec(&self.0).map(Bytes::from).map_err(|e| format!("the reply could not be serialised: {e}"))
    }
}

/// A message body as JSON: as a handler argument, decoded from the body (a body that does not
/// decode is dead-lettered without running the handler); as a handler's `Ok`, its reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

/// The application's state a consumer's runner was given, as a handler argument.
#[derive(Debug, Clone, Copy, Default)]
pub struct State<S>(pub S);

/// How one delivery reached the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The consumer's name (JetStream durable, RabbitMQ queue): the namespace of its record keys.
    pub consumer: String,
    /// Which delivery of the message this is, 1 for the first.
    pub attempt: u64,
    /// How many deliveries the broker makes at most, when it is bounded.
    pub max_attempts: Option<u64>,
    /// Whether the message asks for a reply (NATS request-reply, an AMQP `reply_to`).
    pub wants_reply: bool,
}

impl DeliveryInfo {
    /// The first delivery to `consumer`, without bound or reply.
    pub fn new(consumer: &str) -> Self {
        Self { consumer: consumer.to_owned(), attempt: 1, max_attempts: None, wants_reply: false }
    }

    /// Whether the broker will not deliver the message again after this one.
    pub fn is_last(&self) -> bool {
        self.max_attempts.is_some_and(|max| self.attempt >= max)
    }
}

/// A hook the protocol calls while a handler runs, to extend the broker's own deadline.
pub type ProgressHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// One delivery, as a broker adapter hands it to the protocol before the handler runs.
pub struct Delivery {
    context: Context<http::HeaderMap>,
    info: DeliveryInfo,
    body: Bytes,
    state: Option<Arc<dyn Any + Send + Sync>>,
    progress: Option<(Duration, ProgressHook)>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("info", &self.info).field("body", &self.body.len()).finish_non_exhaustive()
    }
}

/// The namespace a consumer's records are filed under, in place of an HTTP caller's actor.
fn namespace(consumer: &str) -> Actor {
    Actor(format!("consumer:{consumer}"))
}

impl Delivery {
    /// A delivery of `body` with `headers` to the consumer of `info`, run on `runtime`.
    pub fn new(runtime: Runtime, headers: http::HeaderMap, body: Bytes, info: DeliveryInfo) -> Self {
        let content_type = headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes().to_vec());
        // The message's identity is its scope and body: no method, path or query to speak of.
        let incoming = Incoming::new("MESSAGE", None).body(content_type.as_deref(), body.clone());
        let actor = namespace(&info.consumer);
        Self {
            context: Context::new(incoming, Some(runtime), headers, Some(actor)),
            info,
            body,
            state: None,
            progress: None,
        }
    }

    /// The application's state, for [`State`] arguments.
    pub fn with_state(mut self, state: Arc<dyn Any + Send + Sync>) -> Self {
        self.state = Some(state);
        self
    }

    /// Calls `hook` every `every` while the handler runs and its lease is vouched for (JetStream
    /// progress acknowledgements). Once the lease cannot be vouched for (the claim taken over)
    /// the hook is not called again, so the broker's deadline lapses with the lease.
    pub fn with_progress(mut self, every: Duration, hook: ProgressHook) -> Self {
        self.progress = Some((every.max(Duration::from_millis(10)), hook));
        self
    }

    /// How it was delivered.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The message's headers.
    pub fn headers(&self) -> &http::HeaderMap {
        self.context.head()
    }

    /// The message's body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The runtime it runs on.
    pub fn runtime(&self) -> &Runtime {
        self.context.runtime().expect("a delivery always has its runtime")
    }

    /// The message's fingerprint under `policy`: its scope and the whole body canonicalised by
    /// content type, or the declared body fields (`fields`, added by generated code).
    pub fn fingerprint(
        &self,
        policy: &Policy,
        fields: impl FnOnce(FingerprintBuilder) -> Result<FingerprintBuilder, FingerprintError>,
    ) -> Result<Fingerprint, FingerprintError> {
        self.context.fingerprint(policy, fields)
    }

    /// The key of a handler whose key is made of body fields (generated code).
    pub fn key_from_fields(mut self, parts: impl FnOnce(KeyParts) -> Result<KeyParts, KeyError>) -> Self {
        self.context = self.context.key_from_fields(parts);
        self
    }

    /// The settlement of a delivery whose handler arguments could not be decoded from it: no
    /// delivery of the same message can do better, so it is terminated and dead-lettered with
    /// the reason; nothing ran and nothing is stored.
    pub fn rejected(&self, policy: &Policy, rejection: Rejection) -> Settlement {
        match rejection {
            Rejection::Malformed(reason) => {
                tracing::warn!(scope = policy.scope, consumer = %self.info.consumer, %reason, "message rejected before its handler; dead-lettering it");
                Settlement { action: Action::Terminate { reason }, outcome: None }
            }
            Rejection::Misconfigured(reason) => {
                tracing::error!(scope = policy.scope, consumer = %self.info.consumer, %reason, "consumer misconfigured; the message is redelivered");
                Settlement { action: Action::Nak { delay: policy.lease }, outcome: None }
            }
        }
    }

    /// Runs the delivery through `handler` under `policy` (the handler of `framework`'s adapter):
    /// reads the key by the policy's key source, claims it in the consumer's namespace, runs the
    /// handler with its lease renewed (and the progress hook called), stores or releases the
    /// outcome, and answers the [`Action`] per the table of the module documentation. The run is
    /// tracked by the runtime, so that [`Runtime::drain`] waits for it, and has the request span
    /// with `transport` set to the broker's.
    pub async fn run<T, Fut>(
        self,
        framework: Framework,
        policy: &'static Policy,
        fingerprint: Result<Fingerprint, FingerprintError>,
        handler: Fut,
    ) -> Settlement
    where
        T: IntoReply,
        Fut: Future<Output = Result<T, ConsumeError>>,
    {
        let runtime = self.runtime().clone();
        let caller = self.context.caller(runtime.config(), policy, &fingerprint);
        let key = caller.key.as_ref().ok().and_then(Option::as_ref);
        let span = telemetry::transport_span(framework.transport(), policy, key, &runtime.config().digests);
        let (info, progress) = (self.info, self.progress);
        let handler = async move {
            let ran = match progress {
                None => handler.await,
                Some((every, hook)) => with_progress(handler, every, hook).await,
            };
            capture(ran)
        };
        let request = Request { key: caller.key, actor: caller.actor.ok().flatten(), fingerprint };
        let execute = runtime.execute_on(framework.transport(), policy, request, handler);
        let (outcome, settled) = runtime.track(execute).instrument(span.clone()).await;
        let settlement = settle(policy, &info, outcome, settled);
        span.in_scope(|| settlement.log(policy));
        settlement
    }
}

/// What a consumer handler's generated function returns: the delivery's settlement, to come.
pub type Settling = BoxFuture<'static, Settlement>;

/// An annotated consumer handler, as `#[idempotent]` turns it into a value for its runner: its
/// policy, its name in the registry, and the function that runs a delivery through it.
#[derive(Debug, Clone, Copy)]
pub struct Handler {
    /// The handler's policy.
    pub policy: &'static Policy,
    /// `module::path::handler_name`, as in its registry record.
    pub handler: &'static str,
    /// Runs one delivery through the handler: its arguments taken from the delivery, its key
    /// read, the message fingerprinted, then [`Delivery::run`].
    pub call: fn(Delivery) -> Settling,
}

/// Why a handler's arguments could not be taken from a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The message is to blame (a body that is not the handler's type): dead-lettered.
    Malformed(String),
    /// The application is (state of a type the runner was not given): redelivered.
    Misconfigured(String),
}

/// A consumer handler's argument, taken from the delivery before the handler runs.
pub trait FromDelivery: Sized {
    /// The argument, or why it cannot be had.
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection>;
}

impl<T: serde::de::DeserializeOwned> FromDelivery for Json<T> {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        serde_json::from_slice(&delivery.body).map(Json).map_err(|e| {
            Rejection::Malformed(format!("the message body is not a valid `{}`: {e}", std::any::type_name::<T>()))
        })
    }
}

impl FromDelivery for Bytes {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        Ok(delivery.body.clone())
    }
}

impl FromDelivery for String {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        String::from_utf8(delivery.body.to_vec())
            .map_err(|e| Rejection::Malformed(format!("the message body is not UTF-8: {e}")))
    }
}

impl FromDelivery for http::HeaderMap {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        Ok(delivery.headers().clone())
    }
}

impl FromDelivery for DeliveryInfo {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        Ok(delivery.info.clone())
    }
}

impl FromDelivery for crate::engine::Fence {
    fn from_delivery(_: &Delivery) -> Result<Self, Rejection> {
        Ok(crate::engine::Fence::new())
    }
}

impl FromDelivery for crate::store::transaction::Tx {
    fn from_delivery(_: &Delivery) -> Result<Self, Rejection> {
        Ok(crate::store::transaction::Tx::new())
    }
}

impl<S: Clone + Send + Sync + 'static> FromDelivery for State<S> {
    fn from_delivery(delivery: &Delivery) -> Result<Self, Rejection> {
        delivery.state.as_ref().and_then(|s| s.downcast_ref::<S>()).cloned().map(State).ok_or_else(|| {
            Rejection::Misconfigured(format!(
                "the handler takes `State<{}>`, but the consumer was started without state of that type",
                std::any::type_name::<S>()
            ))
        })
    }
}

/// A stored reply, sent to a message that asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The handler's reply (empty for a [`ConsumeError::Final`], whose reason is in `error`).
    pub body: Bytes,
    /// The reason of a [`ConsumeError::Final`]: sent as the [`REASON_HEADER`] header.
    pub error: Option<String>,
    /// Whether it is a stored reply sent again to a duplicate (the handler did not run for it).
    pub replayed: bool,
}

impl Reply {
    /// The headers a broker's reply carries: `Idempotent-Reason` with the reason of a
    /// [`ConsumeError::Final`], `Idempotent-Replayed: true` on a stored reply sent again.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let reason = self.error.clone().map(|e| ("Idempotent-Reason", e));
        reason.into_iter().chain(self.replayed.then(|| ("Idempotent-Replayed", "true".to_owned()))).collect()
    }
}

/// The headers of a message as core reads them (for [`Delivery::new`]), from a broker's
/// `(name, text)` pairs; a pair that is not a valid HTTP header name and value is left out, and a
/// later pair of the same name replaces an earlier one.
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (name.parse::<http::HeaderName>(), http::HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    headers
}

/// What the adapter does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Acknowledge it: its outcome is stored. With `reply`, first send the reply to the message's
    /// reply address. JetStream: `double_ack`, waiting for the server to confirm.
    Ack {
        /// The reply, when the message asked for one.
        reply: Option<Reply>,
    },
    /// Negative-acknowledge it: the broker delivers it again after `delay`. Never an
    /// acknowledgement: its outcome is not stored.
    Nak {
        /// How long the broker waits before the next delivery.
        delay: Duration,
    },
    /// Terminate it (no further delivery) and dead-letter it with `reason` (NATS: published to
    /// the dead-letter subject with the header `Idempotent-Reason`; RabbitMQ: rejected without
    /// requeue to its dead-letter exchange).
    Terminate {
        /// Why, for the dead letter's header and the logs.
        reason: String,
    },
}

/// What the protocol decided for one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// What to do with the message.
    pub action: Action,
    /// How the delivery counted in [`telemetry::REQUESTS_TOTAL`]; `None` for one rejected before
    /// its handler (a body that does not decode), which is not counted.
    pub outcome: Option<RequestOutcome>,
}

impl Settlement {
    fn log(&self, policy: &Policy) {
        match &self.action {
            Action::Ack { .. } => tracing::debug!(scope = policy.scope, "message acknowledged"),
            Action::Nak { delay } => {
                tracing::info!(scope = policy.scope, delay_ms = delay.as_millis() as u64, "message to be redelivered")
            }
            Action::Terminate { reason } => {
                tracing::warn!(scope = policy.scope, %reason, "message terminated and dead-lettered")
            }
        }
    }
}

/// What a handler's run is captured as: the engine stores its record, the protocol reads `live`.
type Ran = Result<Bytes, ConsumeError>;

/// A handler's result as the engine captures it: a success stored with its reply, a final error
/// stored with its reason, a retry captured as retryable (released).
fn capture<T: IntoReply>(result: Result<T, ConsumeError>) -> Captured<Ran> {
    let ran = result.and_then(|t| t.into_reply().map_err(ConsumeError::Final));
    let record = match &ran {
        Ok(body) => StoredResponse::new(OK, NO_HEADERS, body.clone()),
        Err(ConsumeError::Final(reason)) => reasoned(FINAL, reason),
        Err(ConsumeError::DeadLetter(reason)) => reasoned(DEAD, reason),
        Err(ConsumeError::Retry { .. }) => StoredResponse::new(RETRY, NO_HEADERS, Bytes::new()),
    };
    Captured::new(record, ran)
}

/// A stored outcome without headers.
const NO_HEADERS: [(&str, &[u8]); 0] = [];

fn reasoned(status: u16, reason: &str) -> StoredResponse {
    StoredResponse::new(status, vec![(REASON_HEADER.to_owned(), reason.as_bytes().to_vec())], Bytes::new())
}

fn stored_reason(stored: &StoredResponse) -> String {
    let reason = stored.headers.iter().find(|(name, _)| name == REASON_HEADER).map(|(_, v)| v.as_slice());
    String::from_utf8_lossy(reason.unwrap_or_default()).into_owned()
}

/// Runs `handler`, calling `hook` every `every` while the claim's lease is vouched for.
async fn with_progress<F: Future>(handler: F, every: Duration, hook: ProgressHook) -> F::Output {
    let ticks = async {
        loop {
            tokio::time::sleep(every).await;
            // Inside the handler's claim: once the lease cannot be vouched for, the broker's
            // deadline is let lapse with it.
            if crate::engine::Fence::new().check().is_err() {
                return std::future::pending::<()>().await;
            }
            hook().await;
        }
    };
    let handler = std::pin::pin!(handler);
    match futures_util::future::select(handler, std::pin::pin!(ticks)).await {
        futures_util::future::Either::Left((out, _)) => out,
        futures_util::future::Either::Right(((), handler)) => handler.await,
    }
}

/// The table: from what the engine did to the action.
fn settle(policy: &Policy, info: &DeliveryInfo, outcome: Outcome<Ran>, settled: Settled) -> Settlement {
    let reply = |body: Bytes, error: Option<String>, replayed: bool| {
        info.wants_reply.then_some(Reply { body, error, replayed })
    };
    let (action, counted) = match (outcome, settled) {
        // The handler ran, and its outcome is not known to be stored: never acknowledged.
        (Outcome::Executed(_), Settled::NotStored) => (Action::Nak { delay: policy.lease }, RequestOutcome::Executed),
        (Outcome::Executed(Err(ConsumeError::Retry { after })), _) => {
            (retry(info, after, "asked to retry"), RequestOutcome::Released)
        }
        (Outcome::Executed(Ok(body)), _) => (Action::Ack { reply: reply(body, None, false) }, RequestOutcome::Executed),
        (Outcome::Executed(Err(ConsumeError::Final(reason))), _) => {
            (Action::Ack { reply: reply(Bytes::new(), Some(reason), false) }, RequestOutcome::Executed)
        }
        (Outcome::Executed(Err(ConsumeError::DeadLetter(reason))), _) => {
            (Action::Terminate { reason }, RequestOutcome::Executed)
        }
        (Outcome::Replayed(stored), _) => {
            let action = match stored.status {
                DEAD => Action::Terminate { reason: stored_reason(&stored) },
                FINAL => Action::Ack { reply: reply(Bytes::new(), Some(stored_reason(&stored)), true) },
                _ => Action::Ack { reply: reply(stored.body, None, true) },
            };
            (action, RequestOutcome::Replayed)
        }
        (Outcome::Problem(problem), _) => problem_action(policy, info, &problem),
    };
    Settlement { action, outcome: Some(counted) }
}

/// A retryable outcome: redelivered after `after`, or dead-lettered on the last delivery.
fn retry(info: &DeliveryInfo, after: Duration, what: &str) -> Action {
    match info.max_attempts.filter(|_| info.is_last()) {
        Some(max) => Action::Terminate {
            reason: format!("the handler {what} on delivery {} of at most {max}; no delivery is left", info.attempt),
        },
        None => Action::Nak { delay: after },
    }
}

/// The action for a problem the engine answered instead of the handler's outcome.
fn problem_action(policy: &Policy, info: &DeliveryInfo, problem: &Problem) -> (Action, RequestOutcome) {
    let after = |default: Duration| problem.retry_after.map_or(default, Duration::from_secs);
    let is = |kind: ProblemKind| problem.type_uri == kind.type_uri();
    if is(ProblemKind::InProgress) {
        (Action::Nak { delay: after(Duration::from_secs(1)) }, RequestOutcome::InProgress)
    } else if is(ProblemKind::KeyReused) {
        let reason =
            "the key was already used by another message (same key, different content): this message is not processed"
                .to_owned();
        (Action::Terminate { reason }, RequestOutcome::Mismatch)
    } else if is(ProblemKind::KeyMissing) || is(ProblemKind::KeyInvalid) {
        let outcome = if is(ProblemKind::KeyMissing) { RequestOutcome::MissingKey } else { RequestOutcome::InvalidKey };
        let source = policy.key_source.describe("idempotency-key");
        (Action::Terminate { reason: format!("no usable idempotency key in the message's {source}") }, outcome)
    } else if is(ProblemKind::HandlerPanicked) {
        (retry(info, after(Duration::from_secs(1)), "panicked"), RequestOutcome::Released)
    } else if is(ProblemKind::ResponseNotStored) {
        // Completed, its reply too large to store: never a reason to run it again.
        (Action::Ack { reply: None }, RequestOutcome::Replayed)
    } else if is(ProblemKind::QuotaExceeded) {
        (Action::Nak { delay: after(Duration::from_secs(1)) }, RequestOutcome::QuotaExceeded)
    } else {
        // The store failed the claim (or the commit), or the server is misconfigured: nothing is
        // known stored, so the message comes back.
        let delay = after(policy.lease);
        (Action::Nak { delay }, RequestOutcome::StoreUnavailable)
    }
}

/// The broker's redelivery settings of one consumer, which start-up checks against the ttl of
/// the handlers it runs ([`check_redelivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redelivery {
    /// The consumer's name.
    pub consumer: String,
    /// Whether every message must be acknowledged one by one (JetStream `AckPolicy::Explicit`).
    pub explicit_ack: bool,
    /// How long the broker waits for an acknowledgement before delivering again.
    pub ack_wait: Duration,
    /// How many deliveries at most; `None`: unbounded.
    pub max_deliver: Option<u64>,
    /// The broker's redelivery delays, when it has a schedule.
    pub backoff: Vec<Duration>,
    /// How long the broker drops a republished message with the same id (JetStream's duplicate
    /// window), when it does.
    pub duplicate_window: Option<Duration>,
    /// What the broker calls these settings, for the messages of [`check_redelivery`].
    pub names: SettingNames,
}

/// What a broker calls its redelivery settings, so that a refusal to start names the setting
/// its operator has to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingNames {
    /// The acknowledgement deadline ([`Redelivery::ack_wait`]).
    pub ack_wait: &'static str,
    /// The bound on deliveries ([`Redelivery::max_deliver`]).
    pub max_deliver: &'static str,
}

impl SettingNames {
    /// NATS JetStream's consumer settings: `ack_wait`, `max_deliver`.
    pub const JETSTREAM: SettingNames = SettingNames { ack_wait: "ack_wait", max_deliver: "max_deliver" };
    /// RabbitMQ's: the broker's `consumer_timeout`, and a quorum queue's `x-delivery-limit`
    /// (redeliveries after the first delivery).
    pub const RABBITMQ: SettingNames = SettingNames { ack_wait: "consumer_timeout", max_deliver: "x-delivery-limit" };
}

impl Redelivery {
    /// How long after its first delivery a message may still be delivered:
    /// `ack_wait × max_deliver + Σ backoff` (`None` when unbounded).
    pub fn horizon(&self) -> Option<Duration> {
        let max = u32::try_from(self.max_deliver?).unwrap_or(u32::MAX);
        Some(self.ack_wait.saturating_mul(max) + self.backoff.iter().sum::<Duration>())
    }
}

/// Why a consumer refuses to start: one line per problem, naming the consumer and the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the consumer cannot keep its promise of running each message once:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct RedeliveryError(pub Vec<String>);

/// Checks that `redelivery` lets `policy`'s handler run each message once: acknowledgement per
/// message, a bounded number of deliveries, and a ttl that outlives every redelivery and the
/// duplicate window (a record that expires before the last redelivery would let it run again).
pub fn check_redelivery(policy: &Policy, redelivery: &Redelivery) -> Result<(), RedeliveryError> {
    let mut problems = Vec::new();
    let name = &redelivery.consumer;
    let scope = policy.scope;
    let ttl = policy.ttl;
    if !redelivery.explicit_ack {
        problems.push(format!(
            "consumer `{name}` (scope `{scope}`): its ack policy is not explicit, so a message can be acknowledged before its outcome is stored; use the explicit ack policy"
        ));
    }
    let SettingNames { ack_wait, max_deliver } = redelivery.names;
    match redelivery.horizon() {
        None => problems.push(format!(
            "consumer `{name}` (scope `{scope}`): {max_deliver} is unlimited, so a message can be delivered after its record's ttl of {ttl:?} and run again; set {max_deliver}"
        )),
        Some(horizon) if horizon > ttl => problems.push(format!(
            "consumer `{name}` (scope `{scope}`): ttl {ttl:?} is shorter than its redelivery horizon {horizon:?} ({ack_wait} {:?} × {} deliveries + backoff {:?}); lengthen the ttl or lower {ack_wait} or {max_deliver}",
            redelivery.ack_wait,
            redelivery.max_deliver.unwrap_or_default(),
            redelivery.backoff.iter().sum::<Duration>(),
        )),
        Some(_) => {}
    }
    if let Some(window) = redelivery.duplicate_window.filter(|w| *w > ttl) {
        problems.push(format!(
            "consumer `{name}` (scope `{scope}`): ttl {ttl:?} is shorter than the stream's duplicate window {window:?}; lengthen the ttl to at least the window"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RedeliveryError(problems))
    }
}

/// Checks that each delivery of `policy`'s handler can be settled within `deadline`: a broker's
/// bound on how long one delivery may stay unacknowledged where nothing extends it (RabbitMQ's
/// consumer timeout, past which the broker closes the channel and delivers the message again).
/// A handler that runs for up to `max_processing` is followed by up to its lease (storing the
/// outcome, or holding a message whose key is held elsewhere before it is redelivered), so
/// `max_processing + lease` must fit inside `deadline`. Refuses naming the consumer and the
/// numbers.
pub fn check_deadline(
    policy: &Policy,
    consumer: &str,
    deadline: Duration,
    max_processing: Duration,
) -> Result<(), RedeliveryError> {
    let (scope, lease) = (policy.scope, policy.lease);
    let needed = max_processing + lease;
    if needed <= deadline {
        return Ok(());
    }
    Err(RedeliveryError(vec![format!(
        "consumer `{consumer}` (scope `{scope}`): a delivery may stay unacknowledged for max processing {max_processing:?} + lease {lease:?} = {needed:?}, longer than the broker's deadline of {deadline:?} (RabbitMQ's consumer timeout), which would deliver it again while it runs; raise the deadline or lower the max processing"
    )]))
}
