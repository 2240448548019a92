//! The execution state machine under store faults, through [`FaultStore`] over the memory store:
//! the lease covers the storing of the outcome, renewals run beside the handler, every store
//! operation is bounded, and `fail_open` applies to an unreachable store only.

use bytes::Bytes;
use idempotent_core::engine::{Captured, Config, Outcome, Request, Runtime};
use idempotent_core::fingerprint::FingerprintBuilder;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::policy::Policy;
use idempotent_core::problem::ProblemKind;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, MemoryStore, RecordKey, Store};
use idempotent_core::testing::fault::{Failure, Fault, FaultStore, Op};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

const LEASE: Duration = Duration::from_millis(600);
const STORE_TIMEOUT: Duration = Duration::from_millis(100);

fn policy(scope: &'static str) -> &'static Policy {
    Box::leak(Box::new(Policy { lease: LEASE, ..Policy::new(scope) }))
}

fn runtime(store: Arc<dyn Store>) -> Runtime {
    Runtime::new(store, Config { store_timeout: STORE_TIMEOUT, ..Config::default() })
}

fn request(key: &str) -> Request {
    Request {
        key: IdempotencyKey::parse(key.as_bytes()).map(Some),
        actor: None,
        fingerprint: Ok(FingerprintBuilder::new("engine").field("n", &1).unwrap().finish()),
    }
}

/// A handler that counts its executions and answers 201 with `body`.
async fn handler(executions: Arc<AtomicUsize>, body: &'static str) -> Captured<&'static str> {
    executions.fetch_add(1, Ordering::SeqCst);
    Captured::new(StoredResponse::new(201, Vec::<(&str, &str)>::new(), Bytes::from_static(body.as_bytes())), body)
}

fn executed<R: std::fmt::Debug>(outcome: &Outcome<R>) -> bool {
    matches!(outcome, Outcome::Executed(_))
}

fn problem<R: std::fmt::Debug>(outcome: &Outcome<R>) -> ProblemKind {
    match outcome {
        Outcome::Problem(p) => [
            ProblemKind::InProgress,
            ProblemKind::StoreUnavailable,
            ProblemKind::KeyReused,
            ProblemKind::HandlerPanicked,
        ]
        .into_iter()
        .find(|k| k.type_uri() == p.type_uri)
        .unwrap_or_else(|| panic!("unexpected problem {p:?}")),
        other => panic!("expected a problem, got {other:?}"),
    }
}

/// The store is unreachable for longer than the lease right after the handler ran: the outcome is
/// stored once it is back, and a retry during the outage finds the key in progress instead of
/// running the handler a second time (the renewals cover the completion's retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_covers_storing_the_outcome() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    let rt = runtime(store.clone());
    let policy = policy("lease.covers.completion");
    let executions = Arc::new(AtomicUsize::new(0));
    // Five failed completions back off 50 + 100 + 200 + 400 + 800 ms: two and a half leases.
    for _ in 0..5 {
        store.push(Op::Complete, Fault::Fail(Failure::Unavailable));
    }
    let first = tokio::spawn({
        let (rt, executions) = (rt.clone(), executions.clone());
        async move { rt.execute(policy, request("k1"), handler(executions, "first")).await }
    });
    // Retries while the first request is still storing its outcome, well past its first lease.
    while store.calls(Op::Complete) < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retry = rt.execute(policy, request("k1"), handler(executions.clone(), "second")).await;
    assert_eq!(problem(&retry), ProblemKind::InProgress);
    assert!(executed(&first.await.unwrap()));
    match rt.execute(policy, request("k1"), handler(executions.clone(), "third")).await {
        Outcome::Replayed(stored) => assert_eq!(&stored.body[..], b"first"),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    assert_eq!(store.calls(Op::Complete), 6);
    assert!(store.calls(Op::Renew) >= 2, "renewals while the completion was retried: {store:?}");
}

/// A renewal that never answers holds neither the handler nor the request: it is bounded by the
/// store timeout, the handler runs on and its outcome is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_hangs_holds_up_nothing() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.always(Op::Renew, Fault::Hang);
    let rt = runtime(store.clone());
    let policy = policy("lease.renewal.hangs");
    let executions = Arc::new(AtomicUsize::new(0));
    let slow = {
        let executions = executions.clone();
        async move {
            // Three renewal periods: renewals start and hang while the handler sleeps.
            tokio::time::sleep(LEASE / 2).await;
            handler(executions, "slow").await
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(20), rt.execute(policy, request("k1"), slow))
        .await
        .expect("the request finishes although every renewal hangs");
    assert!(executed(&outcome));
    assert!(store.calls(Op::Renew) >= 2, "{store:?}");
    assert!(matches!(
        rt.execute(policy, request("k1"), handler(executions.clone(), "again")).await,
        Outcome::Replayed(_)
    ));
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

/// A renewal held in the store does not pause the handler: the handler finishes and its outcome
/// is stored while that renewal is still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_runs_while_a_renewal_waits() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    let gate = Arc::new(Notify::new());
    store.push(Op::Renew, Fault::Hold(gate.clone()));
    let rt = Runtime::new(store.clone(), Config { store_timeout: Duration::from_secs(3600), ..Config::default() });
    let policy = policy("lease.renewal.waits");
    let executions = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (store, executions) = (store.clone(), executions.clone());
        async move {
            while store.calls(Op::Renew) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            handler(executions, "done").await
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(20), rt.execute(policy, request("k1"), handler))
        .await
        .expect("the handler finished while its first renewal was held");
    assert!(executed(&outcome));
    assert!(matches!(
        rt.store().claim(&RecordKey::new(policy.scope, "", "k1"), &request("k1").fingerprint.unwrap(), LEASE).await,
        Ok(Claim::Completed(_))
    ));
    gate.notify_one();
}

/// A handler that blocks its thread (a synchronous call, a long computation) for several leases
/// keeps its claim on a multi-threaded runtime: the renewals run on another thread, and a
/// concurrent retry finds the key in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_blocking_handler_keeps_its_claim() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    let rt = runtime(store.clone());
    let policy = policy("lease.blocking.handler");
    let executions = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let first = tokio::spawn({
        let (rt, executions, started) = (rt.clone(), executions.clone(), started.clone());
        async move {
            let blocking = async move {
                started.notify_one();
                std::thread::sleep(LEASE * 3);
                handler(executions, "blocking").await
            };
            rt.execute(policy, request("k1"), blocking).await
        }
    });
    started.notified().await;
    for _ in 0..6 {
        tokio::time::sleep(LEASE / 2).await;
        if first.is_finished() {
            break;
        }
        let retry = rt.execute(policy, request("k1"), handler(executions.clone(), "retry")).await;
        assert_eq!(problem(&retry), ProblemKind::InProgress, "{store:?}");
    }
    assert!(executed(&first.await.unwrap()));
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    assert!(store.calls(Op::Renew) >= 3, "{store:?}");
}

/// A renewal that finds the claim taken over stops the renewals, and the outcome is not written
/// over the new owner's claim (no completion is even attempted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_never_completed() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.always(Op::Renew, Fault::Fail(Failure::Fenced));
    let rt = runtime(store.clone());
    let policy = policy("lease.lost");
    let executions = Arc::new(AtomicUsize::new(0));
    let slow = {
        let executions = executions.clone();
        async move {
            tokio::time::sleep(LEASE / 2).await;
            handler(executions, "late").await
        }
    };
    assert!(executed(&rt.execute(policy, request("k1"), slow).await));
    assert_eq!(store.calls(Op::Renew), 1, "renewals stop once the claim is lost");
    assert_eq!(store.calls(Op::Complete), 0);
}

