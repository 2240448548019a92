//! The HTTP protocol of a protected route, written once over `http` crate types.
//!
//! An adapter does three things per request, and nothing else: it gathers an [`Incoming`] (the
//! parts of the request that make up its identity) and a [`Caller`] (key and actor) from its
//! framework's request, lets the generated handler compute the fingerprint with
//! [`Incoming::fingerprint`], and runs [`respond`] with the handler's response converted to an
//! `http::Response` ([`request_task`]: [`respond`] in the request's span, tracked for a graceful
//! shutdown; [`run_task`]: where it stands until it first waits, then on a task of its own that a
//! disconnect cannot cancel). Every rule of the protocol lives here:
//!
//! - key parsing and the actor ([`Caller::identify`]; 400 and 401 problems),
//! - the request's identity: method, path parameters, canonical query and body by content type
//!   ([`Incoming::fingerprint`], per the route's [`Identity`](crate::policy::Identity)),
//! - claim, run, complete or release ([`Runtime::execute`]),
//! - capture under the cap ([`capture::capture`]), replays and problem responses,
//! - the request's span and metrics ([`crate::telemetry`]),
//! - and the operators' endpoints: the policy report ([`policy_report`]), a caller's record
//!   ([`status::record_status`]) and the store's health ([`status::health`]).
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use idempotent_core::engine::{Config, Runtime};
//! use idempotent_core::policy::Policy;
//! use idempotent_core::protocol::{respond, Caller, Incoming};
//! use idempotent_core::store::MemoryStore;
//! use std::sync::Arc;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! static POLICY: Policy = Policy::new("orders.cancel");
//! let runtime = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
//! let mut statuses = Vec::new();
//! for order in ["1", "1", "2"] {
//!     let incoming = Incoming::new("POST", Some("/orders/{id}/cancel")).param("id", order);
//!     let mut headers = http::HeaderMap::new();
//!     headers.insert("idempotency-key", "k-1".parse().unwrap());
//!     let caller = Caller::identify(runtime.config(), &headers, None);
//!     let fingerprint = incoming.fingerprint(&POLICY, Ok);
//!     let response = respond(&runtime, &POLICY, caller, fingerprint, async {
//!         http::Response::new(Full::new(Bytes::from("cancelled")))
//!     })
//!     .await;
//!     statuses.push(response.status().as_u16());
//! }
//! // The same key on another order is a different request: 422, never order 1's answer.
//! assert_eq!(statuses, [200, 200, 422]);
//! # });
//! ```

pub mod body;
pub mod capture;
pub mod consume;
pub mod field;
pub mod status;
pub mod tokens;
pub mod transport;

pub use body::ResponseBody;
pub use transport::Transport;

// The value types a transport names, so that it reaches the rest of the crate through this module.
pub use crate::actor::{Actor, RequestHead};
pub use crate::enforce::{Decision, Gate, GatedBody};
pub use crate::engine::Runtime;
pub use crate::fingerprint::{Fingerprint, FingerprintError};
pub use crate::policy::Policy;
pub use crate::problem::Problem;
pub use crate::registry::{Framework, Site};

use crate::actor::ActorMissing;
use crate::engine::{Config, Outcome, Request, REPLAYED_HEADER};
use crate::fingerprint::FingerprintBuilder;
use crate::key::{IdempotencyKey, KeyError};
use crate::policy::{KeySource, Part, TokenField};
use crate::problem::{ProblemKind, CONTENT_TYPE};
use crate::registry;
use crate::report::Format;
use crate::response::StoredResponse;
use crate::telemetry::{self, RequestOutcome};
use bytes::Bytes;
pub use field::KeyParts;
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use tracing::Instrument;

