//! `payments-worker` as a real process on a real NATS server: settlements published twice,
//! redelivered, stalled (SIGSTOP) past the lease, killed (`kill -9`) and stopped (SIGTERM), each
//! counted in the ledger. The worker's stream and durable have fixed names, so these tests run
//! one at a time, each on a fresh stream.

mod common;

use async_nats::jetstream;
use common::dir;
use futures_util::StreamExt;
use idempotent_tests::nats_server::nats_url;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_payments-worker");

/// One test at a time: they share the stream `PAYMENTS`.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running worker and its log.
struct Worker {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    /// Starts the worker on `url` with `store`, `ledger`, a settle delay and an AckWait, and waits
    /// for its "consuming" line.
    fn start(url: &str, store: &str, ledger: &Path, delay_ms: u64, ack_wait_ms: u64) -> Self {
        let mut child = Command::new(BIN)
            .env("PAYMENTS_BROKER", url)
            .env("IDEMPOTENCY_STORE", store)
            .env("PAYMENTS_LEDGER", ledger)
            .env("PAYMENTS_SETTLE_DELAY_MS", delay_ms.to_string())
            .env("PAYMENTS_ACK_WAIT_MS", ack_wait_ms.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("consuming PAYMENTS/settler") {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("the worker did not start: {:?}", log.lock().unwrap());
        }
        Self { child, log }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code.
    fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("the worker did not exit: {:?}", self.log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh `PAYMENTS` stream (the worker creates it again), and a JetStream context.
async fn fresh() -> Option<(String, jetstream::Context)> {
    let url = nats_url().await?;
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let _ = js.delete_stream("PAYMENTS").await;
    Some((url, js))
}

async fn publish(js: &jetstream::Context, body: &str) {
    js.publish("payments.settle", body.to_owned().into()).await.unwrap().await.unwrap();
}

fn settle(payment: &str, amount: i64) -> String {
    format!(r#"{{"payment":"{payment}","amount":{amount}}}"#)
}

/// Settlement lines per payment in `ledger`.
fn settlements(ledger: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(ledger).unwrap_or_default().lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["kind"], "settlement");
        *counts.entry(entry["payment"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    counts
}

/// Waits until the durable `settler` has nothing left to deliver or acknowledge.
async fn drained(js: &jetstream::Context, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let stream = js.get_stream("PAYMENTS").await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer("settler").await.unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn store(d: &Path) -> String {
    format!("sqlite:{}", d.join("store.sqlite").display())
}

/// Published twice: one ledger line. The same payment with another amount, a body that is not a
/// settlement and a non-positive amount: dead-lettered on `payments.dead` with their reasons, no
/// ledger line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_settle_once_and_bad_messages_are_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let Some((url, js)) = fresh().await else { return };
    let d = dir("worker", "dedupe");
    let ledger = d.join("ledger.jsonl");
    let worker = Worker::start(&url, &store(&d), &ledger, 50, 30_000);
    let client = async_nats::connect(&url).await.unwrap();
    let mut dead = client.subscribe("payments.dead").await.unwrap();
    for body in [settle("pay-1", 100), settle("pay-1", 100), settle("pay-2", 5)] {
        publish(&js, &body).await;
    }
    assert!(drained(&js, Duration::from_secs(20)).await);
    for body in [settle("pay-1", 999), "not json".to_owned(), settle("pay-3", 0)] {
        publish(&js, &body).await;
    }
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let letter = tokio::time::timeout(Duration::from_secs(10), dead.next()).await.unwrap().unwrap();
        reasons.push(letter.headers.unwrap().get("Idempotent-Reason").unwrap().to_string());
    }
    // The three run concurrently: their dead letters arrive in any order.
    reasons.sort();
    assert!(reasons[0] == "amount must be greater than 0, got 0", "{reasons:?}");
    assert!(reasons[1].starts_with("the key was already used by another message"), "{reasons:?}");
    assert!(reasons[2].starts_with("the message body is not a valid"), "{reasons:?}");
    assert!(drained(&js, Duration::from_secs(10)).await);
    drop(worker);
    let expected: std::collections::BTreeMap<String, usize> = [("pay-1".into(), 1), ("pay-2".into(), 1)].into();
    assert_eq!(settlements(&ledger), expected);
}

/// SIGTERM with settlements in flight: the worker stops fetching, finishes and acknowledges
/// them, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_acknowledges_what_is_in_flight() {
    let _serial = SERIAL.lock().await;
    let Some((url, js)) = fresh().await else { return };
    let d = dir("worker", "sigterm");
    let ledger = d.join("ledger.jsonl");
    let mut worker = Worker::start(&url, &store(&d), &ledger, 1_500, 30_000);
    for p in ["t-1", "t-2", "t-3"] {
        publish(&js, &settle(p, 7)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    worker.signal("TERM");
    assert_eq!(worker.wait(Duration::from_secs(20)), Some(0));
    assert_eq!(settlements(&ledger).len(), 3, "every settlement in flight finished");
    assert!(drained(&js, Duration::from_secs(1)).await, "and was acknowledged before the worker exited");
}

/// Two workers of one durable; the one settling a payment is stopped (SIGSTOP) past its lease.
/// The other takes the payment over and settles it; the stopped one, resumed, finds its claim
/// gone and neither settles nor acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_neither_settles_nor_acknowledges() {
    let _serial = SERIAL.lock().await;
    let Some((url, js)) = fresh().await else { return };
    // A store both processes reach without a file lock a stopped process could hold: Redis.
    let Some(redis) = idempotent_tests::redis_server::redis_url().await else { return };
    let d = dir("worker", "sigstop");
    let (ledger_a, ledger_b) = (d.join("a.jsonl"), d.join("b.jsonl"));
    let payment = format!("s-{}", std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_nanos());
    let a = Worker::start(&url, &redis, &ledger_a, 3_000, 2_000);
    publish(&js, &settle(&payment, 42)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("STOP");
    let b = Worker::start(&url, &redis, &ledger_b, 3_000, 2_000);
    // AckWait (2 s) lapses without progress acks, the redelivery waits out A's 6 s lease, then
    // B settles it in 3 s.
    let deadline = Instant::now() + Duration::from_secs(40);
    while settlements(&ledger_b).is_empty() {
        assert!(Instant::now() < deadline, "B never settled: {:?}", b.log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.signal("CONT");
    // A's handler wakes from its processing time, past its lease: the fence refuses.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(drained(&js, Duration::from_secs(10)).await);
    assert_eq!(settlements(&ledger_a).len(), 0, "the stalled worker did not settle: {:?}", a.log.lock().unwrap());
    assert_eq!(settlements(&ledger_b).get(&payment), Some(&1));
    let log = a.log.lock().unwrap().join("\n");
    assert!(!log.contains("message acknowledged"), "{log}");
}

/// `kill -9` of the worker at random instants with settlements in flight, restarts, then a drain:
/// no settlement is lost, and a payment is settled twice only where a kill fell between its
/// ledger line and the storing of its outcome (the window a ledger outside the store's database
/// has): at most one per settlement in flight at a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_loses_no_settlement() {
    let _serial = SERIAL.lock().await;
    let Some((url, js)) = fresh().await else { return };
    let d = dir("worker", "kill9");
    let ledger = d.join("ledger.jsonl");
    let payments: Vec<String> = (0..40).map(|i| format!("k-{i}")).collect();
    let mut worker = Worker::start(&url, &store(&d), &ledger, 200, 2_000);
    for p in &payments {
        publish(&js, &settle(p, 1)).await;
    }
    let mut seed = std::process::id() as u64;
    let kills = 3;
    for _ in 0..kills {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(100 + (seed >> 33) % 400)).await;
        worker.signal("KILL");
        worker.wait(Duration::from_secs(5));
        worker = Worker::start(&url, &store(&d), &ledger, 200, 2_000);
    }
    assert!(drained(&js, Duration::from_secs(60)).await, "{:?}", worker.log.lock().unwrap());
    drop(worker);
    let counts = settlements(&ledger);
    let missing: Vec<&String> = payments.iter().filter(|p| !counts.contains_key(*p)).collect();
    assert!(missing.is_empty(), "lost settlements: {missing:?}");
    let twice: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "kill -9 ×{kills}: {} payments, {} ledger lines, {twice} settled twice",
        payments.len(),
        counts.values().sum::<usize>()
    );
    assert!(twice <= kills * 16, "at most the settlements in flight at each kill: {counts:?}");
}
