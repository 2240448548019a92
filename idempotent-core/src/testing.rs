//! Test support (feature `testing`): the store contract, and [`fault::FaultStore`], a wrapper that
//! injects store faults.
//!
//! The store contract is the behaviour every [`Store`] must show, written once
//! and run unchanged against each backend with [`store_contract_tests!`](crate::store_contract_tests),
//! ours and yours. A custom store adds `idempotent-core` with the `testing` feature and `tokio`
//! (`macros`, `rt-multi-thread`) as dev-dependencies and runs:
//!
//! ```
//! use idempotent_core::store::MemoryStore;
//! use std::sync::Arc;
//!
//! idempotent_core::store_contract_tests!(memory, async { Arc::new(MemoryStore::new()) });
//! // A durable store also proves its records survive a second instance:
//! // idempotent_core::store_contract_tests!(mine, async { fresh().await },
//! //     reopen = |store| async move { store.reopen().await });
//! # fn main() {}
//! ```
//!
//! The setup block returns a fresh store for one test, as `Arc<S>` or `Option<Arc<S>>` (`None`
//! skips the test, for a backend with no server here; the block reports why). Each test uses
//! its own keys, leases of a few hundred milliseconds and time to live of about a second, so the
//! suite runs in a few seconds.

pub mod fault;

use crate::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::response::StoredResponse;
use crate::store::{Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, RecordState, Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Expands to `mod $name { ... }` with one `#[tokio::test]` per contract behaviour.
///
/// `$make` is an async block evaluated once per test that returns a fresh store (`Arc<S>` for
/// any `S: Store`, or `Option<Arc<S>>` where `None` skips). With `reopen = |store| async move {
/// ... }`, returning a second instance on the same backing storage, the suite also checks that
/// records survive a reconnect.
#[macro_export]
macro_rules! store_contract_tests {
    ($name:ident, $make:expr $(,)?) => {
        $crate::store_contract_tests!(@tests $name, $make, {});
    };
    ($name:ident, $make:expr, reopen = $reopen:expr $(,)?) => {
        $crate::store_contract_tests!(@tests $name, $make, {
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn records_survive_reconnect() {
                if let Some(store) = $crate::testing::IntoFixture::into_fixture($make.await) {
                    $crate::testing::records_survive_reconnect(store, $reopen).await;
                }
            }
        });
    };
    (@tests $name:ident, $make:expr, { $($extra:tt)* }) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_contract_tests!(@each $make;
                claim_complete_replay,
                mismatch_in_progress_and_completed,
                in_progress_reports_remaining_lease,
                release_then_reclaim,
                renew_extends_the_lease,
                expired_lease_is_taken_over_by_exactly_one,
                an_abandoned_claim_is_never_taken_by_another_request,
                a_claim_sent_again_finds_itself,
                a_claim_sent_again_after_its_lease_ran_out_leases_anew,
                stale_token_is_fenced,
                completed_records_expire_after_ttl,
                hundred_concurrent_claimers_one_winner,
                actors_and_scopes_are_independent,
                absent_keys_are_fenced,
                late_completion_is_accepted_while_the_token_holds,
                inspect_reports_state_status_and_times,
                invalidate_deletes_a_record_in_any_state,
                health_check_answers,
            );
            $($extra)*
        }
    };
    (@each $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                if let Some(store) = $crate::testing::IntoFixture::into_fixture($make.await) {
                    $crate::testing::$test(store).await;
                }
            }
        )*
    };
}

/// Expands to `mod $name { ... }` with one `#[tokio::test]` per behaviour of a per-caller byte
/// bound ([`crate::store::quota`]), for the stores that count [`quota::record_bytes`] per live
/// record (the shared stores).
///
/// `$make` is a closure `|max_bytes: usize| async move { ... }` returning a fresh store where one
/// actor may hold `max_bytes` (`Arc<S>`, or `Option<Arc<S>>` where `None` skips).
///
/// [`quota::record_bytes`]: crate::store::quota::record_bytes
#[macro_export]
macro_rules! store_quota_tests {
    ($name:ident, $make:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_quota_tests!(@each $make;
                an_actor_over_its_bound_is_refused_alone,
                racing_claims_of_one_actor_fit_its_bound,
            );
        }
    };
    (@each $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                $crate::testing::$test($make).await;
            }
        )*
    };
}