/// The parts of a request that make up its identity, gathered by the adapter before the handler
/// runs: method, matched route, path parameters, query and body.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    method: http::Method,
    route: Option<String>,
    params: Vec<(String, String)>,
    query: Option<String>,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Incoming {
    /// A request with `method` that matched `route` (the route pattern as the router knows it,
    /// `/v1/payments/{id}`; `None` when the framework does not say).
    pub fn new(method: &str, route: Option<&str>) -> Self {
        // Standard methods parse without allocating; an extension method keeps its spelling.
        let method = http::Method::from_bytes(method.as_bytes()).unwrap_or_default();
        Self { method, route: route.map(str::to_owned), ..Self::default() }
    }

    /// Adds a path parameter, decoded, in route order.
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds a path parameter whose value a router left partly percent-encoded (actix-web keeps
    /// `%25`, `%2F` and `%2B` encoded), decoding what is left so that the identity sees the same
    /// value as [`param`](Self::param) would: `a%2Bb` and `a+b` are one parameter value.
    pub fn param_partly_encoded(self, name: &str, value: &str) -> Self {
        self.param(name, &decode_partly_encoded(value))
    }

    /// The raw query string (without `?`).
    pub fn query(mut self, query: Option<&str>) -> Self {
        self.query = query.filter(|q| !q.is_empty()).map(str::to_owned);
        self
    }

    /// The body as received, and its `Content-Type`.
    pub fn body(mut self, content_type: Option<&[u8]>, body: Bytes) -> Self {
        self.content_type = content_type.and_then(|c| HeaderValue::from_bytes(c).ok());
        self.body = body;
        self
    }

    /// The value of the form field `name` of a form-encoded body (`application/x-www-form-urlencoded`),
    /// parsed as a key: `Ok(None)` when absent (or the body is not a form), an error when it is
    /// sent more than once or is not a valid key.
    pub fn form_field(&self, name: &str) -> Result<Option<IdempotencyKey>, KeyError> {
        let form = self.content_type.as_ref().and_then(|c| c.to_str().ok()).is_some_and(|c| {
            c.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
        });
        if !form {
            return Ok(None);
        }
        let pairs = crate::fingerprint::form_pairs(&self.body);
        let values: Vec<&[u8]> =
            pairs.iter().filter(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.as_slice()).collect();
        match values.as_slice() {
            [] => Ok(None),
            [value] => IdempotencyKey::parse(value).map(Some),
            _ => Err(KeyError::Repeated),
        }
    }

    /// The method.
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The matched route pattern, if the framework gave one.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// The request's fingerprint under `policy`: scope and method, then each part of its
    /// [`Identity`](crate::policy::Identity): every path parameter or the named ones, the whole
    /// canonical query or the named parameters, and the whole body by content type, or
    /// `fields` (the declared body fields, added by generated code) — or the part's omission.
    ///
    /// A path parameter the policy names but the route does not have is an error (a server bug,
    /// answered 500 rather than fingerprinting less than declared).
    pub fn fingerprint(
        &self,
        policy: &Policy,
        fields: impl FnOnce(FingerprintBuilder) -> Result<FingerprintBuilder, FingerprintError>,
    ) -> Result<Fingerprint, FingerprintError> {
        let id = policy.identity;
        let mut b = FingerprintBuilder::new(policy.scope).method(self.method.as_str());
        let params: Vec<(&str, &str)> = self.params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        b = match id.path {
            Part::Whole => b.path(&params),
            Part::Only(names) => {
                let mut chosen = Vec::with_capacity(names.len());
                for name in names {
                    let Some(p) = params.iter().find(|(n, _)| n == name) else {
                        return Err(FingerprintError::missing(format!("path({name})")));
                    };
                    chosen.push(*p);
                }
                b.path_params(&chosen)
            }
            Part::Omitted => b.omitted("path"),
        };
        b = match id.query {
            Part::Whole => b.query(self.query.as_deref()),
            Part::Only(names) => b.query_params(self.query.as_deref(), names),
            Part::Omitted => b.omitted("query"),
        };
        b = match id.body {
            Part::Whole => b.raw_body(self.content_type.as_ref().and_then(|c| c.to_str().ok()), &self.body),
            Part::Only(_) => fields(b)?,
            Part::Omitted => b.omitted("body"),
        };
        Ok(b.finish())
    }
}

/// One protected request as its transport hands it to the protocol, before the handler runs: the
/// parts that make up its identity ([`Incoming`]), the runtime installed where it was routed (if
/// any), its head (headers, read through [`RequestHead`]: the key header, a sender's own key
/// header, the actor's header), and the [`Actor`] its authentication set.
///
/// This is the whole of what a transport (a web framework, a broker) must gather; the rest of the
/// sequence is written once, here: the key by the route's [`KeySource`],
/// the caller, the request's span and metrics, claim, run, complete or release, capture, replay
/// and problems ([`task`](Self::task), then [`finish`] with the transport's spawn).
///
/// **Where the caller is read.** A transport captures the [`Actor`] extension when its protected
/// extractor runs, before the body extractor it wraps: an `Actor` set by middleware, or by an
/// extractor written before the body argument, counts; one set by the body extractor itself does
/// not. The same on every transport.
#[derive(Debug)]
pub struct Context<H> {
    incoming: Incoming,
    runtime: Option<Runtime>,
    head: H,
    actor: Option<Actor>,
    field_key: Option<Result<IdempotencyKey, KeyError>>,
}

impl<H: RequestHead> Context<H> {
    /// A request with its identity parts, the runtime found where it was routed, its head and the
    /// actor its authentication set.
    pub fn new(incoming: Incoming, runtime: Option<Runtime>, head: H, actor: Option<Actor>) -> Self {
        Self { incoming, runtime, head, actor, field_key: None }
    }

    /// The request's head.
    pub fn head(&self) -> &H {
        &self.head
    }

    /// The request's identity parts.
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// The runtime installed where the request was routed, if any.
    pub fn runtime(&self) -> Option<&Runtime> {
        self.runtime.as_ref()
    }

    /// The request's fingerprint under `policy`; `fields` adds the declared body fields (see
    /// [`Incoming::fingerprint`]).
    pub fn fingerprint(
        &self,
        policy: &Policy,
        fields: impl FnOnce(FingerprintBuilder) -> Result<FingerprintBuilder, FingerprintError>,
    ) -> Result<Fingerprint, FingerprintError> {
        self.incoming.fingerprint(policy, fields)
    }

    /// The key of a route whose key is made of body fields: `parts` adds their values (generated
    /// code, see [`field::KeyField`]).
    pub fn key_from_fields(mut self, parts: impl FnOnce(KeyParts) -> Result<KeyParts, KeyError>) -> Self {
        self.field_key = Some(parts(KeyParts::default()).and_then(|parts| IdempotencyKey::from_parts(&parts.0)));
        self
    }

    /// Who is asking, and under which key, by `policy`'s key source: the key header the runtime
    /// names, a header of the sender's, the body fields, or the request's own fingerprint.
    fn caller(&self, config: &Config, policy: &Policy, fingerprint: &Result<Fingerprint, FingerprintError>) -> Caller {
        let key = match policy.key_source {
            KeySource::Header => IdempotencyKey::from_header_values(self.head.header_values(&config.header_name)),
            KeySource::NamedHeader(name) => IdempotencyKey::from_header_values(self.head.header_values(name)),
            KeySource::Fields(_) => self.field_key.clone().map_or(Ok(None), |key| key.map(Some)),
            // A fingerprint that failed is a server bug the engine answers itself (500).
            KeySource::Derived => {
                Ok(Some(IdempotencyKey::derived(fingerprint.as_ref().unwrap_or(&Fingerprint([0; 32])))))
            }
            KeySource::Issued { from: TokenField::Header(name), .. } => {
                IdempotencyKey::from_header_values(self.head.header_values(name))
            }
            KeySource::Issued { from: TokenField::Form(name), .. } => self.incoming.form_field(name),
        };
        Caller { key, actor: identify_actor(config, &self.head, self.actor.as_ref()), html: accepts_html(&self.head) }
    }

    /// The protected request's task, once its handler's response is known: `handler` is the
    /// handler's future with its response converted to an `http::Response`. Records the full
    /// path the handler at `site` served (for reports), and returns the task for [`finish`] to
    /// run; when no runtime is installed where the request was routed, the task answers 500.
    ///
    /// The task is boxed here, once: it holds the whole protocol's state (the engine's steps and
    /// the handler), and a future that held it inline would be copied whole each time it moves
    /// (into the framework's box of the handler's future, into a spawned task).
    pub fn task<B, Fut>(
        self,
        framework: Framework,
        policy: &'static Policy,
        site: &'static registry::Site,
        fingerprint: Result<Fingerprint, FingerprintError>,
        handler: Fut,
    ) -> std::pin::Pin<Box<impl Future<Output = Response<ResponseBody<B>>>>>
    where
        Fut: Future<Output = Response<B>>,
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        use futures_util::future::Either;
        let Some(runtime) = self.runtime.clone() else {
            return Box::pin(Either::Left(std::future::ready(runtime_missing(policy).map(ResponseBody::full))));
        };
        observe(framework, site, &self.incoming);
        let caller = self.caller(runtime.config(), policy, &fingerprint);
        Box::pin(Either::Right(request_task(runtime, policy, caller, fingerprint, handler)))
    }
}

