//! The operator's endpoints: a caller's record (`GET /_idempotency/records/{scope}/{key}`) and
//! the store's health (`GET /healthz`), written once for every adapter.

use super::{identify_actor, problem_response, Transport};
use crate::actor::ActorMissing;
use crate::engine::Runtime;
use crate::key::IdempotencyKey;
use crate::problem::{Problem, ProblemKind};
use crate::registry;
use crate::store::RecordInfo;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use std::time::SystemTime;

/// The status of the caller's own record of `key` on `scope`, for
/// `GET /_idempotency/records/{scope}/{key}`:
///
/// - 200 `{"scope", "key", "state": "in_progress"|"completed", "status"?, "created_at"?,
///   "expires_at"}` (times in RFC 3339, UTC; `status` is the stored response's, for a completed
///   record; for one in progress, `expires_at` is its lease deadline);
/// - 404 problem+json when the caller has no such record: absent, expired, or another caller's,
///   which is never told apart from absent;
/// - 404 for a scope no protected route of this binary declares, before the store is asked;
/// - 400 for a key that no request could have sent, 401 when the configured actor source finds
///   no caller (or its identity header was sent more than once);
/// - 403 when the caller is the anonymous namespace (no actor source, or the `Anonymous` one)
///   and the runtime was not told to show records to anonymous callers
///   ([`Builder::anonymous_record_status`](crate::engine::Builder::anonymous_record_status)):
///   there, every caller is everybody, and the endpoint would tell anyone the state of anyone's
///   key;
/// - 503 when the store does not answer, with a generic detail (the backend's own error goes to
///   the log, never to the caller).
///
/// `actor` is resolved as for a protected route (the application's [`Actor`](crate::actor::Actor)
/// extension first, then the configured source: see [`record_status_of`]), so a caller sees only
/// the records its own requests created. The answer is never cached (`Cache-Control: no-store`).
pub async fn record_status(
    runtime: &Runtime,
    scope: &str,
    key: &str,
    actor: Result<Option<String>, ActorMissing>,
) -> Response<Bytes> {
    no_store(record(runtime, scope, key, actor).await)
}

/// [`record_status`] of a transport's request: its caller known as on a protected route
/// ([`identify_actor`]), [`runtime_missing`] when no runtime is installed where it was routed.
pub async fn record_status_of<T: Transport>(request: &T, scope: &str, key: &str) -> Response<Bytes> {
    let Some(runtime) = request.runtime() else { return runtime_missing() };
    let actor = identify_actor(runtime.config(), request, request.actor().as_ref());
    record_status(&runtime, scope, key, actor).await
}

async fn record(
    runtime: &Runtime,
    scope: &str,
    key: &str,
    actor: Result<Option<String>, ActorMissing>,
) -> Response<Bytes> {
    let actor = match actor {
        Ok(actor) => actor,
        Err(e) => {
            return problem_response(&Problem::new(
                ProblemKind::ActorMissing,
                format!("{}: a record is shown only to the caller that created it.", capitalized(&e.to_string())),
            ))
        }
    };
    if actor.is_none() && !runtime.config().anonymous_record_status {
        return problem_response(&Problem::new(
            ProblemKind::StatusDisabled,
            "This server does not tell its callers apart, so it shows no record's state to anyone.",
        ));
    }
    if !registry::routes().iter().any(|r| r.scope() == Some(scope)) {
        return not_found();
    }
    let key = match IdempotencyKey::parse(key.as_bytes()) {
        Ok(key) => key,
        Err(e) => return problem_response(&Problem::new(ProblemKind::KeyInvalid, format!("Invalid key: {e}."))),
    };
    match runtime.inspect(scope, actor.as_deref(), key.as_str()).await {
        Ok(Some(info)) => json(200, &record_json(scope, key.as_str(), &info)),
        Ok(None) => not_found(),
        Err(e) => {
            tracing::warn!(store = runtime.store().name(), error = %e, "record status: the idempotency store failed");
            store_unavailable(runtime, "The idempotency store could not be asked for this record. Retry later.")
        }
    }
}

