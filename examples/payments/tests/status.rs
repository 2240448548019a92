//! The operators' side of both binaries, over real HTTP and real stores: a caller's record at
//! `GET /_idempotency/records/{scope}/{key}` (in progress, completed, absent, another account's),
//! `GET /healthz` while the store answers and while it does not, and the `records inspect` and
//! `records purge` subcommands on the same store as a running demo.

mod common;

use common::{dir, framework, start, Instance, BINS};
use idempotent_tests::fault_proxy::FaultProxy;
use idempotent_tests::postgres::TestSchema;
use idempotent_tests::redis_server::{free_port, redis_url, RedisProcess};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
}

/// A store specification for one test, and what keeps its backing alive.
struct Store {
    spec: String,
    name: &'static str,
    _schema: Option<Arc<TestSchema>>,
}

fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// The store of `kind` for a test, or `None` after the harness's loud skip line.
async fn store(kind: Kind, name: &str) -> Option<Store> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Some(match kind {
        Kind::Sqlite => {
            let path = dir("status", name).join("idempotency.sqlite");
            Store { spec: format!("sqlite:{}", path.display()), name: "sqlite", _schema: None }
        }
        Kind::Postgres => {
            let schema = TestSchema::new().await?;
            schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.expect("create the test's schema");
            let spec = with_param(&schema.url, &format!("options[search_path]={}", schema.name));
            Store { spec, name: "postgres", _schema: Some(schema) }
        }
        Kind::Redis => {
            let spec = with_param(&redis_url().await?, &format!("prefix=status:{id}:"));
            Store { spec, name: "redis", _schema: None }
        }
    })
}

struct Demo {
    instance: Instance,
    base: String,
    client: reqwest::Client,
}

impl Demo {
    fn start(bin: &str, store: &str, name: &str) -> Self {
        let instance = start(bin, store, &dir("status", name).join("ledger.jsonl"), 1500);
        let base = format!("http://{}", instance.demo.addr);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        Self { instance, base, client }
    }

    async fn pay(&self, account: &str, key: &str) -> reqwest::Response {
        let body = json!({"amount": 1250, "currency": "EUR", "customer": "cus_status"});
        let request = self.client.post(format!("{}/payments", self.base)).bearer_auth(account);
        request.header("Idempotency-Key", key).json(&body).send().await.unwrap()
    }

    /// `GET /_idempotency/records/{scope}/{key}` as `account` (none: no `Authorization`).
    async fn status(&self, account: Option<&str>, scope: &str, key: &str) -> (u16, Value) {
        let mut request = self.client.get(format!("{}/_idempotency/records/{scope}/{key}", self.base));
        if let Some(account) = account {
            request = request.bearer_auth(account);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let cache = response.headers().get("cache-control").cloned();
        let body = response.json().await.unwrap_or(Value::Null);
        assert_eq!(cache.as_ref().map(|v| v.to_str().unwrap()), Some("no-store"), "never cached: {status} {body}");
        (status, body)
    }

    async fn health(&self) -> (u16, Option<String>, Value) {
        let response = self.client.get(format!("{}/healthz", self.base)).send().await.unwrap();
        let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), retry_after, response.json().await.unwrap_or(Value::Null))
    }
}