/// Runs a protected request's `task` (from [`Context::task`]) with the transport's `spawn`, so
/// that a client that disconnects cannot cancel it half-way ([`run_task`]); a task that failed
/// outside the handler is the 500 of [`task_failed`].
pub async fn finish<B, F, S>(policy: &Policy, task: std::pin::Pin<Box<F>>, spawn: S) -> Response<ResponseBody<B>>
where
    F: Future<Output = Response<ResponseBody<B>>>,
    S: FnOnce(std::pin::Pin<Box<F>>) -> tokio::task::JoinHandle<Response<ResponseBody<B>>>,
{
    match run_task(task, spawn).await {
        Ok(response) => response,
        Err(e) => task_failed(policy, &e).map(ResponseBody::full),
    }
}

/// Declares the types every adapter has, so they are written once: the installed runtime
/// `Idempotency` (with `builder`, `runtime` and, with the `utoipa` feature, `document_openapi`),
/// the extractor `Protected<T>` that wraps a handler's body extractor and carries its
/// [`Context`], the `Tx` and `Fence` extractors, and the `__private` module the generated code
/// names (the adapter's `extract::Exempt` and `runtime::run`, and `$response`, its framework's
/// response). The adapter adds its framework's trait impls and installation method.
#[doc(hidden)]
#[macro_export]
// `crate::` names the adapter that expands this macro (its `extract` and `runtime` modules),
// which is what is meant.
#[allow(clippy::crate_in_macro_def)]
macro_rules! __adapter_types {
    ($framework:ident, $head:ty, $response:ty) => {
        /// Items used by the code `#[idempotent]` generates. Not a public API.
        #[doc(hidden)]
        pub mod __private {
            pub use crate::extract::Exempt;
            pub use crate::runtime::run;
            pub use crate::{Context, Protected};
            pub use ::core::time::Duration;
            pub use $crate::inventory;
            pub use $crate::policy::{
                ConflictMode, Identity, KeyRequirement, KeySource, Part, Policy, StoredOutcomes, TokenField,
            };
            pub use $crate::protocol::field::{Field, KeyField, PlainField, SetField};
            pub use $crate::registry::{Framework, RouteRecord, Site};
            /// The framework's response, which a protected handler returns.
            pub type Response = $response;
        }

        /// The installed idempotency runtime; cheap to clone.
        #[derive(Debug, Clone)]
        pub struct Idempotency {
            runtime: $crate::engine::Runtime,
        }

        /// Settings of an [`Idempotency`] runtime: header name, actor source, stored-body cap,
        /// `Retry-After` of an unreachable store; `build` validates the routes written for this
        /// adapter and refuses to start on error.
        pub type IdempotencyBuilder = $crate::engine::Builder<Idempotency>;

        impl $crate::engine::Adapter for Idempotency {
            const FRAMEWORK: $crate::registry::Framework = $crate::registry::Framework::$framework;

            fn from_runtime(runtime: $crate::engine::Runtime) -> Self {
                Self { runtime }
            }
        }

        impl Idempotency {
            /// Starts configuring a runtime on `store`.
            pub fn builder(store: ::std::sync::Arc<dyn $crate::store::Store>) -> IdempotencyBuilder {
                $crate::engine::Builder::new(store)
            }

            /// The framework-free runtime.
            pub fn runtime(&self) -> &$crate::engine::Runtime {
                &self.runtime
            }

            /// Graceful shutdown: once the server has stopped accepting connections, waits up
            /// to `timeout` for every protected request still running (including those whose
            /// client went away) to finish and store its outcome. Answers whether all did.
            pub async fn drain(&self, timeout: ::std::time::Duration) -> bool {
                self.runtime.drain(timeout).await
            }

            /// Documents every protected route of this framework on `openapi` (feature
            /// `utoipa`), matched by operation id or by path; returns how many operations were
            /// documented. See `idempotent_core::openapi`.
            #[cfg(feature = "utoipa")]
            pub fn document_openapi(&self, openapi: &mut $crate::openapi::OpenApi) -> usize {
                $crate::openapi::document_runtime(openapi, &self.runtime, $crate::registry::Framework::$framework)
            }
        }

        /// What a protected handler knows of its request before it runs.
        pub type Context = $crate::protocol::Context<$head>;

        /// Wraps a protected handler's body extractor `T` (or stands in for one). With `BODY`
        /// (the whole body is part of the request's identity) it reads the body, within the
        /// framework's configured limit, and hands the same bytes to `T`; without, `T` reads the
        /// body itself as it would unprotected (the identity takes declared fields from `T`, or
        /// leaves the body out).
        #[derive(Debug)]
        pub struct Protected<T, const BODY: bool = true> {
            context: Context,
            inner: T,
        }

        impl<T, const BODY: bool> Protected<T, BODY> {
            /// The context and the handler's own extractor.
            pub fn into_parts(self) -> (Context, T) {
                (self.context, self.inner)
            }
        }

        /// What the engine gives a protected handler while it runs, as an extractor: its
        /// transaction ([`Tx`]) or its claim ([`Fence`]).
        #[derive(Debug, Clone, Copy, Default)]
        pub struct Scoped<T>(pub T);

        impl<T> ::std::ops::Deref for Scoped<T> {
            type Target = T;
            fn deref(&self) -> &T {
                &self.0
            }
        }

        /// The transaction of a `transactional = true` route's handler, as an extractor: lock it
        /// with `postgres()` or `sqlite()` (see `idempotent_core::store::transaction`) and write in it;
        /// the outcome's record commits with the writes.
        pub type Tx = Scoped<$crate::store::transaction::Tx>;

        /// Mints server-issued tokens for the caller of the request, as an extractor: a handler that
        /// renders a form calls `mint.token("checkout.create").await` and writes the token into
        /// the form's hidden field (see `idempotent_core::issued`). The caller is known as on a
        /// protected route: an `Actor` set before this extractor runs, else the configured source.
        #[derive(Debug, Clone)]
        pub struct Mint(pub $crate::protocol::tokens::Minter);

        impl Mint {
            /// A fresh token for this caller on `scope`, recorded as issued; a problem (401, 404,
            /// 429, 503) to answer otherwise.
            pub async fn token(
                &self,
                scope: &str,
            ) -> ::core::result::Result<$crate::issued::IssuedToken, $crate::problem::Problem> {
                self.0.mint(scope).await
            }
        }

        /// The claim a protected handler runs under, as an extractor: `fence.check()` before an
        /// effect that cannot be taken back, `fence.claim()` for the fencing token and the time
        /// the lease is still vouched for (see `idempotent_core::engine::ClaimFence`).
        pub type Fence = Scoped<$crate::engine::Fence>;
    };
}

