//! The extractors `#[idempotent]` adds to a handler, and the request as the protocol reads it.

use crate::{Context, Protected};
use axum::body::{Body, Bytes};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::response::{IntoResponse, Response};
use axum::RequestExt;
use http::request::Parts;
use http_body_util::{BodyExt, LengthLimitError};
use idempotent_core::protocol::{transport, Actor, Gate, Incoming, RequestHead, Runtime, Transport};
use std::borrow::Cow;
use std::sync::Arc;

/// Marker of [`Protected`]'s `FromRequest` impl, whatever `T`'s own marker is.
#[derive(Debug)]
pub struct Via<M>(M);

impl<S, T, M, const BODY: bool> FromRequest<S, Via<M>> for Protected<T, BODY>
where
    S: Send + Sync,
    T: FromRequest<S, M>,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let (mut parts, body) = if BODY { request.with_limited_body() } else { request }.into_parts();
        let params = match RawPathParams::from_request_parts(&mut parts, state).await {
            Ok(params) => Some(params),
            // A route without parameters has none; a parameter that is not UTF-8 once decoded
            // is the client's error (400), never a reason to leave the path out of the identity.
            Err(RawPathParamsRejection::MissingPathParams(_)) => None,
            Err(rejection) => return Err(rejection.into_response()),
        };
        let view = View { parts: &parts, params };
        transport::open(&view);
        let (bytes, body) = match BODY {
            true => match body.collect().await {
                Ok(collected) => (collected.to_bytes(), None),
                Err(e) => return Err(transport::unreadable_body::<LengthLimitError>(&e).map(Body::from)),
            },
            false => (Bytes::new(), Some(body)),
        };
        let context = Context::read(&view, bytes.clone());
        let request = Request::from_parts(parts, body.unwrap_or_else(|| Body::from(bytes)));
        let rejection = match T::from_request(request, state).await {
            Ok(inner) => return Ok(Self { context, inner }),
            Err(rejection) => rejection.into_response(),
        };
        let status = rejection.status().as_u16();
        if !context.maps_rejection(status) {
            return Err(rejection);
        }
        let message = axum::body::to_bytes(rejection.into_body(), 64 * 1024).await.unwrap_or_default();
        let problem = context.rejected(status, &String::from_utf8_lossy(&message));
        Err(problem.map_or_else(
            || http::StatusCode::from_u16(status).unwrap_or_default().into_response(),
            |p| p.map(Body::from),
        ))
    }
}

/// A request as the protocol reads it: its head, and the path parameters the router matched.
pub(crate) struct View<'a> {
    pub(crate) parts: &'a Parts,
    pub(crate) params: Option<RawPathParams>,
}

impl RequestHead for View<'_> {
    fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.parts.headers.header_values(name)
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.parts.headers.header(name)
    }
}

impl Transport for View<'_> {
    type Head = http::HeaderMap;

    fn head(&self) -> http::HeaderMap {
        self.parts.headers.clone()
    }
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn route(&self) -> Option<Cow<'_, str>> {
        self.parts.extensions.get::<MatchedPath>().map(|m| m.as_str().into())
    }
    fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }
    fn params(&self, incoming: Incoming) -> Incoming {
        self.params.iter().flatten().fold(incoming, |incoming, (name, value)| incoming.param(name, value))
    }
    fn runtime(&self) -> Option<Runtime> {
        self.parts.extensions.get().cloned()
    }
    fn actor(&self) -> Option<Actor> {
        self.parts.extensions.get().cloned()
    }
    fn gate(&self) -> Option<Arc<Gate>> {
        self.parts.extensions.get().cloned()
    }
}

impl<S: Send + Sync, T: Default> FromRequestParts<S> for crate::Scoped<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // What it stands for (the transaction, the claim) is found inside the handler.
        Ok(Self::default())
    }
}

/// The first extractor of an `#[idempotent(exempt = "..")]` handler: tells enforcement that this
/// handler serves the route; nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Exempt;

impl<S: Send + Sync> FromRequestParts<S> for Exempt {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        transport::exempt(parts.extensions.get());
        Ok(Exempt)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for crate::Mint {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(idempotent_core::protocol::tokens::Minter::of(&View { parts, params: None })))
    }
}
