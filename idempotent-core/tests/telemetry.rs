//! The metrics a scripted sequence of protected requests records, read back exactly from a
//! `metrics-util` debugging recorder installed for this test's thread alone.

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use idempotent_core::actor::ActorSource;
use idempotent_core::engine::{Config, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::policy::Policy;
use idempotent_core::protocol::{respond, Caller};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, ClaimToken, Invalidated, MemoryStore, Purge, RecordKey, Store, StoreError};
use idempotent_core::telemetry::{self, RequestOutcome};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A lease of 600 ms: renewed every 100 ms.
static POLICY: Policy = Policy { lease: Duration::from_millis(600), ..Policy::new("metrics.test") };

/// The memory store, with switches: `down` fails every operation as unreachable, `renewals_fail`
/// fails renewals only.
#[derive(Default)]
struct Switched {
    inner: MemoryStore,
    down: AtomicBool,
    renewals_fail: AtomicBool,
}

impl Switched {
    fn check(&self, flag: &AtomicBool) -> Result<(), StoreError> {
        match self.down.load(Ordering::SeqCst) || flag.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable("switched off".into())),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Store for Switched {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.check(&self.down)?;
        self.inner.claim_as(key, fingerprint, lease, token).await
    }
    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.check(&self.renewals_fail)?;
        self.inner.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check(&self.down)?;
        self.inner.complete(key, token, r, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        self.check(&self.down)?;
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
        "switched"
    }
}

/// Everything recorded so far. A snapshot drains counters, gauges and histograms, so the values
/// of successive snapshots are added up.
#[derive(Default)]
struct Recorded {
    counters: HashMap<(String, Vec<(String, String)>), u64>,
    gauges: HashMap<(String, Vec<(String, String)>), f64>,
    samples: HashMap<(String, Vec<(String, String)>), usize>,
}

impl Recorded {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<(String, String)> =
                key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
            labels.sort();
            let id = (key.name().to_owned(), labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Gauge(g) => *self.gauges.entry(id).or_default() += g.into_inner(),
                DebugValue::Histogram(v) => *self.samples.entry(id).or_default() += v.len(),
            }
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        v.sort();
        v
    }

    fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> u64 {
        self.counters.get(&(name.to_owned(), Self::labels(pairs))).copied().unwrap_or(0)
    }

    fn gauge(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        self.gauges.get(&(name.to_owned(), Self::labels(pairs))).copied().unwrap_or(0.0)
    }

    fn samples(&self, name: &str, pairs: &[(&str, &str)]) -> usize {
        self.samples.get(&(name.to_owned(), Self::labels(pairs))).copied().unwrap_or(0)
    }
}

fn caller(runtime: &Runtime, key: Option<&str>, account: Option<&str>) -> Caller {
    let mut headers = http::HeaderMap::new();
    if let Some(k) = key {
        headers.insert("idempotency-key", k.parse().unwrap());
    }
    if let Some(a) = account {
        headers.insert("authorization", format!("Bearer {a}").parse().unwrap());
    }
    Caller::identify(runtime.config(), &headers, None)
}

fn fingerprint(amount: i64) -> Result<Fingerprint, idempotent_core::fingerprint::FingerprintError> {
    Ok(FingerprintBuilder::new(POLICY.scope).field("amount", &amount)?.finish())
}

async fn panics() -> http::Response<Full<Bytes>> {
    panic!("the handler fails")
}

fn reply(status: u16) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from_static(b"done")));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
}

/// One request as `acct_1` with `key`, whose handler answers `status` after `delay`.
async fn send(runtime: &Runtime, key: Option<&str>, amount: i64, status: u16, delay: Duration) -> u16 {
    let handler = async move {
        tokio::time::sleep(delay).await;
        reply(status)
    };
    let response = respond(runtime, &POLICY, caller(runtime, key, Some("acct_1")), fingerprint(amount), handler).await;
    response.status().as_u16()
}

