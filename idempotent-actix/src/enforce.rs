//! Enforcement: making a mutating route without an idempotency policy visible, or refusing it.
//!
//! The [`Enforce`] middleware (`App::new().wrap(Enforce::refuse())`) reads each request's method
//! and matched route pattern ([`ServiceRequest::match_pattern`], scopes included) and recognises a
//! protected or exempt handler by what its generated code does on the first request that reaches
//! it, never by a path written in the attribute, so a handler mounted under `web::scope("/api")`
//! needs nothing more. See [`idempotent_core::enforce`] for how, and for the one case refuse mode
//! cannot stop before it runs (a mutating handler that reads no payload, on its first request).

use crate::runtime::reply;
use actix_web::body::EitherBody;
use actix_web::dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::error::PayloadError;
use actix_web::HttpMessage;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use idempotent_core::protocol::{problem_response, Decision, GatedBody, Problem};
use std::future::{ready, Ready};

idempotent_core::__adapter_enforce!(Actix, "App::new().wrap(Enforce::warn())");

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

fn refused<B>(request: actix_web::HttpRequest, problem: &Problem) -> ServiceResponse<EitherBody<B>> {
    let response = reply(problem_response(problem));
    ServiceResponse::new(request, response).map_into_right_body()
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

    fn call(&self, mut request: ServiceRequest) -> Self::Future {
        let method = request.method().as_str().to_owned();
        let route = if self.enforce.judges(&method) { request.match_pattern() } else { None };
        let decision = route.as_deref().map_or(Decision::Serve, |route| self.enforce.before(&method, route));
        match (decision, route) {
            (Decision::Refuse(problem), _) => Box::pin(ready(Ok(refused(request.request().clone(), &problem)))),
            (Decision::Gate(gate), Some(route)) => {
                request.extensions_mut().insert(gate.clone());
                let held = GatedBody::new(gate.clone(), request.take_payload()).map(|chunk| {
                    chunk.map_err(|e| e.unwrap_or_else(|held| PayloadError::Io(std::io::Error::other(held))))
                });
                let held: std::pin::Pin<Box<dyn futures_util::Stream<Item = _>>> = Box::pin(held);
                request.set_payload(Payload::from(held));
                let enforcer = self.enforce.0.clone();
                let response = self.service.call(request);
                Box::pin(async move {
                    let response = response.await?;
                    Ok(match enforcer.after(&method, &route, &gate, response.status().as_u16()) {
                        Some(problem) => refused(response.request().clone(), &problem),
                        None => response.map_into_left_body(),
                    })
                })
            }
            _ => {
                let response = self.service.call(request);
                Box::pin(async move { response.await.map(ServiceResponse::map_into_left_body) })
            }
        }
    }
}
