//! The fault paths every adapter must handle the same way, written once and run against each
//! framework's fixture app over real HTTP by [`fault_tests!`](crate::fault_tests).
//!
//! The invoking test file defines the fixture: `app()` (an async fn returning the base URL of a
//! server with the routes below and a runtime whose stored-body cap is 1024 bytes), `post_to(base,
//! path, key)`, and one execution counter per route: `PANICS` (`/panic`, panics on its first
//! call), `FLAKY` (`/flaky`, 503 on its first call), `SLOW` (`/slow`), `BIG` and `STREAM`
//! (`/big`, `/stream`, bodies over the cap), `BROKEN` (`/broken`, a body that fails half-way),
//! `LIMITED` (`/limited`, a 64-byte request body limit), `WAITED` (`/wait`, `on_conflict =
//! "wait"`), `OPTIONAL` (`/optional`, `key = "optional"`), and `/cookie` (sets a cookie, an
//! `x-order` header and the Date `Thu, 01 Jan 1970 00:00:00 GMT`).

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use std::time::Duration;

/// Expands to one `#[tokio::test]` per fault path, against the invoking file's fixture.
#[macro_export]
macro_rules! fault_tests {
    () => {
        #[tokio::test]
        async fn a_panicking_handler_releases_its_claim() {
            let base = app().await;
            let key = new_key();
            let first = send(post_to(&base, "/panic", Some(&key))).await;
            first.assert_problem(500, "urn:idempotent:problem:handler-panicked");
            let retry = send(post_to(&base, "/panic", Some(&key))).await;
            assert_eq!(retry.status, 201);
            assert!(!retry.replayed());
            assert_eq!(PANICS.load(Ordering::SeqCst), 2);
        }

        #[tokio::test]
        async fn a_503_releases_the_claim_and_the_retry_runs_again() {
            let base = app().await;
            let key = new_key();
            assert_eq!(send(post_to(&base, "/flaky", Some(&key))).await.status, 503);
            let retry = send(post_to(&base, "/flaky", Some(&key))).await;
            assert_eq!((retry.status, retry.replayed()), (201, false));
            let replay = send(post_to(&base, "/flaky", Some(&key))).await;
            assert_eq!((replay.status, replay.replayed()), (201, true));
            assert_eq!(FLAKY.load(Ordering::SeqCst), 2);
        }

        #[tokio::test]
        async fn a_client_that_disconnects_does_not_cancel_the_handler() {
            let base = app().await;
            let key = new_key();
            let client = reqwest::Client::builder().timeout(Duration::from_millis(150)).build().unwrap();
            let cut =
                client.post(format!("{base}/slow")).header("Idempotency-Key", &key).json(&json!({"name": "n"})).send().await;
            assert!(cut.is_err(), "the client gave up before the handler finished");
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(SLOW.load(Ordering::SeqCst), 1, "the handler ran to completion");
            let retry = send(post_to(&base, "/slow", Some(&key))).await;
            assert_eq!(retry.status, 201);
            assert!(retry.replayed(), "the outcome was recorded although nobody received it");
            assert_eq!(retry.body, b"slow n");
            assert_eq!(SLOW.load(Ordering::SeqCst), 1);
        }

        #[tokio::test]
        async fn a_response_over_the_cap_is_delivered_but_never_run_twice() {
            let base = app().await;
            for (path, counter, len) in [("/big", &BIG, 10_000), ("/stream", &STREAM, 8_000)] {
                let key = new_key();
                let first = send(post_to(&base, path, Some(&key))).await;
                assert_eq!(first.body.len(), len, "{path}: the client gets every byte");
                let retry = send(post_to(&base, path, Some(&key))).await;
                retry.assert_problem(409, "urn:idempotent:problem:response-not-stored");
                assert!(retry.json()["detail"].as_str().unwrap().contains("too large"));
                assert_eq!(counter.load(Ordering::SeqCst), 1, "{path}");
            }
        }

        #[tokio::test]
        async fn a_response_body_that_fails_after_the_handler_ran_is_final_and_replayed() {
            let base = app().await;
            let key = new_key();
            let first = send(post_to(&base, "/broken", Some(&key))).await;
            first.assert_problem(500, "urn:idempotent:problem:response-failed");
            assert!(!first.replayed());
            let retry = send(post_to(&base, "/broken", Some(&key))).await;
            assert!(retry.replayed());
            assert_eq!((retry.status, &retry.body), (first.status, &first.body), "the retry gets what the client got");
            assert_eq!(BROKEN.load(Ordering::SeqCst), 1, "never run twice");
        }

        #[tokio::test]
        async fn a_request_body_over_the_limit_is_413_and_runs_nothing() {
            let base = app().await;
            let key = new_key();
            let big = json!({"name": "x".repeat(200)});
            let r = reqwest::Client::new().post(format!("{base}/limited")).header("Idempotency-Key", &key).json(&big);
            send(r).await.assert_problem(413, "urn:idempotent:problem:body-too-large");
            assert_eq!(LIMITED.load(Ordering::SeqCst), 0);
            // Nothing was claimed: the same key with a body under the limit runs.
            let ok = send(post_to(&base, "/limited", Some(&key))).await;
            assert_eq!((ok.status, ok.body.as_slice()), (200, b"n".as_slice()));
            assert_eq!(LIMITED.load(Ordering::SeqCst), 1);
        }

        #[tokio::test]
        async fn wait_mode_replays_the_first_response_to_a_concurrent_duplicate() {
            let base = app().await;
            let key = new_key();
            let a = tokio::spawn(post_to(&base, "/wait", Some(&key)).send());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let b = send(post_to(&base, "/wait", Some(&key))).await;
            let a = Captured::from(a.await.unwrap().unwrap()).await;
            assert_eq!((a.status, b.status), (201, 201));
            assert!(b.replayed());
            assert_eq!(a.body, b.body);
            assert_eq!(WAITED.load(Ordering::SeqCst), 1);
        }

        #[tokio::test]
        async fn an_optional_key_runs_unprotected_without_one() {
            let base = app().await;
            let before = OPTIONAL.load(Ordering::SeqCst);
            assert_eq!(send(post_to(&base, "/optional", None)).await.status, 201);
            assert_eq!(send(post_to(&base, "/optional", None)).await.status, 201);
            assert_eq!(OPTIONAL.load(Ordering::SeqCst) - before, 2);
        }

        #[tokio::test]
        async fn set_cookie_and_date_are_not_replayed() {
            let base = app().await;
            let key = new_key();
            let first = send(post_to(&base, "/cookie", Some(&key))).await;
            assert_eq!(first.header("set-cookie"), Some("session=secret"));
            let replay = send(post_to(&base, "/cookie", Some(&key))).await;
            assert!(replay.replayed());
            assert_eq!(replay.header("set-cookie"), None, "a session cookie is never handed to a retry");
            assert_eq!(replay.header("x-order"), Some("o-1"));
            assert_eq!(first.header("date"), Some("Thu, 01 Jan 1970 00:00:00 GMT"));
            let date = replay.header("date").expect("the replay carries a Date");
            assert_ne!(date, "Thu, 01 Jan 1970 00:00:00 GMT", "the replay carries its own Date, not the stored one");
        }
    };
}

/// A store whose backend refuses every connection, as an unreachable server does.
#[derive(Debug)]
pub struct Unreachable;

fn refused<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable("connection refused".into()))
}

#[async_trait::async_trait]
impl Store for Unreachable {
    async fn claim_as(&self, _: &RecordKey, _: &Fingerprint, _: Duration, _: &ClaimToken) -> Result<Claim, StoreError> {
        refused()
    }
    async fn renew(&self, _: &RecordKey, _: &ClaimToken, _: Duration) -> Result<(), StoreError> {
        refused()
    }
    async fn complete(&self, _: &RecordKey, _: &ClaimToken, _: &StoredResponse, _: Duration) -> Result<(), StoreError> {
        refused()
    }
    async fn release(&self, _: &RecordKey, _: &ClaimToken) -> Result<(), StoreError> {
        refused()
    }
    async fn inspect(&self, _: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        refused()
    }
    async fn invalidate(&self, _: &RecordKey, _: Purge) -> Result<Invalidated, StoreError> {
        refused()
    }
    async fn health(&self) -> Result<(), StoreError> {
        refused()
    }
    fn name(&self) -> &'static str {
        "unreachable"
    }
}
