//! What a protected request tells an operator: one `tracing` span per request and metrics through
//! the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Nothing here installs a subscriber or a recorder: the application chooses both (the payments
//! demo installs `metrics-exporter-prometheus` in its binaries and serves `GET /metrics`).
//! Without them the span is disabled and every metric goes to the facade's no-op recorder.
//!
//! # The span
//! Each protected request runs inside one span named [`SPAN_NAME`] at the `INFO` level, created by
//! the adapter when its handler is called ([`request_span`], via
//! [`protocol::request_task`](crate::protocol::request_task)): it is a child of the span current
//! at that moment (the request's own span from `tower-http`'s `TraceLayer` or
//! `tracing-actix-web`), and the spawned task that runs the protocol and the handler is
//! instrumented with it, so the handler's own events, the lease renewals and the engine's events
//! are all inside it. Its fields:
//!
//! | field | value |
//! |---|---|
//! | `scope` | the route's scope |
//! | `key_digest` | [`key_digest`] of the key: the first 16 hex digits of its SHA-256; absent without a valid key |
//! | `outcome` | the request's [`RequestOutcome`], recorded when it is known |
//! | `replayed` | whether the response sent is a stored one |
//!
//! The raw key and the caller's credentials never reach a span, an event or a label: keys are
//! shown as digests, actors not at all. An operator who holds a key computes its digest with
//! `printf %s "$KEY" | sha256sum | cut -c1-16`.
//!
//! Events inside the span: `info` for a conflict (409), a mismatch (422), a fenced completion
//! and a released claim; `warn` for a store error (a failed claim, renewal, completion or release)
//! and a lost lease; `error` for what is a bug of the application or of its configuration (a
//! panicking handler, a request that cannot be fingerprinted).
//!
//! # Metrics
//! | name | kind | labels | what it measures |
//! |---|---|---|---|
//! | [`REQUESTS_TOTAL`] | counter | `scope`, `outcome` | protected requests by [`RequestOutcome`]: one increment per request |
//! | [`STORE_OPERATION_SECONDS`] | histogram | `store`, `operation` | the duration of each store call the engine makes (`claim`, `renew`, `complete`, `release`, and `inspect`, `invalidate`, `health` for status endpoints, health checks and operators), measured around the call, so every store has it; a call that times out counts its timeout |
//! | [`LEASE_RENEWALS_TOTAL`] | counter | `scope`, `result` | lease renewals: `ok` (extended), `failed` (an error or no answer in time; the next renewal follows), `lost` (the claim was taken over before the request began storing its outcome) |
//! | [`CLAIMS_IN_FLIGHT`] | gauge | `scope` | claims this process holds now: acquired and not yet completed or released |
//! | [`SWEPT_RECORDS_TOTAL`] | counter | `store` | records a store's sweeper deleted (expired completions, abandoned claims past their retention): the memory store's and the SQL stores' sweepers report it; Redis forgets records by key expiry, which it does not report |
//!
//! Every label value is bounded: scopes are the application's routes, stores and operations a
//! handful of names.
//!
//! A renewal whose answer crosses the storing of the outcome is not counted as `lost`: a renewal
//! then cannot tell a takeover from the request's own completion, and the completion's answer
//! tells (a fenced completion is logged at `info`).

use crate::key::IdempotencyKey;
use crate::policy::Policy;
use std::time::Duration;
use tracing::field::Empty;

/// Name of the span of a protected request.
pub const SPAN_NAME: &str = "idempotent.request";
/// The `transport` of requests that arrived over HTTP, through a web framework's adapter.
pub const HTTP: &str = "http";
/// Counter of protected requests, labels `scope`, `outcome` (see [`RequestOutcome`]) and
/// `transport` (`http`, or a broker's name for a consumer's delivery).
pub const REQUESTS_TOTAL: &str = "idempotent_requests_total";
/// Histogram of store call durations in seconds, labels `store` and `operation`.
pub const STORE_OPERATION_SECONDS: &str = "idempotent_store_operation_seconds";
/// Counter of lease renewals, labels `scope` and `result` (`ok`, `failed`, `lost`).
pub const LEASE_RENEWALS_TOTAL: &str = "idempotent_lease_renewals_total";
/// Gauge of the claims held now, label `scope`.
pub const CLAIMS_IN_FLIGHT: &str = "idempotent_claims_in_flight";
/// Counter of records deleted by a store's sweeper, label `store`.
pub const SWEPT_RECORDS_TOTAL: &str = "idempotent_swept_records_total";

