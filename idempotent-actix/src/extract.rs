//! The extractors `#[idempotent]` adds to a handler, and the request as the protocol reads it.

use crate::runtime::{reply, runtime_of, Request};
use crate::{Context, Protected};
use actix_web::dev::Payload;
use actix_web::error::{InternalError, PayloadError};
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use idempotent_core::protocol::{self, transport, Actor, Gate, Incoming, Runtime, Transport};
use std::borrow::Cow;
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
        let request = Request(request.clone());
        transport::open(&request);
        let mut payload = payload.take();
        Box::pin(async move {
            let mut bytes = Bytes::new();
            if BODY {
                // Another extractor (an unmarked `Option<Json<T>>`, `Either`...) took the payload.
                if matches!(payload, Payload::None) && protocol::declares_body(&request) {
                    let response = reply(protocol::body_taken());
                    return Err(
                        InternalError::from_response("request body taken by another extractor", response).into()
                    );
                }
                // Read under the route's `PayloadConfig` limit, decoded if the application decodes
                // request bodies; the body extractor gets the bytes as they came, and decodes them
                // itself under the request's `Content-Encoding`.
                let tee = transport::encoded(&request).then(|| transport::Tee::new(payload.take()));
                let kept = tee.as_ref().map(transport::Tee::kept);
                if let Some(tee) = tee {
                    let tee: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, PayloadError>>>> =
                        Box::pin(tee);
                    payload = Payload::from(tee);
                }
                bytes = web::Bytes::from_request(&request.0, &mut payload).await.map_err(|e| {
                    let too_large = e.as_response_error().status_code().as_u16() == 413;
                    InternalError::from_response(e.to_string(), reply(protocol::body_problem(too_large, &e)))
                })?;
                payload = Payload::from(kept.map_or_else(|| bytes.clone(), |kept| kept.raw()));
            }
            let context = Context::read(&request, bytes);
            match T::from_request(&request.0, &mut payload).await {
                Ok(inner) => Ok(Self { context, inner }),
                Err(e) => {
                    let e: actix_web::Error = e.into();
                    let problem = context.rejected(e.as_response_error().status_code().as_u16(), &e.to_string());
                    Err(match problem {
                        Some(problem) => InternalError::from_response(e.to_string(), reply(problem)).into(),
                        None => e,
                    })
                }
            }
        })
    }
}

impl Transport for Request {
    type Head = Request;

    fn head(&self) -> Request {
        Request(self.0.clone())
    }
    fn method(&self) -> &str {
        self.0.method().as_str()
    }
    fn route(&self) -> Option<Cow<'_, str>> {
        self.0.match_pattern().map(Cow::Owned)
    }
    fn query(&self) -> Option<&str> {
        Some(self.0.query_string())
    }
    fn params(&self, incoming: Incoming) -> Incoming {
        self.0.match_info().iter().fold(incoming, |incoming, (name, value)| incoming.param_partly_encoded(name, value))
    }
    fn runtime(&self) -> Option<Runtime> {
        runtime_of(&self.0)
    }
    fn actor(&self) -> Option<Actor> {
        self.0.extensions().get().cloned()
    }
    fn gate(&self) -> Option<Arc<Gate>> {
        self.0.extensions().get().cloned()
    }
}

/// The first extractor of an `#[idempotent(exempt = "..")]` handler: tells enforcement that this
/// handler serves the route; nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Exempt;

impl FromRequest for Exempt {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        transport::exempt(request.extensions().get());
        ready(Ok(Exempt))
    }
}

impl<T: Default> FromRequest for crate::Scoped<T> {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(_: &HttpRequest, _: &mut Payload) -> Self::Future {
        // What it stands for (the transaction, the claim) is found inside the handler.
        ready(Ok(Self::default()))
    }
}

impl FromRequest for crate::Mint {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Ok(Self(protocol::tokens::Minter::of(&Request(request.clone())))))
    }
}
