//! The execution state machine, framework-free.
//!
//! [`Runtime::execute`] takes a request's key, actor and fingerprint and the handler as a future,
//! and drives: claim → run → complete or release. Adapters turn the [`Outcome`] into their
//! framework's response and run `execute` on a spawned task (see [`Runtime::track`]), so a client
//! that disconnects never cancels a handler half-way or leaves its claim unrecorded.
//!
//! # The lease
//! From the moment a claim is acquired until its outcome is stored (or released, or found taken
//! over), its lease is renewed every sixth of the lease by its thread's lease keeper, one task per
//! thread for all the claims acquired there (a request that ends before its first renewal falls
//! due costs a map insert and removal, not a task of its own). The keeper is not the handler's
//! task: a handler that awaits something slow, or blocks its thread on a multi-threaded runtime,
//! does not hold the renewals up, and the renewals do not hold the handler up. Storing
//! the outcome is retried inside that coverage, for up to [`Config::completion_patience`], so a
//! store that is briefly unreachable after the handler ran does not let the lease lapse and a
//! retry run the handler again.
//!
//! Every store operation is bounded by [`Config::store_timeout`]. The rule that keeps a live claim
//! alive through one failed or timed-out renewal is
//! `lease ≥ 3 × (renewal period + store timeout)`; with the period a sixth of the lease that is
//! `lease ≥ 6 × store timeout`, checked for every route when the runtime starts
//! ([`StartupError::LeaseTooShort`]). `#[idempotent]` refuses leases under one second at compile
//! time.
//!
//! On actix-web each worker is a single-threaded runtime: a handler that blocks its thread blocks
//! every task of that worker, the renewals included. Blocking work belongs in `web::block` there
//! (and in `spawn_blocking` on tokio) whatever this library does.
//!
//! # What it reports
//! Each call of [`Runtime::execute`] counts once by its outcome, every store call is timed, and
//! renewals and held claims are counted (see [`crate::telemetry`]); the lease renewals run in the
//! span current when the claim was acquired, the request's own.

use crate::actor::ActorSource;
use crate::digest::DigestKey;
use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::key::{IdempotencyKey, KeyError};
use crate::policy::{ConflictMode, KeyRequirement, KeySource, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::registry::{self, Framework, RegistryError};
use crate::response::StoredResponse;
use crate::store::transaction::OutcomeTransaction;
use crate::store::{Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use crate::telemetry::{self, RequestOutcome, StoreOperation};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

mod durations;
mod lease;
pub mod timing;
use durations::Durations;
use lease::Lease;
pub use lease::{ClaimFence, LeaseLost};
pub use timing::{renewal_period, safety_margin, RENEWALS_PER_LEASE};

tokio::task_local! {
    static FENCE: ClaimFence;
}

/// The claim a protected handler runs under, as an extractor's value: the adapters' `Fence`
/// extractor is this type, and [`claim`](Self::claim) finds the claim inside the handler (see
/// [`ClaimFence`] for what to do with it).
///
/// ```ignore
/// async fn charge(fence: Fence, Json(c): Json<Charge>) -> Result<Json<Receipt>, ApiError> {
///     let work = prepare(&c).await?;
///     fence.check()?;                       // the lease still vouched for: no other run can be going
///     let receipt = psp.capture(work, fence.claim().map(|f| f.fence())).await?;
///     Ok(Json(receipt))
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Fence {
    _private: (),
}

impl Fence {
    /// The handle; the claim is found when it is used, inside the handler.
    pub const fn new() -> Self {
        Self { _private: () }
    }

    /// The claim of the protected request whose handler is running; `None` outside one (an
    /// ordinary route, a request that ran unprotected, a task the handler spawned without taking
    /// the [`ClaimFence`] with it).
    pub fn claim(&self) -> Option<ClaimFence> {
        FENCE.try_with(ClaimFence::clone).ok()
    }

    /// [`ClaimFence::check`] of the current claim; `Ok` where there is none (nothing to fence).
    pub fn check(&self) -> Result<(), LeaseLost> {
        self.claim().map_or(Ok(()), |claim| claim.check())
    }
}

/// Default name of the key header.
pub const DEFAULT_HEADER: &str = "idempotency-key";
/// Header added to replayed responses.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Default cap on a stored response body.
pub const DEFAULT_MAX_STORED_BODY: usize = 1024 * 1024;
/// Default bound on one store operation: 1 s.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time for which storing an outcome is retried: 30 s.
pub const DEFAULT_COMPLETION_PATIENCE: Duration = Duration::from_secs(30);

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
    /// Bound on every store operation; one that takes longer counts as the store being
    /// unavailable. Every route's lease must be at least [`RENEWALS_PER_LEASE`] times this.
    pub store_timeout: Duration,
    /// What a runtime whose store cannot run transactions does with transactional routes.
    pub without_transactions: WithoutTransactions,
    /// How long storing a handler's outcome is retried while the store fails, the lease being
    /// renewed meanwhile. Within the time the lease is vouched for (see [`ClaimFence`]) a stored
    /// outcome is certain to be the only one; after it, it is still stored while no other request
    /// took the key over, and fenced (nothing written) once one did. The client waits for it;
    /// past it the outcome is given up, the claim expires with its lease and a retry runs the
    /// handler again.
    pub completion_patience: Duration,
    /// How actors (in the store) and keys (in logs) are digested: plain SHA-256, or under a
    /// server secret (see [`crate::digest`]).
    pub digests: DigestKey,
    /// Whether the record status endpoint answers callers of the anonymous namespace (off by
    /// default: see [`crate::protocol::status::record_status`]).
    pub anonymous_record_status: bool,
    /// When set, a protected route's body extractor that rejects a request (malformed JSON, a
    /// missing field) answers `application/problem+json` of this `type`, with the extractor's
    /// status and message, instead of its framework's plain text: see
    /// [`crate::protocol::rejection`].
    pub rejections: Option<&'static str>,
    /// The secret server-issued tokens are minted and verified under (see [`crate::issued`]);
    /// required when a route declares `key = issued(..)`.
    pub tokens: Option<crate::issued::TokenKey>,
    /// How many live (unexpired) tokens one caller may hold, per process, before minting answers
    /// 429 (default [`DEFAULT_TOKEN_QUOTA`]).
    pub token_quota: usize,
    /// How the problems of issued routes are rendered for browsers (requests that accept
    /// `text/html`); `None` answers them problem+json like every other route.
    pub problem_page: Option<ProblemPage>,
}

/// Default of [`Config::token_quota`]: 100 live tokens per caller.
pub const DEFAULT_TOKEN_QUOTA: usize = 100;

/// The application's page for a problem of a route whose key is a server-issued token, answered
/// to browsers instead of problem+json: the function returns the page's HTML, sent with the
/// problem's status (a link to a fresh form belongs on it). Cheap to clone.
#[derive(Clone)]
pub struct ProblemPage(pub Arc<dyn Fn(&Problem) -> String + Send + Sync>);

impl std::fmt::Debug for ProblemPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProblemPage(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_name: DEFAULT_HEADER.to_owned(),
            max_stored_body: DEFAULT_MAX_STORED_BODY,
            store_retry_after: Duration::from_secs(2),
            actor: ActorSource::default(),
            store_timeout: DEFAULT_STORE_TIMEOUT,
            completion_patience: DEFAULT_COMPLETION_PATIENCE,
            without_transactions: WithoutTransactions::default(),
            digests: DigestKey::default(),
            anonymous_record_status: false,
            rejections: None,
            tokens: None,
            token_quota: DEFAULT_TOKEN_QUOTA,
            problem_page: None,
        }
    }
}