fn not_found() -> Response<Bytes> {
    problem_response(&Problem::new(
        ProblemKind::RecordNotFound,
        "No record of yours under this scope and key: it was never used, has expired, or was released.",
    ))
}

/// `text` with its first letter in upper case, to open a sentence.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// The store's health, for `GET /healthz`: 200 `{"status": "ok", "store": name}` when it answers
/// within the store timeout, 503 problem+json (with `Retry-After`) when it does not.
pub async fn health(runtime: &Runtime) -> Response<Bytes> {
    match runtime.health().await {
        Ok(()) => {
            let body = serde_json::json!({ "status": "ok", "store": runtime.store().name() });
            no_store(json(200, &body))
        }
        Err(e) => {
            tracing::warn!(store = runtime.store().name(), error = %e, "health check: the idempotency store does not answer");
            store_unavailable(runtime, "The idempotency store does not answer.")
        }
    }
}

/// [`health`] of the runtime installed where a transport's `request` was routed, or
/// [`runtime_missing`].
pub async fn health_of<T: Transport>(request: &T) -> Response<Bytes> {
    match request.runtime() {
        Some(runtime) => health(&runtime).await,
        None => runtime_missing(),
    }
}

/// The 500 an operator's endpoint answers when no runtime is installed where it is mounted.
pub fn runtime_missing() -> Response<Bytes> {
    tracing::error!("idempotency runtime not installed where an idempotency endpoint is mounted");
    problem_response(&Problem::new(
        ProblemKind::Misconfigured,
        "The server has no idempotency runtime installed for this endpoint; this is a server configuration bug.",
    ))
}

/// The JSON of a record's status.
pub fn record_json(scope: &str, key: &str, info: &RecordInfo) -> serde_json::Value {
    let mut body = serde_json::json!({
        "scope": scope,
        "key": key,
        "state": info.state.as_str(),
        "expires_at": rfc3339(info.expires_at),
    });
    if let Some(status) = info.status {
        body["status"] = status.into();
    }
    if let Some(created) = info.created_at {
        body["created_at"] = rfc3339(created).into();
    }
    body
}

/// A time as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A 503 whose detail is `what`, never the backend's error (which may name hosts, users or
/// files, and which the caller may provoke at will): that goes to the log.
fn store_unavailable(runtime: &Runtime, what: &str) -> Response<Bytes> {
    let problem =
        Problem::new(ProblemKind::StoreUnavailable, what).with_retry_after(runtime.config().store_retry_after);
    no_store(problem_response(&problem))
}

