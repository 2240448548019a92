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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Config, StartupError};
    use crate::key::IdempotencyKey;
    use crate::policy::{Identity, KeyRequirement, KeySource, Part, Policy, TokenField};
    use crate::protocol::{accepts_html, respond, Caller, Incoming};
    use crate::registry::{Framework, RouteRecord};
    use crate::store::MemoryStore;
    use http_body_util::{BodyExt, Full};
    use std::sync::Arc;
    use std::time::Duration;

    static ISSUED: Policy = Policy {
        key_source: KeySource::Issued { ttl: Duration::from_secs(900), from: TokenField::Form("_idem") },
        identity: Identity { body: Part::Omitted, ..Identity::WHOLE },
        ..Policy::new("tokens.unit")
    };

    // Registered for the actix-web framework, which no other test of this crate starts.
    inventory::submit! {
        RouteRecord::protected(ISSUED, "tokens::tests::h", file!(), line!(), Framework::Actix)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn runtime(quota: usize) -> Runtime {
        let config = Config {
            tokens: Some(crate::issued::TokenKey::new(b"unit secret")),
            token_quota: quota,
            problem_page: Some(crate::engine::ProblemPage(Arc::new(|p: &Problem| format!("<p>{}</p>", p.status)))),
            ..Config::default()
        };
        Runtime::new(Arc::new(MemoryStore::new()), config)
    }

    async fn submit(rt: &Runtime, actor: &str, token: &str, html: bool) -> (u16, String) {
        let caller =
            Caller { key: IdempotencyKey::parse(token.as_bytes()).map(Some), actor: Ok(Some(actor.to_owned())), html };
        let fp = Incoming::new("POST", Some("/t")).fingerprint(&ISSUED, Ok);
        let response =
            respond(rt, &ISSUED, caller, fp, async { http::Response::new(Full::new(Bytes::from_static(b"ran"))) })
                .await;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn a_minted_token_is_the_key_of_its_caller_only() {
        block_on(async {
            let rt = runtime(10);
            let token = rt.mint("tokens.unit", Some("alice")).await.unwrap();
            assert_eq!(submit(&rt, "alice", &token.token, false).await, (200, "ran".into()));
            let (status, body) = submit(&rt, "mallory", &token.token, false).await;
            assert_eq!(status, 403);
            assert!(body.contains("token-forbidden"), "{body}");
            assert_eq!(submit(&rt, "mallory", &token.token, true).await, (403, "<p>403</p>".into()), "a page");
            // The same secret on another runtime: the MAC holds, but its store never issued it.
            let other = runtime(10);
            let (status, body) = submit(&other, "alice", &token.token, false).await;
            assert_eq!(status, 400);
            assert!(body.contains("no longer known"), "{body}");
        });
    }

    #[test]
    fn minting_refuses_other_scopes_a_missing_secret_and_a_full_quota() {
        block_on(async {
            let rt = runtime(2);
            let unknown = rt.mint("payments.create", Some("alice")).await.unwrap_err();
            assert_eq!((unknown.status, unknown.type_uri), (404, "urn:idempotent:problem:scope-not-issued"));
            assert!(rt.mint("tokens.unit", Some("alice")).await.is_ok());
            assert!(rt.mint("tokens.unit", Some("alice")).await.is_ok());
            let over = rt.mint("tokens.unit", Some("alice")).await.unwrap_err();
            assert_eq!((over.status, over.retry_after.is_some()), (429, true));
            assert!(rt.mint("tokens.unit", Some("bob")).await.is_ok(), "bob has his own share");
            let bare = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
            assert_eq!(bare.mint("tokens.unit", None).await.unwrap_err().status, 500);
        });
    }

    #[test]
    fn a_runtime_with_issued_routes_needs_a_token_secret() {
        let refused = Runtime::start(Arc::new(MemoryStore::new()), Config::default(), Framework::Actix).unwrap_err();
        assert!(matches!(&refused, StartupError::TokenSecretMissing { routes } if routes[0].contains("tokens.unit")));
        assert!(refused.to_string().contains(".token_secret(..)"), "{refused}");
        let config = Config { tokens: Some(crate::issued::TokenKey::new(b"s")), ..Config::default() };
        assert!(Runtime::start(Arc::new(MemoryStore::new()), config, Framework::Actix).is_ok());
    }

    #[test]
    fn the_registry_refuses_tokens_that_outlive_their_outcome_or_are_optional() {
        let issued = |ttl: u64, token: u64, key: KeyRequirement| Policy {
            ttl: Duration::from_secs(ttl),
            key,
            key_source: KeySource::Issued { ttl: Duration::from_secs(token), from: TokenField::Header("x-t") },
            ..Policy::new("tokens.checked")
        };
        let errors = |p: Policy| {
            let record = RouteRecord::protected(p, "h", "f.rs", 1, Framework::Axum);
            crate::registry::validate(&[&record])
                .err()
                .unwrap_or_default()
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        };
        assert!(errors(issued(3600, 900, KeyRequirement::Required)).is_empty());
        assert!(errors(issued(600, 900, KeyRequirement::Required))[0].contains("make ttl at least the token's ttl"));
        assert!(errors(issued(3600, 0, KeyRequirement::Required))[0].contains("ttl is zero"));
        assert!(errors(issued(3600, 900, KeyRequirement::Optional))[0].contains("cannot be optional"));
    }

    #[test]
    fn the_token_is_read_from_a_form_body_once() {
        let form = |body: &'static str, content_type: &'static [u8]| {
            Incoming::new("POST", None)
                .body(Some(content_type), Bytes::from_static(body.as_bytes()))
                .form_field("_idem")
        };
        let urlencoded = b"application/x-www-form-urlencoded; charset=utf-8".as_slice();
        assert_eq!(form("a=1&_idem=abc", urlencoded).unwrap().unwrap().as_str(), "abc");
        assert_eq!(form("a=1", urlencoded).unwrap(), None);
        assert_eq!(form("_idem=abc", b"application/json").unwrap(), None, "not a form");
        assert_eq!(form("_idem=a&_idem=b", urlencoded).unwrap_err(), crate::key::KeyError::Repeated);
        assert_eq!(form("_idem=", urlencoded).unwrap_err(), crate::key::KeyError::Empty);
    }

    #[test]
    fn browsers_are_told_by_their_accept_header() {
        let head = |accept: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert("accept", accept.parse().unwrap());
            h
        };
        assert!(accepts_html(&head("text/html,application/xhtml+xml,*/*;q=0.8")));
        assert!(accepts_html(&head("Text/HTML; q=0.9")));
        assert!(!accepts_html(&head("application/json")));
        assert!(!accepts_html(&head("*/*")));
        assert!(!accepts_html(&http::HeaderMap::new()));
    }
}
