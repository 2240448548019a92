//! What an attacker or a careless operator can do to both binaries, each reproduced: one caller
//! filling the memory store for everyone, store passwords in messages, backend errors on demand,
//! a repeated identity header, the `records` subcommand running work twice or writing where it
//! should only read, and the served policy report showing the source tree.

mod common;

use common::{dir, framework, start, BINS};
use idempotent_tests::postgres::TestSchema;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "hunter2";

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

/// One account sending large quotes (whose stored answers repeat their input) fills its own share
/// of the memory store, then gets 429 with `Retry-After`; every other account still gets in.
async fn one_caller_cannot_fill_the_store(bin: &str) {
    let name = format!("quota-{}", framework(bin));
    let spec = "memory?max_bytes=16MiB&actor_max_bytes=1MiB";
    let demo = start(bin, spec, &dir("security", &name).join("ledger.jsonl"), 0);
    let base = format!("http://{}", demo.demo.addr);
    let client = client();
    let quote = |account: &str, key: String| {
        let body = json!({"padding": "x".repeat(60_000), "key": key});
        client.post(format!("{base}/quotes")).bearer_auth(account).header("Idempotency-Key", key).json(&body).send()
    };
    let mut admitted = 0;
    let refusal = loop {
        let response = quote("acct_greedy", format!("greedy-{admitted}")).await.unwrap();
        if response.status() != 201 {
            break response;
        }
        admitted += 1;
        assert!(admitted < 100, "the greedy caller was never refused");
    };
    assert!((10..=20).contains(&admitted), "1 MiB holds about 17 answers of 60 kB: {admitted}");
    assert_eq!(refusal.status(), 429);
    let retry_after: u64 = refusal.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "its quotes are kept 3 s: {retry_after}");
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["type"], "urn:idempotent:problem:quota-exceeded", "{body}");
    for i in 0..5 {
        let other = quote("acct_other", format!("other-{i}")).await.unwrap();
        assert_eq!(other.status(), 201, "another caller still gets in");
    }
    assert_eq!(common::executions(&[demo.ledger.as_path()], "quote", Some("acct_greedy")), admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_axum() {
    one_caller_cannot_fill_the_store(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_actix() {
    one_caller_cannot_fill_the_store(BINS[1]).await;
}

/// Every output path of both binaries that names a store specification, fed one with a password:
/// start-up failures (unknown scheme, unreachable store, a cluster without nodes, a malformed
/// Redis URL), the `records` subcommand's errors, and the start-up line of a demo that runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_passwords_are_never_printed() {
    let failing = [
        format!("mongodb://app:{SECRET}@db.internal/payments"),
        format!("redis://:{SECRET}@127.0.0.1:1"),
        format!("redis+cluster://:{SECRET}@/"),
        format!("postgres://app:{SECRET}@127.0.0.1:1/payments"),
        format!("postgres://127.0.0.1:1/payments?password={SECRET}"),
        format!("sqlite:/nonexistent-dir/x.sqlite?password={SECRET}"),
    ];
    for bin in BINS {
        for spec in &failing {
            let ledger = dir("security", &format!("secret-{}", framework(bin))).join("ledger.jsonl");
            let serve = Command::new(bin)
                .env("IDEMPOTENCY_STORE", spec)
                .env("PAYMENTS_LEDGER", &ledger)
                .env("PAYMENTS_ADDR", "127.0.0.1:0")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&serve.stderr);
            assert!(!serve.status.success(), "{spec} cannot be served");
            assert!(!stderr.contains(SECRET), "{bin} on {spec}: {stderr}");
            assert!(stderr.contains("***") || !spec.contains('@'), "the message still names the store: {stderr}");
            let cli = Command::new(bin)
                .args(["records", "inspect", "--scope", "payments.create", "--key", "k"])
                .env("IDEMPOTENCY_STORE", spec)
                .env("PAYMENTS_LEDGER", &ledger)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&cli.stderr);
            assert_eq!(cli.status.code(), Some(2), "{spec}: {stderr}");
            assert!(!stderr.contains(SECRET), "{bin} records on {spec}: {stderr}");
        }
    }
    // A PostgreSQL that trusts the connection ignores the password: the demo starts, and its
    // start-up line names the store without it.
    let Some(schema) = TestSchema::new().await else { return };
    let (scheme, rest) = schema.url.split_once("://").unwrap();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let spec = format!("{scheme}://postgres:{SECRET}@{rest}");
    for bin in BINS {
        let demo = start(bin, &spec, &dir("security", &format!("banner-{}", framework(bin))).join("l.jsonl"), 0);
        assert!(demo.demo.banner.contains("postgres:***@"), "{}", demo.demo.banner);
        assert!(!demo.demo.log().iter().any(|l| l.contains(SECRET)), "{:?}", demo.demo.log());
    }
}

