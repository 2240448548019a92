//! The demo binaries as a user runs them: configuration errors, the policies subcommand, serving.
//! Every test runs against each binary (`payments-axum`, `payments-actix`): they implement the
//! same contract.

use idempotent_tests::process::DemoProcess;
use std::process::Command;

/// One demo binary: its path, and a tag that keeps its temporary files apart.
#[derive(Clone, Copy)]
struct Bin {
    path: &'static str,
    tag: &'static str,
}

fn bin(b: Bin) -> Command {
    let mut c = Command::new(b.path);
    c.env_remove("IDEMPOTENCY_STORE").env_remove("PAYMENTS_ADDR").env_remove("PAYMENTS_LEDGER");
    c
}

fn temp(b: Bin, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("payments-cli-{}-{}-{name}", std::process::id(), b.tag));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn policies_subcommand_prints_each_format(b: Bin) {
    let md = bin(b).args(["policies"]).output().unwrap();
    assert!(md.status.success());
    let text = String::from_utf8(md.stdout).unwrap();
    // The actix-web routing attributes name the route; an axum route is known once served.
    let (payments, refunds) = match b.tag {
        "payments-actix" => ("POST /payments", "POST /payments/{id}/refunds"),
        _ => ("—", "—"),
    };
    let row = |scope: &str, route: &str, body: &str| {
        format!("| `{scope}` | {route} | path: all; query: all; body: {body} | 1d |")
    };
    assert!(text.contains(&row("payments.create", payments, "amount, currency, customer")), "{text}");
    assert!(text.contains(&row("refunds.create", refunds, "amount")), "{text}");
    let json = bin(b).args(["policies", "--format", "json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let mut scopes: Vec<&str> = v["routes"].as_array().unwrap().iter().map(|r| r["scope"].as_str().unwrap()).collect();
    scopes.sort_unstable();
    assert_eq!(
        scopes,
        [
            "checkout.create",
            "deposits.create",
            "notifications.send",
            "payments.create",
            "quotes.create",
            "refunds.create",
            "transfers.create",
            "webhooks.provider"
        ]
    );
    let checkout = v["routes"].as_array().unwrap().iter().find(|r| r["scope"] == "checkout.create").unwrap();
    assert_eq!((&checkout["key_source"], &checkout["token_ttl_seconds"]), (&"issued".into(), &900.0.into()));
    let html = bin(b).args(["policies", "--format", "html"]).output().unwrap();
    assert!(String::from_utf8(html.stdout).unwrap().starts_with("<!DOCTYPE html>"));
    let bad = bin(b).args(["policies", "--format", "pdf"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8(bad.stderr).unwrap().contains("unknown report format `pdf`"));
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "must exit non-zero");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(err.contains(needle), "{err}");
}

fn bad_configuration_exits_with_one_clear_line(b: Bin) {
    let dir = temp(b, "bad");
    fails_with(
        bin(b).env("IDEMPOTENCY_STORE", "mongodb://x").env("PAYMENTS_LEDGER", dir.join("l.jsonl")),
        "unknown store",
    );
    fails_with(bin(b).env("PAYMENTS_LEDGER", "/proc/no/such/dir/ledger.jsonl"), "cannot open ledger");
    fails_with(bin(b).env("PAYMENTS_ADDR", "not-an-addr"), "PAYMENTS_ADDR");
    let ledger = dir.join("l.jsonl");
    fails_with(
        bin(b).env("IDEMPOTENCY_STORE", "postgres://postgres@127.0.0.1:1/test").env("PAYMENTS_LEDGER", &ledger),
        "unavailable",
    );
    fails_with(bin(b).env("IDEMPOTENCY_STORE", "redis://127.0.0.1:1/").env("PAYMENTS_LEDGER", &ledger), "unavailable");
    fails_with(bin(b).arg("serve-please"), "unknown command");
}

fn serves_and_replays_over_http(b: Bin) {
    let dir = temp(b, "serve");
    let ledger = dir.join("ledger.jsonl");
    let _ = std::fs::remove_file(&ledger);
    let mut cmd = bin(b);
    cmd.env("PAYMENTS_LEDGER", &ledger).env("IDEMPOTENCY_STORE", "memory");
    let mut demo = DemoProcess::start(cmd);
    let addr = demo.addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let body = serde_json::json!({"amount": 10, "currency": "USD", "customer": "c"});
        let send = || {
            client
                .post(format!("http://{addr}/payments"))
                .bearer_auth("acct")
                .header("Idempotency-Key", "cli-1")
                .json(&body)
                .send()
        };
        let a = send().await.unwrap();
        assert_eq!(a.status(), 201);
        let b = send().await.unwrap();
        assert_eq!(b.headers()["idempotent-replayed"], "true");
    });
    demo.kill();
    let text = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(text.lines().count(), 1, "one execution recorded durably");
}

fn default_store_is_sqlite_and_survives_a_restart(b: Bin) {
    let dir = temp(b, "restart");
    let ledger = dir.join("ledger.jsonl");
    let _ = std::fs::remove_file(&ledger);
    let _ = std::fs::remove_file(dir.join("payments-idempotency.sqlite"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bodies = Vec::new();
    for round in 0..2 {
        let mut cmd = bin(b);
        cmd.env("PAYMENTS_LEDGER", &ledger);
        let mut demo = DemoProcess::start(cmd);
        let (addr, line) = (demo.addr.clone(), demo.banner.clone());
        assert!(line.contains("store: sqlite:"), "{line}");
        assert!(line.starts_with(&format!("{} listening on http://", b.tag)), "{line}");
        let body = rt.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("http://{addr}/payments"))
                .bearer_auth("acct")
                .header("Idempotency-Key", "restart-1")
                .json(&serde_json::json!({"amount": 10, "currency": "USD", "customer": "c"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            let replayed = r.headers().get("idempotent-replayed").is_some();
            assert_eq!(replayed, round == 1, "round {round}");
            r.bytes().await.unwrap()
        });
        bodies.push(body);
        demo.kill();
    }
    assert_eq!(bodies[0], bodies[1], "the restarted server replays the same payment");
    assert_eq!(std::fs::read_to_string(&ledger).unwrap().lines().count(), 1);
}

/// One test per behaviour and binary: `axum::serves_and_replays_over_http`, `actix::...`.
macro_rules! cli_tests {
    ($($module:ident => $bin:literal),* $(,)?) => {$(
        mod $module {
            const BIN: super::Bin = super::Bin { path: env!(concat!("CARGO_BIN_EXE_", $bin)), tag: $bin };

            #[test]
            fn policies_subcommand_prints_each_format() {
                super::policies_subcommand_prints_each_format(BIN);
            }

            #[test]
            fn bad_configuration_exits_with_one_clear_line() {
                super::bad_configuration_exits_with_one_clear_line(BIN);
            }

            #[test]
            fn serves_and_replays_over_http() {
                super::serves_and_replays_over_http(BIN);
            }

            #[test]
            fn default_store_is_sqlite_and_survives_a_restart() {
                super::default_store_is_sqlite_and_survives_a_restart(BIN);
            }
        }
    )*};
}

cli_tests!(axum => "payments-axum", actix => "payments-actix");