/// Who is asking, and under which key: read from the request head once the application's
/// authentication has run.
#[derive(Debug)]
pub struct Caller {
    /// The parsed key header: `Ok(None)` when absent.
    pub key: Result<Option<IdempotencyKey>, KeyError>,
    /// The actor: `Ok(None)` for the anonymous namespace.
    pub actor: Result<Option<String>, ActorMissing>,
    /// Whether the request accepts `text/html` (a browser): problems of an issued route are then
    /// rendered by the application's [`ProblemPage`](crate::engine::ProblemPage), if it has one.
    pub html: bool,
}

impl Caller {
    /// Reads the key header named in `config` and resolves the actor with [`identify_actor`].
    pub fn identify(config: &Config, head: &dyn RequestHead, extension: Option<&Actor>) -> Self {
        let key = IdempotencyKey::from_header_values(head.header_values(&config.header_name));
        Self { key, actor: identify_actor(config, head, extension), html: accepts_html(head) }
    }
}

/// Whether a request's `Accept` names `text/html` (what browsers send for a page or a form
/// submit; JSON clients do not).
pub fn accepts_html(head: &dyn RequestHead) -> bool {
    head.header_values("accept").iter().any(|v| {
        v.split(|b| *b == b',').any(|range| {
            let media = range.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
            media.eq_ignore_ascii_case(b"text/html")
        })
    })
}

/// The one rule by which a protected route and the record status endpoint know the caller:
/// `extension` (an [`Actor`] the application's authentication set, in middleware or in an
/// extractor that ran before) first, then the configured source on the request head.
pub fn identify_actor(
    config: &Config,
    head: &dyn RequestHead,
    extension: Option<&Actor>,
) -> Result<Option<String>, ActorMissing> {
    config.actor.actor_of(extension, head)
}

