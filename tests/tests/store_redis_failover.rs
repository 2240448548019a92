//! The Redis store on a Redis Cluster whose topology changes under load: a replica promoted by
//! `CLUSTER FAILOVER`, and a master killed and replaced by its replica; and a node that lost the
//! store's scripts. Each test starts a cluster of its own (three masters, with one replica each
//! for the failovers).
//!
//! Workers run request cycles on fresh keys through the switch (claim, a concurrent retry's
//! claim, complete, replay), each operation retried while the store answers `Unavailable` (503).
//! The tests check that every operation is answered within [`BOUND`], that no key is acquired
//! twice while its first claim is live, that claims held and records completed before the switch
//! survive it, and print how many operations failed with `Unavailable` meanwhile.

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, ClaimToken, RecordKey, RedisStore, Store, StoreError};
use idempotent_tests::redis_cluster::{RedisCluster, Role};
use idempotent_tests::redis_server::test_prefix;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest any operation may keep failing with `Unavailable` before it is answered.
const BOUND: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);
/// Fast failure detection, so a killed master's replica is promoted within a few seconds.
const NODE_ARGS: &[&str] = &["--cluster-node-timeout", "1000"];

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn key(k: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_1", k)
}

fn response(body: &str) -> StoredResponse {
    StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from(body.to_owned()))
}

/// What the workers saw.
#[derive(Debug, Default)]
struct Tally {
    /// Operations answered (after their retries).
    answered: AtomicU64,
    /// Attempts that failed with `Unavailable`.
    unavailable: AtomicU64,
    /// Longest time an operation took to be answered, retries included (ms).
    slowest_ms: AtomicU64,
    /// Milliseconds from the switch to the last `Unavailable` seen.
    last_unavailable_ms: AtomicU64,
    /// Claims whose answer was lost but that were written (the retry found the key in progress).
    ambiguous: AtomicU64,
    /// Request cycles finished after the switch.
    cycles_after: AtomicU64,
}

