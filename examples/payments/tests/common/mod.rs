//! What the multi-process tests share: the demo binaries, starting one on a store with a ledger of
//! its own, and counting executions in ledgers.

#![allow(dead_code)] // each test binary uses its own part of it

use idempotent_tests::process::DemoProcess;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Both demo binaries: a scenario must hold whichever framework serves it.
pub const BINS: [&str; 2] = [env!("CARGO_BIN_EXE_payments-axum"), env!("CARGO_BIN_EXE_payments-actix")];

/// `axum` or `actix`, for one of [`BINS`].
pub fn framework(bin: &str) -> &'static str {
    if bin.ends_with("actix") {
        "actix"
    } else {
        "axum"
    }
}

/// A demo process and the ledger it appends to.
pub struct Instance {
    pub demo: DemoProcess,
    pub ledger: PathBuf,
}

/// Starts `bin` on `store` with its own `ledger` and a transfer processing time of `delay_ms`.
pub fn start(bin: &str, store: &str, ledger: &Path, delay_ms: u64) -> Instance {
    let mut cmd = Command::new(bin);
    cmd.env("PAYMENTS_LEDGER", ledger)
        .env("IDEMPOTENCY_STORE", store)
        .env("PAYMENTS_TRANSFER_DELAY_MS", delay_ms.to_string());
    Instance { demo: DemoProcess::start(cmd), ledger: ledger.to_owned() }
}

/// Ledger entries of `kind` over all `ledgers`, only `account`'s when given: executions, since
/// the demo appends (and flushes) an entry before it answers, and never for work it did not do.
pub fn executions(ledgers: &[&Path], kind: &str, account: Option<&str>) -> usize {
    ledgers
        .iter()
        .flat_map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .collect::<Vec<_>>()
        })
        .filter(|e| e["kind"] == kind && account.is_none_or(|a| e["account"] == a))
        .count()
}

/// Entries of `kind` in the ledgers of `instances`.
pub fn ledger_count(instances: &[&Instance], kind: &str) -> usize {
    let ledgers: Vec<&Path> = instances.iter().map(|i| i.ledger.as_path()).collect();
    executions(&ledgers, kind, None)
}

/// The lease `bin` declares for the route of `scope`, from its policy report (`policies --format
/// json`).
pub fn route_lease(bin: &str, scope: &str) -> std::time::Duration {
    let out = Command::new(bin).args(["policies", "--format", "json"]).output().expect("run policies");
    assert!(out.status.success(), "{bin} policies: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the policy report is JSON");
    let route = report["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["scope"] == scope))
        .unwrap_or_else(|| panic!("{bin}: no {scope} route in the policy report"));
    std::time::Duration::from_secs_f64(route["lease_seconds"].as_f64().expect("lease_seconds"))
}

/// A fresh temporary directory for one test's files, named after the test binary and `name`.
pub fn dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("payments-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One payment through `demo` (account `{account}_warm`, key `{key}-warm`), so its store
/// connections are open and its statements (or scripts) known to the store before a fault: a
/// fault then hits the operation a scenario aims at, not a connection set-up or a statement
/// preparation.
pub async fn warm_up(client: &reqwest::Client, demo: &Instance, account: &str, key: &str) -> Result<(), String> {
    let r = client
        .post(format!("http://{}/payments", demo.demo.addr))
        .bearer_auth(format!("{account}_warm"))
        .header("Idempotency-Key", format!("{key}-warm"))
        .json(&serde_json::json!({"amount": 1, "currency": "EUR", "customer": "warm"}))
        .send()
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    if r.status() != 201 {
        return Err(format!("warm-up: {}", r.status()));
    }
    Ok(())
}
