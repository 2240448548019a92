//! The Redis store against real servers: the shared store contract on a single node, on a
//! three-master Redis Cluster (many keys, so they land on every master) and on an application's
//! own `ConnectionManager`, corrupt and foreign values, a worker paused past its lease, a server
//! stopped and restarted mid-run, and the number of Redis commands per request.

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{Claim, ClaimToken, RecordKey, RedisStore, Store, StoreError};
use idempotent_tests::redis_server::{free_port, redis_cluster, redis_url, test_prefix, RedisProcess};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse::new(
        201,
        [("content-type", &b"application/json"[..]), ("x-bin", b"\x00\xff\r\n")],
        bytes::Bytes::from_static(body),
    )
}

fn key(k: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_1", k)
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

async fn acquire<S: Store + ?Sized>(store: &S, k: &RecordKey, f: &Fingerprint, lease: Duration) -> ClaimToken {
    match store.claim(k, f, lease).await {
        Ok(Claim::Acquired(t)) => t,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn single_store() -> Option<Arc<RedisStore>> {
    let url = redis_url().await?;
    Some(Arc::new(RedisStore::builder(&url).prefix(test_prefix()).build().await.expect("connect to redis")))
}

async fn cluster_store() -> Option<Arc<RedisStore>> {
    let nodes = redis_cluster().await?;
    let store = RedisStore::cluster(nodes).prefix(test_prefix()).build().await.expect("connect to redis cluster");
    assert!(store.is_cluster());
    Some(Arc::new(store))
}

/// Redis-specific checks run like the shared contract, on a single node and on the cluster.
mod extra {
    use super::*;

    /// Enough keys to land on every master of a cluster.
    pub async fn many_keys<S: Store>(s: Arc<S>) {
        let tasks = (0..200).map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let k = key(&format!("k-{i}"));
                let t = acquire(&*s, &k, &fp(i), LEASE).await;
                if i % 5 == 0 {
                    s.release(&k, &t).await.unwrap();
                    return;
                }
                s.renew(&k, &t, LEASE).await.unwrap();
                s.complete(&k, &t, &response(b"many"), TTL).await.unwrap();
                assert_eq!(s.claim(&k, &fp(i), LEASE).await.unwrap(), Claim::Completed(response(b"many")));
                assert_eq!(s.claim(&k, &fp(i + 1), LEASE).await.unwrap(), Claim::Mismatch);
            })
        });
        for r in futures_util::future::join_all(tasks).await {
            r.unwrap();
        }
    }
}

macro_rules! redis_contract {
    ($module:ident, $store:expr, [$($case:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(store) = $store.await else { return };
                    extra::$case(store).await;
                }
            )*
        }
    };
}

async fn reopen_single(store: Arc<RedisStore>) -> Arc<RedisStore> {
    let url = redis_url().await.expect("redis url");
    Arc::new(RedisStore::builder(&url).prefix(store.prefix()).build().await.expect("reconnect to redis"))
}

async fn reopen_cluster(store: Arc<RedisStore>) -> Arc<RedisStore> {
    let nodes = redis_cluster().await.expect("redis cluster");
    Arc::new(RedisStore::cluster(nodes).prefix(store.prefix()).build().await.expect("reconnect to redis cluster"))
}

/// A store on a `ConnectionManager` the test builds itself with redis 1.x, as an application does.
async fn manager_store() -> Option<Arc<RedisStore>> {
    let url = redis_url().await?;
    let manager = app_manager(&url, RedisStore::connection_manager_config()).await;
    Some(Arc::new(RedisStore::from_connection_manager(manager).prefix(test_prefix()).build().await.unwrap()))
}

async fn app_manager(url: &str, config: redis::aio::ConnectionManagerConfig) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    redis::aio::ConnectionManager::new_with_config(client, config).await.expect("connect to redis")
}

idempotent_tests::store_contract_tests!(single_node, single_store(), reopen = reopen_single);
// The scripts that keep a per-caller bound's accounting, under the whole contract and the
// bound's own.
idempotent_tests::store_contract_tests!(single_node_bounded, bounded_single_store(1 << 30));
idempotent_tests::store_quota_tests!(single_node_actor_bound, bounded_single_store);