/// The status endpoint, `/healthz` and the `records` subcommands of `bin` on `kind`.
async fn operators_endpoints(bin: &'static str, kind: Kind) {
    let name = format!("{kind:?}-{}", framework(bin));
    let Some(store) = store(kind, &name).await else { return };
    let demo = Demo::start(bin, &store.spec, &name);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (alice, bob) = (format!("acct_a{}", &id[..8]), format!("acct_b{}", &id[..8]));

    let (status, body) = demo.status(Some(&alice), "payments.create", &format!("never-{id}")).await;
    assert_eq!((status, body["type"].as_str()), (404, Some("urn:idempotent:problem:record-not-found")), "{body}");

    let paid = format!("pay-{id}");
    assert_eq!(demo.pay(&alice, &paid).await.status(), 201);
    let (status, body) = demo.status(Some(&alice), "payments.create", &paid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "payments.create");
    assert_eq!(body["key"], paid.as_str());
    assert_eq!(body["state"], "completed");
    assert_eq!(body["status"], 201);
    let expires = humantime::parse_rfc3339(body["expires_at"].as_str().expect("expires_at")).unwrap();
    let ttl = expires.duration_since(std::time::SystemTime::now()).expect("expires in the future");
    assert!(ttl > Duration::from_secs(23 * 3600) && ttl <= Duration::from_secs(24 * 3600), "24 h ttl: {body}");
    humantime::parse_rfc3339(body["created_at"].as_str().expect("created_at")).unwrap();

    let (status, body) = demo.status(Some(&bob), "payments.create", &paid).await;
    assert_eq!(status, 404, "another account's record is not shown: {body}");
    let (status, _) = demo.status(None, "payments.create", &paid).await;
    assert_eq!(status, 401, "no caller, no record");

    // A transfer takes 1.5 s: its record is in progress meanwhile, its lease deadline ahead.
    let moving = format!("move-{id}");
    let transfer = {
        let request = demo.client.post(format!("{}/transfers", demo.base)).bearer_auth(&alice);
        let request = request.header("Idempotency-Key", &moving).json(&json!({"amount": 5, "from": "a", "to": "b"}));
        tokio::spawn(request.send())
    };
    let started = Instant::now();
    loop {
        let (status, body) = demo.status(Some(&alice), "transfers.create", &moving).await;
        if status == 200 {
            assert_eq!(body["state"], "in_progress", "{body}");
            assert!(body.get("status").is_none(), "{body}");
            humantime::parse_rfc3339(body["expires_at"].as_str().expect("the lease deadline")).unwrap();
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "the transfer's claim never showed: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(transfer.await.unwrap().unwrap().status(), 201);
    let (_, body) = demo.status(Some(&alice), "transfers.create", &moving).await;
    assert_eq!((body["state"].as_str(), body["status"].as_u64()), (Some("completed"), Some(201)), "{body}");

    let (status, retry_after, body) = demo.health().await;
    assert_eq!((status, retry_after), (200, None), "{body}");
    assert_eq!(body, json!({"status": "ok", "store": store.name}));

    // The operator's subcommands, on the store the demo is running on.
    let records = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("records")
            .args(args)
            .env("IDEMPOTENCY_STORE", &store.spec)
            .env("PAYMENTS_LEDGER", dir("status", &format!("{name}-cli")).join("ledger.jsonl"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (code, stdout, stderr) = records(&["inspect", "--scope", "payments.create", "--key", &paid, "--actor", &alice]);
    assert_eq!(code, Some(0), "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((shown["state"].as_str(), shown["status"].as_u64()), (Some("completed"), Some(201)), "{shown}");
    let (code, _, stderr) = records(&["inspect", "--scope", "payments.create", "--key", &paid, "--actor", &bob]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no record"), "{stderr}");

    let (code, stdout, stderr) = records(&["purge", "--scope", "payments.create", "--key", &paid, "--actor", &alice]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("purged"), "{stdout}");
    let (code, _, _) = records(&["purge", "--scope", "payments.create", "--key", &paid, "--actor", &alice]);
    assert_eq!(code, Some(1), "nothing left to purge");
    let (status, _) = demo.status(Some(&alice), "payments.create", &paid).await;
    assert_eq!(status, 404, "the purged record is gone for the demo too");
    // A purged key is a new one: the payment runs again, as the operator asked.
    let again = demo.pay(&alice, &paid).await;
    assert_eq!(again.status(), 201);
    assert!(again.headers().get("idempotent-replayed").is_none());
    assert_eq!(common::executions(&[demo.instance.ledger.as_path()], "payment", Some(&alice)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_axum() {
    operators_endpoints(BINS[0], Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_actix() {
    operators_endpoints(BINS[1], Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_axum() {
    operators_endpoints(BINS[0], Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_actix() {
    operators_endpoints(BINS[1], Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_axum() {
    operators_endpoints(BINS[0], Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_actix() {
    operators_endpoints(BINS[1], Kind::Redis).await;
}

/// Polls `/healthz` until it answers `want`, for at most `within`; the last answer.
async fn health_becomes(demo: &Demo, want: u16, within: Duration) -> (u16, Option<String>, Value) {
    let deadline = Instant::now() + within;
    loop {
        let answer = demo.health().await;
        if answer.0 == want || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_unavailable((status, retry_after, body): (u16, Option<String>, Value)) {
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:idempotent:problem:store-unavailable", "{body}");
    assert!(retry_after.is_some(), "a 503 says when to come back");
}

/// A Redis that is killed: `/healthz` says 503 at once, and 200 again once it is back.
async fn health_follows_a_killed_redis(bin: &'static str) {
    let Some(port) = free_port(false) else { return };
    let Some(mut redis) = RedisProcess::start(port, &[]).await else {
        assert!(std::env::var("CI").is_err(), "redis-server is needed under CI");
        return;
    };
    let demo = Demo::start(bin, &redis.url(), &format!("health-redis-{}", framework(bin)));
    assert_eq!(demo.health().await.0, 200);
    redis.kill();
    assert_unavailable(health_becomes(&demo, 503, Duration::from_secs(5)).await);
    assert!(redis.restart().await, "redis-server came back");
    let (status, _, body) = health_becomes(&demo, 200, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "healthy again once Redis is back: {body}");
}

/// A PostgreSQL that stops answering (a proxy in front of it drops everything): `/healthz` says
/// 503 within the store timeout, and 200 again once it answers.
async fn health_follows_a_silent_postgres(bin: &'static str) {
    let Some(store) = store(Kind::Postgres, "health").await else { return };
    let rest = store.spec.split_once("://").unwrap().1;
    let authority = &rest[..rest.find(['/', '?']).unwrap()];
    let host = authority.rsplit('@').next().unwrap();
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:5432") };
    let upstream = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let spec =
        store.spec.replacen(authority, &format!("{}{}", &authority[..=authority.rfind('@').unwrap()], proxy.addr()), 1);
    let demo = Demo::start(bin, &spec, &format!("health-postgres-{}", framework(bin)));
    assert_eq!(demo.health().await.0, 200);
    proxy.stall();
    let asked = Instant::now();
    let answer = demo.health().await;
    let took = asked.elapsed();
    assert_unavailable(answer);
    assert!(took < Duration::from_secs(3), "a silent store is reported within its timeout, not after {took:?}");
    proxy.heal();
    let (status, _, body) = health_becomes(&demo, 200, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "healthy again once PostgreSQL answers: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_redis_axum() {
    health_follows_a_killed_redis(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_redis_actix() {
    health_follows_a_killed_redis(BINS[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_axum() {
    health_follows_a_silent_postgres(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_actix() {
    health_follows_a_silent_postgres(BINS[1]).await;
}

/// Usage errors of the subcommand: one clear line and exit 2, before any store is opened.
#[test]
fn records_usage_errors() {
    for bin in BINS {
        for (args, needle) in [
            (&["records"][..], "`inspect` or `purge`"),
            (&["records", "inspect", "--scope", "payments.create"], "--scope and --key are required"),
            (&["records", "purge", "--scope"], "--scope needs a value"),
            (&["records", "inspect", "--scope", "s", "--key", "k", "--who", "x"], "unknown argument `--who`"),
            (&["records", "inspect", "--scope", "s", "--key", "bad key\u{7f}"], "is not an idempotency key"),
        ] {
            let out = Command::new(bin).args(args).env("IDEMPOTENCY_STORE", "memory").output().unwrap();
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
        }
    }
}