/// What a setup block may return: a store, or `None` to skip.
pub trait IntoFixture {
    /// The store type.
    type Store: Store;
    /// The store, or `None` when the test is skipped.
    fn into_fixture(self) -> Option<Arc<Self::Store>>;
}

impl<S: Store> IntoFixture for Arc<S> {
    type Store = S;
    fn into_fixture(self) -> Option<Arc<S>> {
        Some(self)
    }
}

impl<S: Store> IntoFixture for Option<Arc<S>> {
    type Store = S;
    fn into_fixture(self) -> Option<Arc<S>> {
        self
    }
}

/// A lease long enough never to expire during a test.
const LEASE: Duration = Duration::from_secs(30);
/// A time to live long enough never to expire during a test.
const TTL: Duration = Duration::from_secs(3600);

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn key(k: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_1", k)
}

fn response(body: &[u8]) -> StoredResponse {
    StoredResponse::new(
        201,
        [("content-type", &b"application/json"[..]), ("location", b"/payments/1"), ("x-bin", b"\x00\xff\r\n")],
        bytes::Bytes::copy_from_slice(body),
    )
}

async fn acquire<S: Store + ?Sized>(s: &S, k: &RecordKey, f: &Fingerprint, lease: Duration) -> ClaimToken {
    match s.claim(k, f, lease).await {
        Ok(Claim::Acquired(t)) => t,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn assert_fenced(r: Result<(), StoreError>, what: &str) {
    assert!(matches!(r, Err(StoreError::Fenced)), "{what}: expected Fenced, got {r:?}");
}

async fn claim_many<S: Store>(s: &Arc<S>, k: &RecordKey, n: usize) -> Vec<Claim> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move { s.claim(&k, &fp(1), LEASE).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("claim task").expect("claim"));
    }
    out
}

/// Claim, complete, then every retry replays the stored response byte for byte; an outcome
/// whose body was not stored is recorded too.
pub async fn claim_complete_replay<S: Store>(s: Arc<S>) {
    let k = key("replay");
    let t = acquire(&*s, &k, &fp(1), LEASE).await;
    let r = response(b"{\"id\":\"pay_1\",\"raw\":\"\x00\x01\xfe\xff\"}");
    s.complete(&k, &t, &r, TTL).await.unwrap();
    for _ in 0..3 {
        match s.claim(&k, &fp(1), LEASE).await.unwrap() {
            Claim::Completed(got) => {
                assert_eq!(got, r);
                assert_eq!(got.encode(), r.encode(), "replay is byte for byte");
            }
            other => panic!("expected Completed, got {other:?}"),
        }
    }
    let k2 = key("not-stored");
    let t2 = acquire(&*s, &k2, &fp(1), LEASE).await;
    let mut big = response(b"");
    big.body_stored = false;
    s.complete(&k2, &t2, &big, TTL).await.unwrap();
    assert_eq!(s.claim(&k2, &fp(1), LEASE).await.unwrap(), Claim::Completed(big));
    let k3 = key("empty");
    let t3 = acquire(&*s, &k3, &fp(1), LEASE).await;
    let empty = StoredResponse::new(204, Vec::<(&str, &str)>::new(), bytes::Bytes::new());
    s.complete(&k3, &t3, &empty, TTL).await.unwrap();
    assert_eq!(s.claim(&k3, &fp(1), LEASE).await.unwrap(), Claim::Completed(empty));
}

/// A different fingerprint is a mismatch while the key is in progress and once it completed.
pub async fn mismatch_in_progress_and_completed<S: Store>(s: Arc<S>) {
    let k = key("mismatch");
    let t = acquire(&*s, &k, &fp(1), LEASE).await;
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch, "in progress");
    s.complete(&k, &t, &response(b"ok"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch, "completed");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"ok")));
}

