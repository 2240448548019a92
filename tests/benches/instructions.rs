//! The in-process path in instructions, for `valgrind --tool=callgrind`: repeatable where wall
//! time is not (the same binary and input count the same instructions whatever else the machine
//! is doing).
//!
//! `bash scripts/instructions.sh` builds this benchmark and runs each mode under callgrind,
//! counting only inside [`measure`], and prints the instructions per request of a bare axum
//! handler, a protected first execution and a protected replay on the memory store, and what the
//! protection adds to the bare handler. Run alone
//! (`cargo bench -p idempotent-tests --bench instructions -- first 2000`) it prints the wall time
//! per request of one mode instead; with `--latency` added, each request's time, as percentiles
//! and the requests over 100 µs (`-- first 300000 --latency`: the memory store's tables growing
//! as it fills).
//!
//! The modes `redis-first` and `redis-replay` run the same protected requests on the Redis store
//! (a key prefix of this run on the test Redis, see `idempotent_tests::redis_server`): callgrind
//! counts the process's side of each request, and the benchmark prints, besides the wall time, the
//! `EVALSHA` calls Redis answered meanwhile and the microseconds Redis spent in them per request
//! (`INFO commandstats`), the server's side, which callgrind does not see. Redis is shared with
//! whatever else runs, so the count of calls is exact and the microseconds are not.
//!
//! Under valgrind the SHA-256 of the fingerprint runs in software (valgrind does not offer the
//! CPU's SHA extensions), about 3,500 instructions per 64-byte block where the extensions take a
//! few hundred cycles: the script prints the software SHA-256's share apart.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::{MemoryStore, RedisStore, Store};
use idempotent_axum::{idempotent, Idempotency};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use tower::ServiceExt;

#[derive(Debug, Clone, Deserialize, Serialize)]
struct Charge {
    amount: i64,
    currency: String,
}

async fn bare(Json(c): Json<Charge>) -> (StatusCode, Json<Charge>) {
    (StatusCode::CREATED, Json(c))
}

#[idempotent(scope = "bench.instructions", fields = [amount, currency])]
async fn protected(Json(c): Json<Charge>) -> (StatusCode, Json<Charge>) {
    (StatusCode::CREATED, Json(c))
}

fn request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(r#"{"amount":100,"currency":"EUR"}"#)).unwrap()
}

/// Request `i` of `mode` (`bare`, `first` with fresh keys, `replay` of one key), answered and
/// read whole.
async fn one(app: &Router, mode: &str, i: usize) {
    let r = match mode {
        "bare" => request("/bare", None),
        "first" | "redis-first" => request("/protected", Some(&format!("k-{i}"))),
        _ => request("/protected", Some("warm-0")),
    };
    let r = app.clone().oneshot(r).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
}

/// `n` requests of `mode` ([`one`]); µs per request. The only function callgrind counts in.
#[inline(never)]
fn measure(rt: &tokio::runtime::Runtime, app: &Router, mode: &str, n: usize) -> f64 {
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..n {
            one(app, mode, i).await;
        }
        start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64
    })
}

/// `n` requests of `mode`, each timed: prints the median, the 99th and 99.9th percentiles and the
/// slowest, and how many took over 100 µs and how long those took together (the stalls a
/// request meets: a store's table growing, say).
fn latencies(rt: &tokio::runtime::Runtime, app: &Router, mode: &str, n: usize) {
    let mut ns: Vec<u64> = rt.block_on(async {
        let mut ns = Vec::with_capacity(n);
        for i in 0..n {
            let start = Instant::now();
            one(app, mode, i).await;
            ns.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        ns
    });
    ns.sort_unstable();
    let Some(&slowest) = ns.last() else { return };
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    let slow: Vec<u64> = ns.iter().copied().filter(|&t| t > 100_000).collect();
    println!(
        "{mode}: {n} requests, µs: p50 {:.1}, p99 {:.1}, p99.9 {:.1}, slowest {:.1}; {} over 100 µs, {:.1} ms in them",
        at(0.5),
        at(0.99),
        at(0.999),
        slowest as f64 / 1e3,
        slow.len(),
        slow.iter().sum::<u64>() as f64 / 1e6
    );
}

fn main() {
    let latency = std::env::args().any(|a| a == "--latency");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench" && a != "--latency").collect();
    let modes = ["bare", "first", "replay", "redis-first", "redis-replay"];
    let Some(mode) = args.first().filter(|m| modes.contains(&m.as_str())) else {
        println!("instructions: `bash scripts/instructions.sh`, or `cargo bench -p idempotent-tests --bench instructions -- bare|first|replay|redis-first|redis-replay [N] [--latency]`");
        return;
    };
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    // One thread, as callgrind runs them anyway: no cross-thread wake-ups in the count.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let redis = match mode.strip_prefix("redis-") {
        Some(_) => {
            let Some(url) = rt.block_on(idempotent_tests::redis_server::redis_url()) else {
                println!("instructions: no Redis server");
                return;
            };
            Some(url)
        }
        None => None,
    };
    let store: Arc<dyn Store> = match &redis {
        Some(url) => {
            let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
            Arc::new(rt.block_on(RedisStore::builder(url).prefix(prefix).build()).expect("the Redis store connects"))
        }
        None => Arc::new(MemoryStore::new()),
    };
    let idem = Idempotency::builder(store)
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(payments_demo::api::STORE_TIMEOUT)
        .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
        .token_secret(b"the benchmark's token secret, 32 bytes or more")
        .build()
        .unwrap();
    let app = Router::new().route("/bare", post(bare)).route("/protected", post(protected)).layer(idem.layer());
    // Warm-up outside the count: the first requests fill caches, the store's tables and the
    // runtime's task slab.
    rt.block_on(async {
        for i in 0..1000 {
            app.clone().oneshot(request("/bare", None)).await.unwrap();
            app.clone().oneshot(request("/protected", Some(&format!("warm-{i}")))).await.unwrap();
        }
    });
    if latency {
        latencies(&rt, &app, mode, n);
        return;
    }
    let before = redis.as_deref().map(|url| rt.block_on(evalsha_stats(url)));
    let us = measure(&rt, &app, mode, n);
    println!("{mode}: {n} requests, {us:.2} µs/request");
    if let (Some(url), Some((calls, usec))) = (redis.as_deref(), before) {
        let (calls_after, usec_after) = rt.block_on(evalsha_stats(url));
        let per = |x: u64| x as f64 / n.max(1) as f64;
        println!(
            "{mode}: redis answered {:.2} EVALSHA per request in {:.2} µs per request",
            per(calls_after - calls),
            per(usec_after - usec)
        );
    }
}

/// Redis's count of `EVALSHA` calls and the microseconds it spent in them, from
/// `INFO commandstats`.
async fn evalsha_stats(url: &str) -> (u64, u64) {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("Redis answers");
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO answers");
    let line = info.lines().find_map(|l| l.strip_prefix("cmdstat_evalsha:")).unwrap_or("");
    let field = |name: &str| {
        line.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
    };
    (field("calls"), field("usec"))
}
