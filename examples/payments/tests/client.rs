//! `idempotent-client` against the demo binaries as real processes, through a TCP fault proxy:
//! responses lost after the server executed, connections reset before the request arrived, an
//! attempt held back until after its retry, an attempt slower than the client's timeout, the
//! store down, final answers. Every scenario runs
//! against each binary (`payments-axum`, `payments-actix`) and counts executions in the demo's
//! ledger. Then `payments-client`, the command line built on it.

use axum::http::Extensions;
use idempotent_client::retry::FixedJitter;
use idempotent_client::{IdempotencyMiddleware, Outcome};
use idempotent_tests::fault_proxy::{Fault, FaultProxy};
use idempotent_tests::http::{new_key, payment, temp_ledger, Demo};
use idempotent_tests::process::DemoProcess;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Both demo binaries: a scenario must hold whichever framework serves it.
const BINS: [&str; 2] = [env!("CARGO_BIN_EXE_payments-axum"), env!("CARGO_BIN_EXE_payments-actix")];
const CLIENT: &str = env!("CARGO_BIN_EXE_payments-client");

/// A demo process, a handle on its ledger, and a fault proxy in front of it.
struct Running {
    demo: Demo,
    proxy: FaultProxy,
    _process: DemoProcess,
}

async fn start(bin: &str, store: &str, transfer_delay_ms: u64) -> Running {
    let ledger = temp_ledger();
    let mut cmd = Command::new(bin);
    cmd.env("PAYMENTS_LEDGER", &ledger)
        .env("IDEMPOTENCY_STORE", store)
        .env("PAYMENTS_TRANSFER_DELAY_MS", transfer_delay_ms.to_string());
    let process = DemoProcess::start(cmd);
    let addr: SocketAddr = process.addr.parse().expect("the demo's address");
    let proxy = FaultProxy::start(addr).await;
    Running { demo: Demo::new(addr, ledger, Duration::from_millis(transfer_delay_ms)), proxy, _process: process }
}

/// Quick, deterministic retries.
fn middleware() -> idempotent_client::Builder {
    IdempotencyMiddleware::builder()
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .jitter(FixedJitter(1.0))
}

/// A client without an idle pool: every attempt opens its own connection, so each takes the
/// proxy's next fault and the proxy's connection count is the number of attempts. Behind the
/// idempotency middleware, a [`Wire`] records each attempt.
fn client(middleware: IdempotencyMiddleware) -> (ClientWithMiddleware, Wire) {
    let inner = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("a reqwest client");
    let wire = Wire::default();
    (ClientBuilder::new(inner).with(middleware).with(wire.clone()).build(), wire)
}

/// Each attempt as it leaves the idempotency middleware: its key, and its status when an answer
/// came (`None`: the connection failed, or the attempt timed out).
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<Attempt>>>);

/// One attempt on the wire: its `Idempotency-Key`, and its status if an answer came.
type Attempt = (Option<String>, Option<u16>);

impl Wire {
    fn statuses(&self) -> Vec<Option<u16>> {
        self.0.lock().unwrap().iter().map(|(_, s)| *s).collect()
    }

    /// The one key every attempt carried; panics if an attempt had none or another one.
    fn key(&self) -> String {
        let attempts = self.0.lock().unwrap().clone();
        let key = attempts.first().and_then(|(k, _)| k.clone()).expect("a key on the first attempt");
        assert!(attempts.iter().all(|(k, _)| k.as_deref() == Some(key.as_str())), "{attempts:?}");
        key
    }
}

#[async_trait::async_trait]
impl Middleware for Wire {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let n = {
            let mut attempts = self.0.lock().unwrap();
            attempts.push((key, None));
            attempts.len() - 1
        };
        let result = next.run(req, extensions).await;
        if let Ok(r) = &result {
            self.0.lock().unwrap()[n].1 = Some(r.status().as_u16());
        }
        result
    }
}