async fn bounded_single_store(max_bytes: usize) -> Option<Arc<RedisStore>> {
    let url = redis_url().await?;
    let store = RedisStore::builder(&url).prefix(test_prefix()).actor_max_bytes(Some(max_bytes));
    Some(Arc::new(store.build().await.expect("connect to redis")))
}

/// A per-caller bound needs one node: on a cluster, an actor's records are spread over every
/// slot and no script can sum them. The builder says so rather than bound nothing.
#[tokio::test]
async fn a_per_caller_bound_is_refused_on_a_cluster() {
    let Some(nodes) = redis_cluster().await else { return };
    let bounded = RedisStore::cluster(nodes.clone()).prefix(test_prefix()).actor_max_bytes(Some(1 << 20)).build().await;
    let Err(StoreError::Config(message)) = bounded else { panic!("a bound on a cluster must be refused") };
    assert!(message.contains("actor_max_bytes") && message.contains("single Redis node"), "{message}");
    // `0` is no bound: the cluster store builds.
    RedisStore::cluster(nodes).prefix(test_prefix()).actor_max_bytes(Some(0)).build().await.unwrap();
}
idempotent_tests::store_contract_tests!(applications_manager, manager_store(), reopen = reopen_single);
idempotent_tests::store_contract_tests!(cluster, cluster_store(), reopen = reopen_cluster);
redis_contract!(single_node_extra, single_store(), [many_keys]);
redis_contract!(cluster_extra, cluster_store(), [many_keys]);

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

fn corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{what}: expected Corrupt, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_corrupt_values_are_corrupt_never_overwritten() {
    let Some(url) = redis_url().await else { return };
    let s = RedisStore::builder(&url).prefix(test_prefix()).build().await.unwrap();
    let mut c = raw(&url).await;
    let token = ClaimToken::generate();
    let check = |name: &'static str| {
        let s = s.clone();
        let token = token.clone();
        async move {
            let k = key(name);
            corrupt(s.claim(&k, &fp(1), LEASE).await, name);
            corrupt(s.renew(&k, &token, LEASE).await, name);
            corrupt(s.complete(&k, &token, &response(b"x"), TTL).await, name);
            corrupt(s.release(&k, &token).await, name);
        }
    };
    let f32 = fp(1).0.to_vec();

    // A plain string.
    let k = s.redis_key(&key("string"));
    let _: () = redis::cmd("SET").arg(&k).arg("hello").query_async(&mut c).await.unwrap();
    check("string").await;
    let v: String = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
    assert_eq!(v, "hello", "a foreign value is never overwritten");

    // A list.
    let k = s.redis_key(&key("list"));
    let _: () = redis::cmd("RPUSH").arg(&k).arg("a").query_async(&mut c).await.unwrap();
    check("list").await;

    // A hash with foreign fields.
    let k = s.redis_key(&key("hash"));
    let _: () = redis::cmd("HSET").arg(&k).arg("name").arg("x").query_async(&mut c).await.unwrap();
    check("hash").await;

    // An unknown state.
    let k = s.redis_key(&key("state"));
    let _: () = redis::cmd("HSET")
        .arg(&k)
        .arg("s")
        .arg("z")
        .arg("f")
        .arg(&f32)
        .arg("t")
        .arg(&token.0)
        .query_async(&mut c)
        .await
        .unwrap();
    check("state").await;

    // An in-progress record without token (claim) and without expiry.
    let k = s.redis_key(&key("no-token"));
    let _: () = redis::cmd("HSET").arg(&k).arg("s").arg("p").arg("f").arg(&f32).query_async(&mut c).await.unwrap();
    corrupt(s.claim(&key("no-token"), &fp(1), LEASE).await, "no token");
    let k = s.redis_key(&key("no-expiry"));
    let _: () = redis::cmd("HSET")
        .arg(&k)
        .arg("s")
        .arg("p")
        .arg("f")
        .arg(&f32)
        .arg("t")
        .arg("x")
        .arg("l")
        .arg("99999999999999")
        .query_async(&mut c)
        .await
        .unwrap();
    corrupt(s.claim(&key("no-expiry"), &fp(1), LEASE).await, "no expiry");

    // An in-progress record of this token without a lease deadline, or with one that is not a
    // number of milliseconds: neither taken over nor renewed, completed or released.
    for (name, deadline) in [("no-deadline", None), ("bad-deadline", Some("soon")), ("inf-deadline", Some("inf"))] {
        let k = s.redis_key(&key(name));
        let mut hset = redis::cmd("HSET");
        hset.arg(&k).arg("s").arg("p").arg("f").arg(&f32).arg("t").arg(&token.0);
        if let Some(d) = deadline {
            hset.arg("l").arg(d);
        }
        let _: () = hset.query_async(&mut c).await.unwrap();
        let _: () = redis::cmd("PEXPIRE").arg(&k).arg(60_000).query_async(&mut c).await.unwrap();
        check(name).await;
        let kept: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&k).query_async(&mut c).await.unwrap();
        assert_eq!(kept["t"], token.0.as_bytes(), "{name} is never overwritten");
        assert_eq!(kept.get("l").map(Vec::as_slice), deadline.map(str::as_bytes), "{name} is never overwritten");
    }

    // A fingerprint of the wrong length.
    let k = s.redis_key(&key("short-fp"));
    let _: () = redis::cmd("HSET")
        .arg(&k)
        .arg("s")
        .arg("c")
        .arg("f")
        .arg("abc")
        .arg("r")
        .arg(response(b"x").encode())
        .query_async(&mut c)
        .await
        .unwrap();
    corrupt(s.claim(&key("short-fp"), &fp(1), LEASE).await, "short fingerprint");

    // A completed record whose response bytes do not decode, or that has none.
    let k = s.redis_key(&key("bad-bytes"));
    let _: () = redis::cmd("HSET")
        .arg(&k)
        .arg("s")
        .arg("c")
        .arg("f")
        .arg(&f32)
        .arg("r")
        .arg(&b"R\x01\x01\x00"[..])
        .query_async(&mut c)
        .await
        .unwrap();
    corrupt(s.claim(&key("bad-bytes"), &fp(1), LEASE).await, "bad bytes");
    let k = s.redis_key(&key("no-response"));
    let _: () = redis::cmd("HSET").arg(&k).arg("s").arg("c").arg("f").arg(&f32).query_async(&mut c).await.unwrap();
    corrupt(s.claim(&key("no-response"), &fp(1), LEASE).await, "no response");

    let _: () = redis::cmd("DEL").arg(s.redis_key(&key("string"))).query_async(&mut c).await.unwrap();
    acquire(&s, &key("string"), &fp(1), LEASE).await;
}

