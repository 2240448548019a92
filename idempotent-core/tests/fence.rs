//! Where timing alone could run a handler twice: an instance that loses its store for longer than
//! its lease (a partition, a long pause) while a healthy instance's retry takes the key over, and
//! a `fail_open` claim whose answer was lost. On paused time, with two runtimes (two instances)
//! sharing one store.

use bytes::Bytes;
use idempotent_core::engine::{Captured, Config, Fence, LeaseLost, Outcome, Request, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::key::IdempotencyKey;
use idempotent_core::policy::Policy;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{MemoryStore, Store};
use idempotent_core::testing::fault::{Failure, Fault, FaultStore, Op};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(6);
const POLICY: Policy = Policy { lease: LEASE, ..Policy::new("fence.test") };
const OPEN: Policy = Policy { fail_open: true, lease: LEASE, ..Policy::new("fence.open") };

fn fp() -> Fingerprint {
    FingerprintBuilder::new(POLICY.scope).field("amount", &100).unwrap().finish()
}

fn request(key: &str) -> Request {
    Request { key: IdempotencyKey::parse(key.as_bytes()).map(Some), actor: Some("acct".into()), fingerprint: Ok(fp()) }
}

fn answer(status: u16) -> Captured<u16> {
    Captured::new(StoredResponse::new(status, [("content-type", "text/plain")], Bytes::from_static(b"x")), status)
}

/// Instance A loses the store (every renewal fails) while its handler works for 20 s; after its
/// 6 s lease, instance B's retry takes the key over and runs. When A's handler comes back to do
/// its effect, the fence says the lease is gone: with the check, one effect; without it (the
/// hazard the fence exists for), two.
async fn partitioned_instance(checks_fence: bool) -> (usize, Outcome<u16>, Outcome<u16>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let partitioned = Arc::new(FaultStore::new(store.clone()));
    partitioned.always(Op::Renew, Fault::Fail(Failure::Unavailable));
    let a = Runtime::new(partitioned, Config::default());
    let b = Runtime::new(store, Config::default());
    let effects = Arc::new(AtomicUsize::new(0));

    let slow = {
        let effects = effects.clone();
        tokio::spawn(async move {
            a.execute(&POLICY, request("k"), async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let fence = Fence::new();
                assert!(fence.claim().is_some(), "a protected handler runs under its claim");
                if checks_fence {
                    if let Err(lost) = fence.check() {
                        assert_eq!(lost, LeaseLost::Expired);
                        return answer(503);
                    }
                }
                effects.fetch_add(1, Ordering::SeqCst);
                answer(201)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let effects_b = effects.clone();
    let retry = b
        .execute(&POLICY, request("k"), async move {
            assert!(Fence::new().check().is_ok(), "the new holder's lease is good");
            effects_b.fetch_add(1, Ordering::SeqCst);
            answer(201)
        })
        .await;
    let first = slow.await.unwrap();
    (effects.load(Ordering::SeqCst), first, retry)
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_instance_past_its_lease_does_not_act() {
    let (effects, first, retry) = partitioned_instance(true).await;
    assert!(matches!(retry, Outcome::Executed(201)), "{retry:?}");
    assert!(matches!(first, Outcome::Executed(503)), "the stale holder answers a retryable error: {first:?}");
    assert_eq!(effects, 1);
}

#[tokio::test(start_paused = true)]
async fn without_the_fence_a_partitioned_instance_acts_twice() {
    let (effects, _, _) = partitioned_instance(false).await;
    assert_eq!(effects, 2, "what the fence is for");
}

/// Outside a protected handler there is no claim, and nothing to fence.
#[tokio::test]
async fn no_claim_outside_a_protected_handler() {
    assert!(Fence::new().claim().is_none());
    assert_eq!(Fence::new().check(), Ok(()));
}

/// A `fail_open` claim that reached the store but whose answer was lost: the request runs
/// unprotected (the store looked unreachable), and its outcome is stored under the orphan claim,
/// so the client's retry replays it instead of waiting for the orphan's lease and running again.
#[tokio::test(start_paused = true)]
async fn a_fail_open_claim_whose_answer_was_lost_is_resolved() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.push(Op::Claim, Fault::LoseAnswer);
    let rt = Runtime::new(store.clone(), Config::default());
    let runs = Arc::new(AtomicUsize::new(0));
    for attempt in 0..3 {
        let runs = runs.clone();
        let outcome = rt
            .execute(&OPEN, request("open"), async move {
                runs.fetch_add(1, Ordering::SeqCst);
                answer(201)
            })
            .await;
        match attempt {
            0 => assert!(matches!(outcome, Outcome::Executed(201)), "ran unprotected: {outcome:?}"),
            _ => assert!(matches!(outcome, Outcome::Replayed(_)), "attempt {attempt}: {outcome:?}"),
        }
        // Well past the orphan claim's lease: it would have been taken over by now.
        tokio::time::sleep(LEASE * 2).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(store.calls(Op::Complete), 1, "the outcome was stored under the lost claim's token");
}

const QUICK: Policy = Policy::new("fence.quick");

idempotent_core::inventory::submit! {
    idempotent_core::registry::RouteRecord::protected(
        QUICK, "fence::quick", file!(), line!(), idempotent_core::registry::Framework::Axum,
    )
}

/// A 409 tells the client to come back when the holder will typically be done: a scope whose
/// handlers take 300 ms says a second, not the ten seconds left on the lease.
#[tokio::test(start_paused = true)]
async fn retry_after_follows_how_long_the_scope_takes() {
    let rt = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
    let quick = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        answer(201)
    };
    for i in 0..3 {
        assert!(matches!(rt.execute(&QUICK, request(&format!("warm-{i}")), quick()).await, Outcome::Executed(201)));
    }
    let running = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute(&QUICK, request("busy"), quick()).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = rt.execute(&QUICK, request("busy"), quick()).await;
    let Outcome::Problem(problem) = duplicate else { panic!("{duplicate:?}") };
    assert_eq!((problem.status, problem.retry_after), (409, Some(1)));
    assert!(matches!(running.await.unwrap(), Outcome::Executed(201)));
}