/// A claim on a live in-progress key answers with the time left on its lease.
pub async fn in_progress_reports_remaining_lease<S: Store>(s: Arc<S>) {
    let k = key("lease");
    let _t = acquire(&*s, &k, &fp(1), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    match s.claim(&k, &fp(1), LEASE).await.unwrap() {
        Claim::InProgress { retry_after } => {
            assert!(retry_after <= Duration::from_millis(9_850), "{retry_after:?}");
            assert!(retry_after >= Duration::from_secs(5), "{retry_after:?}");
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
}

/// A released key is free again (even with another fingerprint); the old token is fenced.
pub async fn release_then_reclaim<S: Store>(s: Arc<S>) {
    let k = key("release");
    let t = acquire(&*s, &k, &fp(1), LEASE).await;
    s.release(&k, &t).await.unwrap();
    assert_fenced(s.release(&k, &t).await, "released twice");
    let t2 = acquire(&*s, &k, &fp(2), LEASE).await;
    assert_ne!(t, t2);
    assert_fenced(s.complete(&k, &t, &response(b"x"), TTL).await, "complete with the released token");
    s.complete(&k, &t2, &response(b"second"), TTL).await.unwrap();
    assert_fenced(s.release(&k, &t2).await, "release after complete");
    // A completion sent again (its answer was lost) finds its own work done, and changes nothing.
    s.complete(&k, &t2, &response(b"x"), TTL).await.expect("completed twice by the same token");
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Completed(response(b"second")));
}

/// Renewal keeps a slow handler's claim past its original lease.
pub async fn renew_extends_the_lease<S: Store>(s: Arc<S>) {
    let k = key("renew");
    let lease = Duration::from_millis(400);
    let t = acquire(&*s, &k, &fp(1), lease).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.renew(&k, &t, lease).await.unwrap();
    }
    // 800 ms after the claim: well past the original lease.
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    s.complete(&k, &t, &response(b"slow"), TTL).await.unwrap();
    assert_fenced(s.renew(&k, &t, LEASE).await, "renew after complete");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"slow")));
}

/// Once a lease expires, of many concurrent claimers exactly one takes the key over.
pub async fn expired_lease_is_taken_over_by_exactly_one<S: Store>(s: Arc<S>) {
    let k = key("takeover");
    let _crashed = acquire(&*s, &k, &fp(1), Duration::from_millis(300)).await;
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let claims = claim_many(&s, &k, 20).await;
    let acquired = claims.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
    let waiting = claims.iter().filter(|c| matches!(c, Claim::InProgress { .. })).count();
    assert_eq!((acquired, waiting), (1, 19), "{claims:?}");
}

/// An abandoned claim (its lease expired, its worker silent) is taken over by a retry of the same
/// request only: another request under the key is a mismatch, since the first one's work may
/// have happened before its worker vanished.
pub async fn an_abandoned_claim_is_never_taken_by_another_request<S: Store>(s: Arc<S>) {
    let k = key("takeover-other-body");
    let crashed = acquire(&*s, &k, &fp(1), Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch, "another request");
    let retry = acquire(&*s, &k, &fp(1), LEASE).await;
    assert_ne!(retry, crashed);
    assert_fenced(s.complete(&k, &crashed, &response(b"late"), TTL).await, "the vanished worker");
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch, "a live claim too");
}

/// A claim sent again with its own token (its answer was lost) finds itself: it holds the key,
/// and nothing changed; a claim with another token sees it in progress.
pub async fn a_claim_sent_again_finds_itself<S: Store>(s: Arc<S>) {
    let k = key("resent-claim");
    let token = ClaimToken::generate();
    assert_eq!(s.claim_as(&k, &fp(1), LEASE, &token).await.unwrap(), Claim::Acquired(token.clone()));
    assert_eq!(s.claim_as(&k, &fp(1), LEASE, &token).await.unwrap(), Claim::Acquired(token.clone()));
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    s.complete(&k, &token, &response(b"once"), TTL).await.unwrap();
    assert_eq!(s.claim_as(&k, &fp(1), LEASE, &token).await.unwrap(), Claim::Completed(response(b"once")));
}