/// How one protected request ended: the `outcome` label of [`REQUESTS_TOTAL`] and the `outcome`
/// field of its span. Each protected request counts exactly once, when its response is decided.
///
/// Not counted: a request the server cannot process because of its own configuration (no runtime
/// installed on the route, a request that cannot be fingerprinted: 500, logged at `error`), and
/// one whose task fails (a panic outside a claim, where the key was optional or the route failed
/// open): these are bugs to fix, reported by their error events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// The handler ran for this request and its response was sent: under a claim this request
    /// acquired, with a final outcome (stored, or given up after the store failed, or fenced),
    /// or without a key on a route whose key is optional.
    Executed,
    /// Answered from a completed record without running the handler: the stored response with
    /// `Idempotent-Replayed: true`, or, when that response was too large to store, the 409
    /// that says so.
    Replayed,
    /// 409: another request holds a live claim on the key (after waiting, on a route that
    /// waits).
    InProgress,
    /// 422: the key was used with a different request.
    Mismatch,
    /// 400: no key on a route that requires one.
    MissingKey,
    /// The key cannot be used: the header is malformed (empty, too long, not visible ASCII,
    /// repeated: 400), or the request has a key but no caller identity to namespace it (401).
    InvalidKey,
    /// The store failed the claim (an error, no answer in time, full, a record it cannot read):
    /// 503, nothing ran; or, on a `fail_open` route whose store was unreachable, the handler ran
    /// unprotected.
    StoreUnavailable,
    /// The handler ran under a claim but its outcome is retryable (by default 5xx, 408, 425,
    /// 429) or it panicked: the claim was released so that a retry runs it again.
    Released,
    /// 429: the caller holds as many records as the store allows one caller; nothing ran.
    QuotaExceeded,
}

impl RequestOutcome {
    /// Every outcome, in the order of the documentation.
    pub const ALL: [RequestOutcome; 9] = [
        Self::Executed,
        Self::Replayed,
        Self::InProgress,
        Self::Mismatch,
        Self::MissingKey,
        Self::InvalidKey,
        Self::StoreUnavailable,
        Self::Released,
        Self::QuotaExceeded,
    ];

