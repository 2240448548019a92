//! The execution state machine under real concurrency, on the memory store.

use async_trait::async_trait;
use bytes::Bytes;
use idempotent_core::engine::{Captured, Config, Outcome, Request, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::key::IdempotencyKey;
use idempotent_core::policy::{ConflictMode, KeyRequirement, Policy};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, ClaimToken, Invalidated, MemoryStore, Purge, RecordKey, Store, StoreError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const POLICY: Policy = Policy::new("engine.test");

fn fp(v: i64) -> Fingerprint {
    FingerprintBuilder::new(POLICY.scope).field("v", &v).unwrap().finish()
}

fn request(key: &str, v: i64) -> Request {
    Request {
        key: IdempotencyKey::parse(key.as_bytes()).map(Some),
        actor: Some("actor".into()),
        fingerprint: Ok(fp(v)),
    }
}

fn response(status: u16, body: &'static str) -> Captured<u16> {
    Captured::new(
        StoredResponse::new(status, [("content-type", "text/plain")], Bytes::from_static(body.as_bytes())),
        status,
    )
}

fn runtime() -> Runtime {
    Runtime::new(Arc::new(MemoryStore::new()), Config::default())
}

fn problem_type<R>(o: &Outcome<R>) -> Option<&'static str> {
    match o {
        Outcome::Problem(p) => Some(p.type_uri),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_tasks_racing_on_one_key_run_the_handler_once() {
    let rt = runtime();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (rt, runs) = (rt.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            rt.execute(&POLICY, request("race", 1), async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                response(201, "done")
            })
            .await
        }));
    }
    let mut executed = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Executed(201) => executed += 1,
            Outcome::Replayed(r) => assert_eq!(r.body, Bytes::from_static(b"done")),
            o => {
                assert_eq!(problem_type(&o), Some("urn:idempotent:problem:in-progress"));
                conflicts += 1;
            }
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(executed, 1);
    assert!(conflicts > 0, "some duplicates must have seen the claim in progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_mode_duplicates_replay_the_first_response() {
    const WAIT: Policy = Policy { on_conflict: ConflictMode::Wait, ..Policy::new("engine.wait") };
    let rt = runtime();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (rt, runs) = (rt.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request { fingerprint: Ok(FingerprintBuilder::new(WAIT.scope).finish()), ..request("w", 0) };
            rt.execute(&WAIT, req, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                response(200, "waited")
            })
            .await
        }));
    }
    let (mut executed, mut replayed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Executed(_) => executed += 1,
            Outcome::Replayed(r) => {
                assert_eq!(r.body, Bytes::from_static(b"waited"));
                replayed += 1;
            }
            Outcome::Problem(p) => panic!("unexpected problem {p:?}"),
        }
    }
    assert_eq!((executed, replayed, runs.load(Ordering::SeqCst)), (1, 49, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_lease_is_taken_over_exactly_once() {
    const SHORT: Policy = Policy { lease: Duration::from_millis(200), ..Policy::new("engine.takeover") };
    let store = Arc::new(MemoryStore::new());
    let rt = Runtime::new(store.clone(), Config::default());
    let key = RecordKey::new(SHORT.scope, idempotent_core::actor::digest("actor"), "crashed");
    let fp0 = FingerprintBuilder::new(SHORT.scope).finish();
    // A worker claims and "crashes": it never completes nor releases.
    assert!(matches!(store.claim(&key, &fp0, SHORT.lease).await.unwrap(), Claim::Acquired(_)));
    let blocked = rt
        .execute(&SHORT, Request { fingerprint: Ok(fp0), ..request("crashed", 0) }, async { response(200, "x") })
        .await;
    assert_eq!(problem_type(&blocked), Some("urn:idempotent:problem:in-progress"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (rt, runs) = (rt.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request { fingerprint: Ok(fp0), ..request("crashed", 0) };
            rt.execute(&SHORT, req, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                response(200, "recovered")
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stale_workers_completion_is_refused() {
    let store = MemoryStore::new();
    let key = RecordKey::new("s", "a", "k");
    let lease = Duration::from_millis(50);
    let Claim::Acquired(stale) = store.claim(&key, &fp(1), lease).await.unwrap() else { panic!("first claim") };
    tokio::time::sleep(Duration::from_millis(80)).await;
    let Claim::Acquired(fresh) = store.claim(&key, &fp(1), Duration::from_secs(10)).await.unwrap() else {
        panic!("takeover")
    };
    let late = StoredResponse::new(200, Vec::<(&str, &str)>::new(), Bytes::from_static(b"stale"));
    assert!(matches!(store.complete(&key, &stale, &late, Duration::from_secs(60)).await, Err(StoreError::Fenced)));
    assert!(matches!(store.release(&key, &stale).await, Err(StoreError::Fenced)));
    assert!(matches!(store.renew(&key, &stale, lease).await, Err(StoreError::Fenced)));
    // The newer claim is intact and completes.
    assert!(matches!(store.claim(&key, &fp(1), lease).await.unwrap(), Claim::InProgress { .. }));
    let good = StoredResponse::new(201, Vec::<(&str, &str)>::new(), Bytes::from_static(b"fresh"));
    store.complete(&key, &fresh, &good, Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.claim(&key, &fp(1), lease).await.unwrap(), Claim::Completed(good));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_slow_handler_s_claim() {
    const SLOW: Policy = Policy { lease: Duration::from_millis(150), ..Policy::new("engine.slow") };
    let rt = runtime();
    let runs = Arc::new(AtomicUsize::new(0));
    let first = {
        let (rt, runs) = (rt.clone(), runs.clone());
        tokio::spawn(async move {
            rt.execute(&SLOW, request("slow", 1), async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(700)).await;
                response(201, "slow")
            })
            .await
        })
    };
    // Well past several leases, the claim is still held.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        let dup = rt
            .execute(&SLOW, request("slow", 1), async {
                panic!("a live claim must never be taken over");
            })
            .await;
        assert_eq!(problem_type::<u16>(&dup), Some("urn:idempotent:problem:in-progress"));
    }
    assert!(matches!(first.await.unwrap(), Outcome::Executed(201)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn panic_releases_the_claim_and_the_retry_runs() {
    let rt = runtime();
    let panicked = rt
        .execute(&POLICY, request("p", 1), async {
            if true {
                panic!("handler bug");
            }
            response(200, "never")
        })
        .await;
    assert_eq!(problem_type(&panicked), Some("urn:idempotent:problem:handler-panicked"));
    let retry = rt.execute(&POLICY, request("p", 1), async { response(201, "ok") }).await;
    assert!(matches!(retry, Outcome::Executed(201)));
}

#[tokio::test]
async fn retryable_statuses_release_and_final_ones_are_stored() {
    let rt = runtime();
    let runs = AtomicUsize::new(0);
    for status in [503, 500, 429, 408] {
        let o = rt
            .execute(&POLICY, request("r", 1), async {
                runs.fetch_add(1, Ordering::SeqCst);
                response(status, "retry me")
            })
            .await;
        assert!(matches!(o, Outcome::Executed(s) if s == status));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4, "each retryable outcome let the retry run");
    let o = rt.execute(&POLICY, request("r", 1), async { response(404, "final") }).await;
    assert!(matches!(o, Outcome::Executed(404)));
    let replay = rt.execute(&POLICY, request("r", 1), async { response(200, "never") }).await;
    assert!(matches!(replay, Outcome::Replayed(r) if r.status == 404));
}

#[tokio::test]
async fn key_problems_and_optional_keys() {
    let rt = runtime();
    let missing = Request { key: Ok(None), ..request("x", 1) };
    let o = rt.execute(&POLICY, missing, async { response(200, "x") }).await;
    assert_eq!(problem_type(&o), Some("urn:idempotent:problem:key-missing"));
    let invalid = Request { key: IdempotencyKey::parse(b"").map(Some), ..request("x", 1) };
    let o = rt.execute(&POLICY, invalid, async { response(200, "x") }).await;
    assert_eq!(problem_type(&o), Some("urn:idempotent:problem:key-invalid"));
    const OPTIONAL: Policy = Policy { key: KeyRequirement::Optional, ..Policy::new("engine.optional") };
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        let o = rt
            .execute(&OPTIONAL, Request { key: Ok(None), ..request("x", 1) }, async {
                runs.fetch_add(1, Ordering::SeqCst);
                response(201, "unprotected")
            })
            .await;
        assert!(matches!(o, Outcome::Executed(201)));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "without a key every request runs");
}

#[tokio::test]
async fn mismatch_is_reported_for_a_changed_fingerprint() {
    let rt = runtime();
    rt.execute(&POLICY, request("m", 1), async { response(201, "one") }).await;
    let o = rt.execute(&POLICY, request("m", 2), async { response(201, "two") }).await;
    assert_eq!(problem_type(&o), Some("urn:idempotent:problem:key-reused"));
}

#[tokio::test]
async fn a_response_too_large_to_store_never_runs_twice() {
    let rt = runtime();
    let runs = AtomicUsize::new(0);
    let mut big = response(201, "");
    big.record.body_stored = false;
    let o = rt
        .execute(&POLICY, request("big", 1), async {
            runs.fetch_add(1, Ordering::SeqCst);
            big
        })
        .await;
    assert!(matches!(o, Outcome::Executed(201)));
    let retry = rt
        .execute(&POLICY, request("big", 1), async {
            runs.fetch_add(1, Ordering::SeqCst);
            response(201, "again")
        })
        .await;
    assert_eq!(problem_type(&retry), Some("urn:idempotent:problem:response-not-stored"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A store that can be switched off, to drive the unreachable-store paths of the state machine.
struct Switchable {
    inner: MemoryStore,
    down: AtomicBool,
}

#[async_trait]
impl Store for Switchable {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        self.inner.claim_as(key, fp, lease, token).await
    }
    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        self.inner.complete(key, token, r, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn inspect(&self, key: &RecordKey) -> Result<Option<idempotent_core::store::RecordInfo>, StoreError> {
        self.inner.inspect(key).await
    }
    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.inner.invalidate(key, purge).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }
    fn name(&self) -> &'static str {
        "switchable"
    }
}

#[tokio::test]
async fn unreachable_store_fails_closed_with_503_or_open_when_asked() {
    let store = Arc::new(Switchable { inner: MemoryStore::new(), down: AtomicBool::new(true) });
    let rt = Runtime::new(store.clone(), Config::default());
    let runs = AtomicUsize::new(0);
    let o = rt
        .execute(&POLICY, request("down", 1), async {
            runs.fetch_add(1, Ordering::SeqCst);
            response(201, "x")
        })
        .await;
    match &o {
        Outcome::Problem(p) => {
            assert_eq!(p.type_uri, "urn:idempotent:problem:store-unavailable");
            assert_eq!(p.status, 503);
            assert_eq!(p.retry_after, Some(2));
        }
        _ => panic!("expected 503"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "fail closed runs nothing");
    const OPEN: Policy = Policy { fail_open: true, ..Policy::new("engine.open") };
    let o = rt
        .execute(&OPEN, request("down", 1), async {
            runs.fetch_add(1, Ordering::SeqCst);
            response(201, "x")
        })
        .await;
    assert!(matches!(o, Outcome::Executed(201)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn completion_survives_a_brief_store_outage() {
    let store = Arc::new(Switchable { inner: MemoryStore::new(), down: AtomicBool::new(false) });
    let rt = Runtime::new(store.clone(), Config::default());
    let s2 = store.clone();
    let o = rt
        .execute(&POLICY, request("blip", 1), async move {
            s2.down.store(true, Ordering::SeqCst);
            let s3 = s2.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(120)).await;
                s3.down.store(false, Ordering::SeqCst);
            });
            response(201, "stored late")
        })
        .await;
    assert!(matches!(o, Outcome::Executed(201)));
    let replay = rt.execute(&POLICY, request("blip", 1), async { response(201, "never") }).await;
    assert!(matches!(replay, Outcome::Replayed(r) if r.body == Bytes::from_static(b"stored late")));
}