/// A claim sent again with its own token after its lease ran out (nobody took the record over)
/// is acquired with a new lease: the caller counts on one from when it sent the claim, so the
/// record must not stay expired, open to a takeover.
pub async fn a_claim_sent_again_after_its_lease_ran_out_leases_anew<S: Store>(s: Arc<S>) {
    let k = key("resent-expired-claim");
    let token = ClaimToken::generate();
    let short = Duration::from_millis(300);
    assert_eq!(s.claim_as(&k, &fp(1), short, &token).await.unwrap(), Claim::Acquired(token.clone()));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.claim_as(&k, &fp(1), LEASE, &token).await.unwrap(), Claim::Acquired(token.clone()));
    match s.claim(&k, &fp(1), LEASE).await.unwrap() {
        Claim::InProgress { retry_after } => assert!(retry_after > Duration::from_secs(20), "{retry_after:?}"),
        other => panic!("the lease was not taken anew: {other:?}"),
    }
    let info = s.inspect(&k).await.unwrap().expect("a record");
    assert_eq!(info.state, RecordState::InProgress);
    assert_about(info.expires_at, LEASE, "the new lease");
    s.complete(&k, &token, &response(b"resent"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"resent")));
}

/// A worker whose lease was taken over can neither complete, release nor renew, and does not
/// disturb the new owner's record.
pub async fn stale_token_is_fenced<S: Store>(s: Arc<S>) {
    let k = key("fencing");
    let paused = acquire(&*s, &k, &fp(1), Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    let fresh = acquire(&*s, &k, &fp(1), LEASE).await;
    assert_fenced(s.renew(&k, &paused, LEASE).await, "stale renew");
    assert_fenced(s.complete(&k, &paused, &response(b"late"), TTL).await, "stale complete");
    assert_fenced(s.release(&k, &paused).await, "stale release");
    match s.claim(&k, &fp(1), LEASE).await.unwrap() {
        Claim::InProgress { retry_after } => assert!(retry_after > Duration::from_secs(20), "{retry_after:?}"),
        other => panic!("the new claim was disturbed: {other:?}"),
    }
    s.renew(&k, &fresh, LEASE).await.unwrap();
    s.complete(&k, &fresh, &response(b"fresh"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"fresh")));
    assert_fenced(s.complete(&k, &paused, &response(b"late"), TTL).await, "stale complete after completion");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"fresh")));
}

/// A completed record is forgotten after its time to live: the key is free again, even for
/// another fingerprint.
pub async fn completed_records_expire_after_ttl<S: Store>(s: Arc<S>) {
    let k = key("ttl");
    let t = acquire(&*s, &k, &fp(1), LEASE).await;
    s.complete(&k, &t, &response(b"short"), Duration::from_secs(1)).await.unwrap();
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(_)));
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let t2 = acquire(&*s, &k, &fp(2), LEASE).await;
    s.complete(&k, &t2, &response(b"again"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Completed(response(b"again")));
}

/// 100 concurrent claims of one fresh key: exactly one acquires, the others see it in progress.
pub async fn hundred_concurrent_claimers_one_winner<S: Store>(s: Arc<S>) {
    let k = key("hot");
    let claims = claim_many(&s, &k, 100).await;
    let acquired = claims.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
    let waiting = claims.iter().filter(|c| matches!(c, Claim::InProgress { .. })).count();
    assert_eq!((acquired, waiting), (1, 99));
}

/// The same client key under other actors or scopes is another record; no choice of parts can
/// forge another record's identity.
pub async fn actors_and_scopes_are_independent<S: Store>(s: Arc<S>) {
    let keys = [
        RecordKey::new("payments.create", "acct_1", "k"),
        RecordKey::new("payments.create", "acct_2", "k"),
        RecordKey::new("refunds.create", "acct_1", "k"),
        RecordKey::new("payments.create", "", "k"),
        RecordKey::new("a|b", "c", "d"),
        RecordKey::new("a", "b|c", "d"),
        RecordKey::new("a:1", "b", "c"),
        RecordKey::new("a", "1:b", "c"),
    ];
    for (i, k) in keys.iter().enumerate() {
        let t = acquire(&*s, k, &fp(i as u32), LEASE).await;
        let r = StoredResponse::new(200, Vec::<(&str, &str)>::new(), format!("{i}").into());
        s.complete(k, &t, &r, TTL).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        match s.claim(k, &fp(i as u32), LEASE).await.unwrap() {
            Claim::Completed(r) => assert_eq!(r.body, format!("{i}").into_bytes(), "{k:?}"),
            other => panic!("{k:?}: {other:?}"),
        }
    }
}