/// Redis's clock in milliseconds, as the scripts read it.
async fn redis_now(c: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(c).await.unwrap();
    secs * 1000 + micros / 1000
}

/// One hash per record: an in-progress record keeps its claim time (`c`) and lease deadline
/// (`l`, both by Redis's clock) in the hash and outlives it by the retention of an abandoned claim; renewal moves both; a
/// completed record has no token nor deadline and expires `ttl` after completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_layout_is_one_hash_with_expiry() {
    let Some(url) = redis_url().await else { return };
    let prefix = test_prefix();
    let s = RedisStore::builder(&url).prefix(prefix.clone()).build().await.unwrap();
    let k = key("layout");
    let rk = s.redis_key(&k);
    assert!(rk.starts_with(&format!("{prefix}{{")) && rk.ends_with('}') && rk.len() == prefix.len() + 66, "{rk}");
    let mut c = raw(&url).await;
    let retention = i64::try_from(idempotent_core::store::ABANDONED_CLAIM_RETENTION.as_millis()).unwrap();
    let lease_left = |h: &BTreeMap<String, Vec<u8>>, now: i64| {
        std::str::from_utf8(&h["l"]).unwrap().parse::<i64>().expect("l is decimal milliseconds") - now
    };

    let t = acquire(&s, &k, &fp(1), Duration::from_secs(10)).await;
    let h: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&rk).query_async(&mut c).await.unwrap();
    let now = redis_now(&mut c).await;
    assert_eq!(h.keys().map(String::as_str).collect::<Vec<_>>(), ["c", "f", "l", "s", "t"]);
    assert_eq!(h["s"], b"p");
    let claimed = std::str::from_utf8(&h["c"]).unwrap().parse::<i64>().expect("c is decimal milliseconds");
    assert!((now - 1_000..=now).contains(&claimed), "claimed at {claimed}, now {now}");
    assert_eq!(h["f"], fp(1).0);
    assert_eq!(h["t"], t.0.as_bytes());
    assert!((9_000..=10_000).contains(&lease_left(&h, now)), "{}", lease_left(&h, now));
    let pttl: i64 = redis::cmd("PTTL").arg(&rk).query_async(&mut c).await.unwrap();
    assert!((retention + 9_000..=retention + 10_000).contains(&pttl), "{pttl}");

    s.renew(&k, &t, Duration::from_secs(20)).await.unwrap();
    let h: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&rk).query_async(&mut c).await.unwrap();
    let now = redis_now(&mut c).await;
    assert!((19_000..=20_000).contains(&lease_left(&h, now)), "{}", lease_left(&h, now));
    let pttl: i64 = redis::cmd("PTTL").arg(&rk).query_async(&mut c).await.unwrap();
    assert!((retention + 19_000..=retention + 20_000).contains(&pttl), "{pttl}");

    s.complete(&k, &t, &response(b"done"), Duration::from_secs(600)).await.unwrap();
    let h: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&rk).query_async(&mut c).await.unwrap();
    assert_eq!(
        h.keys().map(String::as_str).collect::<Vec<_>>(),
        ["c", "f", "r", "s", "t"],
        "the claim time stays, and the token (a resent completion recognises its own work)"
    );
    assert_eq!(h["r"], response(b"done").encode());
    let pttl: i64 = redis::cmd("PTTL").arg(&rk).query_async(&mut c).await.unwrap();
    assert!((599_000..=600_000).contains(&pttl), "{pttl}");
}

