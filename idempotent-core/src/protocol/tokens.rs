//! Minting server-issued tokens (see [`crate::issued`]), written once for every adapter: the
//! JSON endpoint `POST /_idempotency/tokens` for scripts, and [`Minter`], what an adapter's
//! extractor hands a handler that renders a form.

use super::status::{json, no_store, rfc3339, runtime_missing};
use super::{identify_actor, problem_response, Transport};
use crate::actor::ActorMissing;
use crate::engine::Runtime;
use crate::issued::IssuedToken;
use crate::problem::{Problem, ProblemKind};
use bytes::Bytes;
use http::Response;

/// What mints tokens for one request's caller: the runtime installed where the request was
/// routed and the caller, known by the same rule as on a protected route ([`identify_actor`]).
#[derive(Debug, Clone)]
pub struct Minter {
    runtime: Option<Runtime>,
    actor: Result<Option<String>, ActorMissing>,
}

impl Minter {
    /// The minter of a transport's request.
    pub fn of<T: Transport>(request: &T) -> Self {
        let runtime = request.runtime();
        let actor = match &runtime {
            Some(runtime) => identify_actor(runtime.config(), request, request.actor().as_ref()),
            None => Ok(None),
        };
        Self { runtime, actor }
    }

    /// A fresh token for this caller on `scope`, recorded as issued ([`Runtime::mint`]); a
    /// problem when the caller is unknown (401), the scope takes no tokens (404), the caller's
    /// quota is used up (429), the store fails (503) or no runtime is installed (500).
    pub async fn mint(&self, scope: &str) -> Result<IssuedToken, Problem> {
        let Some(runtime) = &self.runtime else {
            tracing::error!(scope, "a token was asked for where no idempotency runtime is installed");
            return Err(Problem::new(
                ProblemKind::Misconfigured,
                "The server has no idempotency runtime installed here; this is a server configuration bug.",
            ));
        };
        let actor = match &self.actor {
            Ok(actor) => actor.as_deref(),
            Err(e) => {
                return Err(Problem::new(
                    ProblemKind::ActorMissing,
                    format!("{e}: a form token is issued to a known caller only."),
                ))
            }
        };
        runtime.mint(scope, actor).await
    }
}

/// `POST /_idempotency/tokens` with the body `{"scope": "checkout.create"}`: 201
/// `{"scope", "token", "expires_at"}` (RFC 3339, UTC), a token for the caller to send as the
/// route's form field or header; problem+json otherwise: 400 for a body that is not such JSON,
/// 401, 404 for a scope no route declares `key = issued(..)`, 429, 503 (see [`Minter::mint`]).
/// Never cached (`Cache-Control: no-store`).
pub async fn mint_of<T: Transport>(request: &T, body: &[u8]) -> Response<Bytes> {
    if request.runtime().is_none() {
        return runtime_missing();
    }
    let scope = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("scope").and_then(|s| s.as_str()).map(str::to_owned));
    let Some(scope) = scope else {
        return no_store(problem_response(&Problem::new(
            ProblemKind::BodyUnreadable,
            "Send a JSON object naming the form's scope: {\"scope\": \"checkout.create\"}. Nothing was minted.",
        )));
    };
    match Minter::of(request).mint(&scope).await {
        Ok(token) => no_store(json(
            201,
            &serde_json::json!({ "scope": scope, "token": token.token, "expires_at": rfc3339(token.expires_at) }),
        )),
        Err(problem) => no_store(problem_response(&problem)),
    }
}