async fn body(r: reqwest::Response) -> Value {
    let text = r.text().await.expect("a body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The caller's payments, read from the demo directly.
async fn listed(demo: &Demo, account: &str) -> Vec<Value> {
    let r = demo.req(reqwest::Method::GET, "/payments", account).send().await.unwrap();
    serde_json::from_slice::<Vec<Value>>(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_lost_after_the_server_executed_is_retried_and_replayed() {
    for bin in BINS {
        let run = start(bin, "memory", 0).await;
        run.proxy.push(Fault::DropResponse);
        let (c, wire) = client(middleware().build());
        let r = c
            .post(format!("{}/payments", run.proxy.url()))
            .bearer_auth("acct_lost")
            .json(&payment(1000))
            .send()
            .await
            .unwrap();
        let outcome = Outcome::of(&r).unwrap().clone();
        assert_eq!(r.status(), 201, "{bin}");
        assert!(outcome.replayed(), "{bin}: the retry got the stored response");
        assert_eq!(outcome.attempts(), 2, "{bin}");
        assert_eq!(run.proxy.applied(), [Fault::DropResponse, Fault::Pass], "{bin}");
        assert_eq!(wire.statuses(), [None, Some(201)], "{bin}");
        assert_eq!(wire.key(), outcome.key(), "{bin}: one key throughout");
        let paid = body(r).await;
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}: executed exactly once");
        assert_eq!(listed(&run.demo, "acct_lost").await, [paid], "{bin}: the replay is the payment that ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_before_the_request_arrived_is_retried_and_runs_once() {
    for bin in BINS {
        let run = start(bin, "memory", 0).await;
        run.proxy.push(Fault::Reset);
        run.proxy.push(Fault::Reset);
        let (c, wire) = client(middleware().build());
        let r = c
            .post(format!("{}/payments", run.proxy.url()))
            .bearer_auth("acct_reset")
            .json(&payment(700))
            .send()
            .await
            .unwrap();
        let outcome = Outcome::of(&r).unwrap().clone();
        assert_eq!(r.status(), 201, "{bin}");
        assert!(!outcome.replayed(), "{bin}: the first request that arrived ran");
        assert_eq!(outcome.attempts(), 3, "{bin}");
        assert_eq!(run.proxy.applied(), [Fault::Reset, Fault::Reset, Fault::Pass], "{bin}");
        assert_eq!(wire.statuses(), [None, None, Some(201)], "{bin}");
        assert_eq!(wire.key(), outcome.key(), "{bin}");
        let paid = body(r).await;
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}");
        assert_eq!(listed(&run.demo, "acct_reset").await, [paid], "{bin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_attempt_that_arrives_after_its_retry_does_not_run_again() {
    for bin in BINS {
        let run = start(bin, "memory", 0).await;
        run.proxy.push(Fault::Delay(Duration::from_millis(1500)));
        let (c, wire) = client(middleware().attempt_timeout(Some(Duration::from_millis(600))).build());
        let r = c
            .post(format!("{}/payments", run.proxy.url()))
            .bearer_auth("acct_late")
            .json(&payment(310))
            .send()
            .await
            .unwrap();
        let outcome = Outcome::of(&r).unwrap().clone();
        assert_eq!((r.status().as_u16(), outcome.attempts(), outcome.replayed()), (201, 2, false), "{bin}");
        assert_eq!(wire.statuses(), [None, Some(201)], "{bin}");
        wire.key();
        let paid = body(r).await;
        // The held first attempt reaches the server after the retry ran: a duplicate, not a
        // second payment.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(run.proxy.applied(), [Fault::Delay(Duration::from_millis(1500)), Fault::Pass], "{bin}");
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}: executed exactly once");
        assert_eq!(listed(&run.demo, "acct_late").await, [paid], "{bin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_slower_than_the_timeout_is_retried_gets_409_then_the_replay() {
    for bin in BINS {
        let run = start(bin, "memory", 2000).await;
        let started = Instant::now();
        let (c, wire) = client(middleware().attempt_timeout(Some(Duration::from_millis(700))).build());
        let r = c
            .post(format!("{}/transfers", run.proxy.url()))
            .bearer_auth("acct_slow")
            .json(&json!({"amount": 70, "from": "x", "to": "y"}))
            .send()
            .await
            .unwrap();
        let outcome = Outcome::of(&r).unwrap().clone();
        assert_eq!(r.status(), 201, "{bin}");
        assert!(outcome.replayed(), "{bin}");
        // Timed out, then 409 in-progress (the first attempt still runs), then the replay.
        assert_eq!(outcome.attempts(), 3, "{bin}");
        assert_eq!(wire.statuses(), [None, Some(409), Some(201)], "{bin}");
        wire.key();
        // The 409's Retry-After (the claim's remaining lease, whole seconds) was waited for.
        assert!(started.elapsed() >= Duration::from_secs(1), "{bin}: {:?}", started.elapsed());
        let transfer = body(r).await;
        assert_eq!(transfer["amount"], 70, "{bin}");
        assert_eq!(run.demo.ledger_count("transfer"), 1, "{bin}: executed exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_while_the_store_is_down_is_retried_until_it_is_back_and_runs_once() {
    use idempotent_tests::redis_server::{free_port, RedisProcess};
    let port = free_port(false).expect("a free port");
    let Some(first) = RedisProcess::start(port, &[]).await else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is needed (CI=true forbids skipping)");
        }
        eprintln!(
            "\n==================== SKIPPED: no redis-server on PATH for the store outage test ====================\n"
        );
        return;
    };
    let url = first.url();
    let mut redis = Some(first);
    for bin in BINS {
        let run = start(bin, &url, 0).await;
        drop(redis.take()); // SIGKILL, and its directory removed
        let restart = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            RedisProcess::start(port, &[]).await.expect("redis restarts on the same port")
        });
        let key = new_key();
        let (c, wire) = client(middleware().max_attempts(10).build());
        let pay = || {
            c.post(format!("{}/payments", run.proxy.url()))
                .bearer_auth("acct_outage")
                .header("Idempotency-Key", &key)
                .json(&payment(4200))
                .send()
        };
        let r = pay().await.unwrap();
        redis = Some(restart.await.unwrap());
        let outcome = Outcome::of(&r).unwrap().clone();
        let statuses = wire.statuses();
        assert_eq!(r.status(), 201, "{bin}: {statuses:?}");
        assert!(!outcome.replayed(), "{bin}");
        assert!(outcome.attempts() >= 2, "{bin}");
        // 503 store-unavailable until the store is back, then the one execution.
        let mut expected = vec![Some(503); outcome.attempts() as usize - 1];
        expected.push(Some(201));
        assert_eq!(statuses, expected, "{bin}");
        assert_eq!(wire.key(), key, "{bin}");
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}: executed exactly once");
        let again = pay().await.unwrap();
        assert!(Outcome::of(&again).unwrap().replayed(), "{bin}");
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_is_the_answer_and_is_sent_exactly_once() {
    for bin in BINS {
        let run = start(bin, "memory", 0).await;
        let (c, wire) = client(middleware().build());
        let url = format!("{}/payments", run.proxy.url());
        let key = new_key();
        let first = c.post(&url).bearer_auth("acct_422").header("Idempotency-Key", &key).json(&payment(1000));
        assert_eq!(first.send().await.unwrap().status(), 201);

        // The same key with a changed body: 422 key-reused.
        let before = run.proxy.connections();
        let changed = c.post(&url).bearer_auth("acct_422").header("Idempotency-Key", &key).json(&payment(1001));
        let r = changed.send().await.unwrap();
        assert_eq!((r.status().as_u16(), Outcome::of(&r).unwrap().attempts()), (422, 1), "{bin}");
        assert_eq!(body(r).await["type"], "urn:idempotent:problem:key-reused", "{bin}");
        assert_eq!(run.proxy.connections() - before, 1, "{bin}: sent once");

        // A domain validation error: 422 from the handler.
        let before = run.proxy.connections();
        let r = c.post(&url).bearer_auth("acct_422").json(&payment(0)).send().await.unwrap();
        assert_eq!((r.status().as_u16(), Outcome::of(&r).unwrap().attempts()), (422, 1), "{bin}");
        assert_eq!(body(r).await["type"], "urn:payments-demo:problem:validation", "{bin}");
        assert_eq!(run.proxy.connections() - before, 1, "{bin}: sent once");

        assert_eq!(wire.statuses(), [Some(201), Some(422), Some(422)], "{bin}: one attempt each");
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}: only the first payment ran");
    }
}

/// Runs `payments-client` with `args` (without blocking the runtime the proxy runs on).
async fn payments_client(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(CLIENT).args(&args).env_remove("RUST_LOG").output().expect("run payments-client")
    })
    .await
    .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_client_pays_once_and_replays_under_the_same_key() {
    let run = start(BINS[0], "memory", 0).await;
    let url = run.demo.base.clone();
    let key = new_key();
    let pay = ["--url", &url, "--account", "acct_cli", "pay", "--amount", "1500", "--currency", "EUR", "--customer"];
    let args: Vec<&str> = pay.iter().copied().chain(["cus_9", "--key", &key]).collect();

    let first = payments_client(&args).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let paid = stdout_json(&first);
    assert_eq!((paid["amount"].clone(), paid["currency"].clone()), (json!(1500), json!("EUR")));
    assert_eq!(paid["customer"], "cus_9");
    assert!(stderr(&first).lines().any(|l| l == "replayed: false"), "{}", stderr(&first));

    let second = payments_client(&args).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(second.stdout, first.stdout, "the same payment, byte for byte");
    assert!(stderr(&second).lines().any(|l| l == "replayed: true"), "{}", stderr(&second));
    assert_eq!(run.demo.ledger_count("payment"), 1);
    assert!(!stderr(&first).contains(&key) && !stderr(&second).contains(&key), "the key is not logged");

    // Without --key, each run is a payment of its own; without --account, acct_demo pays.
    for _ in 0..2 {
        let out =
            payments_client(&["--url", &url, "pay", "--amount", "5", "--currency", "EUR", "--customer", "c"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stderr(&out).lines().any(|l| l == "replayed: false"));
    }
    assert_eq!(listed(&run.demo, "acct_demo").await.len(), 2);
    assert_eq!(run.demo.ledger_count("payment"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_client_exits_1_on_a_refusal_or_no_answer_and_2_on_a_usage_error() {
    let run = start(BINS[0], "memory", 0).await;
    let url = run.demo.base.clone();

    let refused =
        payments_client(&["--url", &url, "pay", "--amount", "0", "--currency", "EUR", "--customer", "c"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert_eq!(stdout_json(&refused)["type"], "urn:payments-demo:problem:validation");
    assert!(stderr(&refused).lines().any(|l| l == "replayed: false"), "{}", stderr(&refused));
    let bad_currency =
        payments_client(&["--url", &url, "pay", "--amount", "5", "--currency", "eur", "--customer", "c"]).await;
    assert_eq!(bad_currency.status.code(), Some(1));
    assert_eq!(run.demo.ledger_count("payment"), 0);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nobody = format!("http://{closed}");
    let started = Instant::now();
    let down =
        payments_client(&["--url", &nobody, "pay", "--amount", "5", "--currency", "EUR", "--customer", "c"]).await;
    assert_eq!(down.status.code(), Some(1), "{}", stderr(&down));
    assert!(down.stdout.is_empty());
    let err = stderr(&down);
    assert!(
        err.contains(&format!("payments-client: no answer: POST {nobody}/payments: gave up after 5 attempt(s)")),
        "{err}"
    );
    assert_eq!(err.matches("retrying under the same key").count(), 4, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    for args in [
        &["pay", "--amount", "5", "--currency", "EUR"][..],
        &["pay", "--amount", "five", "--currency", "EUR", "--customer", "c"][..],
        &["refund", "--amount", "5"][..],
        &["pay", "--amount", "5", "--currency", "EUR", "--customer", "c", "--colour", "red"][..],
        &[][..],
    ] {
        let out = payments_client(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("usage: payments-client"), "{args:?}");
    }
    let help = payments_client(&["--help"]).await;
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: payments-client"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_client_retries_a_lost_response_under_one_key() {
    for bin in BINS {
        let run = start(bin, "memory", 0).await;
        run.proxy.push(Fault::DropResponse);
        let url = run.proxy.url();
        let out =
            payments_client(&["--url", &url, "pay", "--amount", "990", "--currency", "EUR", "--customer", "c"]).await;
        assert_eq!(out.status.code(), Some(0), "{bin}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.lines().any(|l| l == "replayed: true"), "{bin}: {err}");
        assert_eq!(err.matches("retrying under the same key").count(), 1, "{bin}: {err}");
        assert_eq!(stdout_json(&out)["amount"], 990);
        assert_eq!(run.demo.ledger_count("payment"), 1, "{bin}: executed exactly once");
    }
}
