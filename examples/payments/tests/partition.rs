//! An instance cut off from its store for longer than a lease, while a healthy instance serves the
//! client's retry: the stale instance's handler must not record the operation once its lease can
//! no longer be vouched for. Both binaries, two processes on one PostgreSQL, the stale one behind
//! a proxy that goes silent.

mod common;

use common::{dir, framework, BINS};
use idempotent_tests::fault_proxy::FaultProxy;
use idempotent_tests::postgres::TestSchema;
use idempotent_tests::process::DemoProcess;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

async fn a_stale_instance_does_not_record(bin: &str) {
    let Some(schema) = TestSchema::new().await else { return };
    schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.unwrap();
    let sep = if schema.url.contains('?') { '&' } else { '?' };
    let direct = format!("{}{sep}options[search_path]={}", schema.url, schema.name);
    let rest = direct.split_once("://").unwrap().1;
    let authority = &rest[..rest.find(['/', '?']).unwrap()];
    let host = authority.rsplit('@').next().unwrap();
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:5432") };
    let upstream = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let prefix = &authority[..authority.rfind('@').map_or(0, |at| at + 1)];
    let through_proxy = direct.replacen(authority, &format!("{prefix}{}", proxy.addr()), 1);

    let base = dir("partition", framework(bin));
    let start = |store: &str, ledger: &str, delay_ms: u64| {
        let mut cmd = Command::new(bin);
        cmd.env("PAYMENTS_LEDGER", base.join(ledger))
            .env("IDEMPOTENCY_STORE", store)
            .env("PAYMENTS_TRANSFER_DELAY_MS", delay_ms.to_string());
        DemoProcess::start(cmd)
    };
    // The stale instance takes 6 s per transfer; its lease is 3 s, renewed every half second.
    let stale = start(&through_proxy, "stale.jsonl", 6000);
    let healthy = start(&direct, "healthy.jsonl", 0);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let transfer = |addr: &str| {
        client
            .post(format!("http://{addr}/transfers"))
            .bearer_auth("acct_part")
            .header("Idempotency-Key", "move-partitioned")
            .json(&json!({"amount": 40, "from": "a", "to": "b"}))
            .send()
    };
    let first = tokio::spawn(transfer(&stale.addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.stall(); // the stale instance's store goes silent: no renewal gets through
    tokio::time::sleep(Duration::from_secs(4)).await; // past its lease
    let retry = transfer(&healthy.addr).await.unwrap();
    assert_eq!(retry.status(), 201, "the healthy instance took the key over");
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 503, "the stale instance did not record it");
    proxy.heal();
    let ledgers = [base.join("stale.jsonl"), base.join("healthy.jsonl")];
    let ledgers: Vec<&std::path::Path> = ledgers.iter().map(|p| p.as_path()).collect();
    assert_eq!(common::executions(&ledgers, "transfer", Some("acct_part")), 1, "one transfer, once");
    let replay = transfer(&healthy.addr).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_instance_axum() {
    a_stale_instance_does_not_record(BINS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_instance_actix() {
    a_stale_instance_does_not_record(BINS[1]).await;
}
