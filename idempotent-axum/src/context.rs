//! The extractor the macro adds to every protected handler.

use axum::extract::FromRequestParts;
use http::request::Parts;
use idempotent_core::actor::{Actor, RequestHead};
use idempotent_core::engine::{Runtime, DEFAULT_HEADER};
use idempotent_core::key::{IdempotencyKey, KeyError};
use std::convert::Infallible;

/// Per-request idempotency context: the installed runtime, the parsed key and the actor.
///
/// Extraction never fails; every problem (no runtime, a bad key) is answered by
/// [`run`](crate::__private::run) once the route's policy is known.
#[derive(Debug)]
pub struct Context {
    pub(crate) runtime: Option<Runtime>,
    pub(crate) key: Result<Option<IdempotencyKey>, KeyError>,
    pub(crate) actor: Option<String>,
}

struct Head<'a>(&'a http::HeaderMap);

impl RequestHead for Head<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(|v| v.as_bytes())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Context {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let runtime = parts.extensions.get::<Runtime>().cloned();
        let header = runtime.as_ref().map_or(DEFAULT_HEADER, |r| r.config().header_name.as_str());
        let key = IdempotencyKey::from_header_values(parts.headers.get_all(header).iter().map(|v| v.as_bytes()));
        let actor = match parts.extensions.get::<Actor>() {
            Some(a) => Some(a.0.clone()),
            None => runtime.as_ref().and_then(|r| r.config().actor.resolve(&Head(&parts.headers))),
        };
        Ok(Self { runtime, key, actor })
    }
}