/// Runs `op` until it is answered with anything but `Unavailable`, within [`BOUND`]; returns the
/// answer and whether an attempt failed first.
async fn answered<T, F, Fut>(tally: &Tally, switch: Instant, what: &str, mut op: F) -> (Result<T, StoreError>, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut failed = false;
    loop {
        match op().await {
            Err(StoreError::Unavailable(e)) => {
                failed = true;
                tally.unavailable.fetch_add(1, Relaxed);
                let since = Instant::now().saturating_duration_since(switch);
                tally.last_unavailable_ms.fetch_max(since.as_millis() as u64, Relaxed);
                assert!(started.elapsed() < BOUND, "{what}: still unavailable after {:?}: {e}", started.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => {
                tally.answered.fetch_add(1, Relaxed);
                tally.slowest_ms.fetch_max(started.elapsed().as_millis() as u64, Relaxed);
                return (other, failed);
            }
        }
    }
}

/// One request's life on a fresh key: claim, a retry's claim while it runs (never acquires),
/// complete, replay.
async fn cycle(s: &RedisStore, tally: &Tally, switch: Instant, name: &str) {
    let k = &key(name);
    let f = &fp(1);
    let (first, retried) = answered(tally, switch, name, || s.claim(k, f, LEASE)).await;
    let token = match first {
        Ok(Claim::Acquired(t)) => t,
        // An earlier attempt's claim was written but its answer lost: the key stays in progress
        // until its lease ends, as for any ambiguous claim.
        Ok(Claim::InProgress { .. }) if retried => {
            tally.ambiguous.fetch_add(1, Relaxed);
            return;
        }
        other => panic!("{name}: first claim answered {other:?}"),
    };
    match answered(tally, switch, name, || s.claim(k, f, LEASE)).await.0 {
        Ok(Claim::InProgress { .. }) => {}
        other => panic!("{name} claimed again while its first claim is live: {other:?}"),
    }
    let r = &response(name);
    match answered(tally, switch, name, || s.complete(k, &token, r, TTL)).await {
        (Ok(()), _) => {}
        // A completion written whose answer was lost: its retry finds the record completed.
        (Err(StoreError::Fenced), true) => {}
        other => panic!("{name}: completion answered {other:?}"),
    }
    match answered(tally, switch, name, || s.claim(k, f, LEASE)).await.0 {
        Ok(Claim::Completed(got)) => assert_eq!(&got, r, "{name}"),
        other => panic!("{name}: replay answered {other:?}"),
    }
}

/// Request cycles on fresh keys from `workers` tasks until `stop`.
fn load(
    s: &Arc<RedisStore>,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
    switch: Instant,
    workers: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (s, tally, stop) = (s.clone(), tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Relaxed) {
                    let after = Instant::now() > switch;
                    cycle(&s, &tally, switch, &format!("load-{w}-{i}")).await;
                    if after {
                        tally.cycles_after.fetch_add(1, Relaxed);
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

/// Before the switch: records completed and claims held on keys of every master.
struct Before {
    done: Vec<RecordKey>,
    held: Vec<(RecordKey, ClaimToken)>,
}

async fn before(s: &RedisStore, cluster: &RedisCluster) -> Before {
    let mut done = Vec::new();
    for i in 0..60 {
        let k = key(&format!("done-{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("fresh key") };
        s.complete(&k, &t, &response("done"), TTL).await.unwrap();
        assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response("done")));
        done.push(k);
    }
    let mut held = Vec::new();
    for i in 0..60 {
        let k = key(&format!("held-{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("fresh key") };
        held.push((k, t));
    }
    for master in cluster.masters().await {
        assert!(records_on(s, master).await > 0, "no record on master {master}");
    }
    Before { done, held }
}

/// After the switch: what was completed replays, what was claimed is still held by its token
/// (never acquired by another claim) and completes, and fresh keys on every master work.
async fn after(s: &RedisStore, cluster: &RedisCluster, was: Before, tally: &Tally, switch: Instant) {
    let (f, done, held) = (&fp(1), &response("done"), &response("held"));
    for k in &was.done {
        let (r, _) = answered(tally, switch, "replay", || s.claim(k, f, LEASE)).await;
        assert_eq!(&r.unwrap(), &Claim::Completed(done.clone()), "{k:?}");
    }
    for (k, t) in &was.held {
        match answered(tally, switch, "held", || s.claim(k, f, LEASE)).await.0 {
            Ok(Claim::InProgress { .. }) => {}
            other => panic!("{k:?}: a claim held across the switch answered {other:?}"),
        }
        answered(tally, switch, "renew", || s.renew(k, t, LEASE)).await.0.unwrap();
        answered(tally, switch, "complete", || s.complete(k, t, held, TTL)).await.0.unwrap();
        let (r, _) = answered(tally, switch, "replay", || s.claim(k, f, LEASE)).await;
        assert_eq!(&r.unwrap(), &Claim::Completed(held.clone()), "{k:?}");
    }
    for i in 0..60 {
        cycle(s, tally, switch, &format!("fresh-{i}")).await;
    }
    for master in cluster.masters().await {
        assert!(records_on(s, master).await > 0, "no record on master {master}");
    }
}

/// How many of the store's records the node on `port` holds.
async fn records_on(s: &RedisStore, port: u16) -> usize {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", s.prefix())).query_async(&mut c).await.unwrap();
    keys.len()
}

fn report(what: &str, tally: &Tally) {
    println!(
        "{what}: {} operations answered, {} attempts failed with Unavailable (503) during the switch, \
         the last {} ms after it; slowest operation {} ms; {} ambiguous claims; {} request cycles after the switch",
        tally.answered.load(Relaxed),
        tally.unavailable.load(Relaxed),
        tally.last_unavailable_ms.load(Relaxed),
        tally.slowest_ms.load(Relaxed),
        tally.ambiguous.load(Relaxed),
        tally.cycles_after.load(Relaxed),
    );
}

/// `CLUSTER FAILOVER` promotes a replica while requests run: every operation is answered within
/// the bound, no key is acquired twice, and the store keeps working on the new master without
/// being rebuilt. Redis does not replicate its script cache, so a promoted replica may have none
/// of the store's scripts; the test empties the replica's cache to make sure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_promoted_by_cluster_failover() {
    let Some(cluster) = RedisCluster::start(3, 1, NODE_ARGS).await else { return };
    let s = Arc::new(RedisStore::cluster(cluster.urls()).prefix(test_prefix()).build().await.unwrap());
    let was = before(&s, &cluster).await;
    let master = cluster.masters().await[0];
    let replica = cluster.replica_of(master).await.expect("a replica");
    cluster.flush_scripts(replica).await;
    cluster.wait_replicated(replica, Duration::from_secs(5)).await;

    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let switch = Instant::now() + Duration::from_millis(300);
    let workers = load(&s, &tally, &stop, switch, 8);
    tokio::time::sleep_until(switch.into()).await;
    cluster.failover(replica).await;
    let promoted = switch.elapsed();
    assert!(cluster.wait_until_settled(3, 3, Duration::from_secs(10)).await, "{:?}", cluster.roles().await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(tally.cycles_after.load(Relaxed) > 0, "no request ran after the failover");
    assert_eq!(cluster.replica_of(replica).await, Some(master), "the old master follows the new one");
    after(&s, &cluster, was, &tally, switch).await;
    assert!(records_on(&s, replica).await > 0);
    println!("replica {replica} promoted {promoted:?} after CLUSTER FAILOVER was sent");
    report("manual failover", &tally);
}

/// A master is killed (SIGKILL) while requests run: operations on its slots fail with
/// `Unavailable` until its replica is promoted, then the same store works again, claims held
/// before the kill are still held, and no key is acquired twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_killed_and_replaced_by_its_replica() {
    let Some(mut cluster) = RedisCluster::start(3, 1, NODE_ARGS).await else { return };
    let s = Arc::new(RedisStore::cluster(cluster.urls()).prefix(test_prefix()).build().await.unwrap());
    let was = before(&s, &cluster).await;
    let master = cluster.masters().await[0];
    let replica = cluster.replica_of(master).await.expect("a replica");
    cluster.flush_scripts(replica).await;
    // Nothing written before the kill may be lost to asynchronous replication: this test is about
    // the store, not about that window (see the store's docs).
    cluster.wait_replicated(replica, Duration::from_secs(5)).await;

    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let switch = Instant::now();
    cluster.kill(master);
    let workers = load(&s, &tally, &stop, switch, 8);
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.roles().await.iter().find(|(p, _)| *p == replica).and_then(|(_, r)| r.clone()) != Some(Role::Master) {
        assert!(Instant::now() < deadline, "replica {replica} was not promoted: {:?}", cluster.roles().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = switch.elapsed();
    assert!(cluster.wait_until_settled(3, 2, Duration::from_secs(10)).await, "{:?}", cluster.roles().await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(tally.cycles_after.load(Relaxed) > 0, "no request ran after the kill");
    after(&s, &cluster, was, &tally, switch).await;
    assert!(records_on(&s, replica).await > 0);
    println!("replica {replica} promoted {promoted:?} after master {master} was killed");
    report("master killed", &tally);
}

/// A node without the store's scripts (restarted, promoted, or `SCRIPT FLUSH`ed) gets each script
/// on its own with the store's first call there (`EVAL` after `NOSCRIPT`): that call succeeds at
/// once, even while another master cannot answer (here it is busy with a long script), because
/// loading a script asks nothing of the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_the_scripts_gets_them_alone() {
    let Some(cluster) = RedisCluster::start(3, 0, &[]).await else { return };
    let s = RedisStore::cluster(cluster.urls()).prefix(test_prefix()).build().await.unwrap();
    let f = &fp(1);
    // Every script on every master.
    for i in 0..30 {
        let k = key(&format!("warm-{i}"));
        let Claim::Acquired(t) = s.claim(&k, f, LEASE).await.unwrap() else { panic!("fresh key") };
        s.renew(&k, &t, LEASE).await.unwrap();
        if i % 2 == 0 {
            s.complete(&k, &t, &response("warm"), TTL).await.unwrap();
        } else {
            s.release(&k, &t).await.unwrap();
        }
    }
    let masters = cluster.masters().await;
    let (target, busy) = (masters[0], masters[1]);
    let mut keys = Vec::new();
    for i in 0.. {
        let k = key(&format!("on-target-{i}"));
        if cluster.owner(target, &s.redis_key(&k)).await == target {
            keys.push(k);
        }
        if keys.len() == 2 {
            break;
        }
    }
    cluster.flush_scripts(target).await;
    cluster.start_busy_script(busy).await;

    let (done, gone) = (&keys[0], &keys[1]);
    let t = match s.claim(done, f, LEASE).await {
        Ok(Claim::Acquired(t)) => t,
        other => panic!("first claim on a node without scripts: {other:?}"),
    };
    s.renew(done, &t, LEASE).await.expect("first renewal on a node without scripts");
    s.complete(done, &t, &response("alone"), TTL).await.expect("first completion on a node without scripts");
    assert_eq!(s.claim(done, f, LEASE).await.unwrap(), Claim::Completed(response("alone")));
    let Claim::Acquired(t) = s.claim(gone, f, LEASE).await.unwrap() else { panic!("fresh key") };
    s.release(gone, &t).await.expect("first release on a node without scripts");
    cluster.end_busy_script(busy).await;
}
