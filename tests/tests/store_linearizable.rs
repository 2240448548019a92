//! Linearizability of each real store: concurrent clients issue random claims, renewals,
//! completions, releases, inspections and invalidations on one key, and the history of what they
//! asked, what they were answered, and when, must be explained by some order of the operations
//! that keeps their real-time order and in which every answer is the one the model's store step
//! gives ([`idempotent_model::linearizable`]).
//!
//! Leases last an hour, so that no lease runs out during a history and time plays no part in the
//! answers. Each store runs [`KEYS`] histories of [`CLIENTS`] clients and [`OPS`] operations per
//! client; Redis also runs them through the fault proxy, whose connections are cut every 150 ms:
//! an operation whose call fails (or gets no answer within the engine's store timeout) may or may
//! not have taken effect, and the check allows either.

use idempotent_core::store::{RedisStore, Store, StoreError};
use idempotent_model::linearizable::{linearizable, Event};
use idempotent_model::store::{Op, Purge};
use idempotent_tests::fault_proxy::FaultProxy;
use idempotent_tests::spec::{store, Driver};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: u64 = 4;
const CLIENTS: u8 = 4;
const OPS: usize = 40;
const LEASE: Duration = Duration::from_secs(3600);
/// The bound on one call, the engine's default.
const STORE_TIMEOUT: Duration = idempotent_core::engine::DEFAULT_STORE_TIMEOUT;

/// A small deterministic generator (xorshift), so a failing history can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Client `c`'s next operation: mostly with one of its own two tokens, sometimes another's.
fn next_op(rng: &mut Rng, c: u8) -> Op {
    let token = if rng.below(6) == 0 { rng.below(u64::from(CLIENTS) * 2) as u8 } else { c * 2 + rng.below(2) as u8 };
    match rng.below(20) {
        0..=6 => Op::Claim { token, fingerprint: u8::from(rng.below(8) == 0) },
        7..=8 => Op::Renew { token },
        9..=12 => Op::Complete { token },
        13..=14 => Op::Release { token },
        15..=16 => Op::Inspect,
        17..=18 => Op::Invalidate(Purge::Any),
        _ => Op::Invalidate(Purge::Completed),
    }
}

/// One history on a fresh key of `store`; `faulty`: failed calls are allowed (their answer is
/// unknown).
async fn history(store: Arc<dyn Store>, seed: u64, faulty: bool) -> Vec<Event> {
    let driver = Arc::new(Driver::new(store, &format!("lin-{seed}"), usize::from(CLIENTS) * 2, LEASE));
    let start = Instant::now();
    let clients = (0..CLIENTS).map(|c| {
        let driver = driver.clone();
        tokio::spawn(async move {
            let mut rng = Rng((seed * 31 + u64::from(c) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut events = Vec::with_capacity(OPS);
            for _ in 0..OPS {
                let op = next_op(&mut rng, c);
                let invoked = start.elapsed().as_nanos() as u64;
                // Bounded as the engine bounds every store call: no answer in time is a failure.
                let answer = match tokio::time::timeout(STORE_TIMEOUT, driver.run(op)).await {
                    Ok(Ok(answer)) => Some(answer),
                    Ok(Err(StoreError::Unavailable(_))) | Err(_) if faulty => None,
                    Ok(Err(e)) => panic!("{op:?}: {e}"),
                    Err(_) => panic!("{op:?}: no answer within {STORE_TIMEOUT:?}"),
                };
                // A call that failed on a reset connection took effect before it failed, if at
                // all; one that got no answer in time may still take effect later.
                let returned = match answer {
                    None if start.elapsed().as_nanos() as u64 - invoked >= STORE_TIMEOUT.as_nanos() as u64 => u64::MAX,
                    _ => start.elapsed().as_nanos() as u64,
                };
                events.push(Event { op, answer, invoked, returned });
            }
            events
        })
    });
    let mut all = Vec::new();
    for c in futures_util::future::join_all(clients).await {
        all.extend(c.expect("client"));
    }
    all
}

/// Checks [`KEYS`] histories on `store`, one after another.
async fn check(name: &str, store: Arc<dyn Store>, faulty: bool) {
    let (mut ops, mut failed, started) = (0, 0, Instant::now());
    for seed in 0..KEYS {
        let events = history(store.clone(), seed, faulty).await;
        ops += events.len();
        failed += events.iter().filter(|e| e.answer.is_none()).count();
        let checking = Instant::now();
        match linearizable(&events) {
            Ok(order) => eprintln!(
                "{name}: history {seed}: {} operations linearizable ({} ordered), checked in {:?}",
                events.len(),
                order.len(),
                checking.elapsed()
            ),
            Err(e) => {
                let longest: Vec<_> = e.longest.iter().map(|&i| events[i]).collect();
                panic!("{name}: history {seed} is not linearizable; longest order found: {longest:#?}\nhistory: {events:#?}")
            }
        }
    }
    eprintln!("{name}: {KEYS} histories, {ops} operations ({failed} failed calls), {:?}", started.elapsed());
    if faulty {
        // Both kinds of operation in the histories: answered ones, and failed ones to place.
        assert!(failed > 0 && failed * 2 < ops, "{failed} of {ops} calls failed");
    } else {
        assert_eq!(failed, 0);
    }
}

async fn plain(name: &str) {
    if let Some(s) = store(name).await {
        check(name, s, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_is_linearizable() {
    plain("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_is_linearizable() {
    plain("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_is_linearizable() {
    plain("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_is_linearizable() {
    plain("mysql").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_is_linearizable() {
    plain("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_is_linearizable() {
    plain("redis-cluster").await;
}

/// Cuts every connection through `proxy` every 150 ms, for 10 ms, until the returned task is
/// aborted.
fn cutting(proxy: Arc<FaultProxy>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(10)).await;
            proxy.heal();
        }
    })
}

/// A quarter or so of the calls fail, each of which may or may not have taken effect; the search
/// places a failed call only where it changes the record and merges the configurations that differ
/// only in failed calls no longer placeable, so each history checks in well under a millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_through_cut_connections_is_linearizable() {
    let Some(url) = idempotent_tests::redis_server::redis_url().await else { return };
    let host = url.trim_start_matches("redis://").split('/').next().unwrap_or_default().to_owned();
    let upstream = tokio::net::lookup_host(host).await.expect("resolve").next().expect("an address");
    let proxy = Arc::new(FaultProxy::start(upstream).await);
    let store = RedisStore::builder(&format!("redis://{}", proxy.addr()))
        .prefix(idempotent_tests::redis_server::test_prefix())
        .build()
        .await
        .expect("connect through the proxy");
    let cuts = cutting(proxy.clone());
    check("redis through cut connections", Arc::new(store), true).await;
    cuts.abort();
}
