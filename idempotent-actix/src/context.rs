//! The extractor the macro adds to every protected handler.

use crate::runtime::Idempotency;
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest};
use idempotent_core::engine::Runtime;
use std::convert::Infallible;
use std::future::{ready, Ready};

/// Per-request idempotency context: the request and the installed runtime.
///
/// Extraction never fails. The key header and the actor are read by
/// [`run`](crate::__private::run), after every extractor of the handler has run, so an
/// authentication extractor anywhere in the argument list can insert an [`Actor`](crate::Actor)
/// into the request's extensions first. Every problem (no runtime, a bad key) is answered by `run`
/// once the route's policy is known.
#[derive(Debug)]
pub struct Context {
    pub(crate) request: HttpRequest,
    pub(crate) runtime: Option<Runtime>,
}

impl FromRequest for Context {
    type Error = Infallible;
    type Future = Ready<Result<Self, Infallible>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let runtime = req.app_data::<Idempotency>().map(|i| i.runtime().clone());
        ready(Ok(Self { request: req.clone(), runtime }))
    }
}