/// What a runtime does with routes declared `transactional = true` when its store cannot run
/// transactions (memory, Redis): see [`crate::store::transaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WithoutTransactions {
    /// Refuse to start, naming the routes ([`StartupError::NoTransactions`]): the default, since
    /// such a route would otherwise never run.
    #[default]
    RefuseToStart,
    /// Start, and answer those routes 501 problem+json without running them: for an application
    /// that runs on several kinds of store and serves those routes only on SQL.
    NotImplemented,
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

/// What became of a claimed execution's outcome in the store: what a transport that
/// acknowledges only stored outcomes (a message consumer) needs to know beyond the [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// No claim was acquired for this request: a replay, a problem, or a run without protection
    /// (an optional key without one, a `fail_open` route whose store was unreachable).
    Unclaimed,
    /// The handler ran under the claim and its outcome is stored (or committed with its writes).
    Stored,
    /// The claim was given back: the outcome was retryable, the handler panicked, or its
    /// transaction could not be opened or committed. A retry runs the handler again.
    Released,
    /// The handler ran but its outcome is not known to be stored: the claim was taken over (the
    /// completion was fenced, or the lease found lost), or the store failed past the patience.
    NotStored,
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
    tasks: TaskTracker,
    /// How long each scope's handlers take, for the `Retry-After` of a 409.
    durations: Arc<Durations>,
    /// Live server-issued tokens per caller.
    minted: Arc<crate::issued::Quota>,
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
    /// Routes whose lease cannot survive one failed renewal with this store timeout; one line
    /// each.
    #[error("leases too short for the store timeout of {timeout:?}: a lease must be at least {RENEWALS_PER_LEASE} times the store timeout ({:?} here; `#[idempotent]` itself accepts any lease from 1 s), so that one renewal that fails or times out cannot lose a live claim. Lengthen the lease, or lower the store timeout with `.store_timeout(..)` to at most a sixth of the shortest lease ({:?}):\n{}", *timeout * RENEWALS_PER_LEASE, timing::max_store_timeout(shortest_lease(routes)), .routes.iter().map(|(r, _)| format!("  - {r}")).collect::<Vec<_>>().join("\n"))]
    LeaseTooShort {
        /// The configured store timeout.
        timeout: Duration,
        /// `scope (handler at file:line): lease Ns` and the lease, one per route.
        routes: Vec<(String, Duration)>,
    },
    /// Routes protected by a runtime built without choosing where the caller's identity comes
    /// from: every caller would share one key namespace, and one caller's key could replay
    /// another's response.
    #[error("no actor source chosen, so every caller of these routes would share one key namespace (one caller's key could replay another's response). Choose one on the builder: `.actor(ActorSource::BearerToken)`, `.actor(ActorSource::Header(..))` or `.actor(ActorSource::custom(..))` (an `Actor` your authentication sets on the request wins over it), or `.actor(ActorSource::Anonymous)` on purpose for a service whose callers all trust each other:\n{}", .routes.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    ActorSourceNotChosen {
        /// `scope (handler at file:line)`, one per route.
        routes: Vec<String>,
    },
    /// Routes whose key is a server-issued token on a runtime built without the secret to mint
    /// and verify tokens under.
    #[error("these routes take server-issued tokens, but no token secret was given: call `.token_secret(..)` on the builder with 32 random bytes or more, the same on every instance sharing the store:\n{}", .routes.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    TokenSecretMissing {
        /// `scope (handler at file:line)`, one per route.
        routes: Vec<String>,
    },
    /// More than one of the above; one block each.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<StartupError>),
    /// Transactional routes on a store that cannot run transactions; one line each.
    #[error("the `{store}` idempotency store cannot run transactional routes (use the PostgreSQL, MySQL or SQLite store, or build with `without_transactions(WithoutTransactions::NotImplemented)` to answer them 501):\n{}", .routes.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    NoTransactions {
        /// The store's name.
        store: &'static str,
        /// `scope (handler at file:line)`, one per route.
        routes: Vec<String>,
    },
}

/// The shortest of the leases listed in a [`StartupError::LeaseTooShort`].
fn shortest_lease(routes: &[(String, Duration)]) -> Duration {
    routes.iter().map(|(_, lease)| *lease).min().unwrap_or_default()
}

