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
use idempotent_core::protocol::{problem_response, Gate, GatedBody, Problem};
use std::future::{ready, Ready};
use std::rc::Rc;
use std::sync::Arc;

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
        ready(Ok(EnforceMiddleware { enforce: self.clone(), service: Rc::new(service) }))
    }
}

/// The service [`Enforce`] wraps an application in.
#[derive(Debug)]
pub struct EnforceMiddleware<S> {
    enforce: Enforce,
    service: Rc<S>,
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
        let method = request.method().as_str().to_owned();
        let route = request.match_pattern();
        let service = self.service.clone();
        let serve = move |mut request: ServiceRequest, gate: Option<Arc<Gate>>| {
            if let Some(gate) = gate {
                request.extensions_mut().insert(gate.clone());
                let held = GatedBody::new(gate, request.take_payload()).map(|chunk| {
                    chunk.map_err(|e| e.unwrap_or_else(|held| PayloadError::Io(std::io::Error::other(held))))
                });
                let held: std::pin::Pin<Box<dyn futures_util::Stream<Item = _>>> = Box::pin(held);
                request.set_payload(Payload::from(held));
            }
            let response = service.call(request);
            async move { response.await.map(ServiceResponse::map_into_left_body) }
        };
        let status = |response: &Result<Self::Response, _>| response.as_ref().map_or(500, |r| r.status().as_u16());
        let refuse = |problem: &Problem, answered: Result<Result<Self::Response, _>, ServiceRequest>| {
            let request = match answered {
                Ok(response) => response?.request().clone(),
                Err(request) => request.request().clone(),
            };
            Ok(ServiceResponse::new(request, reply(problem_response(problem))).map_into_right_body())
        };
        Box::pin(self.enforce.0.clone().serve((method, route), request, serve, status, refuse))
    }
}