/// Runs one protected request: answers a missing actor with 401, then claims, runs `handler`
/// (capturing its response under the runtime's cap), completes or releases, and returns what the
/// client gets: the handler's response, a replay, or a problem. Adapters run this on a spawned
/// task so a client that disconnects cannot cancel it between the handler's effects and the
/// recording of its outcome.
pub async fn respond<B, Fut>(
    runtime: &Runtime,
    policy: &Policy,
    caller: Caller,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: Fut,
) -> Response<ResponseBody<B>>
where
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // Without a key on a route whose key is optional the request runs unprotected: no namespace
    // is needed, so a missing actor is no reason to refuse it.
    let unprotected = matches!(caller.key, Ok(None)) && policy.key == crate::policy::KeyRequirement::Optional;
    let page =
        runtime.config().problem_page.as_ref().filter(|_| caller.html && policy.key_source.token_ttl().is_some());
    let problem_answer = |problem: &Problem| match page {
        Some(page) => page_response(page, problem),
        None => problem_response(problem),
    };
    let actor = match caller.actor {
        Ok(actor) => actor,
        Err(_) if unprotected => None,
        Err(e) => {
            tracing::info!(scope = policy.scope, "{e}");
            telemetry::request_finished(telemetry::HTTP, policy.scope, RequestOutcome::InvalidKey);
            let detail = match e {
                ActorMissing::NotFound => "This operation needs to know who is calling, and the request did not say: authenticate and retry with the same key.",
                ActorMissing::Repeated => "The request carries its identity header more than once, so it cannot say who is calling: send it exactly once and retry with the same key.",
            };
            let problem = Problem::new(ProblemKind::ActorMissing, detail);
            return problem_answer(&problem).map(ResponseBody::full);
        }
    };
    let max = runtime.config().max_stored_body;
    let request = Request { key: caller.key, actor, fingerprint };
    // A panic in the handler is the engine's to catch (the claim is released: nothing finished).
    // A panic while its response body is produced comes after the handler's effects, so it is a
    // failed but final outcome, like a body that errors.
    // Boxed: the engine's state machine moves the handler through several layers, and a boxed
    // one moves as a pointer (with the capture's state inline it would be copied, kilobytes at a
    // time, at each of them and into the spawned task).
    let handler = Box::pin(async move {
        let response = handler.await;
        match AssertUnwindSafe(capture::capture(response, max)).catch_unwind().await {
            Ok(captured) => captured,
            Err(_) => capture::failed(&"the response body panicked"),
        }
    });
    match runtime.execute(policy, request, handler).await {
        Outcome::Executed(response) => response,
        Outcome::Replayed(stored) => replay_response(stored).map(ResponseBody::full),
        Outcome::Problem(problem) => problem_answer(&problem).map(ResponseBody::full),
    }
}

/// The application's HTML page for `problem` ([`ProblemPage`](crate::engine::ProblemPage)), with
/// the problem's status and `Retry-After`, never cached.
pub fn page_response(page: &crate::engine::ProblemPage, problem: &Problem) -> Response<Bytes> {
    let mut response = problem_response(problem);
    *response.body_mut() = Bytes::from((page.0)(problem));
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The task an adapter spawns for one protected request: [`respond`], inside the request's span
/// ([`telemetry::request_span`], created now as a child of the current span, so the handler's
/// own events are inside it), and tracked by `runtime` so that [`Runtime::drain`] waits for it.
///
/// An adapter calls it where its handler is called (the request's own span is current there) and
/// runs the result with [`run_task`].
pub fn request_task<B, Fut>(
    runtime: Runtime,
    policy: &'static Policy,
    caller: Caller,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: Fut,
) -> impl Future<Output = Response<ResponseBody<B>>>
where
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let span =
        telemetry::request_span(policy, caller.key.as_ref().ok().and_then(Option::as_ref), &runtime.config().digests);
    let tracker = runtime.clone();
    tracker.track(async move { respond(&runtime, policy, caller, fingerprint, handler).await }.instrument(span))
}

/// Runs a protected request's task (from [`request_task`]) so that a client that disconnects
/// cannot cancel it half-way, spawning it only if it has to wait.
///
/// The task is first polled here, in the request's own task: a request that finishes without
/// waiting (a replay or a first execution on the memory store, a problem answered at once) costs
/// no task, no copy of its state and no wake-up of another thread. One that has to wait (a store
/// round trip, a handler that awaits) is handed to `spawn` as it stands, before this function
/// returns to any await point, and its answer awaited: from its first poll on, only its own task
/// can drop it. A panic outside the handler (the handler's own are caught inside) and a spawned
/// task that failed are answered with `Err`: see [`task_failed`].
///
/// The task comes boxed, so that the future of this function (and of its callers) holds a
/// pointer, not the task's whole state.
pub async fn run_task<T, F, S>(mut task: std::pin::Pin<Box<F>>, spawn: S) -> Result<T, String>
where
    F: Future<Output = T>,
    S: FnOnce(std::pin::Pin<Box<F>>) -> tokio::task::JoinHandle<T>,
{
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))))
    })
    .await;
    match first {
        Ok(std::task::Poll::Ready(answer)) => Ok(answer),
        Ok(std::task::Poll::Pending) => spawn(task).await.map_err(|e| e.to_string()),
        Err(panic) => Err(panic_message(panic.as_ref())),
    }
}

/// The message a panic carried, when it is a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("panicked: {}", message.unwrap_or("(no message)"))
}

