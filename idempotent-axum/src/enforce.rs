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
use idempotent_core::protocol::{problem_response, Decision, GatedBody};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
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
        let judged = self.enforce.judges(request.method().as_str());
        let route = request.extensions().get::<MatchedPath>().filter(|_| judged).map(|m| m.as_str().to_owned());
        let Some(route) = route else {
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
                    Ok(match enforcer.after(method.as_str(), &route, &gate, response.status().as_u16()) {
                        Some(problem) => problem_response(&problem).map(Body::from),
                        None => response,
                    })
                })
            }
        }
    }
}
