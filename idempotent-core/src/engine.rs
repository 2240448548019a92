//! The execution state machine, framework-free.
//!
//! [`Runtime::execute`] takes a request's key, actor and fingerprint and the handler as a future,
//! and drives: claim → run (with a lease heartbeat) → complete or release. Adapters turn the
//! [`Outcome`] into their framework's response and run `execute` on a spawned task, so a client
//! that disconnects never cancels a handler half-way or leaves its claim unrecorded.

use crate::actor::ActorSource;
use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::key::{IdempotencyKey, KeyError};
use crate::policy::{ConflictMode, KeyRequirement, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::registry::{self, Framework, RegistryError};
use crate::response::StoredResponse;
use crate::store::{Claim, ClaimToken, RecordKey, Store, StoreError};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default name of the key header.
pub const DEFAULT_HEADER: &str = "idempotency-key";
/// Header added to replayed responses.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Default cap on a stored response body.
pub const DEFAULT_MAX_STORED_BODY: usize = 1024 * 1024;

/// Runtime settings, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of the key header, lowercase.
    pub header_name: String,
    /// Bodies larger than this are not stored: the outcome is recorded without its body and a
    /// retry is told so (409) instead of running the handler again.
    pub max_stored_body: usize,
    /// `Retry-After` sent with 503 when the store is unreachable.
    pub store_retry_after: Duration,
    /// Where the actor comes from.
    pub actor: ActorSource,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_name: DEFAULT_HEADER.to_owned(),
            max_stored_body: DEFAULT_MAX_STORED_BODY,
            store_retry_after: Duration::from_secs(2),
            actor: ActorSource::default(),
        }
    }
}

/// A handler's response as captured for storing.
#[derive(Debug)]
pub struct Captured<R> {
    /// What would be stored; `body_stored` is false when the body was over the cap.
    pub record: StoredResponse,
    /// The response to send to this client (it may still hold an unread body stream).
    pub live: R,
    /// The handler ran but its response failed while being read: the outcome is final whatever
    /// its status (the handler's effects happened), so it is stored even where the route's
    /// [`StoredOutcomes`](crate::policy::StoredOutcomes) would release it.
    pub failed: bool,
}

impl<R> Captured<R> {
    /// A complete response: `record` to store, `live` to send.
    pub fn new(record: StoredResponse, live: R) -> Self {
        Self { record, live, failed: false }
    }
}

/// What the adapter sends.
#[derive(Debug)]
pub enum Outcome<R> {
    /// The handler ran for this request (protected or, for an optional key, unprotected).
    Executed(R),
    /// A stored response to replay with `Idempotent-Replayed: true`.
    Replayed(StoredResponse),
    /// A framework error.
    Problem(Problem),
}

/// Everything the engine needs to know about one request.
#[derive(Debug)]
pub struct Request {
    /// The parsed key header.
    pub key: Result<Option<IdempotencyKey>, KeyError>,
    /// The resolved actor, `None` for anonymous; stored and compared as a digest.
    pub actor: Option<String>,
    /// The request's fingerprint.
    pub fingerprint: Result<Fingerprint, FingerprintError>,
}

/// The idempotency runtime: a store and its settings, shared by every route.
#[derive(Clone)]
pub struct Runtime {
    store: Arc<dyn Store>,
    config: Arc<Config>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("store", &self.store.name()).field("config", &self.config).finish()
    }
}

/// Why an adapter's runtime refused to start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The route registry has problems; one line each.
    #[error("invalid idempotency policies:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Registry(Vec<RegistryError>),
    /// The header name is not a valid HTTP header name.
    #[error("invalid idempotency key header name `{0}`")]
    HeaderName(String),
}

/// Whether `name` is a valid HTTP field name (an RFC 9110 token).
pub fn is_valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A framework adapter's installed runtime, as built by [`Builder`].
pub trait Adapter: Sized {
    /// The framework whose registered routes [`Builder::build`] validates.
    const FRAMEWORK: Framework;

    /// Wraps a started runtime.
    fn from_runtime(runtime: Runtime) -> Self;
}

/// Settings of a runtime, shared by every adapter: `Idempotency::builder(store)` in
/// `idempotent-axum` and `idempotent-actix` returns a `Builder` of that adapter's type.
pub struct Builder<A> {
    store: Arc<dyn Store>,
    config: Config,
    adapter: std::marker::PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for Builder<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("store", &self.store.name()).field("config", &self.config).finish()
    }
}