/// A response of a framework built on another version of the `http` crate (actix-web 4 is on
/// `http` 0.2), rebuilt from its status and raw headers around `body`; a header this version
/// cannot represent is left out.
pub fn response_from_parts<'a, B>(
    status: u16,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    body: B,
) -> Response<B> {
    let mut out = Response::new(body);
    *out.status_mut() = StatusCode::from_u16(status).unwrap_or_default();
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            out.headers_mut().append(n, v);
        }
    }
    out
}

/// A path parameter a router left partly percent-encoded (actix-web keeps `%25`, `%2F` and `%2B`
/// encoded), decoded the rest of the way.
pub fn decode_partly_encoded(value: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(value).decode_utf8_lossy()
}

/// Records that the handler at `site` of `framework` served this request's route (for reports:
/// full paths under nested routers and scopes).
pub fn observe(framework: Framework, site: &registry::Site, incoming: &Incoming) {
    if let Some(route) = incoming.route() {
        registry::observe(framework, site, incoming.method.as_str(), route);
    }
}

/// An `application/problem+json` response, with `Retry-After` when the problem has one.
pub fn problem_response(problem: &Problem) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(problem.to_json()));
    *response.status_mut() = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(secs) = problem.retry_after {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A stored response rebuilt for a retry, marked `Idempotent-Replayed: true`.
pub fn replay_response(stored: StoredResponse) -> Response<Bytes> {
    let mut response = Response::new(stored.body);
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        // The stored value's bytes become the header's: checked, not copied.
        if let (Ok(n), Ok(v)) =
            (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(Bytes::from(value)))
        {
            headers.append(n, v);
        }
    }
    headers.insert(HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"));
    response
}

/// The 500 a protected route answers when no runtime is installed on its router or app.
pub fn runtime_missing(policy: &Policy) -> Response<Bytes> {
    tracing::error!(scope = policy.scope, "idempotency runtime not installed for this route");
    problem_response(&Problem::new(
        ProblemKind::Misconfigured,
        "The server has no idempotency runtime installed for this route; this is a server configuration bug.",
    ))
}

/// The 500 sent when the task running a protected request failed (it panicked outside the
/// handler, or the runtime shut down).
pub fn task_failed(policy: &Policy, error: &dyn std::fmt::Display) -> Response<Bytes> {
    tracing::error!(scope = policy.scope, %error, "idempotent execution task failed");
    problem_response(&Problem::new(
        ProblemKind::HandlerPanicked,
        "The request failed before completing. Retry with the same key.",
    ))
}

/// The problem for a request body that could not be read before the handler ran: 413 when it was
/// over the limit, 400 otherwise. Nothing ran and nothing was stored.
pub fn body_problem(too_large: bool, error: &dyn std::fmt::Display) -> Response<Bytes> {
    let problem = if too_large {
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!("The request body is larger than this route accepts ({error}); nothing was executed."),
        )
    } else {
        Problem::new(
            ProblemKind::BodyUnreadable,
            format!("The request body could not be read ({error}); nothing was executed. Retry with the same key."),
        )
    };
    problem_response(&problem)
}

/// What a protected route answers when its body extractor rejected the request with `status` and
/// `message`: `Some` problem+json of the application's type when the runtime was built with
/// [`rejections_as_problems`](crate::engine::Builder::rejections_as_problems), `None` to send the
/// framework's own rejection.
///
/// Only the statuses of a malformed body are mapped (400, 413, 415, 422): a body extractor that
/// answers otherwise (401 for a signature that does not verify, say) keeps its own answer.
pub fn rejection(config: &Config, status: u16, message: &str) -> Option<Response<Bytes>> {
    let type_uri = config.rejections.filter(|_| maps_rejection(config, status))?;
    let detail = match message.trim().trim_end_matches('.') {
        "" => "The request was rejected",
        message => message,
    };
    let problem = Problem {
        type_uri,
        title: "Request rejected",
        status,
        detail: format!("{detail}. Nothing was executed or stored; fix the request and send it again."),
        retry_after: None,
    };
    Some(problem_response(&problem))
}

/// Whether [`rejection`] answers a body extractor's rejection of `status` (so that an adapter
/// reads the rejection's message only then).
pub fn maps_rejection(config: &Config, status: u16) -> bool {
    config.rejections.is_some() && matches!(status, 400 | 413 | 415 | 422)
}

/// Whether a request head says a body follows (a non-zero `Content-Length`, or chunked
/// `Transfer-Encoding`).
pub fn declares_body(head: &dyn RequestHead) -> bool {
    let header = |name| head.header(name).and_then(|v| std::str::from_utf8(v).ok());
    header("content-length").is_some_and(|n| n.trim() != "0")
        || header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
}

/// The 500 for a request whose body another extractor consumed before the body could become part
/// of its identity: fingerprinting it as empty would replay other requests' answers, so nothing
/// runs and the server's configuration is blamed.
pub fn body_taken() -> Response<Bytes> {
    tracing::error!("the request body was read by an extractor the idempotency layer does not know");
    problem_response(&Problem::new(
        ProblemKind::Misconfigured,
        "Another extractor read this request's body before the idempotency layer could; mark the body argument \
         #[body] or declare exclude = [body]. Nothing was executed. This is a server configuration bug.",
    ))
}

/// The `policies [--format md|json|html]` subcommand for an application's `main`, on the process's
/// command line ([`crate::report::command`]): `None` when it is not that subcommand (serve as
/// usual); else the report printed on stdout, exit code 0, or a usage error on stderr, 2. The
/// adapters offer it as `policies_command()`.
pub fn policies_command(framework: Framework) -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    Some(match crate::report::command(framework, &args)? {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(usage) => {
            eprintln!("{usage}");
            std::process::ExitCode::from(2)
        }
    })
}