/// An in-progress record whose lease has passed stays in Redis (its late worker may still
/// complete it) until a claim takes it over: that claim acquires it with a new token even with
/// another fingerprint, and the late worker is fenced from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_claim_is_kept_until_a_retry_of_its_request_takes_it_over() {
    let Some(url) = redis_url().await else { return };
    let s = RedisStore::builder(&url).prefix(test_prefix()).build().await.unwrap();
    let mut c = raw(&url).await;
    let k = key("kept");
    let late = acquire(&s, &k, &fp(1), Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    let exists: bool = redis::cmd("EXISTS").arg(s.redis_key(&k)).query_async(&mut c).await.unwrap();
    assert!(exists, "an in-progress record outlives its lease");
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch, "never by another request");
    let fresh = acquire(&s, &k, &fp(1), LEASE).await;
    assert_ne!(fresh, late);
    assert!(matches!(s.renew(&k, &late, LEASE).await, Err(StoreError::Fenced)));
    assert!(matches!(s.complete(&k, &late, &response(b"late"), TTL).await, Err(StoreError::Fenced)));
    assert!(matches!(s.release(&k, &late).await, Err(StoreError::Fenced)));
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    s.complete(&k, &fresh, &response(b"fresh"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"fresh")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_by_specification() {
    let Some(url) = redis_url().await else { return };
    let prefix = test_prefix();
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = idempotent_core::store::connect(&format!("{url}{sep}prefix={prefix}")).await.unwrap();
    assert_eq!(store.name(), "redis");
    let t = acquire(&*store, &key("spec"), &fp(1), LEASE).await;
    store.complete(&key("spec"), &t, &response(b"spec"), TTL).await.unwrap();
    let direct = RedisStore::builder(&url).prefix(prefix).build().await.unwrap();
    assert_eq!(direct.claim(&key("spec"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"spec")));

    assert!(matches!(RedisStore::builder(&url).prefix("a{b}:").build().await, Err(StoreError::Config(_))));
    assert!(matches!(idempotent_core::store::connect("redis+cluster://").await, Err(StoreError::Config(_))));
    let port = free_port(false).unwrap();
    let down = RedisStore::builder(&format!("redis://127.0.0.1:{port}")).build().await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_over_all_masters() {
    let Some(nodes) = redis_cluster().await else { return };
    let s = RedisStore::cluster(nodes.clone()).prefix(test_prefix()).build().await.unwrap();
    for i in 0..60 {
        acquire(&s, &key(&format!("spread-{i}")), &fp(1), LEASE).await;
    }
    let spec = format!(
        "redis+cluster://{}",
        nodes.iter().map(|n| n.trim_start_matches("redis://")).collect::<Vec<_>>().join(",")
    );
    let via_spec = idempotent_core::store::connect(&format!("{spec}?prefix={}", s.prefix())).await.unwrap();
    assert!(matches!(via_spec.claim(&key("spread-0"), &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    for node in &nodes {
        let mut c = raw(node).await;
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", s.prefix())).query_async(&mut c).await.unwrap();
        assert!(!keys.is_empty(), "no record on {node}");
    }
}

/// A server of this test's own, stopped and restarted on the same port: operations fail fast
/// with `Unavailable` while it is down, and the same store instance works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_then_restarted() {
    if redis_url().await.is_none() {
        return;
    }
    let port = free_port(false).expect("free port");
    let mut server = RedisProcess::start(port, &[]).await.expect("start redis-server");
    let s = RedisStore::builder(&server.url())
        .prefix(test_prefix())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let k = key("mid-run");
    let t = acquire(&s, &k, &fp(1), LEASE).await;

    // Connections dropped by the server: the manager reconnects by itself.
    let mut c = raw(&server.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut ok = false;
    for _ in 0..20 {
        if let Ok(Claim::InProgress { .. }) = s.claim(&k, &fp(1), LEASE).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "store did not recover from a killed connection");

    server.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let r = s.claim(&key("while-down"), &fp(1), LEASE).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        let r = s.complete(&k, &t, &response(b"x"), TTL).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }

    let _server = RedisProcess::start(port, &[]).await.expect("restart redis-server");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match s.claim(&key("after-restart"), &fp(1), LEASE).await {
            Ok(Claim::Acquired(t2)) => {
                s.complete(&key("after-restart"), &t2, &response(b"back"), TTL).await.unwrap();
                break;
            }
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("store did not come back: {other:?}"),
        }
    }
    assert_eq!(s.claim(&key("after-restart"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"back")));
    // Without persistence the old claim is gone: its late completion is fenced, not written.
    assert!(matches!(s.complete(&k, &t, &response(b"x"), TTL).await, Err(StoreError::Fenced)));
}

/// A Redis that stops answering without closing anything (paused: its kernel still accepts and
/// acknowledges) fails each operation of a store with default settings after the default response
/// timeout, 1 s, within the engine's default store timeout; the same store works again once it
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_redis_fails_operations_after_one_second() {
    if redis_url().await.is_none() {
        return;
    }
    let server = RedisProcess::start(free_port(false).unwrap(), &[]).await.expect("start redis-server");
    let s = RedisStore::connect(&format!("{}?prefix={}", server.url(), test_prefix())).await.unwrap();
    let k = key("paused");
    let t = acquire(&s, &k, &fp(1), LEASE).await;

    server.pause();
    for what in ["claim", "renew"] {
        let started = Instant::now();
        let r = match what {
            "claim" => s.claim(&key("while-paused"), &fp(1), LEASE).await.map(|_| ()),
            _ => s.renew(&k, &t, LEASE).await,
        };
        let took = started.elapsed();
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{what}: {r:?}");
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(1500)).contains(&took),
            "{what} failed after {took:?}"
        );
        println!("{what} on a paused redis failed after {took:?}");
    }
    server.resume();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.complete(&k, &t, &response(b"after"), TTL).await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("store did not come back: {other:?}"),
        }
    }
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"after")));
}