impl<A: Adapter> Builder<A> {
    /// Starts configuring a runtime on `store` with the default [`Config`].
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, config: Config::default(), adapter: std::marker::PhantomData }
    }

    /// Name of the key header (default `Idempotency-Key`).
    pub fn header_name(mut self, name: &str) -> Self {
        self.config.header_name = name.to_ascii_lowercase();
        self
    }

    /// Where the caller's identity comes from when no [`Actor`](crate::actor::Actor) extension is
    /// set.
    pub fn actor(mut self, source: ActorSource) -> Self {
        self.config.actor = source;
        self
    }

    /// Largest response body stored for replay (default 1 MiB).
    pub fn max_stored_body(mut self, bytes: usize) -> Self {
        self.config.max_stored_body = bytes;
        self
    }

    /// `Retry-After` sent with 503 when the store is unreachable (default 2s).
    pub fn store_retry_after(mut self, after: Duration) -> Self {
        self.config.store_retry_after = after;
        self
    }

    /// Checks the settings and validates the routes registered through this adapter, then
    /// starts the runtime; refuses to start with one message per problem (see [`Runtime::start`]).
    pub fn build(self) -> Result<A, StartupError> {
        Runtime::start(self.store, self.config, A::FRAMEWORK).map(A::from_runtime)
    }
}

