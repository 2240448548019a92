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
use idempotent_core::protocol::{problem_response, Gate, GatedBody, Problem};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

idempotent_core::__adapter_enforce!(Axum, "router.layer(Enforce::warn())");

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
        let method = request.method().as_str().to_owned();
        let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
        let serve = move |request: Request, gate: Option<Arc<Gate>>| match gate {
            None => ready.call(request),
            Some(gate) => {
                let (mut parts, body) = request.into_parts();
                parts.extensions.insert(gate.clone());
                ready.call(Request::from_parts(parts, Body::new(GatedBody::new(gate, body))))
            }
        };
        let status = |response: &Result<Response, Infallible>| response.as_ref().map_or(500, |r| r.status().as_u16());
        let refuse = |problem: &Problem, _| Ok(problem_response(problem).map(Body::from));
        Box::pin(self.enforce.0.clone().serve((method, route), request, serve, status, refuse))
    }
}
