//! Throughput and round trips of the idempotent path, printed as figures (never asserted).
//!
//! `cargo bench -p idempotent-tests --bench throughput` prints:
//! 1. the in-process cost per request (no network) of a bare axum handler, a protected first
//!    execution and a replay, on the memory store, and their ratios; then the cost of the
//!    observability on that path: the same protected requests with no subscriber and no recorder,
//!    with a `tracing` subscriber (the `fmt` layer at `INFO`, writing to a sink), with the demo's
//!    Prometheus recorder, and with both, and their ratios to the first;
//! 2. the payments demo's `POST /payments` over loopback HTTP on memory, SQLite, PostgreSQL and
//!    Redis, beside a bare handler and a handler doing the same Redis commands by hand;
//! 3. PostgreSQL round trips per first execution and per replay, counted by a proxy that parses
//!    the wire protocol (request-path statements apart from sqlx's background pool checks);
//! 4. the cost of SQLite's durable commits: first executions per second through the SQLite store
//!    (a claim, then a completion) with `synchronous = FULL` (the default) and `NORMAL`, on a
//!    database file in the temporary directory, each with group commit (the default) and with one
//!    write per transaction (`group_commit(1)`), each row first in turn, each cell after the one
//!    before closed its database;
//! 5. the memory store as it fills: claims and completions per second on an empty store, one
//!    half full and one full of live records (where every new key is refused), one full of
//!    expired records (each claim makes its own room), and one holding a million records; and
//!    the bytes a record costs, by the store's own count and by the process's resident memory;
//! 6. the cost of the transactional mode: first executions per second of a deposit (a row INSERT
//!    and a balance upsert) through a transactional route, whose writes go through `Tx` and
//!    commit with the outcome's record, and through the same route in ordinary mode, whose
//!    handler commits the same writes in a transaction of its own before the engine stores the
//!    outcome (both on the store's pool); on PostgreSQL and on a SQLite file (`synchronous =
//!    FULL`), with 1 and 16 concurrent callers (each its own account), in process, and their
//!    ratio.
//!
//! 7. server-issued form tokens: the cost of minting one (the `Mint` extractor of a form page:
//!    MAC and one store write) and of a submit whose key is an issued token (MAC check, one store
//!    round trip to find the token as issued, then the usual claim and completion) against the
//!    same form submitted with an `Idempotency-Key` header, first executions and replays, in
//!    process, on the memory store, SQLite, PostgreSQL and Redis.
//!
//! 8. keyed digests: the cost of one actor digest and one key digest, plain and keyed (HMAC), in
//!    nanoseconds; then the in-process cost of a first execution and a replay of a caller known by
//!    its bearer token, with plain SHA-256 digests (the default) and with a digest secret
//!    (HMAC-SHA256 of the actor on every request, and of the key for the request's span), without
//!    and with a `tracing` subscriber (the key's digest is computed only for a span someone
//!    wants);
//! 9. the cost of a per-caller byte bound (`actor_max_bytes`, set high enough never to refuse):
//!    first executions (claim and completion) per second through the store, without and with a
//!    bound, on a SQLite file and on PostgreSQL, with 1 caller, 16 concurrent callers (each its
//!    own actor) and 16 concurrent requests of one actor (whose claims take turns under a bound).
//! 10. PostgreSQL group commit: first executions per second through the PostgreSQL store (a claim,
//!     then a completion, no HTTP) with 1, 16 and 64 concurrent callers, with claims and
//!     completions of concurrent callers batched into one statement each (`group_commit(64)`, the
//!     default) and with one statement per claim and per completion (`group_commit(1)`),
//!     alternating, best of 3.
//!
//! Machines are shared and noisy: compare the ratios within one run, not absolute numbers
//! across runs. `cargo bench -p idempotent-tests --bench throughput -- in-process` runs only the
//! first part, `-- sqlite-sync` only the fourth, `-- memory-fill` only the fifth,
//! `-- transactional` only the sixth, `-- issued` only the seventh, `-- digests` only the eighth,
//! `-- actor-quota` only the ninth, `-- postgres-batch` only the tenth.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use idempotent_axum::{idempotent, Idempotency};
use idempotent_tests::http::temp_ledger;
use payments_demo::config::Config;
use payments_demo::ledger::Ledger;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

#[derive(Debug, Clone, Deserialize, Serialize)]
struct Charge {
    amount: i64,
    currency: String,
}

async fn bare(Json(c): Json<Charge>) -> (StatusCode, Json<Charge>) {
    (StatusCode::CREATED, Json(c))
}

#[idempotent(scope = "bench.charge", fields = [amount, currency])]
async fn protected(Json(c): Json<Charge>) -> (StatusCode, Json<Charge>) {
    (StatusCode::CREATED, Json(c))
}

fn charge_request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(r#"{"amount":100,"currency":"EUR"}"#)).unwrap()
}

/// What is installed on the threads that serve the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Observed {
    Nothing,
    Subscriber,
    Recorder,
    Both,
}

impl Observed {
    const ALL: [Observed; 4] = [Observed::Nothing, Observed::Recorder, Observed::Subscriber, Observed::Both];

    fn label(self) -> &'static str {
        match self {
            Observed::Nothing => "no subscriber, no recorder",
            Observed::Subscriber => "subscriber (fmt, INFO, to a sink)",
            Observed::Recorder => "recorder (Prometheus)",
            Observed::Both => "subscriber + recorder",
        }
    }

    /// A runtime like a server's (two workers) whose threads have this variant's subscriber
    /// and recorder as their defaults, so one process measures every variant.
    fn runtime(self) -> tokio::runtime::Runtime {
        let subscriber = matches!(self, Observed::Subscriber | Observed::Both).then(|| {
            use tracing_subscriber::layer::SubscriberExt;
            let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::sink);
            let subscriber =
                tracing_subscriber::registry().with(fmt).with(tracing_subscriber::filter::LevelFilter::INFO);
            tracing::Dispatch::new(subscriber)
        });
        let recorder: Option<&'static (dyn metrics::Recorder + Send + Sync)> =
            matches!(self, Observed::Recorder | Observed::Both)
                .then(|| &*Box::leak(Box::new(payments_demo::metrics::recorder().0)) as _);
        // Dispatchers of earlier variants are gone with their threads: callsites forget them.
        tracing::callsite::rebuild_interest_cache();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // For the thread's whole life: the guards are never dropped.
                if let Some(dispatch) = &subscriber {
                    std::mem::forget(tracing::dispatcher::set_default(dispatch));
                }
                if let Some(recorder) = recorder {
                    std::mem::forget(metrics::set_default_local_recorder(recorder));
                }
            })
            .build()
            .unwrap()
    }
}

