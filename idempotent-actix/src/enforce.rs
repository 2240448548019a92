//! Enforcement: making a mutating route without an idempotency policy visible, or refusing it.
//!
//! The [`Enforce`] middleware (`App::new().wrap(Enforce::warn())`) reads each request's method
//! and matched route pattern ([`ServiceRequest::match_pattern`]) and compares them with the route
//! registry. A request to a mutating route (`POST`, `PATCH`, and `PUT`/`DELETE` when configured,
//! see [`MutatingMethods`]) that no `#[idempotent]` handler protects or exempts is, depending on
//! the [`Mode`]:
//! - [`Mode::Warn`]: served, with one `tracing` warning per route for the life of the middleware;
//! - [`Mode::Refuse`]: answered `500 application/problem+json`
//!   (`urn:idempotent:problem:misconfigured`) before the handler runs.
//!
//! Handlers are recognised by the method and path of their registry record: the macro reads them
//! from the routing attribute (`#[post("/payments")]`) or from `route = "METHOD /path"`. The path
//! must be the full pattern the request matches, so a handler mounted under `web::scope("/api")`
//! needs `route = "POST /api/payments"`. [`assert_protected`] checks a list of routes in a test.

use crate::capture::problem_response;
use actix_web::body::EitherBody;
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use futures_util::future::LocalBoxFuture;
pub use idempotent_core::enforce::{Enforcer, Mode, MutatingMethods, Unprotected};
use idempotent_core::registry::{Framework, RouteRecord};
use std::future::{ready, Ready};

/// The enforcement middleware: `App::new().wrap(Enforce::warn())`. Cheap to clone; its decisions (and the
/// methods it counts as mutating, [`Mode`], `is_unprotected`) are those of the framework-free
/// [`Enforcer`] it derefs to.
#[derive(Debug, Clone)]
pub struct Enforce(Enforcer);

impl Enforce {
    /// Enforcement in `mode` against the actix routes of the registry, `POST` and `PATCH`
    /// counted as mutating.
    pub fn new(mode: Mode) -> Self {
        Self(Enforcer::new(mode, Framework::Actix))
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

impl<S, B> Transform<S, ServiceRequest> for Enforce
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = EnforceMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(EnforceMiddleware { enforce: self.clone(), service }))
    }
}

/// The service [`Enforce`] wraps an application in.
#[derive(Debug)]
pub struct EnforceMiddleware<S> {
    enforce: Enforce,
    service: S,
}

impl<S, B> Service<ServiceRequest> for EnforceMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let refused = request.match_pattern().and_then(|path| self.enforce.check(request.method().as_str(), &path));
        if let Some(problem) = refused {
            let response = problem_response(&problem);
            return Box::pin(ready(Ok(request.into_response(response).map_into_right_body())));
        }
        let future = self.service.call(request);
        Box::pin(async move { future.await.map(ServiceResponse::map_into_left_body) })
    }
}

/// The mutating routes among `routes` (`(method, full route pattern)`) that no actix
/// `#[idempotent]` handler protects or exempts, `POST` and `PATCH` counted as mutating.
pub fn unprotected(routes: &[(&str, &str)]) -> Vec<Unprotected> {
    unprotected_with(routes, MutatingMethods::default())
}

/// [`unprotected`] with a choice of mutating methods.
pub fn unprotected_with(routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    idempotent_core::enforce::unprotected(Framework::Actix, routes, methods)
}

/// Test helper: panics, listing each one, when a mutating route among `routes` is neither
/// protected nor exempt.
#[track_caller]
pub fn assert_protected(routes: &[(&str, &str)]) {
    idempotent_core::enforce::assert_protected(Framework::Actix, routes, MutatingMethods::default());
}
