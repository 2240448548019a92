//! Enforcement: making a mutating route without an idempotency policy visible, or refusing it.
//!
//! `router.layer(Enforce::refuse())` (or [`Enforce::warn`]) wraps every route of the router,
//! nested routers included. It recognises a protected or exempt handler by what its generated
//! code does on the first request that reaches it, never by a path written in the attribute, so
//! `Router::nest("/v1", ..)` and routes added any other way need nothing more. See
//! [`idempotent_core::enforce`] for how, and for the one case refuse mode cannot stop before it
//! runs (a mutating handler that reads no body, on its first request).
//!
//! ```
//! use axum::{routing::post, Router};
//! use idempotent_axum::enforce::Enforce;
//!
//! async fn search() -> &'static str { "[]" }
//! let app: Router = Router::new().route("/search", post(search)).layer(Enforce::warn());
//! ```

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use idempotent_core::enforce::{Decision, GatedBody};
pub use idempotent_core::enforce::{Enforcer, Learned, Mode, MutatingMethods, Unprotected};
use idempotent_core::protocol::problem_response;
use idempotent_core::registry::Framework;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The enforcement layer: `router.layer(Enforce::warn())`. Cheap to clone; clones share what
/// they learned. Its decisions are those of the framework-free [`Enforcer`] it derefs to.
#[derive(Debug, Clone)]
pub struct Enforce(Enforcer);

impl Enforce {
    /// Enforcement in `mode`, `POST` and `PATCH` counted as mutating.
    pub fn new(mode: Mode) -> Self {
        Self(Enforcer::new(mode))
    }

    /// Serve unprotected mutating routes, warning once per route.
    pub fn warn() -> Self {
        Self::new(Mode::Warn)
    }

    /// Refuse unprotected mutating routes with 500 problem+json.
    pub fn refuse() -> Self {
        Self::new(Mode::Refuse)
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
        // The clone that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let Some(route) = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()) else {
            return Box::pin(ready.call(request));
        };
        let method = request.method().clone();
        match self.enforce.before(method.as_str(), &route) {
            Decision::Serve => Box::pin(ready.call(request)),
            Decision::Refuse(problem) => Box::pin(std::future::ready(Ok(problem_response(&problem).map(Body::from)))),
            Decision::Gate(gate) => {
                let (mut parts, body) = request.into_parts();
                parts.extensions.insert(gate.clone());
                let request = Request::from_parts(parts, Body::new(GatedBody::new(gate.clone(), body)));
                let enforcer = self.enforce.0.clone();
                let response = ready.call(request);
                Box::pin(async move {
                    let response = response.await?;
                    Ok(match enforcer.after(method.as_str(), &route, &gate) {
                        Some(problem) => problem_response(&problem).map(Body::from),
                        None => response,
                    })
                })
            }
        }
    }
}

/// The mutating routes among `routes` (`(method, path)`) that no axum `#[idempotent]` handler
/// declaring that route (`route = ".."`) protects or exempts, `POST` and `PATCH` counted as
/// mutating. A test helper for routes declared in attributes; the [`Enforce`] layer needs no
/// declaration.
pub fn unprotected(routes: &[(&str, &str)]) -> Vec<Unprotected> {
    unprotected_with(routes, MutatingMethods::default())
}

/// [`unprotected`] with a choice of mutating methods.
pub fn unprotected_with(routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    idempotent_core::enforce::unprotected_routes(Framework::Axum, routes, methods)
}

/// Test helper: panics, listing each one, when a mutating route among `routes` is neither
/// protected nor exempt by a handler that declares it.
///
/// ```should_panic
/// idempotent_axum::enforce::assert_protected(&[("GET", "/payments"), ("POST", "/refunds")]);
/// ```
#[track_caller]
pub fn assert_protected(routes: &[(&str, &str)]) {
    idempotent_core::enforce::assert_protected(Framework::Axum, routes, MutatingMethods::default());
}