/// A worker slowed past its lease still holds the record while no other claim took it over: it
/// can renew the lease again and store its outcome (a late completion), and the next claim
/// replays. Once another claim took the record, the late worker is fenced
/// ([`stale_token_is_fenced`]).
pub async fn late_completion_is_accepted_while_the_token_holds<S: Store>(s: Arc<S>) {
    let short = Duration::from_millis(300);
    let slow = key("late-renew");
    let t = acquire(&*s, &slow, &fp(1), short).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.renew(&slow, &t, LEASE).await.expect("renewal of an expired lease that nobody took");
    match s.claim(&slow, &fp(1), LEASE).await.unwrap() {
        Claim::InProgress { retry_after } => assert!(retry_after > Duration::from_secs(20), "{retry_after:?}"),
        other => panic!("the renewed claim should be in progress: {other:?}"),
    }
    s.complete(&slow, &t, &response(b"renewed"), TTL).await.unwrap();
    assert_eq!(s.claim(&slow, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"renewed")));

    let late = key("late-complete");
    let t = acquire(&*s, &late, &fp(1), short).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.complete(&late, &t, &response(b"late"), TTL).await.expect("late completion that nobody took over");
    assert_eq!(s.claim(&late, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"late")));

    let gone = key("late-release");
    let t = acquire(&*s, &gone, &fp(1), short).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.release(&gone, &t).await.expect("late release that nobody took over");
    acquire(&*s, &gone, &fp(2), LEASE).await;
}

/// Completing, releasing or renewing a key that was never claimed is fenced and creates nothing.
pub async fn absent_keys_are_fenced<S: Store>(s: Arc<S>) {
    let k = key("absent");
    let t = ClaimToken::generate();
    assert_fenced(s.complete(&k, &t, &response(b"x"), TTL).await, "complete");
    assert_fenced(s.release(&k, &t).await, "release");
    assert_fenced(s.renew(&k, &t, LEASE).await, "renew");
    acquire(&*s, &k, &fp(1), LEASE).await;
}

/// Asserts that `at` is `expected` from now, give or take the clock skew a test tolerates between
/// the test's clock and the store's (a database server on another host).
fn assert_about(at: SystemTime, expected_from_now: Duration, what: &str) {
    const SKEW: Duration = Duration::from_secs(5);
    let expected = SystemTime::now() + expected_from_now;
    let gap = at.duration_since(expected).or_else(|e| Ok::<_, ()>(e.duration())).unwrap_or_default();
    assert!(gap <= SKEW, "{what}: {at:?} is {gap:?} away from now + {expected_from_now:?}");
}

/// [`Store::inspect`] reports what a key holds without changing it: nothing for an absent key or
/// another actor's; in progress with its creation and lease deadline (reported, with a deadline
/// in the past, after the lease runs out); completed with its stored status and expiry; nothing
/// once a completed record's time to live has passed.
pub async fn inspect_reports_state_status_and_times<S: Store>(s: Arc<S>) {
    let k = key("inspect");
    assert_eq!(s.inspect(&k).await.unwrap(), None, "absent key");
    let t = acquire(&*s, &k, &fp(1), LEASE).await;
    let info: RecordInfo = s.inspect(&k).await.unwrap().expect("in-progress record");
    assert_eq!((info.state, info.status), (RecordState::InProgress, None));
    assert_about(info.created_at.expect("claim time"), Duration::ZERO, "created_at");
    assert_about(info.expires_at, LEASE, "lease deadline");
    let other = RecordKey::new(&k.scope, "acct_2", &k.key);
    assert_eq!(s.inspect(&other).await.unwrap(), None, "another actor's key is another record");
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }), "inspect changed nothing");

    s.complete(&k, &t, &response(b"done"), Duration::from_secs(1)).await.unwrap();
    let info = s.inspect(&k).await.unwrap().expect("completed record");
    assert_eq!((info.state, info.status), (RecordState::Completed, Some(201)));
    assert_about(info.created_at.expect("claim time"), Duration::ZERO, "created_at after completion");
    assert_about(info.expires_at, Duration::from_secs(1), "completed expiry");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(s.inspect(&k).await.unwrap(), None, "a completed record past its time to live");

    let abandoned = key("inspect-abandoned");
    acquire(&*s, &abandoned, &fp(1), Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let info = s.inspect(&abandoned).await.unwrap().expect("an abandoned claim is still held");
    assert_eq!(info.state, RecordState::InProgress);
    assert!(info.expires_at < SystemTime::now() + Duration::from_secs(1), "its lease ran out: {info:?}");
}