pub(crate) fn json(status: u16, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn no_store(mut response: Response<Bytes>) -> Response<Bytes> {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Config;
    use crate::store::{Claim, MemoryStore, RecordKey, Store, StoreError};
    use std::sync::Arc;
    use std::time::Duration;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn body(r: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(r.body()).unwrap()
    }

    use crate::policy::Policy;
    use crate::registry::{Framework, RouteRecord};

    inventory::submit! {
        RouteRecord::protected(Policy::new("status.s"), "status::tests::h", file!(), line!(), Framework::Axum)
    }

    #[test]
    fn a_caller_sees_its_own_records_only() {
        block_on(async {
            let store = Arc::new(MemoryStore::new());
            let rt = Runtime::new(store.clone(), Config::default());
            let fp = crate::fingerprint::Fingerprint([1; 32]);
            let Claim::Acquired(_) = store
                .claim(&RecordKey::of("status.s", Some("alice"), "k1"), &fp, Duration::from_secs(30))
                .await
                .unwrap()
            else {
                panic!()
            };
            let mine = record_status(&rt, "status.s", "k1", Ok(Some("alice".into()))).await;
            assert_eq!(mine.status(), 200);
            assert_eq!(mine.headers()[CACHE_CONTROL], "no-store");
            let v = body(&mine);
            assert_eq!(
                (v["scope"].as_str(), v["key"].as_str(), v["state"].as_str()),
                (Some("status.s"), Some("k1"), Some("in_progress"))
            );
            assert!(v["expires_at"].as_str().unwrap().ends_with('Z'), "{v}");
            assert!(v.get("status").is_none());

            let theirs = record_status(&rt, "status.s", "k1", Ok(Some("mallory".into()))).await;
            assert_eq!(theirs.status(), 404);
            assert_eq!(body(&theirs)["type"], "urn:idempotent:problem:record-not-found");
            let anonymous = record_status(&rt, "status.s", "k1", Ok(None)).await;
            assert_eq!(anonymous.status(), 403, "nobody is told apart: off unless asked for");
            assert_eq!(body(&anonymous)["type"], "urn:idempotent:problem:status-disabled");
            let open = Runtime::new(store.clone(), Config { anonymous_record_status: true, ..Config::default() });
            assert_eq!(record_status(&open, "status.s", "k1", Ok(None)).await.status(), 404, "another namespace");
            for missing in [ActorMissing::NotFound, ActorMissing::Repeated] {
                assert_eq!(record_status(&rt, "status.s", "k1", Err(missing)).await.status(), 401);
            }
            assert_eq!(record_status(&rt, "status.s", "bad\u{7f}key", Ok(Some("alice".into()))).await.status(), 400);
            // A scope no route declares is never looked up, whatever its bytes.
            for scope in ["s", "a\u{0}b", "payments.create'--"] {
                let unknown = record_status(&rt, scope, "k1", Ok(Some("alice".into()))).await;
                assert_eq!(unknown.status(), 404, "{scope:?}");
            }
            assert_eq!(health(&rt).await.status(), 200);
            assert_eq!(body(&health(&rt).await)["store"], "memory");
        });
    }

    /// A store whose backend refuses every call, in its own words.
    struct Failing;

    #[async_trait::async_trait]
    impl Store for Failing {
        async fn claim_as(
            &self,
            _: &RecordKey,
            _: &crate::fingerprint::Fingerprint,
            _: Duration,
            _: &crate::store::ClaimToken,
        ) -> Result<Claim, StoreError> {
            Err(refused())
        }
        async fn renew(&self, _: &RecordKey, _: &crate::store::ClaimToken, _: Duration) -> Result<(), StoreError> {
            Err(refused())
        }
        async fn complete(
            &self,
            _: &RecordKey,
            _: &crate::store::ClaimToken,
            _: &crate::response::StoredResponse,
            _: Duration,
        ) -> Result<(), StoreError> {
            Err(refused())
        }
        async fn release(&self, _: &RecordKey, _: &crate::store::ClaimToken) -> Result<(), StoreError> {
            Err(refused())
        }
        async fn inspect(&self, _: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
            Err(refused())
        }
        async fn invalidate(
            &self,
            _: &RecordKey,
            _: crate::store::Purge,
        ) -> Result<crate::store::Invalidated, StoreError> {
            Err(refused())
        }
        async fn health(&self) -> Result<(), StoreError> {
            Err(refused())
        }
        fn name(&self) -> &'static str {
            "failing"
        }
    }

    fn refused() -> StoreError {
        StoreError::Unavailable("Connection refused (os error 111) at db.internal:5432".into())
    }

    /// The backend's error may name hosts, users and files, and a caller can provoke it at
    /// will: it goes to the log, the caller gets a generic detail.
    #[test]
    fn store_failures_are_answered_without_the_backends_words() {
        block_on(async {
            let rt = Runtime::new(Arc::new(Failing), Config::default());
            for response in [health(&rt).await, record_status(&rt, "status.s", "k1", Ok(Some("alice".into()))).await] {
                assert_eq!(response.status(), 503);
                let detail = body(&response)["detail"].as_str().unwrap().to_owned();
                assert!(!detail.contains("refused") && !detail.contains("db.internal"), "{detail}");
            }
        });
    }
}