impl StartupError {
    /// Every single problem, flattening [`StartupError::Several`].
    pub fn problems(&self) -> Vec<&StartupError> {
        match self {
            StartupError::Several(all) => all.iter().flat_map(StartupError::problems).collect(),
            one => vec![one],
        }
    }
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
    /// Whether [`actor`](Self::actor) was called.
    actor_chosen: bool,
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
        Self { store, config: Config::default(), actor_chosen: false, adapter: std::marker::PhantomData }
    }

    /// Name of the key header (default `Idempotency-Key`).
    pub fn header_name(mut self, name: &str) -> Self {
        self.config.header_name = name.to_ascii_lowercase();
        self
    }

    /// Where the caller's identity comes from when no [`Actor`](crate::actor::Actor) extension is
    /// set.
    ///
    /// Choosing is required: a runtime with protected routes refuses to start without it
    /// ([`StartupError::ActorSourceNotChosen`]), so that no application shares one key namespace
    /// among all its callers by forgetting to wire its authentication. `ActorSource::Anonymous`
    /// is that choice made on purpose.
    pub fn actor(mut self, source: ActorSource) -> Self {
        self.config.actor = source;
        self.actor_chosen = true;
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

    /// Bound on every store operation (default 1 s); every route's lease must be at least six
    /// times it (see [`Config::store_timeout`]).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// How long storing an outcome is retried while the store fails (default 30 s; see
    /// [`Config::completion_patience`]).
    pub fn completion_patience(mut self, patience: Duration) -> Self {
        self.config.completion_patience = patience;
        self
    }

    /// Digests actors (what stores file records under) and keys (what logs show) with
    /// HMAC-SHA256 under `secret` instead of plain SHA-256, so that a low-entropy bearer token or
    /// key cannot be confirmed by guessing against the store or the logs. Every instance sharing
    /// a store, and the operators' tools, must use the same secret; changing it loses the replays
    /// of earlier requests (see [`crate::digest`] for rotation).
    pub fn digest_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.config.digests = DigestKey::new(secret);
        self
    }

    /// Whether the record status endpoint shows records to callers of the anonymous namespace
    /// (default `false`: with no actor source, or `ActorSource::Anonymous`, every caller is
    /// everybody, and the endpoint would tell anyone the state of anyone's key). Turn it on only
    /// for a single-tenant service whose callers all trust each other.
    pub fn anonymous_record_status(mut self, show: bool) -> Self {
        self.config.anonymous_record_status = show;
        self
    }

    /// Answers the rejections of protected routes' body extractors (a body that is not JSON, a
    /// missing or mistyped field: 400 or 422 from the framework, as plain text) as
    /// `application/problem+json` with `type_uri`, their own status and message, so that a
    /// client tells "your request is malformed" (`type_uri`) from "this key was used with another
    /// request" (`urn:idempotent:problem:key-reused`, also 422) by the body, like every other
    /// answer of the API. Nothing is stored for them either way: they never reach the handler.
    pub fn rejections_as_problems(mut self, type_uri: &'static str) -> Self {
        self.config.rejections = Some(type_uri);
        self
    }

    /// The secret server-issued tokens are minted and verified under (HMAC-SHA256; 32 random
    /// bytes or more, the same on every instance sharing the store): required when a route
    /// declares `key = issued(..)`. See [`crate::issued`].
    pub fn token_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.config.tokens = Some(crate::issued::TokenKey::new(secret));
        self
    }

    /// How many live tokens one caller may hold per process before minting answers 429 (default
    /// [`DEFAULT_TOKEN_QUOTA`]).
    pub fn token_quota(mut self, quota: usize) -> Self {
        self.config.token_quota = quota;
        self
    }

    /// Renders the problems of routes whose key is a server-issued token as the application's
    /// own HTML page, for requests that accept `text/html` (a browser submitting a form):
    /// `page` gets the problem (its `status`, `type_uri` and `detail`) and returns the page,
    /// sent with the problem's status and `Cache-Control: no-store`. JSON clients still get
    /// problem+json.
    pub fn problem_page(mut self, page: impl Fn(&Problem) -> String + Send + Sync + 'static) -> Self {
        self.config.problem_page = Some(ProblemPage(Arc::new(page)));
        self
    }

    /// What to do with transactional routes when the store cannot run transactions (default:
    /// refuse to start; see [`WithoutTransactions`]).
    pub fn without_transactions(mut self, choice: WithoutTransactions) -> Self {
        self.config.without_transactions = choice;
        self
    }

    /// Checks the settings and validates the routes registered through this adapter, then
    /// starts the runtime; refuses to start with one message per problem (see [`Runtime::start`]).
    pub fn build(self) -> Result<A, StartupError> {
        Runtime::start_checked(self.store, self.config, A::FRAMEWORK, self.actor_chosen).map(A::from_runtime)
    }
}

