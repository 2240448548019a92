//! SIGTERM drains: a binary asked to stop lets the requests in flight finish and store their
//! outcomes (a client that already went away included), then exits 0.

use idempotent_tests::process::DemoProcess;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BINS: [&str; 2] = [env!("CARGO_BIN_EXE_payments-axum"), env!("CARGO_BIN_EXE_payments-actix")];

fn start(bin: &str, dir: &Path) -> DemoProcess {
    let mut cmd = Command::new(bin);
    cmd.env("PAYMENTS_LEDGER", dir.join("ledger.jsonl"))
        .env("IDEMPOTENCY_STORE", format!("sqlite:{}", dir.join("store.db").display()))
        .env("PAYMENTS_TRANSFER_DELAY_MS", "1500");
    DemoProcess::start(cmd)
}

fn transfers(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"transfer\""))
        .count()
}

fn transfer(client: &reqwest::Client, addr: &str, key: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("http://{addr}/transfers"))
        .bearer_auth("acct_drain")
        .header("Idempotency-Key", key)
        .json(&json!({"amount": 5, "from": "a", "to": "b"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_transfers_finish_and_store_their_outcomes() {
    for bin in BINS {
        let name = if bin.ends_with("actix") { "actix" } else { "axum" };
        let dir = std::env::temp_dir().join(format!("payments-shutdown-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut demo = start(bin, &dir);
        let client = reqwest::Client::new();
        // One client gives up at once (its transfer is held by no connection any more), the other
        // waits for its answer.
        let gone = transfer(&client, &demo.addr, "drain-gone").timeout(Duration::from_millis(300)).send().await;
        assert!(gone.is_err(), "{name}: the impatient client gave up");
        let waiting = tokio::spawn(transfer(&client, &demo.addr, "drain-waiting").send());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = tokio::task::spawn_blocking(move || {
            let status = demo.terminate(Duration::from_secs(15));
            (demo, status)
        });
        let (demo, status) = status.await.unwrap();
        assert!(status.is_some_and(|s| s.success()), "{name}: exits 0 after draining, got {status:?}");
        let answered = waiting.await.unwrap().expect("the waiting client got its answer");
        assert_eq!(answered.status(), 201, "{name}");
        assert_eq!(transfers(&dir), 2, "{name}: both in-flight transfers ran to the end");
        drop(demo);

        // The transfer whose client went away was stored: its retry, on a new process, replays.
        let demo = start(bin, &dir);
        let retry = transfer(&client, &demo.addr, "drain-gone").send().await.unwrap();
        assert_eq!(retry.status(), 201, "{name}");
        assert_eq!(retry.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"), "{name}");
        assert_eq!(transfers(&dir), 2, "{name}: nothing ran twice");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