/// This machine's established IPv4 TCP connections to the loopback `port`, from `/proc/net/tcp`
/// (Linux): for each, the keepalive timer's time left when one is armed (`tr` 2).
fn connections_to(port: u16) -> Vec<Option<Duration>> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (01 established), tx:rx queues, timer:when (clock ticks).
            if f.get(2) != Some(&remote.as_str()) || f.get(3) != Some(&"01") {
                return None;
            }
            let (timer, when) = f.get(5)?.split_once(':')?;
            let ticks = u64::from_str_radix(when, 16).ok()?;
            Some((timer == "02").then(|| Duration::from_millis(ticks * 10)))
        })
        .collect()
}

/// Every connection the store opens, to a single node or to each node of a cluster, has TCP
/// keepalive on with probes after 5 s idle, so the kernel drops a connection whose peer vanished
/// without a reset instead of leaving requests to wait on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_store_opens_have_keepalive() {
    if redis_url().await.is_none() {
        return;
    }
    if !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("SKIPPED: no /proc/net/tcp to read TCP timers from");
        return;
    }
    let server = RedisProcess::start(free_port(false).unwrap(), &[]).await.expect("start redis-server");
    let s = RedisStore::builder(&server.url()).prefix(test_prefix()).build().await.unwrap();
    acquire(&s, &key("keepalive"), &fp(1), LEASE).await;
    let conns = connections_to(server.port);
    assert!(!conns.is_empty(), "no connection to {}", server.port);
    for timer in &conns {
        let left = timer.expect("a keepalive timer on the store's connection");
        assert!(left <= Duration::from_secs(5), "first probe in {left:?}");
    }

    let Some(cluster) = idempotent_tests::redis_cluster::RedisCluster::start(3, 0, &[]).await else { return };
    let s = RedisStore::cluster(cluster.urls()).prefix(test_prefix()).build().await.unwrap();
    for i in 0..30 {
        acquire(&s, &key(&format!("keepalive-{i}")), &fp(1), LEASE).await;
    }
    for port in cluster.ports() {
        let conns = connections_to(port);
        assert!(!conns.is_empty(), "no connection to node {port}");
        for timer in &conns {
            let left = timer.expect("a keepalive timer on the store's connection");
            assert!(left <= Duration::from_secs(5), "first probe in {left:?}");
        }
    }
}