/// The policy report of `framework`'s routes for a request with `query` (`format=json|md|html`,
/// default JSON), without the handlers' source files and lines (whoever can reach the endpoint
/// learns the policies, not the source tree's layout); an unknown format is 400 with a
/// plain-text message naming the formats.
/// default JSON); an unknown format is a 400 problem naming the formats.
pub fn policy_report(framework: Framework, query: Option<&str>) -> Response<Bytes> {
    let format =
        query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| pair.strip_prefix("format=")).unwrap_or("json");
    match format.parse::<Format>() {
        Ok(format) => {
            let routes = registry::routes_of(framework);
            let body = crate::report::render_with(&routes, format, crate::report::Sources::Hidden);
            let mut response = Response::new(Bytes::from(body));
            response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
            response
        }
        Err(e) => problem_response(&Problem::new(ProblemKind::ReportFormatUnknown, format!("{e}."))),
    }
}

#[cfg(test)]
mod policy_report_tests {
    use super::*;

    /// It answered text/plain, unlike every other error of the framework.
    #[test]
    fn an_unknown_format_is_a_problem() {
        let response = policy_report(Framework::Axum, Some("format=yaml"));
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], CONTENT_TYPE);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "urn:idempotent:problem:report-format-unknown");
        assert_eq!(body["detail"], "unknown report format `yaml`: use md, json or html.");
        for (query, content_type) in [(None, "application/json"), (Some("format=md"), "text/markdown; charset=utf-8")] {
            let response = policy_report(Framework::Axum, query);
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()[http::header::CONTENT_TYPE], content_type);
        }
    }
}

