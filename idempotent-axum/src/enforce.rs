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
pub use idempotent_core::enforce::{Enforcer, Mode, MutatingMethods, Unprotected};
use idempotent_core::registry::{Framework, RouteRecord};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The enforcement layer: `router.layer(Enforce::warn())`. Cheap to clone; its decisions (and the
/// methods it counts as mutating, [`Mode`], `is_unprotected`) are those of the framework-free
/// [`Enforcer`] it derefs to.
#[derive(Debug, Clone)]
pub struct Enforce(Enforcer);

impl Enforce {
    /// Enforcement in `mode` against the axum routes of the registry, `POST` and `PATCH`
    /// counted as mutating.
    pub fn new(mode: Mode) -> Self {
        Self(Enforcer::new(mode, Framework::Axum))
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
        Self(Enforcer::with_records(mode, records))
    }

    /// Which methods count as mutating (default [`MutatingMethods::POST_PATCH`]).
    pub fn methods(self, methods: MutatingMethods) -> Self {
        Self(self.0.methods(methods))
    }
}

impl std::ops::Deref for Enforce {
    type Target = Enforcer;

    fn deref(&self) -> &Enforcer {
        &self.0
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
        let refused = request
            .extensions()
            .get::<MatchedPath>()
            .and_then(|path| self.enforce.check(request.method().as_str(), path.as_str()));
        if let Some(problem) = refused {
            return Box::pin(std::future::ready(Ok(problem_response(&problem))));
        }
        // The clone that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(ready.call(request))
    }
}

/// The mutating routes among `routes` (`(method, path as given to `Router::route`)`) that no axum
/// `#[idempotent]` handler protects or exempts, `POST` and `PATCH` counted as mutating.
pub fn unprotected(routes: &[(&str, &str)]) -> Vec<Unprotected> {
    unprotected_with(routes, MutatingMethods::default())
}

/// [`unprotected`] with a choice of mutating methods.
pub fn unprotected_with(routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    idempotent_core::enforce::unprotected(Framework::Axum, routes, methods)
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
    idempotent_core::enforce::assert_protected(Framework::Axum, routes, methods);
}
