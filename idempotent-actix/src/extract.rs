//! The extractors `#[idempotent]` adds to a handler.

use crate::runtime::{reply, runtime_of, Head, Request};
use crate::{Context, Protected};
use actix_web::dev::Payload;
use actix_web::error::InternalError;
use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use idempotent_core::enforce::Gate;
use idempotent_core::protocol::{self, Incoming};
use std::future::{ready, Ready};
use std::sync::Arc;

impl<T, const BODY: bool> FromRequest for Protected<T, BODY>
where
    T: FromRequest + 'static,
    T::Future: 'static,
{
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, actix_web::Error>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        if let Some(gate) = request.extensions().get::<Arc<Gate>>() {
            gate.open_protected();
        }
        let request = request.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let mut bytes = Bytes::new();
            if BODY {
                // Another extractor (an unmarked `Option<Json<T>>`, `Either`...) took the payload.
                if matches!(payload, Payload::None) && protocol::declares_body(&Head(request.headers())) {
                    let response = reply(protocol::body_taken());
                    return Err(
                        InternalError::from_response("request body taken by another extractor", response).into()
                    );
                }
                bytes = web::Bytes::from_request(&request, &mut payload).await.map_err(|e| {
                    let too_large = e.as_response_error().status_code().as_u16() == 413;
                    let problem = reply(protocol::body_problem(too_large, &e));
                    InternalError::from_response(e.to_string(), problem)
                })?;
                payload = Payload::from(bytes.clone());
            }
            let incoming = incoming(&request, bytes);
            let runtime = runtime_of(&request);
            // The caller is read now, before the body extractor runs (see `protocol::Context`).
            let actor = request.extensions().get::<idempotent_core::actor::Actor>().cloned();
            let inner = match T::from_request(&request, &mut payload).await {
                Ok(inner) => inner,
                Err(e) => {
                    let e: actix_web::Error = e.into();
                    let status = e.as_response_error().status_code().as_u16();
                    let problem =
                        runtime.as_ref().and_then(|r| protocol::rejection(r.config(), status, &e.to_string()));
                    return Err(match problem {
                        Some(problem) => InternalError::from_response(e.to_string(), reply(problem)).into(),
                        None => e,
                    });
                }
            };
            Ok(Self { context: Context::new(incoming, runtime, Request(request), actor), inner })
        })
    }
}

fn incoming(request: &HttpRequest, body: Bytes) -> Incoming {
    let content_type = request.headers().get(CONTENT_TYPE).map(|v| v.as_bytes());
    let route = request.match_pattern();
    let mut incoming = Incoming::new(request.method().as_str(), route.as_deref())
        .query(Some(request.query_string()))
        .body(content_type, body);
    for (name, value) in request.match_info().iter() {
        incoming = incoming.param_partly_encoded(name, value);
    }
    incoming
}

/// The first extractor of an `#[idempotent(exempt = "..")]` handler: tells enforcement that this
/// handler serves the route; nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Exempt;

impl FromRequest for Exempt {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        if let Some(gate) = request.extensions().get::<Arc<Gate>>() {
            gate.open_exempt();
        }
        ready(Ok(Exempt))
    }
}

impl FromRequest for crate::Fence {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(_: &HttpRequest, _: &mut Payload) -> Self::Future {
        // The claim is found inside the handler, which runs under it.
        ready(Ok(crate::Fence::default()))
    }
}

impl FromRequest for crate::Tx {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(_: &HttpRequest, _: &mut Payload) -> Self::Future {
        // What it locks is found inside the handler, which runs in the engine's transaction.
        ready(Ok(crate::Tx::default()))
    }
}
