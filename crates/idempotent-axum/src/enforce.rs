//! Enforcement: making a mutating route without an idempotency policy visible, or refusing it.
//!
//! axum's `Router` cannot list its routes, so enforcement looks at the routes requests actually
//! take: the [`Enforce`] layer reads each request's method and [`MatchedPath`] and compares them
//! with the route registry. A request to a mutating route (`POST`, `PATCH`, and `PUT`/`DELETE`
//! when configured, see [`MutatingMethods`]) that no `#[idempotent]` handler protects or exempts
//! is, depending on the [`Mode`]:
//! - [`Mode::Warn`]: served, with one `tracing` warning per route for the life of the layer;
//! - [`Mode::Refuse`]: answered `500 application/problem+json`
//!   (`urn:idempotent:problem:misconfigured`) before the handler runs, so no side effect happens.
//!
//! A layer was chosen over a route-declaring wrapper around `Router` because it needs no change
//! to how routes are written (one `.layer(..)` line), covers nested routers and every way of
//! adding a route, and cannot drift from the real routing table. Its limit is that it sees a route
//! only when a request takes it; tests close that gap with [`assert_protected`], which checks a
//! list of routes against the registry without serving anything.
//!
//! ```
//! use axum::{routing::post, Router};
//! use idempotent_axum::enforce::Enforce;
//!
//! async fn search() -> &'static str { "[]" }
//! let app: Router = Router::new().route("/search", post(search)).layer(Enforce::warn());
//! ```
//!
//! Protected and exempt handlers are recognised by the method and path of their registry
//! record, so on axum each of them needs `route = "METHOD /path"` in its attribute, with the path
//! written exactly as given to `Router::route` (`/payments/{id}`). Building an [`Enforce`] logs
//! every axum handler without one (an error under [`Mode::Refuse`], whose requests it would refuse).

use crate::capture::problem_response;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use idempotent_core::problem::{Problem, ProblemKind};
use idempotent_core::registry::{self, Framework, RouteRecord};
pub use idempotent_core::registry::{MutatingMethods, Unprotected};
use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What [`Enforce`] does with a request to an unprotected, non-exempt mutating route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve it and log one warning per route.
    Warn,
    /// Answer 500 problem+json without running the handler.
    Refuse,
}

/// The enforcement layer: `router.layer(Enforce::warn())`. Cheap to clone.
///
/// Add it with `Router::layer` (not `route_layer` on a sub-router only) so that it sees every
/// route; requests that match no route are passed through untouched.
#[derive(Debug, Clone)]
pub struct Enforce {
    mode: Mode,
    methods: MutatingMethods,
    records: Arc<[&'static RouteRecord]>,
    warned: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Enforce {
    /// Enforcement in `mode` against the axum routes of the registry, `POST` and `PATCH` counted
    /// as mutating.
    pub fn new(mode: Mode) -> Self {
        Self::with_records(mode, registry::routes_of(Framework::Axum))
    }

    /// Serve unprotected mutating routes, warning once per route.
    pub fn warn() -> Self {
        Self::new(Mode::Warn)
    }

    /// Refuse unprotected mutating routes with 500 problem+json.
    pub fn refuse() -> Self {
        Self::new(Mode::Refuse)
    }

    /// Enforcement against `records` instead of the registry.
    pub fn with_records(mode: Mode, records: Vec<&'static RouteRecord>) -> Self {
        for r in records.iter().filter(|r| r.route().is_none()) {
            let message = "#[idempotent] handler has no `route = \"METHOD /path\"`: enforcement cannot match it \
                           and treats its route as unprotected";
            match mode {
                Mode::Refuse => tracing::error!(handler = r.handler, file = r.file, line = r.line, "{message}"),
                Mode::Warn => tracing::warn!(handler = r.handler, file = r.file, line = r.line, "{message}"),
            }
        }
        Self { mode, methods: MutatingMethods::default(), records: records.into(), warned: Arc::default() }
    }

    /// Which methods count as mutating (default [`MutatingMethods::POST_PATCH`]).
    pub fn methods(self, methods: MutatingMethods) -> Self {
        Self { methods, ..self }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether a request to `method` + `path` (a matched route path) is unprotected and not exempt.
    pub fn is_unprotected(&self, method: &str, path: &str) -> bool {
        self.methods.contains(method) && !registry::covers(&self.records, method, path)
    }

    /// `None` to serve the request, `Some(response)` to refuse it.
    fn check(&self, request: &Request) -> Option<Response> {
        let path = request.extensions().get::<MatchedPath>()?.as_str();
        let method = request.method().as_str();
        if !self.is_unprotected(method, path) {
            return None;
        }
        let unprotected = Unprotected { method: method.to_owned(), path: path.to_owned() };
        match self.mode {
            Mode::Warn => {
                let first = self
                    .warned
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert((unprotected.method.clone(), unprotected.path.clone()));
                if first {
                    tracing::warn!(method, path, "{unprotected}");
                }
                None
            }
            Mode::Refuse => {
                tracing::error!(method, path, "refused: {unprotected}");
                Some(problem_response(&Problem::new(
                    ProblemKind::Misconfigured,
                    format!(
                        "{method} {path} changes state but has no idempotency policy, and this server refuses such \
                         routes; this is a server configuration bug."
                    ),
                )))
            }
        }
    }
}

impl<S> tower_layer::Layer<S> for Enforce {
    type Service = EnforceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnforceService { enforce: self.clone(), inner }
    }
}

/// The service [`Enforce`] wraps each route in.
#[derive(Debug, Clone)]
pub struct EnforceService<S> {
    enforce: Enforce,
    inner: S,
}

impl<S> tower_service::Service<Request> for EnforceService<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(refused) = self.enforce.check(&request) {
            return Box::pin(std::future::ready(Ok(refused)));
        }
        // The clone that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(ready.call(request))
    }
}

/// The mutating routes among `routes` (`(method, path)` as given to `Router::route`) that no
/// axum `#[idempotent]` handler protects or exempts, `POST` and `PATCH` counted as mutating.
pub fn unprotected(routes: &[(&str, &str)]) -> Vec<Unprotected> {
    unprotected_with(routes, MutatingMethods::default())
}

/// [`unprotected`] with a choice of mutating methods.
pub fn unprotected_with(routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    registry::check_routes(&registry::routes_of(Framework::Axum), routes, methods)
}

/// Test helper: panics, listing each one, when a mutating route among `routes` is neither
/// protected nor exempt.
///
/// ```should_panic
/// idempotent_axum::enforce::assert_protected(&[("GET", "/payments"), ("POST", "/refunds")]);
/// ```
#[track_caller]
pub fn assert_protected(routes: &[(&str, &str)]) {
    assert_protected_with(routes, MutatingMethods::default());
}

/// [`assert_protected`] with a choice of mutating methods.
#[track_caller]
pub fn assert_protected_with(routes: &[(&str, &str)], methods: MutatingMethods) {
    let missing = unprotected_with(routes, methods);
    if !missing.is_empty() {
        let lines: Vec<String> = missing.iter().map(|u| format!("  - {u}")).collect();
        panic!("{} mutating route(s) without an idempotency policy:\n{}", missing.len(), lines.join("\n"));
    }
}