/// A claim that gets no answer within the store timeout fails closed (503) without running the
/// handler; with `fail_open`, an unreachable store (an error or a timeout) runs it unprotected.
#[tokio::test]
async fn a_claim_without_an_answer_fails_closed_within_the_store_timeout() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.always(Op::Claim, Fault::Hang);
    let rt = runtime(store.clone());
    let executions = Arc::new(AtomicUsize::new(0));
    let closed = tokio::time::timeout(
        Duration::from_secs(20),
        rt.execute(policy("claim.hangs"), request("k1"), handler(executions.clone(), "x")),
    )
    .await
    .expect("bounded by the store timeout");
    assert_eq!(problem(&closed), ProblemKind::StoreUnavailable);
    assert_eq!(executions.load(Ordering::SeqCst), 0);
    let open: &'static Policy = Box::leak(Box::new(Policy { fail_open: true, ..*policy("claim.hangs.open") }));
    assert!(executed(&rt.execute(open, request("k2"), handler(executions.clone(), "x")).await));
    store.always(Op::Claim, Fault::Fail(Failure::Unavailable));
    assert!(executed(&rt.execute(open, request("k3"), handler(executions.clone(), "x")).await));
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

/// `fail_open` is for an unreachable store only: a full store or a corrupt record fails closed
/// even on a `fail_open` route, and nothing runs.
#[tokio::test]
async fn fail_open_does_not_cover_a_full_store_or_a_corrupt_record() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    let rt = runtime(store.clone());
    let open: &'static Policy = Box::leak(Box::new(Policy { fail_open: true, ..*policy("fail.open.narrow") }));
    let executions = Arc::new(AtomicUsize::new(0));
    for failure in [Failure::Full, Failure::Corrupt] {
        store.push(Op::Claim, Fault::Fail(failure));
        let outcome = rt.execute(open, request("k1"), handler(executions.clone(), "x")).await;
        assert_eq!(problem(&outcome), ProblemKind::StoreUnavailable, "{failure:?}");
        let Outcome::Problem(p) = outcome else { unreachable!() };
        assert!(p.detail.contains("Nothing was executed") || p.detail.contains("nothing was executed"), "{p:?}");
    }
    assert_eq!(executions.load(Ordering::SeqCst), 0);
}

/// A completion whose answer is lost (it was applied) is retried: the retry is fenced or accepted
/// by the store, never a second execution, and the key replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_answer_was_lost_still_replays() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.push(Op::Complete, Fault::LoseAnswer);
    let rt = runtime(store.clone());
    let policy = policy("complete.answer.lost");
    let executions = Arc::new(AtomicUsize::new(0));
    assert!(executed(&rt.execute(policy, request("k1"), handler(executions.clone(), "once")).await));
    match rt.execute(policy, request("k1"), handler(executions.clone(), "twice")).await {
        Outcome::Replayed(stored) => assert_eq!(&stored.body[..], b"once"),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}
