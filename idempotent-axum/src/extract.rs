//! The extractors `#[idempotent]` adds to a handler.

use crate::{Context, Protected};
use axum::body::{Body, Bytes};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::response::{IntoResponse, Response};
use axum::RequestExt;
use http::request::Parts;
use http_body_util::BodyExt;
use idempotent_core::actor::Actor;
use idempotent_core::enforce::Gate;
use idempotent_core::engine::Runtime;
use idempotent_core::protocol::{self, Incoming};
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
        if let Some(gate) = request.extensions().get::<Arc<Gate>>() {
            gate.open_protected();
        }
        if !BODY {
            let (mut parts, body) = request.into_parts();
            let context = context(&mut parts, state, Bytes::new()).await?;
            let rejection = match T::from_request(Request::from_parts(parts, body), state).await {
                Ok(inner) => return Ok(Self { context, inner }),
                Err(rejection) => rejection.into_response(),
            };
            return Err(rejected(&context, rejection).await);
        }
        let (mut parts, body) = request.with_limited_body().into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let too_large = source_is::<http_body_util::LengthLimitError>(&e);
                return Err(protocol::body_problem(too_large, &e).map(Body::from));
            }
        };
        let context = context(&mut parts, state, bytes.clone()).await?;
        let rejection = match T::from_request(Request::from_parts(parts, Body::from(bytes)), state).await {
            Ok(inner) => return Ok(Self { context, inner }),
            Err(rejection) => rejection.into_response(),
        };
        Err(rejected(&context, rejection).await)
    }
}

/// The request's context, read before the body extractor runs (see [`protocol::Context`] for
/// where the caller is read).
async fn context<S: Send + Sync>(parts: &mut Parts, state: &S, body: Bytes) -> Result<Context, Response> {
    let route = parts.extensions.get::<MatchedPath>().map(MatchedPath::as_str);
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes());
    let mut incoming = Incoming::new(parts.method.as_str(), route).query(parts.uri.query()).body(content_type, body);
    // A route without parameters has none to add; a parameter that is not UTF-8 once decoded is
    // the client's error (400, from axum), never a reason to leave the path out of the identity.
    match RawPathParams::from_request_parts(parts, state).await {
        Ok(params) => {
            for (name, value) in &params {
                incoming = incoming.param(name, value);
            }
        }
        Err(RawPathParamsRejection::MissingPathParams(_)) => {}
        Err(rejection) => return Err(rejection.into_response()),
    }
    let runtime = parts.extensions.get::<Runtime>().cloned();
    let actor = parts.extensions.get::<Actor>().cloned();
    Ok(Context::new(incoming, runtime, parts.headers.clone(), actor))
}

/// The body extractor's rejection, as the runtime's settings want it answered
/// ([`protocol::rejection`]).
async fn rejected(context: &Context, rejection: Response) -> Response {
    let status = rejection.status().as_u16();
    let Some(config) = context.runtime().map(Runtime::config).filter(|c| protocol::maps_rejection(c, status)) else {
        return rejection;
    };
    let message = axum::body::to_bytes(rejection.into_body(), 64 * 1024).await.unwrap_or_default();
    let problem = protocol::rejection(config, status, &String::from_utf8_lossy(&message));
    problem
        .map_or_else(|| http::StatusCode::from_u16(status).unwrap_or_default().into_response(), |p| p.map(Body::from))
}

fn source_is<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

impl<S: Send + Sync> FromRequestParts<S> for crate::Tx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // What it locks is found inside the handler, which runs in the engine's transaction.
        Ok(crate::Tx::default())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for crate::Fence {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The claim is found inside the handler, which runs under it.
        Ok(crate::Fence::default())
    }
}

/// The first extractor of an `#[idempotent(exempt = "..")]` handler: tells enforcement that this
/// handler serves the route; nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Exempt;

impl<S: Send + Sync> FromRequestParts<S> for Exempt {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(gate) = parts.extensions.get::<Arc<Gate>>() {
            gate.open_exempt();
        }
        Ok(Exempt)
    }
}