impl Runtime {
    /// A runtime on `store` with `config`.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        Self { store, config: Arc::new(config) }
    }

    /// What an adapter's `build` does: checks the settings and validates the routes registered
    /// through `framework`'s adapter (see [`registry::validate_framework`]), then builds the
    /// runtime. Refuses to start with one message per problem.
    pub fn start(store: Arc<dyn Store>, config: Config, framework: Framework) -> Result<Self, StartupError> {
        if !is_valid_header_name(&config.header_name) {
            return Err(StartupError::HeaderName(config.header_name));
        }
        registry::validate_framework(framework).map_err(StartupError::Registry)?;
        Ok(Self::new(store, config))
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs one request through the state machine; `handler` is polled at most once per call and
    /// only when this request owns the key (or runs unprotected).
    pub async fn execute<R, Fut>(&self, policy: &Policy, request: Request, handler: Fut) -> Outcome<R>
    where
        Fut: Future<Output = Captured<R>>,
    {
        let key = match request.key {
            Err(e) => return Outcome::Problem(Problem::new(ProblemKind::KeyInvalid, format!("{e}."))),
            Ok(None) if policy.key == KeyRequirement::Optional => {
                return Outcome::Executed(handler.await.live);
            }
            Ok(None) => {
                return Outcome::Problem(Problem::new(
                    ProblemKind::KeyMissing,
                    format!(
                        "This operation requires an `{}` header: send a unique value (e.g. a UUID) and reuse it when you retry.",
                        self.config.header_name
                    ),
                ))
            }
            Ok(Some(k)) => k,
        };
        let fingerprint = match request.fingerprint {
            Ok(fp) => fp,
            Err(e) => {
                tracing::error!(scope = policy.scope, error = %e, "cannot fingerprint request");
                return Outcome::Problem(Problem::new(
                    ProblemKind::Misconfigured,
                    "The server could not fingerprint this request; this is a server bug.",
                ));
            }
        };
        // Stores only ever see a digest of the actor (see `actor::digest`).
        let actor = request.actor.as_deref().map(crate::actor::digest).unwrap_or_default();
        let record_key = RecordKey::new(policy.scope, actor, key.as_str());
        let deadline = Instant::now() + policy.wait_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.store.claim(&record_key, &fingerprint, policy.lease).await {
                Ok(Claim::Acquired(token)) => return self.run_claimed(policy, &record_key, token, handler).await,
                Ok(Claim::Completed(response)) => {
                    tracing::debug!(scope = policy.scope, "replaying stored response");
                    return replay(response);
                }
                Ok(Claim::Mismatch) => {
                    return Outcome::Problem(Problem::new(
                        ProblemKind::KeyReused,
                        "This idempotency key was already used with a different request. Use a new key for a new request, or resend the original request unchanged.",
                    ))
                }
                Ok(Claim::InProgress { retry_after }) => {
                    let now = Instant::now();
                    if policy.on_conflict == ConflictMode::Reject || now >= deadline {
                        return Outcome::Problem(
                            Problem::new(
                                ProblemKind::InProgress,
                                "A request with this idempotency key is still being processed. Retry after the indicated time to get its result.",
                            )
                            .with_retry_after(retry_after),
                        );
                    }
                    let nap = backoff.min(retry_after.max(Duration::from_millis(1))).min(deadline - now);
                    tokio::time::sleep(nap).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(e) => {
                    if policy.fail_open {
                        tracing::warn!(scope = policy.scope, error = %e, "store unavailable; running unprotected (fail_open)");
                        return Outcome::Executed(handler.await.live);
                    }
                    tracing::error!(scope = policy.scope, error = %e, "store unavailable; failing closed");
                    return Outcome::Problem(
                        Problem::new(
                            ProblemKind::StoreUnavailable,
                            "The server cannot guarantee this request runs only once right now; nothing was executed. Retry later with the same key.",
                        )
                        .with_retry_after(self.config.store_retry_after),
                    );
                }
            }
        }
    }

    async fn run_claimed<R, Fut>(&self, policy: &Policy, key: &RecordKey, token: ClaimToken, handler: Fut) -> Outcome<R>
    where
        Fut: Future<Output = Captured<R>>,
    {
        let result = {
            let run = AssertUnwindSafe(handler).catch_unwind();
            tokio::pin!(run);
            let period = (policy.lease / 3).max(Duration::from_millis(20));
            let mut lost = false;
            loop {
                tokio::select! {
                    biased;
                    r = &mut run => break r,
                    _ = tokio::time::sleep(period), if !lost => {
                        match self.store.renew(key, &token, policy.lease).await {
                            Ok(()) => {}
                            Err(StoreError::Fenced) => {
                                tracing::error!(scope = policy.scope, "lease lost while the handler runs; its outcome will not be stored");
                                lost = true;
                            }
                            Err(e) => tracing::warn!(scope = policy.scope, error = %e, "lease renewal failed; will retry"),
                        }
                    }
                }
            }
        };
        match result {
            Err(_panic) => {
                tracing::error!(scope = policy.scope, "handler panicked; releasing the claim");
                self.release(policy, key, &token).await;
                Outcome::Problem(Problem::new(
                    ProblemKind::HandlerPanicked,
                    "The request failed before completing; nothing was stored. Retry with the same key.",
                ))
            }
            Ok(captured) => {
                if captured.failed || policy.outcomes.stores(captured.record.status) {
                    self.complete(policy, key, &token, &captured.record).await;
                } else {
                    self.release(policy, key, &token).await;
                }
                Outcome::Executed(captured.live)
            }
        }
    }

    async fn complete(&self, policy: &Policy, key: &RecordKey, token: &ClaimToken, record: &StoredResponse) {
        // The handler ran: losing its outcome would let a retry run it again, so a store that
        // is briefly unreachable is retried for a while before giving up.
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=6 {
            match self.store.complete(key, token, record, policy.ttl).await {
                Ok(()) => return,
                Err(StoreError::Fenced) => {
                    tracing::error!(scope = policy.scope, "claim was taken over before completion; outcome not stored");
                    return;
                }
                Err(e) => {
                    tracing::warn!(scope = policy.scope, attempt, error = %e, "storing the outcome failed");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        tracing::error!(scope = policy.scope, "outcome could not be stored; the claim will expire with its lease");
    }

    async fn release(&self, policy: &Policy, key: &RecordKey, token: &ClaimToken) {
        if let Err(e) = self.store.release(key, token).await {
            tracing::warn!(scope = policy.scope, error = %e, "release failed; the claim will expire with its lease");
        }
    }
}

fn replay<R>(response: StoredResponse) -> Outcome<R> {
    if response.body_stored {
        return Outcome::Replayed(response);
    }
    Outcome::Problem(Problem::new(
        ProblemKind::ResponseNotStored,
        format!(
            "A request with this idempotency key already completed with status {}, but its response was too large to store. Do not retry; fetch the resulting resource instead.",
            response.status
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_tokens() {
        for ok in ["idempotency-key", "x-request-key", "X_Key.1", "a!#$%&'*+-.^_`|~z"] {
            assert!(is_valid_header_name(ok), "{ok}");
        }
        for bad in ["", "bad header", "key:", "k\u{e9}y", "a\"b", "(x)"] {
            assert!(!is_valid_header_name(bad), "{bad}");
        }
    }
}