/// [`Store::invalidate`] with [`Purge::Any`] deletes a record in any state: the worker of a
/// deleted claim is fenced, and the next claim of the key acquires it, for a completed record
/// too. With [`Purge::Completed`] it deletes a completed record and leaves a claim in progress
/// alone, live or abandoned.
pub async fn invalidate_deletes_a_record_in_any_state<S: Store>(s: Arc<S>) {
    let k = key("invalidate");
    assert_eq!(s.invalidate(&k, Purge::Any).await.unwrap(), Invalidated::Absent, "nothing to delete");
    assert_eq!(s.invalidate(&k, Purge::Completed).await.unwrap(), Invalidated::Absent, "nothing to delete");
    let t = acquire(&*s, &k, &fp(1), Duration::from_millis(300)).await;
    assert_eq!(s.invalidate(&k, Purge::Completed).await.unwrap(), Invalidated::InProgress, "a live claim");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.invalidate(&k, Purge::Completed).await.unwrap(), Invalidated::InProgress, "an abandoned claim");
    s.renew(&k, &t, LEASE).await.expect("left alone: its token still holds it");
    assert_eq!(s.invalidate(&k, Purge::Any).await.unwrap(), Invalidated::Deleted, "in progress, forced");
    assert_eq!(s.inspect(&k).await.unwrap(), None);
    assert_fenced(s.renew(&k, &t, LEASE).await, "renew after invalidation");
    assert_fenced(s.complete(&k, &t, &response(b"x"), TTL).await, "complete after invalidation");
    let t = acquire(&*s, &k, &fp(2), LEASE).await;
    s.complete(&k, &t, &response(b"done"), TTL).await.unwrap();
    assert_eq!(s.invalidate(&k, Purge::Completed).await.unwrap(), Invalidated::Deleted, "completed");
    assert_eq!(s.invalidate(&k, Purge::Completed).await.unwrap(), Invalidated::Absent, "already gone");
    let t = acquire(&*s, &k, &fp(2), LEASE).await;
    s.complete(&k, &t, &response(b"done"), TTL).await.unwrap();
    assert_eq!(s.invalidate(&k, Purge::Any).await.unwrap(), Invalidated::Deleted, "completed, forced");
    acquire(&*s, &k, &fp(2), LEASE).await;
}

/// [`Store::health`] answers when the backend does.
pub async fn health_check_answers<S: Store>(s: Arc<S>) {
    s.health().await.expect("a reachable store is healthy");
}