    /// The label value: `executed`, `replayed`, `in_progress`, `mismatch`, `missing_key`,
    /// `invalid_key`, `store_unavailable`, `released` or `quota_exceeded`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InProgress => "in_progress",
            Self::Mismatch => "mismatch",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::StoreUnavailable => "store_unavailable",
            Self::Released => "released",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

impl std::fmt::Display for RequestOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store call the engine makes: the `operation` label of [`STORE_OPERATION_SECONDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOperation {
    /// [`Store::claim`](crate::store::Store::claim).
    Claim,
    /// [`Store::renew`](crate::store::Store::renew).
    Renew,
    /// [`Store::complete`](crate::store::Store::complete).
    Complete,
    /// [`Store::release`](crate::store::Store::release).
    Release,
    /// [`Store::inspect`](crate::store::Store::inspect), for status endpoints and operators.
    Inspect,
    /// [`Store::invalidate`](crate::store::Store::invalidate).
    Invalidate,
    /// [`Store::health`](crate::store::Store::health), for health checks.
    Health,
    /// Opening a transactional route's transaction.
    Begin,
    /// Committing a transactional route's outcome with the handler's writes.
    Commit,
}

impl StoreOperation {
    /// The label value: `claim`, `renew`, `complete`, `release`, `inspect`, `invalidate`,
    /// `health`, `begin` or `commit`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Renew => "renew",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Inspect => "inspect",
            Self::Invalidate => "invalidate",
            Self::Health => "health",
            Self::Begin => "begin",
            Self::Commit => "commit",
        }
    }
}

/// The first 16 hex digits (64 bits) of the SHA-256 of `key`: enough to follow one key through
/// the logs, and no way back to the key a client chose.
///
/// With a digest secret the runtime shows [`DigestKey::key`](crate::digest::DigestKey::key)
/// instead, which only the secret's holder can confirm a guess against.
pub fn key_digest(key: &str) -> String {
    crate::digest::DigestKey::default().key(key)
}

/// The span of one protected request on `policy`'s route with `key` (`None` when the request has
/// no valid key): a child of the current span, with `outcome` and `replayed` left to be recorded
/// by the engine. The key's digest (under `digests`) is computed only when a subscriber wants the
/// span.
pub fn request_span(
    policy: &Policy,
    key: Option<&IdempotencyKey>,
    digests: &crate::digest::DigestKey,
) -> tracing::Span {
    transport_span(HTTP, policy, key, digests)
}

/// [`request_span`] of a request that arrived over `transport` (its span's `transport` field):
/// a message consumer's delivery has one like an HTTP request.
pub fn transport_span(
    transport: &'static str,
    policy: &Policy,
    key: Option<&IdempotencyKey>,
    digests: &crate::digest::DigestKey,
) -> tracing::Span {
    let span = tracing::info_span!(
        "idempotent.request",
        scope = policy.scope,
        transport,
        key_digest = Empty,
        outcome = Empty,
        replayed = Empty
    );
    if let (false, Some(key)) = (span.is_disabled(), key) {
        span.record("key_digest", digests.key(key.as_str()));
    }
    span
}

/// Where the metrics of this module say they come from (what the facade's macros would give).
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The identity of a metric key: its name and label values, by address and length (every one is
/// a `&'static str`, so equal addresses are equal keys; equal text at two addresses makes two
/// equal keys, which is harmless).
type KeyId = (usize, [(usize, usize); 3]);

/// A hasher for [`KeyId`]s (FNV-1a over their words): addresses, which no caller chooses.
#[derive(Default)]
struct KeyIdHasher(u64);

impl std::hash::Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_usize(&mut self, word: usize) {
        self.0 = (self.0 ^ word as u64).wrapping_mul(0x0100_0000_01b3);
    }
}

type KeyMap = std::collections::HashMap<KeyId, &'static metrics::Key, std::hash::BuildHasherDefault<KeyIdHasher>>;

/// Every key made so far, shared by the threads (each made once per process).
static KEYS: std::sync::Mutex<Option<KeyMap>> = std::sync::Mutex::new(None);

thread_local! {
    /// The keys this thread has used, found without a lock.
    static THREAD_KEYS: std::cell::RefCell<KeyMap> = std::cell::RefCell::default();
}

/// The metric key of `name` with `labels`, made once per process and kept: a request builds no
/// key (a vector of labels and its hash) whether a recorder is installed or not. The keys are
/// bounded, as their label values are (see [the module docs](self#metrics)).
fn key<const N: usize>(name: &'static str, labels: [(&'static str, &'static str); N]) -> &'static metrics::Key {
    const { assert!(N <= 3, "a metric key of this module has at most three labels") };
    let mut id: KeyId = (name.as_ptr() as usize, [(0, 0); 3]);
    for (slot, (_, value)) in id.1.iter_mut().zip(labels) {
        *slot = (value.as_ptr() as usize, value.len());
    }
    let make = || {
        let mut shared = KEYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *shared.get_or_insert_with(KeyMap::default).entry(id).or_insert_with(|| {
            let labels: Vec<metrics::Label> = labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
            Box::leak(Box::new(metrics::Key::from_parts(name, labels)))
        })
    };
    // A thread being torn down has no thread-locals left: it asks the shared map.
    THREAD_KEYS.try_with(|keys| *keys.borrow_mut().entry(id).or_insert_with(make)).unwrap_or_else(|_| make())
}

/// Records how a request ended: the counter, and the fields of its span when the current span is
/// one (a caller of [`Runtime::execute`](crate::engine::Runtime::execute) outside an adapter may
/// have none, or a span of its own that is left alone).
pub(crate) fn request_finished(transport: &'static str, scope: &'static str, outcome: RequestOutcome) {
    let key = key(REQUESTS_TOTAL, [("scope", scope), ("outcome", outcome.as_str()), ("transport", transport)]);
    metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
    let span = tracing::Span::current();
    if span.metadata().is_some_and(|m| m.name() == SPAN_NAME) {
        span.record("outcome", outcome.as_str());
        span.record("replayed", outcome == RequestOutcome::Replayed);
    }
}

/// Records one store call's duration.
pub(crate) fn store_operation(store: &'static str, operation: StoreOperation, took: Duration) {
    let key = key(STORE_OPERATION_SECONDS, [("store", store), ("operation", operation.as_str())]);
    metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(took.as_secs_f64());
}

/// The result of one lease renewal (`ok`, `failed` or `lost`).
pub(crate) fn lease_renewal(scope: &'static str, result: &'static str) {
    let key = key(LEASE_RENEWALS_TOTAL, [("scope", scope), ("result", result)]);
    metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
}

/// A claim acquired (`+1`) or given back (`-1`).
pub(crate) fn claims_in_flight(scope: &'static str, change: f64) {
    let key = key(CLAIMS_IN_FLIGHT, [("scope", scope)]);
    metrics::with_recorder(|r| r.register_gauge(key, &METADATA)).increment(change);
}

/// Counts `records` deleted by `store`'s sweeper ([`SWEPT_RECORDS_TOTAL`]); for stores with a
/// sweeper of their own, custom ones included. Nothing is recorded for zero.
pub fn records_swept(store: &'static str, records: u64) {
    if records > 0 {
        metrics::counter!(SWEPT_RECORDS_TOTAL, "store" => store).increment(records);
    }
}

/// Describes the metrics (units and help texts) to the recorder installed now; the runtime does
/// it when it is built, so an application that installs its recorder first gets them in its
/// exposition. Harmless to repeat.
pub fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(REQUESTS_TOTAL, Unit::Count, "Protected requests by scope and outcome.");
    metrics::describe_histogram!(
        STORE_OPERATION_SECONDS,
        Unit::Seconds,
        "Duration of the idempotency store's operations (claim, renew, complete, release)."
    );
    metrics::describe_counter!(
        LEASE_RENEWALS_TOTAL,
        Unit::Count,
        "Lease renewals of held claims by result: ok, failed, lost."
    );
    metrics::describe_gauge!(
        CLAIMS_IN_FLIGHT,
        Unit::Count,
        "Claims held now: acquired, outcome not yet stored or released."
    );
    metrics::describe_counter!(SWEPT_RECORDS_TOTAL, Unit::Count, "Expired records deleted by a store's sweeper.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_digest_is_the_start_of_its_sha256() {
        // `printf %s order-42 | sha256sum | cut -c1-16`, as an operator computes it.
        assert_eq!(key_digest("order-42"), "3bf8b157c4238eef");
    }
}