#[test]
fn a_scripted_sequence_counts_each_outcome_exactly_once_per_request() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut recorded = Recorded::default();
    let tokio = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        tokio.block_on(async {
            let store = Arc::new(Switched::default());
            let config = Config { actor: ActorSource::BearerToken, ..Config::default() };
            let runtime = Runtime::new(store.clone(), config);
            let now = Duration::ZERO;

            assert_eq!(send(&runtime, Some("k1"), 100, 201, now).await, 201, "executed");
            assert_eq!(send(&runtime, Some("k1"), 100, 201, now).await, 201, "replayed");
            assert_eq!(send(&runtime, Some("k1"), 999, 201, now).await, 422, "mismatch");
            assert_eq!(send(&runtime, None, 100, 201, now).await, 400, "missing key");
            assert_eq!(send(&runtime, Some("\"\""), 100, 201, now).await, 400, "invalid key: empty");
            let anonymous = caller(&runtime, Some("k1"), None);
            let response = respond(&runtime, &POLICY, anonymous, fingerprint(100), async { reply(201) }).await;
            assert_eq!(response.status(), 401, "invalid key: nobody to namespace it");
            assert_eq!(send(&runtime, Some("k2"), 100, 503, now).await, 503, "released: retryable");
            let k3 = caller(&runtime, Some("k3"), Some("acct_1"));
            let panicked = respond(&runtime, &POLICY, k3, fingerprint(1), panics()).await;
            assert_eq!(panicked.status(), 500, "released: panicked");

            // A held claim: the gauge shows it, a second request with its key is 409.
            let gate = Arc::new(tokio::sync::Notify::new());
            let opened = gate.clone();
            let held = {
                let runtime = runtime.clone();
                tokio::spawn(async move {
                    let c = caller(&runtime, Some("k4"), Some("acct_1"));
                    respond(&runtime, &POLICY, c, fingerprint(4), async move {
                        opened.notified().await;
                        reply(201)
                    })
                    .await
                    .status()
                })
            };
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            recorded.take(&snapshotter);
            assert_eq!(recorded.gauge(telemetry::CLAIMS_IN_FLIGHT, &[("scope", "metrics.test")]), 1.0);
            assert_eq!(send(&runtime, Some("k4"), 4, 201, now).await, 409, "in progress");
            gate.notify_one();
            assert_eq!(held.await.unwrap(), 201, "executed once let go");

            store.down.store(true, Ordering::SeqCst);
            assert_eq!(send(&runtime, Some("k5"), 100, 201, now).await, 503, "store unavailable");
            store.down.store(false, Ordering::SeqCst);

            // Renewals at 100 and 200 ms of a handler that takes 250 ms.
            assert_eq!(send(&runtime, Some("k6"), 100, 201, Duration::from_millis(250)).await, 201, "executed");

            // A claim whose renewals fail (100 to 600 ms) expires; another request takes the key
            // over at 650 ms, and the first one's next renewal (700 ms) finds it lost.
            store.renewals_fail.store(true, Ordering::SeqCst);
            let slow = {
                let runtime = runtime.clone();
                tokio::spawn(async move { send(&runtime, Some("k7"), 7, 201, Duration::from_millis(1000)).await })
            };
            tokio::time::sleep(Duration::from_millis(650)).await;
            assert_eq!(send(&runtime, Some("k7"), 7, 201, now).await, 201, "executed: took the expired claim over");
            store.renewals_fail.store(false, Ordering::SeqCst);
            assert_eq!(slow.await.unwrap(), 201, "executed, outcome not stored");
        });
    });
    recorded.take(&snapshotter);

    let count = |outcome: RequestOutcome| {
        recorded.counter(
            telemetry::REQUESTS_TOTAL,
            &[("scope", "metrics.test"), ("outcome", outcome.as_str()), ("transport", "http")],
        )
    };
    let expected = [
        (RequestOutcome::Executed, 5),
        (RequestOutcome::Replayed, 1),
        (RequestOutcome::InProgress, 1),
        (RequestOutcome::Mismatch, 1),
        (RequestOutcome::MissingKey, 1),
        (RequestOutcome::InvalidKey, 2),
        (RequestOutcome::StoreUnavailable, 1),
        (RequestOutcome::Released, 2),
    ];
    for (outcome, n) in expected {
        assert_eq!(count(outcome), n, "{outcome}");
    }
    let total: u64 = RequestOutcome::ALL.iter().map(|o| count(*o)).sum();
    assert_eq!(total, 14, "one increment per request, and 14 requests were sent");

    let renewals =
        |result| recorded.counter(telemetry::LEASE_RENEWALS_TOTAL, &[("scope", "metrics.test"), ("result", result)]);
    assert_eq!((renewals("ok"), renewals("failed"), renewals("lost")), (2, 6, 1));

    let op = |operation| {
        recorded.samples(telemetry::STORE_OPERATION_SECONDS, &[("store", "switched"), ("operation", operation)])
    };
    // Claims: every keyed request with an actor (11), the failed one included. Completions: k1, k4,
    // k6 and the takeover of k7 (the first k7 lost its lease). Releases: k2 and k3. Renewals: 2 +
    // 6 + 1.
    assert_eq!((op("claim"), op("complete"), op("release"), op("renew")), (11, 4, 2, 9));
    assert_eq!(
        recorded.gauge(telemetry::CLAIMS_IN_FLIGHT, &[("scope", "metrics.test")]),
        0.0,
        "every claim given back"
    );
}

#[test]
fn the_memory_store_reports_the_records_its_sweeper_deletes() {
    static SHORT: Policy = Policy { ttl: Duration::from_millis(10), ..Policy::new("metrics.sweep") };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tokio = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        tokio.block_on(async {
            // Room for two records: the third claim sweeps the two expired ones.
            let runtime = Runtime::new(Arc::new(MemoryStore::with_limits(2, 1 << 20)), Config::default());
            for key in ["a", "b", "c"] {
                let c = Caller {
                    key: idempotent_core::key::IdempotencyKey::parse(key.as_bytes()).map(Some),
                    actor: Ok(None),
                    html: false,
                };
                let fp = Ok(FingerprintBuilder::new(SHORT.scope).finish());
                assert_eq!(respond(&runtime, &SHORT, c, fp, async { reply(201) }).await.status(), 201);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    });
    let mut recorded = Recorded::default();
    recorded.take(&snapshotter);
    assert_eq!(recorded.counter(telemetry::SWEPT_RECORDS_TOTAL, &[("store", "memory")]), 2);
}