impl Runtime {
    /// A runtime on `store` with `config`.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        telemetry::describe();
        let durations = Arc::new(Durations::for_scopes(registry::routes().iter().filter_map(|r| r.scope())));
        Self { store, config: Arc::new(config), tasks: TaskTracker::new(), durations, minted: Arc::default() }
    }

    /// What an adapter's `build` does: checks the settings and validates the routes registered
    /// through `framework`'s adapter (see [`registry::validate_framework`]), then builds the
    /// runtime. Refuses to start with one message per problem.
    pub fn start(store: Arc<dyn Store>, config: Config, framework: Framework) -> Result<Self, StartupError> {
        Self::start_checked(store, config, framework, true)
    }

    /// [`start`](Self::start), also refusing protected routes when no actor source was chosen;
    /// every problem is reported, not only the first.
    fn start_checked(
        store: Arc<dyn Store>,
        config: Config,
        framework: Framework,
        actor_chosen: bool,
    ) -> Result<Self, StartupError> {
        let mut problems = Vec::new();
        if !is_valid_header_name(&config.header_name) {
            problems.push(StartupError::HeaderName(config.header_name.clone()));
        }
        if let Err(errors) = registry::validate_framework(framework) {
            problems.push(StartupError::Registry(errors));
        }
        let routes = registry::routes_of(framework);
        let protected: Vec<(&&registry::RouteRecord, &Policy)> =
            routes.iter().filter_map(|r| r.policy.as_ref().map(|p| (r, p))).collect();
        let place = |r: &registry::RouteRecord, p: &Policy| {
            format!("scope `{}` ({} at {}:{})", p.scope, r.handler, r.file, r.line)
        };
        let short: Vec<(String, Duration)> = protected
            .iter()
            .filter(|(_, p)| !timing::lease_covers(p.lease, config.store_timeout))
            .map(|(r, p)| (format!("{}: lease {:?}", place(r, p), p.lease), p.lease))
            .collect();
        if !short.is_empty() {
            problems.push(StartupError::LeaseTooShort { timeout: config.store_timeout, routes: short });
        }
        if store.transactions().is_none() && config.without_transactions == WithoutTransactions::RefuseToStart {
            let transactional: Vec<String> =
                protected.iter().filter(|(_, p)| p.transactional).map(|(r, p)| place(r, p)).collect();
            if !transactional.is_empty() {
                problems.push(StartupError::NoTransactions { store: store.name(), routes: transactional });
            }
        }
        if config.tokens.is_none() {
            let issued: Vec<String> = protected
                .iter()
                .filter(|(_, p)| p.key_source.token_ttl().is_some())
                .map(|(r, p)| place(r, p))
                .collect();
            if !issued.is_empty() {
                problems.push(StartupError::TokenSecretMissing { routes: issued });
            }
        }
        if !actor_chosen && !protected.is_empty() {
            let routes = protected.iter().map(|(r, p)| place(r, p)).collect();
            problems.push(StartupError::ActorSourceNotChosen { routes });
        }
        match problems.len() {
            0 => Ok(Self::new(store, config)),
            1 => Err(problems.remove(0)),
            _ => Err(StartupError::Several(problems)),
        }
    }

    /// Runs `task` (an adapter's protected request) so that [`drain`](Self::drain) waits for it.
    /// Adapters spawn [`protocol::request_task`](crate::protocol::request_task), which does this
    /// inside the request's span.
    pub fn track<F: Future>(&self, task: F) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.tasks.track_future(task)
    }

    /// Graceful shutdown: waits until every protected request running now has finished and stored
    /// its outcome, for at most `timeout`. Call it once the server has stopped accepting
    /// connections; answers whether everything finished in time. Requests that start after it was
    /// called are still run and waited for.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tasks.close();
        let finished = tokio::time::timeout(timeout, self.tasks.wait()).await.is_ok();
        if !finished {
            tracing::warn!(running = self.tasks.len(), "shutdown: protected requests still running after {timeout:?}");
        }
        finished
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where this runtime files `actor`'s record of `key` on `scope` (its actor digested under
    /// [`Config::digests`]).
    pub fn record_key(&self, scope: &str, actor: Option<&str>, key: &str) -> RecordKey {
        RecordKey::keyed(&self.config.digests, scope, actor, key)
    }

    /// What the store holds for `actor`'s `key` on `scope` ([`Store::inspect`]), bounded by
    /// [`Config::store_timeout`] like every store operation.
    pub async fn inspect(&self, scope: &str, actor: Option<&str>, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        self.bounded(StoreOperation::Inspect, self.store.inspect(&self.record_key(scope, actor, key))).await
    }

    /// Deletes `actor`'s record of `key` on `scope` as `purge` allows ([`Store::invalidate`]),
    /// bounded by [`Config::store_timeout`].
    pub async fn invalidate(
        &self,
        scope: &str,
        actor: Option<&str>,
        key: &str,
        purge: Purge,
    ) -> Result<Invalidated, StoreError> {
        self.bounded(StoreOperation::Invalidate, self.store.invalidate(&self.record_key(scope, actor, key), purge))
            .await
    }

    /// Whether the store answers ([`Store::health`]) within [`Config::store_timeout`].
    pub async fn health(&self) -> Result<(), StoreError> {
        self.bounded(StoreOperation::Health, self.store.health()).await
    }

    /// Mints a token for `actor` (`None`: anonymous) on `scope`, for a form being rendered or the
    /// mint endpoint: checks that a protected route declares `scope` with `key = issued(..)`,
    /// takes one of the caller's [`Config::token_quota`], and records the token as issued in the
    /// store for its ttl (one claim round trip) before handing it out.
    ///
    /// Errors are problems to answer: 404 `scope-not-issued`, 429 `quota-exceeded` (the caller's
    /// share here or in the store), 503 `store-unavailable`, 500 when no token secret is set.
    pub async fn mint(&self, scope: &str, actor: Option<&str>) -> Result<crate::issued::IssuedToken, Problem> {
        let routes = registry::routes();
        let Some(policy) = routes
            .iter()
            .filter_map(|r| r.policy.as_ref())
            .find(|p| p.scope == scope && p.key_source.token_ttl().is_some())
        else {
            return Err(Problem::new(
                ProblemKind::ScopeNotIssued,
                format!(
                    "No route of this server takes server-issued tokens for the scope `{scope}`; nothing was minted."
                ),
            ));
        };
        let ttl = policy.key_source.token_ttl().unwrap_or_default();
        let Some(tokens) = &self.config.tokens else {
            tracing::error!(scope, "a token was asked for, but the runtime has no token secret");
            return Err(Problem::new(
                ProblemKind::Misconfigured,
                "The server has no secret to mint form tokens under; this is a server configuration bug.",
            ));
        };
        let digest = actor.map(|a| self.config.digests.actor(a)).unwrap_or_default();
        let now = std::time::SystemTime::now();
        let token = tokens.mint(&digest, policy.scope, ttl, now);
        if let Err(retry_after) = self.minted.admit(&digest, self.config.token_quota, now, token.expires_at) {
            return Err(Problem::new(
                ProblemKind::QuotaExceeded,
                "You hold as many unsubmitted form tokens as this server issues to one caller; submit or abandon a form and retry later.",
            )
            .with_retry_after(retry_after));
        }
        let record = self.record_key(policy.scope, actor, &format!("{}{}", crate::issued::ISSUED_PREFIX, token.id));
        let issued = crate::fingerprint::FingerprintBuilder::new(policy.scope).method("ISSUE").finish();
        let holder = tokens.issued_claim(&token.id);
        let claim = self.store.claim_as(&record, &issued, ttl, &holder);
        match self.bounded(StoreOperation::Claim, claim).await {
            Ok(Claim::Acquired(_)) => Ok(token),
            Ok(other) => {
                // 128 random bits met a record of their own: not something to hand out.
                tracing::error!(scope, answer = ?other, "a new token's issued record already existed");
                Err(Problem::new(ProblemKind::Misconfigured, "The server could not mint a form token; retry."))
            }
            Err(StoreError::QuotaExceeded { retry_after }) => Err(Problem::new(
                ProblemKind::QuotaExceeded,
                "You hold as many records as this server keeps for one caller; nothing was minted. Retry later.",
            )
            .with_retry_after(retry_after)),
            Err(e) => {
                tracing::warn!(scope, error = %e, "could not record a minted token");
                Err(Problem::new(
                    ProblemKind::StoreUnavailable,
                    "The server cannot issue form tokens right now; load the form again later.",
                )
                .with_retry_after(self.config.store_retry_after))
            }
        }
    }

    /// The key of an issued route's request: `token` checked for `actor` on `policy`'s scope by
    /// its MAC and expiry (no store round trip), then found as issued in the store (one renewal
    /// of its issued record, which writes no state). A problem and how it counts when refused.
    async fn redeem(
        &self,
        policy: &Policy,
        actor: Option<&str>,
        token: &IdempotencyKey,
    ) -> Result<IdempotencyKey, (Problem, RequestOutcome)> {
        use crate::issued::TokenError;
        let Some(tokens) = &self.config.tokens else {
            let problem = Problem::new(
                ProblemKind::Misconfigured,
                "The server has no secret to verify form tokens under; this is a server configuration bug.",
            );
            return Err((problem, RequestOutcome::InvalidKey));
        };
        let digest = actor.map(|a| self.config.digests.actor(a)).unwrap_or_default();
        let now = std::time::SystemTime::now();
        let fresh = "Load the form again to get a fresh one; nothing was executed.";
        let verified = match tokens.verify(token.as_str(), &digest, policy.scope, now) {
            Ok(verified) => verified,
            Err(e) => {
                tracing::info!(scope = policy.scope, error = %e, "form token refused");
                let kind =
                    if e == TokenError::Forbidden { ProblemKind::TokenForbidden } else { ProblemKind::TokenInvalid };
                let what = match e {
                    TokenError::Malformed => "This form's token is not one this server issues.",
                    TokenError::Forbidden => "This form's token was not issued to you for this form.",
                    TokenError::Expired => "This form has expired.",
                };
                return Err((Problem::new(kind, format!("{what} {fresh}")), RequestOutcome::InvalidKey));
            }
        };
        let record = self.record_key(policy.scope, actor, &format!("{}{}", crate::issued::ISSUED_PREFIX, verified.id));
        let left = verified.expires_at.duration_since(now).unwrap_or_default().max(Duration::from_secs(1));
        let holder = tokens.issued_claim(&verified.id);
        let found = self.store.renew(&record, &holder, left);
        match self.bounded(StoreOperation::Renew, found).await {
            Ok(()) => IdempotencyKey::parse(verified.id.as_bytes())
                .map_err(|e| (Problem::new(ProblemKind::KeyInvalid, format!("{e}.")), RequestOutcome::InvalidKey)),
            Err(StoreError::Fenced) => {
                tracing::info!(scope = policy.scope, "form token unknown to the store");
                let problem = Problem::new(
                    ProblemKind::TokenInvalid,
                    format!("This form's token is no longer known to the server. {fresh}"),
                );
                Err((problem, RequestOutcome::InvalidKey))
            }
            Err(e) => {
                tracing::warn!(scope = policy.scope, error = %e, "could not look the form token up; failing closed");
                let problem = Problem::new(
                    ProblemKind::StoreUnavailable,
                    "The server cannot guarantee this form is submitted only once right now; nothing was executed. Submit it again later.",
                )
                .with_retry_after(self.config.store_retry_after);
                Err((problem, RequestOutcome::StoreUnavailable))
            }
        }
    }

    /// Runs one request through the state machine; `handler` is polled at most once per call and
    /// only when this request owns the key (or runs unprotected).
    ///
    /// Counts the request in [`telemetry::REQUESTS_TOTAL`] by its [`RequestOutcome`] and, inside
    /// the request's span ([`telemetry::request_span`]), records the span's `outcome` and
    /// `replayed` fields.
    pub async fn execute<R, Fut>(&self, policy: &Policy, request: Request, handler: Fut) -> Outcome<R>
    where
        Fut: Future<Output = Captured<R>>,
    {
        self.execute_on(telemetry::HTTP, policy, request, handler).await.0
    }

    /// [`execute`](Self::execute) for a request that arrived over `transport` (the `transport`
    /// label of [`telemetry::REQUESTS_TOTAL`]: `http`, or a broker's name), also telling what
    /// became of the outcome in the store ([`Settled`]), which a consumer needs before it
    /// acknowledges a message.
    pub async fn execute_on<R, Fut>(
        &self,
        transport: &'static str,
        policy: &Policy,
        request: Request,
        handler: Fut,
    ) -> (Outcome<R>, Settled)
    where
        Fut: Future<Output = Captured<R>>,
    {
        let mut settled = Settled::Unclaimed;
        let (outcome, counted) = self.decide(policy, request, handler, &mut settled).await;
        if let Some(counted) = counted {
            telemetry::request_finished(transport, policy.scope, counted);
        }
        (outcome, settled)
    }

    /// [`execute`](Self::execute) without the bookkeeping: the outcome and how it counts (`None`
    /// for a server bug, which is not an outcome of the protocol).
    async fn decide<R, Fut>(
        &self,
        policy: &Policy,
        request: Request,
        handler: Fut,
        settled: &mut Settled,
    ) -> (Outcome<R>, Option<RequestOutcome>)
    where
        Fut: Future<Output = Captured<R>>,
    {
        let key = match request.key {
            Err(e) => {
                // A key made of body fields that are missing is a missing key, named by its field.
                if let KeyError::FieldMissing(field) = &e {
                    let problem = Problem::new(
                        ProblemKind::KeyMissing,
                        format!("This operation takes its idempotency key from the body field `{field}`, which is missing, null or empty; send it, and resend it unchanged when you retry."),
                    );
                    return (Outcome::Problem(problem), Some(RequestOutcome::MissingKey));
                }
                let source = policy.key_source.describe(&self.config.header_name);
                let problem = Problem::new(ProblemKind::KeyInvalid, format!("The {source}: {e}."));
                return (Outcome::Problem(problem), Some(RequestOutcome::InvalidKey));
            }
            Ok(None) if policy.key == KeyRequirement::Optional => {
                return (Outcome::Executed(handler.await.live), Some(RequestOutcome::Executed));
            }
            Ok(None) => {
                let detail = match policy.key_source {
                    KeySource::NamedHeader(name) => format!(
                        "This operation requires a `{name}` header (the sender's id of this delivery): send it, and resend it unchanged when you retry."
                    ),
                    KeySource::Fields(_) => format!(
                        "This operation takes its idempotency key from the {}, which the request did not carry.",
                        policy.key_source.describe(&self.config.header_name)
                    ),
                    KeySource::Issued { from, .. } => format!(
                        "This form carries no token (the {}). Load the form again to get a fresh one; nothing was executed.",
                        from.describe()
                    ),
                    _ => format!(
                        "This operation requires an `{}` header: send a unique value (e.g. a UUID) and reuse it when you retry.",
                        self.config.header_name
                    ),
                };
                let problem = Problem::new(ProblemKind::KeyMissing, detail);
                return (Outcome::Problem(problem), Some(RequestOutcome::MissingKey));
            }
            Ok(Some(k)) => k,
        };
        let key = match policy.key_source {
            KeySource::Issued { .. } => match self.redeem(policy, request.actor.as_deref(), &key).await {
                Ok(key) => key,
                Err((problem, counted)) => return (Outcome::Problem(problem), Some(counted)),
            },
            _ => key,
        };
        let fingerprint = match request.fingerprint {
            Ok(fp) => fp,
            Err(e) => {
                tracing::error!(scope = policy.scope, error = %e, "cannot fingerprint request");
                let problem = Problem::new(
                    ProblemKind::Misconfigured,
                    "The server could not fingerprint this request; this is a server bug.",
                );
                return (Outcome::Problem(problem), None);
            }
        };
        if policy.transactional && self.store.transactions().is_none() {
            let problem = Problem::new(
                ProblemKind::TransactionsUnsupported,
                format!(
                    "This operation runs only on an idempotency store with SQL transactions; this server's is `{}`. Nothing was executed.",
                    self.store.name()
                ),
            );
            return (Outcome::Problem(problem), None);
        }
        let record_key = self.record_key(policy.scope, request.actor.as_deref(), key.as_str());
        let deadline = Instant::now() + policy.wait_timeout;
        let mut backoff = Duration::from_millis(10);
        // One token for every attempt: a claim sent again finds its own record.
        let token = ClaimToken::generate();
        loop {
            let sent = tokio::time::Instant::now();
            let claim = self.store.claim_as(&record_key, &fingerprint, policy.lease, &token);
            match self.bounded(StoreOperation::Claim, claim).await {
                Ok(Claim::Acquired(token)) => {
                    let (outcome, counted, stored) = self.run_claimed(policy, record_key, token, sent, handler).await;
                    *settled = stored;
                    return (outcome, counted);
                }
                Ok(Claim::Completed(response)) => {
                    tracing::debug!(scope = policy.scope, "replaying stored response");
                    return (replay(response), Some(RequestOutcome::Replayed));
                }
                Ok(Claim::Mismatch) => {
                    tracing::info!(scope = policy.scope, "key already used with a different request; answering 422");
                    let detail = match policy.key_source {
                        KeySource::Issued { .. } => "This form was already submitted with other values, and its outcome stands. Load the form again to make a new submission.",
                        _ => "This idempotency key was already used with a different request. Use a new key for a new request, or resend the original request unchanged.",
                    };
                    let problem = Problem::new(ProblemKind::KeyReused, detail);
                    return (Outcome::Problem(problem), Some(RequestOutcome::Mismatch));
                }
                Ok(Claim::InProgress { retry_after }) => {
                    let now = Instant::now();
                    if policy.on_conflict == ConflictMode::Reject || now >= deadline {
                        let retry_after = self.durations.retry_after(policy.scope, retry_after);
                        tracing::info!(
                            scope = policy.scope,
                            retry_after_ms = retry_after.as_millis() as u64,
                            "key held by a request still running; answering 409"
                        );
                        let problem = Problem::new(
                            ProblemKind::InProgress,
                            "A request with this idempotency key is still being processed. Retry after the indicated time to get its result.",
                        )
                        .with_retry_after(retry_after);
                        return (Outcome::Problem(problem), Some(RequestOutcome::InProgress));
                    }
                    let nap = backoff.min(retry_after.max(Duration::from_millis(1))).min(deadline - now);
                    tokio::time::sleep(nap).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(StoreError::QuotaExceeded { retry_after }) => {
                    tracing::info!(scope = policy.scope, "the caller's share of the store is used up; answering 429");
                    let problem = Problem::new(
                        ProblemKind::QuotaExceeded,
                        "You hold as many idempotency records as this server keeps for one caller; nothing was executed. Retry later with the same key, or reuse keys of operations you retry.",
                    )
                    .with_retry_after(retry_after);
                    return (Outcome::Problem(problem), Some(RequestOutcome::QuotaExceeded));
                }
                Err(e) => {
                    let outcome = self.store_failed(policy, e, &record_key, &token, handler).await;
                    return (outcome, Some(RequestOutcome::StoreUnavailable));
                }
            }
        }
    }

    /// A claim the store could not answer. Only an unreachable store (an error or a timeout) lets
    /// a `fail_open` route run unprotected: a full store, or a record that cannot be read, is a
    /// state of the store that running unprotected would paper over.
    ///
    /// An error or a timeout is ambiguous: the claim may have reached the store and been applied,
    /// its answer lost. Such an orphan claim holds the key under `token`; a retry would find it in
    /// progress, and once its lease ran out take it over and run the handler a second time. So
    /// after running unprotected, the outcome is stored under `token` (fenced, once, bounded):
    /// where the orphan exists it now holds the outcome and retries replay it; where the claim
    /// never arrived the completion finds nothing and writes nothing.
    async fn store_failed<R, Fut>(
        &self,
        policy: &Policy,
        error: StoreError,
        key: &RecordKey,
        token: &ClaimToken,
        handler: Fut,
    ) -> Outcome<R>
    where
        Fut: Future<Output = Captured<R>>,
    {
        let detail = match &error {
            StoreError::Unavailable(_) if policy.fail_open => {
                tracing::warn!(scope = policy.scope, error = %error, "store unavailable; running unprotected (fail_open)");
                let captured = handler.await;
                if captured.failed || policy.outcomes.stores(captured.record.status) {
                    let orphan = self.store.complete(key, token, &captured.record, policy.ttl);
                    match self.bounded(StoreOperation::Complete, orphan).await {
                        Ok(()) => tracing::info!(
                            scope = policy.scope,
                            "the claim had reached the store after all: the unprotected run's outcome is stored under it"
                        ),
                        Err(e) => tracing::debug!(scope = policy.scope, error = %e, "no claim of this request to complete"),
                    }
                }
                return Outcome::Executed(captured.live);
            }
            StoreError::Full => {
                "The server cannot take new idempotent requests right now: its idempotency store is full. Nothing was executed. Retry later with the same key."
            }
            StoreError::Corrupt(_) => {
                "The server cannot read the record of this idempotency key; nothing was executed. Retry later with the same key."
            }
            _ => {
                "The server cannot guarantee this request runs only once right now; nothing was executed. Retry later with the same key."
            }
        };
        tracing::warn!(scope = policy.scope, error = %error, "store failed the claim; failing closed");
        Outcome::Problem(
            Problem::new(ProblemKind::StoreUnavailable, detail).with_retry_after(self.config.store_retry_after),
        )
    }

    /// `call` bounded by [`Config::store_timeout`]: one that takes longer is
    /// [`StoreError::Unavailable`].
    async fn bounded<T>(
        &self,
        operation: StoreOperation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        bounded(self.store.name(), operation, self.config.store_timeout, call).await
    }

    async fn run_claimed<R, Fut>(
        &self,
        policy: &Policy,
        key: RecordKey,
        token: ClaimToken,
        sent: tokio::time::Instant,
        handler: Fut,
    ) -> (Outcome<R>, Option<RequestOutcome>, Settled)
    where
        Fut: Future<Output = Captured<R>>,
    {
        let lease = Lease::hold(self, policy, key, token, sent);
        let (key, token) = (lease.key(), lease.token());
        let transaction = match self.begin(policy).await {
            Ok(transaction) => transaction,
            Err(e) => {
                tracing::warn!(scope = policy.scope, error = %e, "could not open the route's transaction; releasing the claim");
                self.release(policy, key, token, &lease, None).await;
                let problem = Problem::new(
                    ProblemKind::StoreUnavailable,
                    format!("The idempotency store could not open this request's transaction ({e}); nothing was executed. Retry with the same key."),
                )
                .with_retry_after(self.config.store_retry_after);
                return (Outcome::Problem(problem), Some(RequestOutcome::StoreUnavailable), Settled::Released);
            }
        };
        lease.let_keeper_arm().await;
        let started = Instant::now();
        let handler = FENCE.scope(lease.fence(), handler);
        let result = match &transaction {
            Some(t) => AssertUnwindSafe(crate::store::transaction::scope(t.clone(), handler)).catch_unwind().await,
            None => AssertUnwindSafe(handler).catch_unwind().await,
        };
        self.durations.record(policy.scope, started.elapsed());
        if let Some(t) = transaction.as_ref().filter(|t| t.escaped()) {
            let (outcome, counted) = self.refuse_escaped(policy, key, token, t.as_ref(), result, &lease).await;
            return (outcome, counted, Settled::Released);
        }
        let result = match (&transaction, result) {
            (Some(t), Ok(captured)) if captured.failed || policy.outcomes.stores(captured.record.status) => {
                return self.commit(policy, key, token, t.as_ref(), captured, &lease).await;
            }
            (_, result) => result,
        };
        if let Some(t) = &transaction {
            // A panic or a retryable outcome: the handler's writes go with its claim.
            self.roll_back(t.as_ref()).await;
        }
        match result {
            Err(_panic) => {
                tracing::error!(scope = policy.scope, "handler panicked; releasing the claim");
                self.release(policy, key, token, &lease, None).await;
                let problem = Problem::new(
                    ProblemKind::HandlerPanicked,
                    "The request failed before completing; nothing was stored. Retry with the same key.",
                );
                (Outcome::Problem(problem), Some(RequestOutcome::Released), Settled::Released)
            }
            Ok(captured) => {
                let status = captured.record.status;
                if captured.failed || policy.outcomes.stores(status) {
                    let stored = self.complete(policy, key, token, &captured.record, &lease).await;
                    let settled = if stored { Settled::Stored } else { Settled::NotStored };
                    (Outcome::Executed(captured.live), Some(RequestOutcome::Executed), settled)
                } else {
                    self.release(policy, key, token, &lease, Some(status)).await;
                    (Outcome::Executed(captured.live), Some(RequestOutcome::Released), Settled::Released)
                }
            }
        }
        // `lease` is dropped here, once the outcome is stored or released: renewals stop.
    }

    /// Opens the transaction of a transactional route (`None` for any other), bounded by the
    /// store timeout.
    async fn begin(&self, policy: &Policy) -> Result<Option<Arc<dyn OutcomeTransaction>>, StoreError> {
        let Some(store) = self.store.transactions().filter(|_| policy.transactional) else { return Ok(None) };
        self.bounded(StoreOperation::Begin, store.begin()).await.map(Some)
    }

    /// Commits a transactional route's final outcome with the handler's writes. The client gets
    /// the handler's response once both are committed; 409 when the claim was taken over (and
    /// the writes rolled back); 503 when the commit failed (nothing was committed, and the claim
    /// is released so that the retry runs at once).
    async fn commit<R>(
        &self,
        policy: &Policy,
        key: &RecordKey,
        token: &ClaimToken,
        transaction: &dyn OutcomeTransaction,
        captured: Captured<R>,
        lease: &Lease,
    ) -> (Outcome<R>, Option<RequestOutcome>, Settled) {
        lease.settling();
        let commit = transaction.commit(key, token, &captured.record, policy.ttl);
        match self.bounded(StoreOperation::Commit, commit).await {
            Ok(()) => (Outcome::Executed(captured.live), Some(RequestOutcome::Executed), Settled::Stored),
            Err(StoreError::Fenced) => {
                tracing::info!(
                    scope = policy.scope,
                    "commit fenced: the claim was taken over; the handler's writes were rolled back"
                );
                let problem = Problem::new(
                    ProblemKind::InProgress,
                    "This request lost its claim on the key to a retry before it could commit; its writes were rolled back. Retry with the same key to get the outcome.",
                )
                .with_retry_after(Duration::from_secs(1));
                (Outcome::Problem(problem), Some(RequestOutcome::InProgress), Settled::NotStored)
            }
            Err(e) => {
                // A commit cut short by the timeout is dropped with its connection: the server
                // rolls it back.
                tracing::warn!(scope = policy.scope, error = %e, "commit failed; the handler's writes were not committed");
                self.roll_back(transaction).await;
                self.release(policy, key, token, lease, None).await;
                let problem = Problem::new(
                    ProblemKind::StoreUnavailable,
                    format!(
                        "The request's writes could not be committed ({e}); nothing was done. Retry with the same key."
                    ),
                )
                .with_retry_after(self.config.store_retry_after);
                (Outcome::Problem(problem), Some(RequestOutcome::StoreUnavailable), Settled::Released)
            }
        }
    }

    /// Rolls a transactional route's writes back, bounded by the store timeout: a rollback cut
    /// short is dropped with its connection, and the database rolls back what it held.
    async fn roll_back(&self, transaction: &dyn OutcomeTransaction) {
        if tokio::time::timeout(self.config.store_timeout, transaction.rollback()).await.is_err() {
            tracing::warn!(
                timeout = ?self.config.store_timeout,
                "rolling back a transactional route's writes took longer than the store timeout; its connection is dropped"
            );
        }
    }

    /// A transactional handler returned while a guard on its transaction was still held: it was
    /// moved out of the handler (into a spawned task, a response stream), and whatever it writes
    /// from there would commit with the record. The engine neither waits for it nor commits: the
    /// response (and any guard its body held) is dropped, the transaction rolled back (by that
    /// guard when it is dropped, if it is still held), the claim released, and the client told.
    async fn refuse_escaped<R>(
        &self,
        policy: &Policy,
        key: &RecordKey,
        token: &ClaimToken,
        transaction: &dyn OutcomeTransaction,
        result: std::thread::Result<Captured<R>>,
        lease: &Lease,
    ) -> (Outcome<R>, Option<RequestOutcome>) {
        drop(result);
        self.roll_back(transaction).await;
        tracing::error!(
            scope = policy.scope,
            "the handler's transaction outlived it (a `Tx` guard moved into a spawned task or a response stream); refusing the request: its writes are rolled back and its claim released"
        );
        self.release(policy, key, token, lease, None).await;
        let problem = Problem::new(
            ProblemKind::Misconfigured,
            "The server kept this request's transaction beyond its handler (a server bug); its writes were rolled back and nothing was stored. Retrying with the same key runs it again.",
        );
        (Outcome::Problem(problem), Some(RequestOutcome::Released))
    }

    /// Stores the outcome, retrying while the store fails for up to
    /// [`Config::completion_patience`]; the lease is renewed meanwhile. Answers whether the
    /// outcome is known to be stored (a fenced retry of a completion whose first answer was lost
    /// may have stored it, and answers `false`: not known).
    async fn complete(
        &self,
        policy: &Policy,
        key: &RecordKey,
        token: &ClaimToken,
        record: &StoredResponse,
        lease: &Lease,
    ) -> bool {
        lease.settling();
        // The handler ran: losing its outcome would let a retry run it again. Storing it is
        // retried for the whole patience: within the time the lease is vouched for, no retry can
        // have taken the key, and after it a completion is still accepted while none did (and
        // fenced, writing nothing, once one did), so giving up earlier could only lose it.
        let give_up = tokio::time::Instant::now() + self.config.completion_patience;
        let mut delay = timing::COMPLETION_FIRST_RETRY;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if lease.lost() {
                tracing::warn!(
                    scope = policy.scope,
                    "lease lost while the handler ran (another request took the key over); outcome not stored"
                );
                return false;
            }

            match self.bounded(StoreOperation::Complete, self.store.complete(key, token, record, policy.ttl)).await {
                Ok(()) => return true,
                Err(StoreError::Fenced) if attempt > 1 => {
                    // An earlier attempt whose answer was lost may have stored it.
                    tracing::info!(
                        scope = policy.scope,
                        attempt,
                        "completion fenced: stored by an earlier attempt whose answer was lost, or taken over"
                    );
                    return false;
                }
                Err(StoreError::Fenced) => {
                    tracing::info!(
                        scope = policy.scope,
                        "completion fenced: the claim was taken over before completion; outcome not stored"
                    );
                    return false;
                }
                Err(e) => {
                    let retry_at = tokio::time::Instant::now() + delay;
                    if retry_at >= give_up {
                        tracing::warn!(scope = policy.scope, attempt, error = %e, "outcome could not be stored; the claim will expire with its lease");
                        return false;
                    }
                    tracing::warn!(scope = policy.scope, attempt, error = %e, "storing the outcome failed; retrying");
                    tokio::time::sleep_until(retry_at).await;
                    delay = timing::next_completion_retry(delay);
                }
            }
        }
    }

    /// Gives the claim back so that a retry runs the handler again: its outcome was retryable
    /// (`status`), or it panicked (`None`).
    async fn release(&self, policy: &Policy, key: &RecordKey, token: &ClaimToken, lease: &Lease, status: Option<u16>) {
        lease.settling();
        match self.bounded(StoreOperation::Release, self.store.release(key, token)).await {
            Ok(()) => tracing::info!(scope = policy.scope, status, "claim released: a retry runs the handler again"),
            Err(StoreError::Fenced) => {
                tracing::info!(scope = policy.scope, status, "release fenced: the claim was already taken over")
            }
            Err(e) => {
                tracing::warn!(scope = policy.scope, status, error = %e, "release failed; the claim will expire with its lease")
            }
        }
    }
}

/// `call`, the `operation` of `store`, bounded by `timeout` and timed.
async fn bounded<T>(
    store: &'static str,
    operation: StoreOperation,
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    // Polled once before the timer is made: a store that answers at once (the memory store, a
    // replay found in a cache) costs no timer entry. One that has to wait gets the whole
    // `timeout` from its first wait (the runtime's clock, which tests may pause).
    let mut call = std::pin::pin!(call);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
    let result = match first {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("no answer within {timeout:?}"))),
        },
    };
    telemetry::store_operation(store, operation, started.elapsed());
    result
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