/// Commands executed by clients, from `INFO commandstats`: script invocations separately from
/// the commands the scripts run inside Redis.
async fn command_counts(c: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(c).await.unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Round trips per request, counted by Redis itself on a private server: a first execution is
/// two commands (claim, complete), a replay one (claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_request() {
    if redis_url().await.is_none() {
        return;
    }
    let server = RedisProcess::start(free_port(false).unwrap(), &[]).await.expect("start redis-server");
    let s = RedisStore::builder(&server.url()).prefix(test_prefix()).build().await.unwrap();
    let mut c = raw(&server.url()).await;

    // Warm up: load the scripts once.
    let t = acquire(&s, &key("warm"), &fp(1), LEASE).await;
    s.complete(&key("warm"), &t, &response(b"w"), TTL).await.unwrap();

    let s1 = s.clone();
    let first = measure(&mut c, "first execution (claim + complete)", async move {
        let t = acquire(&s1, &key("order"), &fp(1), LEASE).await;
        s1.complete(&key("order"), &t, &response(b"paid"), TTL).await.unwrap();
    })
    .await;
    let replay = measure(&mut c, "replay (claim)", async move {
        assert_eq!(s.claim(&key("order"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"paid")));
    })
    .await;
    assert_eq!((first, replay), (2, 1));
}

/// Client commands executed while `run` runs.
async fn measure(
    c: &mut redis::aio::MultiplexedConnection,
    what: &str,
    run: impl std::future::Future<Output = ()>,
) -> u64 {
    // Commands a script runs inside Redis, and this measurement's own; every other command came
    // from the store.
    const IN_SCRIPT: &[&str] = &["type", "time", "hset", "hmget", "pexpire", "pttl", "hdel", "del"];
    const OURS: &[&str] = &["info"];
    let before = command_counts(c).await;
    run.await;
    let after = command_counts(c).await;
    let mut from_clients = 0;
    for (name, calls) in &after {
        let delta = calls - before.get(name).copied().unwrap_or(0);
        if delta > 0 && !IN_SCRIPT.contains(&name.as_str()) && !OURS.contains(&name.as_str()) {
            assert_eq!(name, "evalsha", "{what}: unexpected client command {name}");
            from_clients += delta;
        }
    }
    println!("redis round trips per {what}: {from_clients}");
    from_clients
}