/// A gateway that appends `Authorization` instead of replacing it must not let the client pick
/// whose namespace a request runs in: a repeated identity header is a 401, on protected routes
/// and on the record status endpoint.
async fn a_repeated_identity_header_is_refused(bin: &str) {
    let demo = start(bin, "memory", &dir("security", &format!("auth-{}", framework(bin))).join("l.jsonl"), 0);
    let base = format!("http://{}", demo.demo.addr);
    let client = client();
    let twice = |request: reqwest::RequestBuilder| {
        request.header("authorization", "Bearer acct_victim").header("authorization", "Bearer acct_attacker")
    };
    let body = json!({"amount": 100, "currency": "EUR", "customer": "cus_1"});
    let paid = twice(client.post(format!("{base}/payments")).header("Idempotency-Key", "k-1").json(&body));
    let paid = paid.send().await.unwrap();
    assert_eq!(paid.status(), 401);
    let status = twice(client.get(format!("{base}/_idempotency/records/payments.create/k-1"))).send().await.unwrap();
    assert_eq!(status.status(), 401);
    assert_eq!(common::executions(&[demo.ledger.as_path()], "payment", None), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_authorization_axum() {
    a_repeated_identity_header_is_refused(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_authorization_actix() {
    a_repeated_identity_header_is_refused(BINS[1]).await;
}

/// The status and health endpoints never put the backend's words in a problem (a caller could
/// provoke them at will), and a scope no route declares is answered 404 before the store is
/// asked: on PostgreSQL a NUL byte in it would otherwise be a server error, and an ERROR in the
/// database's log, each time.
async fn endpoints_answer_generic_problems(bin: &str) {
    let Some(schema) = TestSchema::new().await else { return };
    schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.unwrap();
    let sep = if schema.url.contains('?') { '&' } else { '?' };
    let spec = format!("{}{sep}options[search_path]={}", schema.url, schema.name);
    let name = format!("generic-{}", framework(bin));
    let demo = start(bin, &spec, &dir("security", &name).join("l.jsonl"), 0);
    let base = format!("http://{}", demo.demo.addr);
    let client = client();
    for path in ["a%00b", "payments.create%27--", "no.such.scope"] {
        let response =
            client.get(format!("{base}/_idempotency/records/{path}/k-1")).bearer_auth("acct_1").send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["type"], "urn:idempotent:problem:record-not-found");
    }
    // The served policy report shows policies, not the source tree.
    let report =
        client.get(format!("{base}/_idempotency/policies?format=md")).bearer_auth("acct_1").send().await.unwrap();
    let report = report.text().await.unwrap();
    assert!(report.contains("payments.create") && !report.contains(".rs:"), "{report}");

    // Schema dropped under the running demo: the store now fails every statement.
    drop(demo);
    let demo = start(bin, &spec, &dir("security", &name).join("l2.jsonl"), 0);
    let base = format!("http://{}", demo.demo.addr);
    schema.execute(&format!("DROP SCHEMA \"{}\" CASCADE", schema.name)).await.unwrap();
    let status = client.get(format!("{base}/_idempotency/records/payments.create/k-1")).bearer_auth("acct_1");
    let health = client.get(format!("{base}/healthz"));
    for request in [status, health] {
        let response = request.send().await.unwrap();
        let code = response.status();
        let body: Value = response.json().await.unwrap();
        if code == 200 {
            continue; // `/healthz` asks `SELECT 1`, which needs no table
        }
        assert_eq!(code, 503, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains("relation") && !detail.contains(&schema.name), "{detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_problems_axum() {
    endpoints_answer_generic_problems(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_problems_actix() {
    endpoints_answer_generic_problems(BINS[1]).await;
}

/// `records` on the store of a running demo: a quoted key is the key, purging a request still
/// running is refused (it would run twice) unless forced, and a mistyped store is an error, never
/// a new empty store.
async fn the_records_subcommand_keeps_the_promise(bin: &'static str) {
    let name = format!("records-{}", framework(bin));
    let path = dir("security", &name).join("idempotency.sqlite");
    let spec = format!("sqlite:{}", path.display());
    let demo = start(bin, &spec, &dir("security", &name).join("ledger.jsonl"), 4000);
    let base = format!("http://{}", demo.demo.addr);
    let records = |args: &[&str], spec: &str| {
        let out = Command::new(bin)
            .arg("records")
            .args(args)
            .env("IDEMPOTENCY_STORE", spec)
            .env("PAYMENTS_LEDGER", dir("security", &format!("{name}-cli")).join("l.jsonl"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let client = client();
    let transfer = client
        .post(format!("{base}/transfers"))
        .bearer_auth("acct_ops")
        .header("Idempotency-Key", "move-1")
        .json(&json!({"amount": 5, "from": "a", "to": "b"}));
    let running = tokio::spawn(transfer.send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let purge = ["purge", "--scope", "transfers.create", "--key", "move-1", "--actor", "acct_ops"];
    let (code, _, stderr) = records(&purge, &spec);
    assert_eq!(code, Some(3), "a running request is not purged: {stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(running.await.unwrap().unwrap().status(), 201);
    let retry = client
        .post(format!("{base}/transfers"))
        .bearer_auth("acct_ops")
        .header("Idempotency-Key", "move-1")
        .json(&json!({"amount": 5, "from": "a", "to": "b"}));
    assert_eq!(retry.send().await.unwrap().headers()["idempotent-replayed"], "true");
    assert_eq!(common::executions(&[demo.ledger.as_path()], "transfer", None), 1, "ran once");

    // A quoted or padded key names the same record as the header would.
    let inspect = ["inspect", "--scope", "transfers.create", "--key", "\"move-1\"", "--actor", "acct_ops"];
    let (code, stdout, stderr) = records(&inspect, &spec);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"key\":\"move-1\""), "{stdout}");

    // Forcing says what it does.
    let second = client
        .post(format!("{base}/transfers"))
        .bearer_auth("acct_ops")
        .header("Idempotency-Key", "move-2")
        .json(&json!({"amount": 6, "from": "a", "to": "b"}));
    let running = tokio::spawn(second.send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forced = ["purge", "--scope", "transfers.create", "--key", "move-2", "--actor", "acct_ops", "--force"];
    let (code, stdout, stderr) = records(&forced, &spec);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("purged") && stderr.contains("runs the operation again"), "{stdout} {stderr}");
    let _ = running.await;

    // Mistakes are exit 2, and a mistyped SQLite path creates nothing.
    let typo = dir("security", &format!("{name}-typo")).join("idempotncy.sqlite");
    let (code, _, stderr) = records(&inspect, &format!("sqlite:{}", typo.display()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!typo.exists(), "the tool created {}", typo.display());
    let (code, _, stderr) = records(&inspect, "memory");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("memory"), "{stderr}");
    for (args, needle) in [
        (&["inspect", "--scope", "s", "--key", "k", "--actor", ""][..], "--actor needs an account"),
        (&["inspect", "--scope", "s", "--key", "--actor", "acct_ops"], "--key needs a value"),
        (&["inspect", "--scope", "s", "--key", "k", "--force"], "unknown argument `--force`"),
        (&["purge", "--scope", "s", "--scope", "t", "--key", "k"], "--scope given twice"),
    ] {
        let (code, _, stderr) = records(args, &spec);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_axum() {
    the_records_subcommand_keeps_the_promise(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_actix() {
    the_records_subcommand_keeps_the_promise(BINS[1]).await;
}

/// `records inspect` runs no migration: on a database the application never used it is an error,
/// and the database is left without the store's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_never_writes() {
    let Some(schema) = TestSchema::new().await else { return };
    schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.unwrap();
    let sep = if schema.url.contains('?') { '&' } else { '?' };
    let spec = format!("{}{sep}options[search_path]={}", schema.url, schema.name);
    for bin in BINS {
        let out = Command::new(bin)
            .args(["records", "inspect", "--scope", "payments.create", "--key", "k"])
            .env("IDEMPOTENCY_STORE", &spec)
            .env("PAYMENTS_LEDGER", dir("security", "inspect").join("l.jsonl"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let tables = schema
        .query_scalar(&format!("SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}'", schema.name))
        .await
        .unwrap();
    assert_eq!(tables, 0, "no table was created");
}
