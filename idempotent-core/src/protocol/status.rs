//! The operator's endpoints: a caller's record (`GET /_idempotency/records/{scope}/{key}`) and
//! the store's health (`GET /healthz`), written once for every adapter.

use super::problem_response;
use crate::actor::ActorMissing;
use crate::engine::Runtime;
use crate::key::IdempotencyKey;
use crate::problem::{Problem, ProblemKind};
use crate::store::{RecordInfo, StoreError};
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
/// - 400 for a key that no request could have sent, 401 when the configured actor source finds
///   no caller, 503 when the store does not answer.
///
/// `actor` is resolved as for a protected route (the application's [`Actor`](crate::actor::Actor)
/// extension first, then the configured source), so a caller sees only the records its own
/// requests created. The answer is never cached (`Cache-Control: no-store`).
pub async fn record_status(
    runtime: &Runtime,
    scope: &str,
    key: &str,
    actor: Result<Option<String>, ActorMissing>,
) -> Response<Bytes> {
    no_store(record(runtime, scope, key, actor).await)
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
                format!("{e}: a record is shown only to the caller that created it."),
            ))
        }
    };
    let key = match IdempotencyKey::parse(key.as_bytes()) {
        Ok(key) => key,
        Err(e) => return problem_response(&Problem::new(ProblemKind::KeyInvalid, format!("Invalid key: {e}."))),
    };
    match runtime.inspect(scope, actor.as_deref(), key.as_str()).await {
        Ok(Some(info)) => json(200, &record_json(scope, key.as_str(), &info)),
        Ok(None) => problem_response(&Problem::new(
            ProblemKind::RecordNotFound,
            "No record of yours under this scope and key: it was never used, has expired, or was released.",
        )),
        Err(e) => store_unavailable(runtime, &e, "The idempotency store could not be asked for this record"),
    }
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
            store_unavailable(runtime, &e, "The idempotency store does not answer")
        }
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

fn store_unavailable(runtime: &Runtime, error: &StoreError, what: &str) -> Response<Bytes> {
    let problem = Problem::new(ProblemKind::StoreUnavailable, format!("{what}: {error}."))
        .with_retry_after(runtime.config().store_retry_after);
    no_store(problem_response(&problem))
}

fn json(status: u16, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn no_store(mut response: Response<Bytes>) -> Response<Bytes> {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Config;
    use crate::store::{Claim, MemoryStore, RecordKey, Store};
    use std::sync::Arc;
    use std::time::Duration;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    fn body(r: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(r.body()).unwrap()
    }

    #[test]
    fn a_caller_sees_its_own_records_only() {
        block_on(async {
            let store = Arc::new(MemoryStore::new());
            let rt = Runtime::new(store.clone(), Config::default());
            let fp = crate::fingerprint::Fingerprint([1; 32]);
            let Claim::Acquired(_) =
                store.claim(&RecordKey::of("s", Some("alice"), "k1"), &fp, Duration::from_secs(30)).await.unwrap()
            else {
                panic!()
            };
            let mine = record_status(&rt, "s", "k1", Ok(Some("alice".into()))).await;
            assert_eq!(mine.status(), 200);
            assert_eq!(mine.headers()[CACHE_CONTROL], "no-store");
            let v = body(&mine);
            assert_eq!(
                (v["scope"].as_str(), v["key"].as_str(), v["state"].as_str()),
                (Some("s"), Some("k1"), Some("in_progress"))
            );
            assert!(v["expires_at"].as_str().unwrap().ends_with('Z'), "{v}");
            assert!(v.get("status").is_none());

            let theirs = record_status(&rt, "s", "k1", Ok(Some("mallory".into()))).await;
            assert_eq!(theirs.status(), 404);
            assert_eq!(body(&theirs)["type"], "urn:idempotent:problem:record-not-found");
            assert_eq!(record_status(&rt, "s", "k1", Ok(None)).await.status(), 404, "anonymous is another namespace");
            assert_eq!(record_status(&rt, "s", "k1", Err(ActorMissing)).await.status(), 401);
            assert_eq!(record_status(&rt, "s", "bad\u{7f}key", Ok(Some("alice".into()))).await.status(), 400);
            assert_eq!(health(&rt).await.status(), 200);
            assert_eq!(body(&health(&rt).await)["store"], "memory");
        });
    }
}