/// A full Redis under `noeviction` refuses new claims: the store reports `Full` (503), and
/// nothing already stored is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_redis_refuses_claims_rather_than_evicting() {
    if redis_url().await.is_none() {
        return;
    }
    let args = ["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"];
    let server = RedisProcess::start(free_port(false).unwrap(), &args).await.expect("start redis-server");
    let s = RedisStore::builder(&server.url()).prefix(test_prefix()).build().await.unwrap();
    let mut big = response(b"");
    big.body = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let mut stored = Vec::new();
    let full = loop {
        let k = key(&format!("fill-{}", stored.len()));
        match s.claim(&k, &fp(1), LEASE).await {
            Ok(Claim::Acquired(t)) => match s.complete(&k, &t, &big, TTL).await {
                Ok(()) => stored.push(k),
                Err(e) => break e,
            },
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(stored.len() < 1000, "maxmemory never reached");
    };
    assert!(matches!(full, StoreError::Full), "{full:?}");
    assert!(!stored.is_empty());
    for k in &stored {
        assert_eq!(s.claim(k, &fp(1), LEASE).await.unwrap(), Claim::Completed(big.clone()));
    }
}

/// A full Redis (`maxmemory` reached under `noeviction`) refuses new claims with `Full`, but the
/// work already claimed finishes: renewal, completion (with a response of several KB) and release
/// still succeed, the completed key replays, and replays and conflicts are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_redis_refuses_new_claims_but_lets_claimed_work_finish() {
    if redis_url().await.is_none() {
        return;
    }
    let args = ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"];
    let server = RedisProcess::start(free_port(false).unwrap(), &args).await.expect("start redis-server");
    let s = RedisStore::builder(&server.url()).prefix(test_prefix()).build().await.unwrap();
    let done = key("done-before");
    let t = acquire(&s, &done, &fp(1), LEASE).await;
    s.complete(&done, &t, &response(b"early"), TTL).await.unwrap();
    let (renewed, completed, released) = (key("renewed"), key("completed"), key("released"));
    let t_renew = acquire(&s, &renewed, &fp(1), LEASE).await;
    let t_complete = acquire(&s, &completed, &fp(1), LEASE).await;
    let t_release = acquire(&s, &released, &fp(1), LEASE).await;

    // Other data fills the memory until Redis refuses even a small write (a large value refused
    // counts its own request buffer, freed once refused).
    let mut c = raw(&server.url()).await;
    let mut filled = 0;
    for size in [64 * 1024, 4096, 256, 16] {
        let chunk = vec![b'x'; size];
        loop {
            let r: redis::RedisResult<()> =
                redis::cmd("SET").arg(format!("filler:{filled}")).arg(&chunk).query_async(&mut c).await;
            match r {
                Ok(()) => filled += 1,
                Err(e) if e.code() == Some("OOM") => break,
                Err(e) => panic!("filling redis: {e}"),
            }
            assert!(filled < 100_000, "maxmemory never reached");
        }
    }
    let r = s.claim(&key("new"), &fp(1), LEASE).await;
    assert!(matches!(r, Err(StoreError::Full)), "a new claim on a full redis: {r:?}");
    // As on a node restarted or promoted meanwhile: every script is sent again (`EVAL`), on a
    // full Redis.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();

    // Claims that write nothing are still answered.
    assert_eq!(s.claim(&done, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"early")));
    assert_eq!(s.claim(&done, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    assert!(matches!(s.claim(&renewed, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));

    // Work already claimed finishes.
    s.renew(&renewed, &t_renew, LEASE).await.expect("renewal on a full redis");
    let mut big = response(b"");
    big.body = bytes::Bytes::from(vec![7u8; 16 * 1024]);
    s.complete(&completed, &t_complete, &big, TTL).await.expect("completion on a full redis");
    s.release(&released, &t_release).await.expect("release on a full redis");
    assert_eq!(s.claim(&completed, &fp(1), LEASE).await.unwrap(), Claim::Completed(big));
    s.complete(&renewed, &t_renew, &response(b"late"), TTL).await.expect("completion on a full redis");
    assert_eq!(s.claim(&renewed, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"late")));
    // The released key is free, but a full redis takes no new claim on it.
    let r = s.claim(&released, &fp(1), LEASE).await;
    assert!(matches!(r, Err(StoreError::Full)), "a new claim on a full redis: {r:?}");

    // Room again: claims are taken again.
    let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    acquire(&s, &released, &fp(1), LEASE).await;
}

/// The tests crate's `redis` (the workspace's) and the store's re-export are one crate, so an
/// application's connection is the store's connection type.
#[allow(dead_code)]
fn same_redis_crate(m: redis::aio::ConnectionManager) -> idempotent_core::redis::aio::ConnectionManager {
    m
}

/// The application builds its own redis 1.x `ConnectionManager`, hands a clone to the store, and
/// keeps using it for its own commands: the store's records and the application's keys travel
/// over one client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_the_applications_connection_manager() {
    let Some(url) = redis_url().await else { return };
    let manager = app_manager(&url, RedisStore::connection_manager_config()).await;
    let s = RedisStore::from_connection_manager(manager.clone()).prefix(test_prefix()).build().await.unwrap();
    assert!(!s.is_cluster());
    assert!(format!("{s:?}").contains("prefix"));

    let k = key("app-manager");
    let t = acquire(&s, &k, &fp(1), LEASE).await;
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    s.renew(&k, &t, LEASE).await.unwrap();
    s.complete(&k, &t, &response(b"shared"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"shared")));
    assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);

    // The application's own command, on the same manager.
    let mut app = manager;
    let own = format!("{}app:own", s.prefix());
    let _: () = redis::cmd("SET").arg(&own).arg("app value").arg("PX").arg(60_000).query_async(&mut app).await.unwrap();
    let v: String = redis::cmd("GET").arg(&own).query_async(&mut app).await.unwrap();
    assert_eq!(v, "app value");
    // And the store's record, read through it.
    let state: Vec<u8> = redis::cmd("HGET").arg(s.redis_key(&k)).arg("s").query_async(&mut app).await.unwrap();
    assert_eq!(state, b"c");

    // A prefix is still checked, and an application's connection needs no specification.
    assert!(matches!(
        RedisStore::from_connection_manager(app).prefix("a{b}:").build().await,
        Err(StoreError::Config(_))
    ));
}