/// Microseconds per request of `n` requests `f(i)` (after 1000 of warm-up).
async fn per_request(app: &Router, n: usize, f: impl Fn(usize) -> Request<Body>) -> f64 {
    for i in 0..1000 {
        app.clone().oneshot(f(n + i)).await.unwrap();
    }
    let start = Instant::now();
    for i in 0..n {
        let r = app.clone().oneshot(f(i)).await.unwrap();
        assert!(r.status().is_success());
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Bare handler, first execution and replay, µs per request, on a fresh store.
async fn in_process_round(n: usize, round: usize) -> [f64; 3] {
    // The demo's routes are linked in too, and their 3 s leases need the demo's store timeout;
    // the transactional routes (the demo's deposits, part 5's) cannot run on the memory store.
    let idem = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(payments_demo::api::STORE_TIMEOUT)
        .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
        .token_secret(TOKEN_SECRET)
        .build()
        .unwrap();
    let app = Router::new().route("/bare", post(bare)).route("/protected", post(protected)).layer(idem.layer());
    let bare_us = per_request(&app, n, |_| charge_request("/bare", None)).await;
    let key = |i: usize| format!("r{round}-k-{i}");
    let first_us = per_request(&app, n, |i| charge_request("/protected", Some(&key(i)))).await;
    let replay_us = per_request(&app, n, |_| charge_request("/protected", Some(&key(0)))).await;
    [bare_us, first_us, replay_us]
}

fn in_process() {
    const N: usize = 20_000;
    const ROUNDS: usize = 5;
    // best[variant] = [bare, first, replay], the fastest of the rounds: the one least disturbed
    // by the machine's other work. The variants are interleaved so that a busy period does not
    // land on one of them only.
    let mut best = [[f64::MAX; 3]; 4];
    for round in 0..ROUNDS {
        for (v, observed) in Observed::ALL.into_iter().enumerate() {
            let rt = observed.runtime();
            // On a worker thread, as a server's handlers run (block_on's own thread is not one,
            // and every task it spawns would pay a cross-thread wake-up that servers do not).
            let figures = rt.block_on(async { tokio::spawn(in_process_round(N, round)).await.unwrap() });
            drop(rt);
            for (b, f) in best[v].iter_mut().zip(figures) {
                *b = b.min(f);
            }
        }
    }
    let [bare_us, first_us, replay_us] = best[0];
    println!("1. in-process cost per request, memory store, {N} requests each, best of {ROUNDS} rounds");
    println!("  {:<34} {bare_us:>8.2} µs/request", "bare handler");
    println!("  {:<34} {first_us:>8.2} µs/request", "protected, first execution");
    println!("  {:<34} {replay_us:>8.2} µs/request", "protected, replay");
    println!(
        "  ratios: first/bare {:.2}x, replay/bare {:.2}x; added cost of a first execution {:.2} µs",
        first_us / bare_us,
        replay_us / bare_us,
        first_us - bare_us
    );
    println!("\n  cost of spans and metrics on the protected path (µs/request, and ratio to the first row)");
    println!("  {:<34} {:>8} {:>8} {:>8} {:>8} {:>8}", "installed", "bare", "first", "replay", "first x", "replay x");
    for (v, observed) in Observed::ALL.into_iter().enumerate() {
        let [b, f, r] = best[v];
        println!(
            "  {:<34} {b:>8.2} {f:>8.2} {r:>8.2} {:>7.2}x {:>7.2}x",
            observed.label(),
            f / first_us,
            r / replay_us
        );
    }
    let both = best[3];
    println!(
        "  added by subscriber + recorder: {:.2} µs per first execution, {:.2} µs per replay",
        both[1] - first_us,
        both[2] - replay_us
    );
}

/// The digest secret of part 8's keyed runtime.
const DIGEST_SECRET: &[u8] = b"the benchmark's digest secret, 32 bytes or more";

/// Part 8: first execution and replay, µs per request, of a caller known by its bearer token, on
/// a runtime with plain digests or (`keyed`) a digest secret.
async fn digest_round(n: usize, round: usize, keyed: bool) -> [f64; 2] {
    let mut builder = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::BearerToken)
        .store_timeout(payments_demo::api::STORE_TIMEOUT)
        .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
        .token_secret(TOKEN_SECRET);
    if keyed {
        builder = builder.digest_secret(DIGEST_SECRET);
    }
    let app = Router::new().route("/protected", post(protected)).layer(builder.build().unwrap().layer());
    let request = |key: &str| {
        let mut r = charge_request("/protected", Some(key));
        r.headers_mut().insert("authorization", "Bearer tok_live_4eC39HqLyjWDarjtT1zdp7dc".parse().unwrap());
        r
    };
    let tag = if keyed { "keyed" } else { "plain" };
    let first = per_request(&app, n, |i| request(&format!("{tag}-r{round}-k-{i}"))).await;
    let replay = per_request(&app, n, |_| request(&format!("{tag}-r{round}-k-0"))).await;
    [first, replay]
}

/// Nanoseconds per call of the actor's digest and the key's, plain and keyed: the whole of what a
/// digest secret adds to a request, apart from the noise of the request around it. The four are
/// interleaved in blocks and the fastest block of each kept.
fn digest_calls() -> [[f64; 2]; 2] {
    use idempotent_axum::core::digest::DigestKey;
    const CALLS: usize = 20_000;
    const BLOCKS: usize = 25;
    let (plain, keyed) = (DigestKey::default(), DigestKey::new(DIGEST_SECRET));
    let actor = "tok_live_4eC39HqLyjWDarjtT1zdp7dc";
    let key = "3f2a7c9e-5b1d-4e8a-9c6f-0d2b4a6e8c1f";
    let mut best = [[f64::MAX; 2]; 2];
    for _ in 0..BLOCKS {
        for (k, digests) in [&plain, &keyed].into_iter().enumerate() {
            let start = Instant::now();
            for _ in 0..CALLS {
                std::hint::black_box(digests.actor(std::hint::black_box(actor)));
            }
            best[k][0] = best[k][0].min(start.elapsed().as_secs_f64() * 1e9 / CALLS as f64);
            let start = Instant::now();
            for _ in 0..CALLS {
                std::hint::black_box(digests.key(std::hint::black_box(key)));
            }
            best[k][1] = best[k][1].min(start.elapsed().as_secs_f64() * 1e9 / CALLS as f64);
        }
    }
    best
}

fn digests() {
    let [plain, keyed] = digest_calls();
    println!("8. keyed digests: one call, ns (fastest of 25 interleaved blocks of 20000)");
    println!("  {:<34} {:>10} {:>10}", "", "plain", "HMAC");
    println!("  {:<34} {:>10.0} {:>10.0}", "actor digest (every request)", plain[0], keyed[0]);
    println!("  {:<34} {:>10.0} {:>10.0}", "key digest (for a wanted span)", plain[1], keyed[1]);
    println!(
        "  a digest secret adds {:.0} ns to a request of a known caller, {:.0} ns more when a subscriber wants its span\n",
        keyed[0] - plain[0],
        keyed[1] - plain[1]
    );
    const N: usize = 20_000;
    const ROUNDS: usize = 5;
    // best[subscriber][keyed] = [first, replay], the fastest of the rounds, variants interleaved.
    let mut best = [[[f64::MAX; 2]; 2]; 2];
    for round in 0..ROUNDS {
        for (s, observed) in [Observed::Nothing, Observed::Subscriber].into_iter().enumerate() {
            let rt = observed.runtime();
            for keyed in [false, true] {
                let figures = rt.block_on(async { tokio::spawn(digest_round(N, round, keyed)).await.unwrap() });
                for (b, f) in best[s][usize::from(keyed)].iter_mut().zip(figures) {
                    *b = b.min(f);
                }
            }
        }
    }
    println!("  the same over whole requests: a bearer-token caller, memory store, {N} requests each, best of {ROUNDS} rounds (µs/request)");
    println!("  {:<56} {:>8} {:>8} {:>9} {:>9}", "installed", "first", "replay", "first +", "replay +");
    for (s, label) in ["no subscriber", "subscriber (fmt, INFO, to a sink)"].into_iter().enumerate() {
        let [plain, keyed] = best[s];
        println!("  {:<56} {:>8.2} {:>8.2}", format!("{label}, plain SHA-256"), plain[0], plain[1]);
        println!(
            "  {:<56} {:>8.2} {:>8.2} {:>8.2}  {:>8.2}",
            format!("{label}, HMAC (digest secret)"),
            keyed[0],
            keyed[1],
            keyed[0] - plain[0],
            keyed[1] - plain[1]
        );
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

async fn demo(store: Arc<dyn Store>) -> SocketAddr {
    let ledger = temp_ledger();
    let config = Config::new("bench", ledger.clone(), Duration::ZERO);
    let (ledger, entries) = Ledger::open(&ledger).unwrap();
    serve(payments_demo::axum_app::app_with_store(&config, store, ledger, entries).await.unwrap()).await
}

/// Sends `n` requests with `concurrency` clients; `key(i)` is the key of request `i`.
async fn drive(addr: SocketAddr, path: &str, n: usize, concurrency: usize, key: impl Fn(usize) -> String) -> f64 {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let next = Arc::new(AtomicU64::new(0));
    let keys: Arc<Vec<String>> = Arc::new((0..n).map(key).collect());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next, keys) = (client.clone(), url.clone(), next.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= keys.len() {
                    break;
                }
                let r = client
                    .post(&url)
                    .bearer_auth("acct_bench")
                    .header("Idempotency-Key", &keys[i])
                    .header("content-type", "application/json")
                    .body(r#"{"amount":100,"currency":"EUR","customer":"cus_1"}"#)
                    .send()
                    .await
                    .expect("request");
                assert!(r.status().is_success(), "status {}", r.status());
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[derive(Clone)]
struct Hand {
    redis: redis::aio::ConnectionManager,
    prefix: String,
}

/// A bare handler doing by hand what the Redis store does: claim with `SET NX PX`, run, store
/// the response with `SET PX`; a replay is one `GET` (two commands first, one on replay).
async fn by_hand(
    State(h): State<Hand>,
    headers: axum::http::HeaderMap,
    Json(c): Json<serde_json::Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let key = format!("{}{}", h.prefix, headers["idempotency-key"].to_str().unwrap());
    let mut conn = h.redis.clone();
    let claimed: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("p")
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    match claimed {
        None => {
            let body = serde_json::json!({"id": "pay_1", "amount": c["amount"], "currency": c["currency"]}).to_string();
            let _: () =
                redis::cmd("SET").arg(&key).arg(&body).arg("PX").arg(86_400_000).query_async(&mut conn).await.unwrap();
            (StatusCode::CREATED, body).into_response()
        }
        Some(stored) => (StatusCode::CREATED, stored).into_response(),
    }
}

async fn over_http(redis_url: Option<String>, pg: Option<Arc<idempotent_tests::postgres::TestSchema>>) {
    const N: usize = 2_000;
    const C: usize = 16;
    println!("\n2. POST /payments over loopback HTTP, {C} concurrent clients, {N} requests per row");
    println!("  {:<44} {:>12} {:>12}", "server", "first req/s", "replay req/s");
    let row = |label: &str, first: f64, replay: f64| println!("  {label:<44} {first:>12.0} {replay:>12.0}");

    let bare_addr = serve(Router::new().route("/payments", post(bare))).await;
    let b = drive(bare_addr, "/payments", N, C, |i| format!("b{i}")).await;
    row("bare handler (no idempotency, no ledger)", b, b);

    let mut stores: Vec<(&str, Arc<dyn Store>)> = vec![("demo on memory", Arc::new(MemoryStore::new()))];
    let sqlite_path = std::env::temp_dir().join(format!("bench-{}.sqlite", std::process::id()));
    let sqlite = SqliteStore::connect(&format!("sqlite:{}", sqlite_path.display())).await.unwrap();
    stores.push(("demo on SQLite", Arc::new(sqlite)));
    if let Some(pg) = &pg {
        stores.push(("demo on PostgreSQL", Arc::new(PostgresStore::connect_with(&pg.url, pg.config()).await.unwrap())));
    }
    if let Some(url) = &redis_url {
        let store = RedisStore::builder(url).prefix(format!("bench:{}:", std::process::id())).build().await.unwrap();
        stores.push(("demo on Redis", Arc::new(store)));
    }
    for (label, store) in stores {
        let addr = demo(store).await;
        let first = drive(addr, "/payments", N, C, |i| format!("f{i}")).await;
        let replay = drive(addr, "/payments", N, C, |i| format!("f{}", i % 100)).await;
        row(label, first, replay);
    }
    if let Some(url) = &redis_url {
        let client = redis::Client::open(url.as_str()).unwrap();
        let hand = Hand {
            redis: redis::aio::ConnectionManager::new(client).await.unwrap(),
            prefix: format!("bench-hand:{}:", std::process::id()),
        };
        let addr = serve(Router::new().route("/payments", post(by_hand)).with_state(hand)).await;
        let first = drive(addr, "/payments", N, C, |i| format!("h{i}")).await;
        let replay = drive(addr, "/payments", N, C, |i| format!("h{}", i % 100)).await;
        row("bare handler, same Redis commands by hand", first, replay);
    }
    let _ = std::fs::remove_file(&sqlite_path);
}

/// A TCP proxy in front of PostgreSQL that counts the client's round trips: each client write
/// that ends in a Sync or Query message (the client then waits for ReadyForQuery). A write that
/// holds only a Sync is sqlx's connection check when a connection goes back to its pool: it runs
/// on a background task after the caller has its answer, so it is counted apart.
#[derive(Default)]
struct WireCounts {
    statements: AtomicU64,
    pings: AtomicU64,
}

async fn counting_proxy(upstream: String) -> (SocketAddr, Arc<WireCounts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(WireCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                let mut started = false;
                loop {
                    let n = match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let (mut syncs, mut others) = (0u64, 0u64);
                    loop {
                        if !started {
                            // Untyped start-up packets: an SSLRequest (answered 'N') then the startup message.
                            if buf.len() < 8 {
                                break;
                            }
                            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                            if buf.len() < len {
                                break;
                            }
                            let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                            buf.drain(..len);
                            if code != 80_877_103 {
                                started = true;
                            }
                            continue;
                        }
                        if buf.len() < 5 {
                            break;
                        }
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
                        if buf.len() < len {
                            break;
                        }
                        match buf[0] {
                            b'S' | b'Q' => syncs += 1,
                            _ => others += 1,
                        }
                        buf.drain(..len);
                    }
                    if syncs > 0 && others == 0 && !buf.starts_with(b"Q") {
                        c.pings.fetch_add(1, Ordering::SeqCst);
                    } else if syncs > 0 {
                        c.statements.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, counts)
}

async fn postgres_round_trips(pg: &idempotent_tests::postgres::TestSchema) {
    use idempotent_axum::core::engine::{Captured, Config as EngineConfig, Request as EngineRequest, Runtime};
    use idempotent_axum::core::fingerprint::FingerprintBuilder;
    use idempotent_axum::core::key::IdempotencyKey;
    use idempotent_axum::core::policy::Policy;
    use idempotent_axum::core::response::StoredResponse;
    const POLICY: Policy = Policy::new("bench.rt");
    let upstream = pg.url.split('@').nth(1).and_then(|r| r.split('/').next()).unwrap_or("127.0.0.1:5432").to_owned();
    let (proxy, counts) = counting_proxy(upstream.clone()).await;
    let url = pg.url.replace(&upstream, &proxy.to_string());
    let store = PostgresStore::connect_with(&url, pg.config().sweep_interval(None).max_connections(1)).await.unwrap();
    let runtime = Runtime::new(Arc::new(store), EngineConfig::default());
    let run = |key: String| {
        let runtime = runtime.clone();
        async move {
            let req = EngineRequest {
                key: IdempotencyKey::parse(key.as_bytes()).map(Some),
                actor: None,
                fingerprint: Ok(FingerprintBuilder::new(POLICY.scope).finish()),
            };
            runtime
                .execute(&POLICY, req, async { Captured::new(StoredResponse::new(201, [("a", "b")], "x".into()), ()) })
                .await;
        }
    };
    // Warm up: the connection and its prepared statements.
    run("warm".into()).await;
    run("warm".into()).await;
    const N: u64 = 200;
    let snapshot = || (counts.statements.load(Ordering::SeqCst), counts.pings.load(Ordering::SeqCst));
    let settle = || tokio::time::sleep(Duration::from_millis(200));
    settle().await;
    let before = snapshot();
    for i in 0..N {
        run(format!("first-{i}")).await;
    }
    settle().await;
    let mid = snapshot();
    for i in 0..N {
        run(format!("first-{i}")).await;
    }
    settle().await;
    let after = snapshot();
    let per = |a: u64, b: u64| (b - a) as f64 / N as f64;
    println!("\n3. PostgreSQL round trips per request, counted on the wire by a proxy, {N} requests each");
    println!("  {:<18} {:>22} {:>34}", "", "on the request path", "sqlx pool check (background)");
    println!("  {:<18} {:>22.2} {:>34.2}", "first execution", per(before.0, mid.0), per(before.1, mid.1));
    println!("  {:<18} {:>22.2} {:>34.2}", "replay", per(mid.0, after.0), per(mid.1, after.1));
}

/// First executions per second through a SQLite store with `synchronous`, at most `group` writes
/// per transaction, `callers` at once.
async fn sqlite_first_executions(
    synchronous: sqlx::sqlite::SqliteSynchronous,
    group: usize,
    callers: usize,
    n: usize,
) -> f64 {
    use idempotent_axum::core::fingerprint::FingerprintBuilder;
    use idempotent_axum::core::response::StoredResponse;
    use idempotent_axum::core::store::{Claim, RecordKey, SqliteConfig};
    let path = std::env::temp_dir().join(format!("bench-sync-{}.sqlite", uuid::Uuid::new_v4().simple()));
    let config = SqliteConfig::new().synchronous(synchronous).group_commit(group).sweep_interval(None);
    let store = SqliteStore::connect_with(&format!("sqlite:{}", path.display()), config).await.unwrap();
    let fingerprint = FingerprintBuilder::new("bench.sync").finish();
    let response = StoredResponse::new(201, [("content-type", "application/json")], r#"{"id":"pay_1"}"#.into());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (store, next, fingerprint, response) = (store.clone(), next.clone(), fingerprint, response.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        break;
                    }
                    let key = RecordKey::new("bench.sync", "acct_bench", format!("k{i}"));
                    let Claim::Acquired(token) =
                        store.claim(&key, &fingerprint, Duration::from_secs(30)).await.unwrap()
                    else {
                        panic!("a fresh key")
                    };
                    store.complete(&key, &token, &response, Duration::from_secs(3600)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let per_second = n as f64 / start.elapsed().as_secs_f64();
    drop(store);
    // The last connection to close checkpoints the write-ahead log into the database and deletes
    // it: wait for that (at most 10 s), so that its writes and syncs do not fall in the next cell.
    let wal = format!("{}-wal", path.display());
    let closing = Instant::now();
    while std::path::Path::new(&wal).exists() && closing.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    per_second
}

async fn sqlite_durability() {
    use sqlx::sqlite::SqliteSynchronous;
    const N: usize = 2_000;
    // The default (group commit, up to 64 writes per transaction) and one write per transaction
    // (`group_commit(1)`, each claim and each completion a commit of its own), for each setting.
    const ROWS: [(&str, SqliteSynchronous, usize); 4] = [
        ("FULL (default)", SqliteSynchronous::Full, 64),
        ("FULL, 1 write per tx", SqliteSynchronous::Full, 1),
        ("NORMAL", SqliteSynchronous::Normal, 64),
        ("NORMAL, 1 write per tx", SqliteSynchronous::Normal, 1),
    ];
    println!(
        "\n4. SQLite store, first executions (claim + completion) per second, {N} per run, best of 3 alternating runs"
    );
    println!("  {:<24} {:>14} {:>22}", "synchronous", "1 caller", "16 concurrent callers");
    let mut best = [[0f64; 2]; ROWS.len()];
    for round in 0..3 {
        // Each row goes first in turn: no row always follows the same one.
        for turn in 0..ROWS.len() {
            let row = (turn + round) % ROWS.len();
            let (_, sync, group) = ROWS[row];
            for (col, callers) in [1, 16].into_iter().enumerate() {
                best[row][col] = best[row][col].max(sqlite_first_executions(sync, group, callers, N).await);
            }
        }
    }
    for ((label, ..), [one, many]) in ROWS.into_iter().zip(best) {
        println!("  {label:<24} {one:>14.0} {many:>22.0}");
    }
    println!("  NORMAL/FULL: {:.2}x with 1 caller, {:.2}x with 16", best[2][0] / best[0][0], best[2][1] / best[0][1]);
    println!(
        "  group commit (default) / 1 write per tx, FULL: {:.2}x with 1 caller, {:.2}x with 16",
        best[0][0] / best[1][0],
        best[0][1] / best[1][1]
    );
}

/// First executions per second through `store` (a claim, then a completion), `callers` at once,
/// `n` keys named after `run`.
async fn postgres_first_executions(store: &PostgresStore, run: &str, callers: usize, n: usize) -> f64 {
    use idempotent_axum::core::fingerprint::FingerprintBuilder;
    use idempotent_axum::core::response::StoredResponse;
    use idempotent_axum::core::store::{Claim, RecordKey};
    let fingerprint = FingerprintBuilder::new("bench.batch").finish();
    let response = StoredResponse::new(201, [("content-type", "application/json")], r#"{"id":"pay_1"}"#.into());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (store, next, response, run) = (store.clone(), next.clone(), response.clone(), run.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        break;
                    }
                    let key = RecordKey::new("bench.batch", "acct_bench", format!("{run}-{i}"));
                    let Claim::Acquired(token) =
                        store.claim(&key, &fingerprint, Duration::from_secs(30)).await.unwrap()
                    else {
                        panic!("a fresh key")
                    };
                    store.complete(&key, &token, &response, Duration::from_secs(3600)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn postgres_batching(pg: Option<Arc<idempotent_tests::postgres::TestSchema>>) {
    use idempotent_axum::core::store::PostgresConfig;
    let Some(pg) = pg else {
        println!("\n10. PostgreSQL group commit: skipped (no PostgreSQL server)");
        return;
    };
    const N: usize = 3_000;
    const CALLERS: [usize; 3] = [1, 16, 64];
    // A pool of 8, as the comparison's; the sweeper off, so that only the measured work runs.
    let config = |group: usize| pg.config().sweep_interval(None).max_connections(8).group_commit(group);
    let rows: [(&str, PostgresConfig); 2] =
        [("group_commit(64) (default)", config(64)), ("1 statement per write", config(1))];
    let mut stores = Vec::new();
    for (label, config) in rows {
        stores.push((label, PostgresStore::connect_with(&pg.url, config).await.unwrap()));
    }
    // Warm up: connections and prepared statements, single and batched.
    for (row, (_, store)) in stores.iter().enumerate() {
        postgres_first_executions(store, &format!("warm{row}"), 64, 2_000).await;
    }
    println!(
        "\n10. PostgreSQL store, first executions (claim + completion) per second, {N} per run, best of 3 alternating runs"
    );
    println!("  {:<32} {:>10} {:>12} {:>12}", "", "1 caller", "16 callers", "64 callers");
    let mut best = [[0f64; CALLERS.len()]; 2];
    for round in 0..3 {
        for (col, callers) in CALLERS.into_iter().enumerate() {
            // Each row goes first in turn: the cell after a 64-caller run meets the server still
            // busy with it (its WAL writer, autovacuum), and a pause lets it settle.
            for turn in 0..2 {
                let row = (turn + round + col) % 2;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let run = format!("r{round}c{callers}s{row}");
                best[row][col] = best[row][col].max(postgres_first_executions(&stores[row].1, &run, callers, N).await);
            }
        }
    }
    for ((label, _), figures) in stores.iter().zip(best) {
        println!("  {label:<32} {:>10.0} {:>12.0} {:>12.0}", figures[0], figures[1], figures[2]);
    }
    println!(
        "  batched / 1 statement per write: {:.2}x with 1 caller, {:.2}x with 16, {:.2}x with 64",
        best[0][0] / best[1][0],
        best[0][1] / best[1][1],
        best[0][2] / best[1][2]
    );
}

/// The record of key number `i` of the fill part, filed as the engine files it: a route's scope,
/// the digest of one caller (computed once: the figures are the store's), a key shaped like a
/// UUID.
fn fill_key(i: usize) -> idempotent_axum::core::store::RecordKey {
    static ACTOR: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| idempotent_axum::core::actor::digest("acct_bench"));
    idempotent_axum::core::store::RecordKey::new(
        "bench.fill",
        ACTOR.as_str(),
        format!("00000000-0000-4000-8000-{i:012}"),
    )
}

/// A payment's answer, as the demo stores it: a JSON body of about 150 bytes and its type.
fn fill_response() -> idempotent_axum::core::response::StoredResponse {
    let body = r#"{"id":"pay_00000000000000000000000000000001","amount":100,"currency":"EUR","customer":"cus_1","status":"succeeded","created":1700000000}"#;
    idempotent_axum::core::response::StoredResponse::new(201, [("content-type", "application/json")], body.into())
}

/// Claims then completes the keys numbered `keys` (kept `ttl`), `callers` at once; answers the
/// pairs per second, and how many claims were refused as full (a refused key is not completed).
/// Stops after `budget` when the store is slower than that.
async fn fill(
    store: &Arc<MemoryStore>,
    keys: std::ops::Range<usize>,
    callers: usize,
    ttl: Duration,
    budget: Duration,
) -> (f64, usize) {
    use idempotent_axum::core::fingerprint::FingerprintBuilder;
    use idempotent_axum::core::store::{Claim, StoreError};
    let fingerprint = FingerprintBuilder::new("bench.fill").finish();
    let next = Arc::new(AtomicU64::new(keys.start as u64));
    let (done, full) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (store, next, done, full) = (store.clone(), next.clone(), done.clone(), full.clone());
            let (end, response) = (keys.end, fill_response());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= end || start.elapsed() > budget {
                        break;
                    }
                    let key = fill_key(i);
                    match store.claim(&key, &fingerprint, Duration::from_secs(30)).await {
                        Ok(Claim::Acquired(token)) => store.complete(&key, &token, &response, ttl).await.unwrap(),
                        Err(StoreError::Full) => {
                            full.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("a fresh key: {other:?}"),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(), full.load(Ordering::Relaxed) as usize)
}

/// Resident memory of the process, in bytes (0 where `/proc` is not there).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

async fn memory_fill() {
    const BOUND: usize = 200_000;
    const MEASURED: usize = 20_000;
    const MILLION: usize = 1_000_000;
    const DAY: Duration = Duration::from_secs(86_400);
    const BUDGET: Duration = Duration::from_secs(3);
    println!(
        "\n5. memory store: claim + completion pairs per second as it fills ({MEASURED} new keys per cell, best of 3)"
    );

    // First, while the process's heap holds nothing else: what a million records cost.
    let before = resident_bytes();
    let store = Arc::new(MemoryStore::with_limits(usize::MAX, usize::MAX));
    fill(&store, 0..MILLION, 2, DAY, Duration::MAX).await;
    let resident = resident_bytes().saturating_sub(before) as f64 / store.len() as f64;
    let mut million = [0f64; 2];
    for _ in 0..3 {
        for (col, callers) in [1, 4].into_iter().enumerate() {
            let from = MILLION + store.len();
            million[col] = million[col].max(fill(&store, from..from + MEASURED, callers, DAY, BUDGET).await.0);
        }
    }
    let records = store.len();
    let own = store.bytes();
    drop(store);

    println!(
        "  {:<48} {:>10} {:>10} {:>8}",
        format!("state of the store (bound {BOUND} records)"),
        "1 caller",
        "4 callers",
        "refused"
    );
    let rows: [(&str, usize, bool); 4] = [
        ("empty", 0, false),
        ("half full (live records)", BOUND / 2, false),
        ("full of live records (every claim refused)", BOUND, false),
        ("full of expired records (each claim makes room)", BOUND, true),
    ];
    for (label, prefill, expired) in rows {
        let mut best = [0f64; 2];
        let mut refused = 0;
        for _ in 0..3 {
            for (col, callers) in [1, 4].into_iter().enumerate() {
                let store = Arc::new(MemoryStore::with_limits(BOUND, usize::MAX));
                let ttl = if expired { Duration::from_secs(1) } else { DAY };
                fill(&store, 0..prefill, 2, ttl, Duration::MAX).await;
                if expired {
                    tokio::time::sleep(ttl + Duration::from_millis(10)).await;
                }
                let (rate, full) = fill(&store, BOUND..BOUND + MEASURED, callers, DAY, BUDGET).await;
                best[col] = best[col].max(rate);
                refused = refused.max(full);
            }
        }
        println!("  {label:<48} {:>10.0} {:>10.0} {refused:>8}", best[0], best[1]);
    }
    println!("  {:<48} {:>10.0} {:>10.0} {:>8}", format!("{records} records (no bound)"), million[0], million[1], 0);
    println!("\n  bytes per record at {records} records (small JSON answer, UUID key, digest actor):");
    println!("  {:<48} {:>10.0}", "by the store's own count", own as f64 / records as f64);
    println!("  {:<48} {:>10.0}", format!("by the process's resident memory (at {MILLION})"), resident);
}

/// `POST /deposits` of the transactional comparison: `account` gets `amount`.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct DepositBody {
    account: String,
    amount: i64,
}

/// The database the deposit routes write in: the store's, through the store's own pool, so that
/// both modes have the same connections to share (on SQLite, a second pool on the file would add
/// writers queueing for its one write lock, a cost of that set-up rather than of the mode).
#[derive(Clone)]
enum DepositDb {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

const PG_DEPOSIT_TABLES: &str = "CREATE TABLE IF NOT EXISTS bench_deposits (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS bench_balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL);";
const PG_INSERT: &str = "INSERT INTO bench_deposits (id, account, amount) VALUES ($1, $2, $3)";
const PG_UPSERT: &str = "INSERT INTO bench_balances AS b (account, balance) VALUES ($1, $2)
    ON CONFLICT (account) DO UPDATE SET balance = b.balance + EXCLUDED.balance";
const SQLITE_DEPOSIT_TABLES: &str = "CREATE TABLE IF NOT EXISTS bench_deposits (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bench_balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL);";
const SQLITE_INSERT: &str = "INSERT INTO bench_deposits (id, account, amount) VALUES (?1, ?2, ?3)";
const SQLITE_UPSERT: &str = "INSERT INTO bench_balances (account, balance) VALUES (?1, ?2)
    ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance";

/// The deposit's two writes (a row, the balance's upsert) on `conn`.
async fn pg_deposit(conn: &mut sqlx::PgConnection, d: &DepositBody) -> String {
    let id = format!("dep_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(PG_INSERT).bind(&id).bind(&d.account).bind(d.amount).execute(&mut *conn).await.unwrap();
    sqlx::query(PG_UPSERT).bind(&d.account).bind(d.amount).execute(&mut *conn).await.unwrap();
    id
}

async fn sqlite_deposit(conn: &mut sqlx::SqliteConnection, d: &DepositBody) -> String {
    let id = format!("dep_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(SQLITE_INSERT).bind(&id).bind(&d.account).bind(d.amount).execute(&mut *conn).await.unwrap();
    sqlx::query(SQLITE_UPSERT).bind(&d.account).bind(d.amount).execute(&mut *conn).await.unwrap();
    id
}

/// Ordinary mode: the handler commits its writes in a transaction of its own, then the engine
/// stores the outcome.
#[idempotent(scope = "bench.deposit.ordinary")]
async fn deposit_ordinary(State(db): State<DepositDb>, Json(d): Json<DepositBody>) -> (StatusCode, String) {
    let id = match &db {
        DepositDb::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            let id = pg_deposit(&mut tx, &d).await;
            tx.commit().await.unwrap();
            id
        }
        DepositDb::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            let id = sqlite_deposit(&mut tx, &d).await;
            tx.commit().await.unwrap();
            id
        }
    };
    (StatusCode::CREATED, id)
}

/// Transactional mode: the same writes through `Tx`, committed with the outcome's record.
#[idempotent(scope = "bench.deposit.transactional", transactional = true)]
async fn deposit_transactional(
    State(db): State<DepositDb>,
    tx: idempotent_axum::Tx,
    Json(d): Json<DepositBody>,
) -> (StatusCode, String) {
    let id = match &db {
        DepositDb::Postgres(_) => pg_deposit(&mut tx.postgres().await.unwrap(), &d).await,
        DepositDb::Sqlite(_) => sqlite_deposit(&mut tx.sqlite().await.unwrap(), &d).await,
    };
    (StatusCode::CREATED, id)
}

/// First executions per second of `n` deposits on `path` from `callers` concurrent callers (each
/// its own account, so that callers do not queue on one balance row), in process; and how many
/// answers were not 201 (the store timed out: sent again with the same key).
async fn deposits_per_second(app: &Router, path: &str, tag: &str, callers: usize, n: usize) -> (f64, u64) {
    let next = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let (app, path, tag, next, retried) =
                (app.clone(), path.to_owned(), tag.to_owned(), next.clone(), retried.clone());
            tokio::spawn(async move {
                let body =
                    serde_json::to_string(&DepositBody { account: format!("acct_{caller}"), amount: 5 }).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        break;
                    }
                    loop {
                        let request = Request::post(&path)
                            .header("content-type", "application/json")
                            .header("idempotency-key", format!("{tag}-{i}"))
                            .body(Body::from(body.clone()))
                            .unwrap();
                        let r = app.clone().oneshot(request).await.unwrap();
                        if r.status() == StatusCode::CREATED {
                            assert!(!r.headers().contains_key("idempotent-replayed"), "a first execution");
                            break;
                        }
                        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
                        retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (n as f64 / start.elapsed().as_secs_f64(), retried.load(Ordering::Relaxed))
}

/// The deposit routes on `store`, writing in `db`.
fn deposit_app(store: Arc<dyn Store>, db: DepositDb) -> Router {
    // The demo's routes are linked in too, and their 3 s leases need the demo's store timeout.
    let idem = Idempotency::builder(store)
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(payments_demo::api::STORE_TIMEOUT)
        .token_secret(TOKEN_SECRET)
        .build()
        .unwrap();
    Router::new()
        .route("/ordinary", post(deposit_ordinary))
        .route("/transactional", post(deposit_transactional))
        .layer(idem.layer())
        .with_state(db)
}

async fn transactional_cost(pg: Option<Arc<idempotent_tests::postgres::TestSchema>>) {
    const CALLERS: [usize; 2] = [1, 16];
    const ROUNDS: usize = 5;
    let mut databases: Vec<(&str, Router, usize)> = Vec::new();
    let sqlite_path = std::env::temp_dir().join(format!("bench-tx-{}.sqlite", uuid::Uuid::new_v4().simple()));
    {
        // The store's defaults: WAL, synchronous FULL.
        let store = SqliteStore::connect(&format!("sqlite:{}", sqlite_path.display())).await.unwrap();
        let pool = store.pool().clone();
        sqlx::raw_sql(SQLITE_DEPOSIT_TABLES).execute(&pool).await.unwrap();
        databases.push(("SQLite (file, FULL)", deposit_app(Arc::new(store), DepositDb::Sqlite(pool)), 600));
    }
    if let Some(pg) = &pg {
        let sep = if pg.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options[search_path]={}", pg.url, pg.name);
        let config = idempotent_axum::core::store::PostgresConfig::new()
            .schema(&pg.name)
            .application_name(&pg.name)
            .sweep_interval(None);
        let store = PostgresStore::connect_with(&url, config).await.unwrap();
        let pool = store.pool().clone();
        sqlx::raw_sql(PG_DEPOSIT_TABLES).execute(&pool).await.unwrap();
        databases.push(("PostgreSQL", deposit_app(Arc::new(store), DepositDb::Postgres(pool)), 2_000));
    }
    println!(
        "\n5. transactional mode: first executions per second of a deposit (a row INSERT and a balance upsert), in process, best of {ROUNDS} alternating rounds"
    );
    println!("  ordinary: the handler commits its writes in a transaction of its own (on the store's pool), then the");
    println!("  engine stores the outcome; transactional: the writes through Tx, committed with the outcome's record;");
    println!(
        "  retried: 503 answers (a store operation past the demo's 500 ms store timeout) sent again with the same"
    );
    println!("  key, over all rounds, ordinary / transactional");
    println!(
        "  {:<20} {:>8} {:>8} {:>14} {:>14} {:>10} {:>13}",
        "database", "callers", "requests", "ordinary/s", "transact./s", "tx/ord", "retried o / t"
    );
    for (label, app, n) in &databases {
        let n = *n;
        let mut best = [[0f64; 2]; CALLERS.len()];
        let mut retried = [[0u64; 2]; CALLERS.len()];
        for round in 0..ROUNDS {
            for (c, callers) in CALLERS.into_iter().enumerate() {
                for (v, path) in ["/ordinary", "/transactional"].into_iter().enumerate() {
                    let tag = format!("r{round}-c{callers}");
                    let (per_second, r) = deposits_per_second(app, path, &tag, callers, n).await;
                    best[c][v] = best[c][v].max(per_second);
                    retried[c][v] += r;
                }
            }
        }
        for ((callers, [ordinary, transactional]), [o, t]) in CALLERS.into_iter().zip(best).zip(retried) {
            println!(
                "  {label:<20} {callers:>8} {n:>8} {ordinary:>14.0} {transactional:>14.0} {:>9.2}x {:>13}",
                transactional / ordinary,
                format!("{o} / {t}")
            );
        }
    }
    drop(databases);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
    }
}

/// The token secret of every runtime here (the demo's checkout route is linked in).
const TOKEN_SECRET: &[u8] = b"the benchmark's token secret, 32 bytes or more";

#[derive(Debug, Clone, Deserialize, Serialize)]
struct FormCharge {
    amount: i64,
    currency: String,
}

#[idempotent(scope = "bench.form.header", fields = [amount, currency], lease = "3s")]
async fn form_by_header(axum::Form(c): axum::Form<FormCharge>) -> (StatusCode, String) {
    (StatusCode::SEE_OTHER, c.currency)
}

#[idempotent(scope = "bench.form.issued", key = issued(ttl = "15m", from = form("_idem")), fields = [amount, currency], lease = "3s")]
async fn form_by_token(axum::Form(c): axum::Form<FormCharge>) -> (StatusCode, String) {
    (StatusCode::SEE_OTHER, c.currency)
}

async fn form_page(mint: idempotent_axum::Mint) -> String {
    mint.token("bench.form.issued").await.expect("a token").token
}

fn form_request(path: &str, key: Option<&str>, token: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let body = match token {
        Some(t) => format!("amount=100&currency=EUR&_idem={t}"),
        None => "amount=100&currency=EUR".to_owned(),
    };
    b.body(Body::from(body)).unwrap()
}

/// Microseconds per call of `n` sequential calls of `f(i)`.
async fn timed<F: std::future::Future<Output = ()>>(n: usize, f: impl Fn(usize) -> F) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i).await;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Part 7 on one store: µs per mint, per issued first execution and replay, per header-key first
/// execution and replay.
async fn issued_on(store: Arc<dyn Store>, n: usize) -> [f64; 5] {
    let idem = Idempotency::builder(store)
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(payments_demo::api::STORE_TIMEOUT)
        .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
        .token_secret(TOKEN_SECRET)
        .token_quota(usize::MAX)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/form", axum::routing::get(form_page))
        .route("/header", post(form_by_header))
        .route("/issued", post(form_by_token))
        .layer(idem.layer());
    let tokens = std::sync::Mutex::new(Vec::with_capacity(n));
    let mint_us = timed(n, |_| async {
        let r = app.clone().oneshot(Request::get("/form").body(Body::empty()).unwrap()).await.unwrap();
        let token = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        tokens.lock().unwrap().push(String::from_utf8(token.to_vec()).unwrap());
    })
    .await;
    let tokens = tokens.into_inner().unwrap();
    let submit = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let r = app.oneshot(req).await.unwrap();
            assert_eq!(r.status(), StatusCode::SEE_OTHER);
        }
    };
    let run = std::process::id();
    let issued_first = timed(n, |i| submit(form_request("/issued", None, Some(&tokens[i])))).await;
    let issued_replay = timed(n, |_| submit(form_request("/issued", None, Some(&tokens[0])))).await;
    let header_first = timed(n, |i| submit(form_request("/header", Some(&format!("h-{run}-{i}")), None))).await;
    let header_replay = timed(n, |_| submit(form_request("/header", Some(&format!("h-{run}-0")), None))).await;
    [mint_us, issued_first, issued_replay, header_first, header_replay]
}

async fn issued_cost(redis_url: Option<String>, pg: Option<Arc<idempotent_tests::postgres::TestSchema>>) {
    println!("\n7. server-issued form tokens, in process, µs per request (sequential)");
    println!(
        "  {:<12} {:>6} {:>9} {:>13} {:>13} {:>13} {:>13} {:>9} {:>9}",
        "store", "n", "mint", "issued first", "issued replay", "header first", "header replay", "first x", "replay x"
    );
    let sqlite_path = std::env::temp_dir().join(format!("bench-issued-{}.db", std::process::id()));
    let mut stores: Vec<(&str, usize, Arc<dyn Store>)> = vec![("memory", 20_000, Arc::new(MemoryStore::new()))];
    let sqlite = SqliteStore::connect(&format!("sqlite:{}", sqlite_path.display())).await.unwrap();
    stores.push(("sqlite", 1_000, Arc::new(sqlite)));
    if let Some(pg) = &pg {
        stores.push(("postgres", 1_000, pg.store().await));
    }
    if let Some(url) = &redis_url {
        let prefix = format!("bench-issued:{}:", std::process::id());
        stores.push(("redis", 2_000, Arc::new(RedisStore::builder(url).prefix(prefix).build().await.unwrap())));
    }
    for (name, n, store) in stores {
        let [mint, issued_first, issued_replay, header_first, header_replay] = issued_on(store, n).await;
        println!(
            "  {name:<12} {n:>6} {mint:>9.2} {issued_first:>13.2} {issued_replay:>13.2} {header_first:>13.2} {header_replay:>13.2} {:>8.2}x {:>8.2}x",
            issued_first / header_first,
            issued_replay / header_replay
        );
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
    }
}

/// First executions (claim then completion) per second through `store`: `n` fresh keys over
/// `callers` concurrent tasks, each its own actor unless `one_actor`.
async fn first_executions(store: Arc<dyn Store>, callers: usize, one_actor: bool, n: usize) -> f64 {
    use idempotent_axum::core::fingerprint::FingerprintBuilder;
    use idempotent_axum::core::response::StoredResponse;
    use idempotent_axum::core::store::{Claim, RecordKey};
    let fingerprint = FingerprintBuilder::new("bench.quota").finish();
    let response = StoredResponse::new(201, [("content-type", "application/json")], r#"{"id":"pay_1"}"#.into());
    let next = Arc::new(AtomicU64::new(0));
    let run = uuid::Uuid::new_v4().simple().to_string();
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let (store, next, response, run) = (store.clone(), next.clone(), response.clone(), run.clone());
            let actor = if one_actor { "acct_bench".to_owned() } else { format!("acct_{c}") };
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        break;
                    }
                    let key = RecordKey::new("bench.quota", actor.as_str(), format!("{run}-{i}"));
                    let Claim::Acquired(token) =
                        store.claim(&key, &fingerprint, Duration::from_secs(30)).await.unwrap()
                    else {
                        panic!("a fresh key")
                    };
                    store.complete(&key, &token, &response, Duration::from_secs(3600)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn actor_quota_cost(pg: Option<Arc<idempotent_tests::postgres::TestSchema>>) {
    use idempotent_axum::core::store::SqliteConfig;
    const N: usize = 1_000;
    const BOUND: Option<usize> = Some(1 << 30);
    println!("\n9. per-caller byte bound: first executions (claim + completion) per second, {N} per run, best of 3");
    println!("  {:<28} {:>10} {:>24} {:>22}", "store", "1 caller", "16 callers, 16 actors", "16 callers, 1 actor");
    let path = std::env::temp_dir().join(format!("bench-quota-{}.sqlite", uuid::Uuid::new_v4().simple()));
    let spec = format!("sqlite:{}", path.display());
    let mut rows: Vec<(String, Arc<dyn Store>)> = Vec::new();
    for (label, bound) in [("SQLite, no bound", None), ("SQLite, actor_max_bytes", BOUND)] {
        let config = SqliteConfig::new().sweep_interval(None).actor_max_bytes(bound);
        rows.push((label.into(), Arc::new(SqliteStore::connect_with(&spec, config).await.unwrap())));
    }
    if let Some(pg) = &pg {
        for (label, bound) in [("PostgreSQL, no bound", None), ("PostgreSQL, actor_max_bytes", BOUND)] {
            let config = pg.config().sweep_interval(None).actor_max_bytes(bound);
            rows.push((label.into(), Arc::new(PostgresStore::connect_with(&pg.url, config).await.unwrap())));
        }
    } else {
        println!("  (no PostgreSQL: its rows are left out)");
    }
    let mut best = vec![[0f64; 3]; rows.len()];
    for _ in 0..3 {
        for (row, (_, store)) in rows.iter().enumerate() {
            for (col, (callers, one_actor)) in [(1, false), (16, false), (16, true)].into_iter().enumerate() {
                best[row][col] = best[row][col].max(first_executions(store.clone(), callers, one_actor, N).await);
            }
        }
    }
    for ((label, _), [one, many, shared]) in rows.iter().zip(&best) {
        println!("  {label:<28} {one:>10.0} {many:>24.0} {shared:>22.0}");
    }
    for pair in best.chunks(2) {
        if let [off, on] = pair {
            println!(
                "  with / without a bound: {:.2}x (1 caller), {:.2}x (16 actors), {:.2}x (1 actor)",
                on[0] / off[0],
                on[1] / off[1],
                on[2] / off[2]
            );
        }
    }
    drop(rows);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: run with `cargo bench -p idempotent-tests --bench throughput`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::args().any(|a| a == "transactional") {
        rt.block_on(async {
            let pg = idempotent_tests::postgres::TestSchema::new().await;
            tokio::spawn(transactional_cost(pg)).await
        })
        .unwrap();
        return;
    }
    if std::env::args().any(|a| a == "actor-quota") {
        rt.block_on(async {
            let pg = idempotent_tests::postgres::TestSchema::new().await;
            tokio::spawn(actor_quota_cost(pg)).await
        })
        .unwrap();
        return;
    }
    if std::env::args().any(|a| a == "sqlite-sync") {
        rt.block_on(async { tokio::spawn(sqlite_durability()).await }).unwrap();
        return;
    }
    if std::env::args().any(|a| a == "postgres-batch") {
        rt.block_on(async {
            let pg = idempotent_tests::postgres::TestSchema::new().await;
            tokio::spawn(postgres_batching(pg)).await
        })
        .unwrap();
        return;
    }
    if std::env::args().any(|a| a == "memory-fill") {
        rt.block_on(async { tokio::spawn(memory_fill()).await }).unwrap();
        return;
    }
    if std::env::args().any(|a| a == "issued") {
        rt.block_on(async {
            let redis_url = idempotent_tests::redis_server::redis_url().await;
            let pg = idempotent_tests::postgres::TestSchema::new().await;
            tokio::spawn(issued_cost(redis_url, pg)).await
        })
        .unwrap();
        return;
    }
    if std::env::args().any(|a| a == "digests") {
        digests();
        return;
    }
    in_process();
    if std::env::args().any(|a| a == "in-process") {
        return;
    }
    digests();
    rt.block_on(async {
        let redis_url = idempotent_tests::redis_server::redis_url().await;
        let pg = idempotent_tests::postgres::TestSchema::new().await;
        over_http(redis_url, pg.clone()).await;
        if let Some(pg) = &pg {
            postgres_round_trips(pg).await;
        }
        tokio::spawn(sqlite_durability()).await.unwrap();
        tokio::spawn(memory_fill()).await.unwrap();
        tokio::spawn(transactional_cost(pg.clone())).await.unwrap();
        let redis_url = idempotent_tests::redis_server::redis_url().await;
        tokio::spawn(issued_cost(redis_url, pg.clone())).await.unwrap();
        tokio::spawn(actor_quota_cost(pg.clone())).await.unwrap();
        tokio::spawn(postgres_batching(pg)).await.unwrap();
    });
}