#[cfg(test)]
mod run_task_tests {
    use super::run_task;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_task_that_finishes_at_once_is_not_spawned() {
        let spawned = AtomicBool::new(false);
        let answer = run_task(Box::pin(async { 7 }), |task| {
            spawned.store(true, Ordering::SeqCst);
            tokio::spawn(task)
        })
        .await;
        assert_eq!(answer, Ok(7));
        assert!(!spawned.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_task_that_waits_is_spawned_and_answered() {
        let spawned = AtomicBool::new(false);
        let task = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            8
        };
        let answer = run_task(Box::pin(task), |task| {
            spawned.store(true, Ordering::SeqCst);
            tokio::spawn(task)
        })
        .await;
        assert_eq!(answer, Ok(8));
        assert!(spawned.load(Ordering::SeqCst));
    }

    /// Once the task has begun, dropping the caller (a client that disconnects) does not cancel
    /// it: it runs to its end on its own task.
    #[tokio::test]
    async fn a_dropped_caller_does_not_cancel_a_begun_task() {
        let (steps, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
        let task = {
            let (steps, finished) = (steps.clone(), finished.clone());
            async move {
                steps.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                steps.fetch_add(1, Ordering::SeqCst);
                finished.notify_one();
            }
        };
        let caller = run_task(Box::pin(task), |task| tokio::spawn(task));
        // The caller is polled once (the task begins and waits), then dropped.
        assert!(tokio::time::timeout(Duration::from_millis(1), caller).await.is_err());
        assert_eq!(steps.load(Ordering::SeqCst), 1);
        tokio::time::timeout(Duration::from_secs(5), finished.notified()).await.expect("the task ran to its end");
        assert_eq!(steps.load(Ordering::SeqCst), 2);
    }

    /// On the memory store a protected request never waits, so it is never spawned: neither its
    /// first execution nor its replay, also once the thread's lease keeper has woken and found
    /// no claim left. (The first claim on a thread starts the thread's keeper and lets it run
    /// first: that one request waits once.)
    #[tokio::test(start_paused = true)]
    async fn a_request_on_the_memory_store_is_not_spawned() {
        use crate::engine::{Config, Runtime};
        use crate::policy::Policy;
        use crate::store::MemoryStore;
        use bytes::Bytes;
        use http_body_util::Full;

        static POLICY: Policy = Policy::new("t.in-place");
        let runtime = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
        let spawned = Arc::new(AtomicUsize::new(0));
        for (key, expected) in [("k-0", "201"), ("k-1", "201"), ("k-1", "201 replayed"), ("k-2", "201")] {
            let mut headers = http::HeaderMap::new();
            headers.insert("idempotency-key", key.parse().unwrap());
            let caller = super::Caller::identify(runtime.config(), &headers, None);
            let fingerprint = super::Incoming::new("POST", Some("/x")).fingerprint(&POLICY, Ok);
            let handler = async {
                let mut response = http::Response::new(Full::new(Bytes::from_static(b"done")));
                *response.status_mut() = http::StatusCode::CREATED;
                response
            };
            let task = super::request_task(runtime.clone(), &POLICY, caller, fingerprint, handler);
            // The first request starts this thread's lease keeper: it is not counted.
            let counter = if key == "k-0" { Arc::new(AtomicUsize::new(0)) } else { spawned.clone() };
            let response = run_task(Box::pin(task), |task| {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(task)
            })
            .await
            .unwrap();
            let replayed = response.headers().contains_key(crate::engine::REPLAYED_HEADER);
            let got = format!("{}{}", response.status().as_u16(), if replayed { " replayed" } else { "" });
            assert_eq!(got, expected);
            // Three renewal periods (of the default 10 s lease): the keeper wakes, finds no claim.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert_eq!(spawned.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_panic_in_the_first_poll_is_an_error() {
        let answer: Result<u8, String> =
            run_task(Box::pin(async { panic!("outside the handler") }), |task| tokio::spawn(task)).await;
        assert_eq!(answer, Err("panicked: outside the handler".to_owned()));
    }

    #[tokio::test]
    async fn a_panic_after_the_task_waited_is_an_error() {
        let task = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            panic!("later")
        };
        let answer: Result<u8, String> = run_task(Box::pin(task), |task| tokio::spawn(task)).await;
        assert!(answer.is_err_and(|e| e.contains("panic")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::ActorSource;
    use crate::policy::{Identity, KeyRequirement};
    use crate::store::MemoryStore;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn runtime(actor: ActorSource) -> Runtime {
        Runtime::new(Arc::new(MemoryStore::new()), Config { actor, ..Config::default() })
    }

    fn caller(runtime: &Runtime, key: Option<&str>) -> Caller {
        let mut headers = http::HeaderMap::new();
        if let Some(k) = key {
            headers.insert("idempotency-key", k.parse().unwrap());
        }
        Caller::identify(runtime.config(), &headers, None)
    }

    #[test]
    fn an_optional_key_route_runs_without_key_or_actor_but_a_keyed_request_needs_an_actor() {
        block_on(async {
            static OPTIONAL: Policy = Policy { key: KeyRequirement::Optional, ..Policy::new("t.optional") };
            let rt = runtime(ActorSource::BearerToken);
            let fp = || Incoming::new("POST", Some("/x")).fingerprint(&OPTIONAL, Ok);
            let ok = || async { http::Response::new(Full::new(Bytes::from_static(b"ran"))) };
            let unkeyed = respond(&rt, &OPTIONAL, caller(&rt, None), fp(), ok()).await;
            assert_eq!(unkeyed.status(), 200, "no key: runs unprotected, no namespace needed");
            let keyed = respond(&rt, &OPTIONAL, caller(&rt, Some("k")), fp(), ok()).await;
            assert_eq!(keyed.status(), 401, "a key needs a caller to namespace it");
        });
    }

    #[test]
    fn a_response_body_that_panics_after_the_handler_ran_is_stored_not_run_again() {
        block_on(async {
            static POLICY: Policy = Policy::new("t.panicking-body");
            let rt = runtime(ActorSource::Anonymous);
            let runs = AtomicUsize::new(0);
            let mut bodies = Vec::new();
            for _ in 0..2 {
                let handler = async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let chunks = futures_util::stream::iter(0..2).map(|i| {
                        assert!(i == 0, "the body breaks half-way");
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"part")))
                    });
                    http::Response::new(StreamBody::new(chunks))
                };
                let fp = Incoming::new("POST", None).fingerprint(&POLICY, Ok);
                let response = respond(&rt, &POLICY, caller(&rt, Some("k")), fp, handler).await;
                let replayed = response.headers().contains_key(REPLAYED_HEADER);
                let status = response.status();
                bodies.push((status, replayed, response.into_body().collect().await.unwrap().to_bytes()));
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "never run twice");
            assert_eq!(bodies[0].0, 500);
            assert!(String::from_utf8_lossy(&bodies[0].2).contains("response-failed"));
            assert_eq!((bodies[1].0, bodies[1].1), (StatusCode::INTERNAL_SERVER_ERROR, true));
            assert_eq!(bodies[1].2, bodies[0].2, "the retry gets what the client got");
        });
    }

    #[test]
    fn declared_parts_of_the_identity() {
        let only_id = Policy {
            identity: Identity { path: Part::Only(&["id"]), query: Part::Omitted, body: Part::Omitted },
            ..Policy::new("t.parts")
        };
        let fp = |id: &str, other: &str, query: &str, body: &str| {
            Incoming::new("POST", Some("/o/{id}/x/{other}"))
                .param("id", id)
                .param("other", other)
                .query(Some(query))
                .body(Some(b"text/plain"), Bytes::copy_from_slice(body.as_bytes()))
                .fingerprint(&only_id, Ok)
                .unwrap()
        };
        assert_eq!(fp("1", "a", "q=1", "x"), fp("1", "b", "q=2", "y"), "undeclared parts do not count");
        assert_ne!(fp("1", "a", "", ""), fp("2", "a", "", ""), "the declared parameter does");
        let no_query =
            Policy { identity: Identity { query: Part::Omitted, ..Identity::WHOLE }, ..Policy::new("t.parts") };
        let empty_query = Incoming::new("POST", None).fingerprint(&Policy::new("t.parts"), Ok).unwrap();
        let omitted = Incoming::new("POST", None).fingerprint(&no_query, Ok).unwrap();
        assert_ne!(empty_query, omitted, "leaving a part out is itself part of the identity");
        let missing = Incoming::new("POST", Some("/o")).fingerprint(&only_id, Ok).unwrap_err();
        assert_eq!(missing.field, "path(id)");
    }

    #[test]
    fn a_partly_encoded_parameter_is_the_decoded_value() {
        let policy = Policy::new("t.params");
        let fp = |incoming: Incoming| incoming.fingerprint(&policy, Ok).unwrap();
        let plain = fp(Incoming::new("POST", None).param("id", "a+b/c%d"));
        assert_eq!(plain, fp(Incoming::new("POST", None).param_partly_encoded("id", "a%2Bb%2Fc%25d")));
        assert_ne!(plain, fp(Incoming::new("POST", None).param("id", "a%2Bb%2Fc%25d")));
    }
}