/// An application's manager with redis 1.x's default reconnection policy (six retries with
/// back-off) on a server that goes away: the store's own bound still answers `Unavailable`
/// within its response timeout, and the same store works again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_manager_outage_fails_within_the_store_bound() {
    if redis_url().await.is_none() {
        return;
    }
    let port = free_port(false).expect("free port");
    let mut server = RedisProcess::start(port, &[]).await.expect("start redis-server");
    let manager = app_manager(&server.url(), redis::aio::ConnectionManagerConfig::new()).await;
    let s = RedisStore::from_connection_manager(manager)
        .prefix(test_prefix())
        .response_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let k = key("app-outage");
    let t = acquire(&s, &k, &fp(1), LEASE).await;

    server.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let r = s.claim(&key("while-down"), &fp(1), LEASE).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        let r = s.renew(&k, &t, LEASE).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
    }

    let _server = RedisProcess::start(port, &[]).await.expect("restart redis-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match s.claim(&key("after-restart"), &fp(1), LEASE).await {
            Ok(Claim::Acquired(_)) => break,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("store did not come back: {other:?}"),
        }
    }
}

/// The application's own Redis Cluster connection (redis 1.x), shared the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_the_applications_cluster_connection() {
    let Some(nodes) = redis_cluster().await else { return };
    let client =
        redis::cluster::ClusterClientBuilder::new(nodes).response_timeout(Duration::from_secs(2)).build().unwrap();
    let conn = client.get_async_connection().await.expect("connect to redis cluster");
    let s = RedisStore::from_cluster_connection(conn.clone()).prefix(test_prefix()).build().await.unwrap();
    assert!(s.is_cluster());
    for i in 0..30 {
        let k = key(&format!("app-cluster-{i}"));
        let t = acquire(&s, &k, &fp(1), LEASE).await;
        s.complete(&k, &t, &response(b"cluster"), TTL).await.unwrap();
        assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"cluster")));
    }

    let mut app = conn;
    for i in 0..10 {
        let own = format!("{}app:own:{i}", s.prefix());
        let _: () = redis::cmd("SET").arg(&own).arg(i).arg("PX").arg(60_000).query_async(&mut app).await.unwrap();
        let v: u32 = redis::cmd("GET").arg(&own).query_async(&mut app).await.unwrap();
        assert_eq!(v, i);
    }
}