/// Records written by one store instance are seen by another on the same storage: a completed
/// response replays, a live claim stays in progress and its token still completes it.
pub async fn records_survive_reconnect<S, S2, F, Fut>(s: Arc<S>, reopen: F)
where
    S: Store,
    S2: Store,
    F: FnOnce(Arc<S>) -> Fut,
    Fut: Future<Output = Arc<S2>>,
{
    let done = key("durable-done");
    let t = acquire(&*s, &done, &fp(1), LEASE).await;
    s.complete(&done, &t, &response(b"kept"), TTL).await.unwrap();
    let running = key("durable-running");
    let t2 = acquire(&*s, &running, &fp(1), LEASE).await;
    let again = reopen(s.clone()).await;
    drop(s);
    assert_eq!(again.claim(&done, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"kept")));
    assert_eq!(again.claim(&done, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    assert!(matches!(again.claim(&running, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    again.complete(&running, &t2, &response(b"finished"), TTL).await.unwrap();
    assert_eq!(again.claim(&running, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"finished")));
}

/// A bounded actor's key `n` (one character, so that all its claims count alike).
fn greedy(n: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_greedy", format!("key-{n}"))
}

/// A claim that must be refused by its actor's bound; its `Retry-After`.
async fn refused<S: Store + ?Sized>(s: &S, k: &RecordKey) -> Duration {
    match s.claim(k, &fp(1), LEASE).await {
        Err(StoreError::QuotaExceeded { retry_after }) => retry_after,
        other => panic!("{k:?}: expected QuotaExceeded, got {other:?}"),
    }
}

/// An actor at its byte bound (three claims' worth) is refused a new key, with the time until
/// its earliest live record expires, while another actor and anonymous callers still get in;
/// every answer about its own records (in progress, mismatch, the claim sent again, renewal,
/// completion past the bound, replay) still comes. It gets in again once a record is purged or
/// released, and once a record's lease runs out.
pub async fn an_actor_over_its_bound_is_refused_alone<F, Fut, X>(make: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = X>,
    X: IntoFixture,
{
    let claim = crate::store::quota::record_bytes(&greedy("1"), 0);
    let Some(s) = make(3 * claim).await.into_fixture() else { return };
    let short = Duration::from_secs(4);
    let t1 = acquire(&*s, &greedy("1"), &fp(1), LEASE).await;
    let t2 = acquire(&*s, &greedy("2"), &fp(1), LEASE).await;
    acquire(&*s, &greedy("3"), &fp(1), short).await;
    let retry_after = refused(&*s, &greedy("4")).await;
    assert!(
        retry_after >= Duration::from_secs(1) && retry_after <= short,
        "until the earliest record's lease ends: {retry_after:?}"
    );
    // Another actor gets its own three claims' worth; anonymous callers are not bounded.
    for (actor, claims) in [("acct_other", 3), ("", 5)] {
        for i in 0..claims {
            acquire(&*s, &RecordKey::new("payments.create", actor, format!("key-{i}")), &fp(1), LEASE).await;
        }
    }
    // Its own records keep answering, and its claims keep going.
    assert!(matches!(s.claim(&greedy("1"), &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    assert_eq!(s.claim(&greedy("1"), &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    assert_eq!(s.claim_as(&greedy("2"), &fp(1), LEASE, &t2).await.unwrap(), Claim::Acquired(t2.clone()));
    s.renew(&greedy("2"), &t2, LEASE).await.unwrap();
    let large = response(&[7; 4096]);
    s.complete(&greedy("1"), &t1, &large, TTL).await.expect("a completion is never refused");
    assert_eq!(s.claim(&greedy("1"), &fp(1), LEASE).await.unwrap(), Claim::Completed(large));
    refused(&*s, &greedy("4")).await;
    // A purged record, or a released claim, no longer counts.
    assert_eq!(s.invalidate(&greedy("1"), Purge::Any).await.unwrap(), Invalidated::Deleted);
    let t4 = acquire(&*s, &greedy("4"), &fp(1), LEASE).await;
    refused(&*s, &greedy("5")).await;
    s.release(&greedy("4"), &t4).await.unwrap();
    acquire(&*s, &greedy("5"), &fp(1), LEASE).await;
    refused(&*s, &greedy("6")).await;
    // Nor does a claim whose lease ran out.
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    acquire(&*s, &greedy("6"), &fp(1), LEASE).await;
    refused(&*s, &greedy("7")).await;
}

/// 32 concurrent claims of one actor, each for a new key, under a bound that fits five claims:
/// exactly five acquire, every other one is refused with [`StoreError::QuotaExceeded`].
pub async fn racing_claims_of_one_actor_fit_its_bound<F, Fut, X>(make: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = X>,
    X: IntoFixture,
{
    let race = |i: usize| RecordKey::new("payments.create", "acct_racer", format!("race-{i:02}"));
    let Some(s) = make(5 * crate::store::quota::record_bytes(&race(0), 0)).await.into_fixture() else { return };
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.claim(&race(i), &fp(1), LEASE).await })
        })
        .collect();
    let (mut acquired, mut over) = (0, 0);
    for t in tasks {
        match t.await.expect("claim task") {
            Ok(Claim::Acquired(_)) => acquired += 1,
            Err(StoreError::QuotaExceeded { .. }) => over += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((acquired, over), (5, 27));
}
