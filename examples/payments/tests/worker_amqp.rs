//! `payments-worker` on RabbitMQ as a real process (DEMO.md, "The settlement worker"): each
//! payment settled once however often it is published or delivered, a worker killed mid-settlement
//! settled once by the next, mismatches and bodies that are not settlements dead-lettered to
//! `payments.dead` with their reason and no ledger line, SIGTERM finishing what is in flight and
//! exiting 0. The queue names are the demo's own, so the tests here take turns.

use idempotent_rabbitmq::lapin::types::AMQPValue;
use idempotent_rabbitmq::lapin::BasicProperties;
use idempotent_tests::rabbitmq::{amqp_url, Client};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_payments-worker");
const QUEUE: &str = "payments.settle";
const DEAD: &str = "payments.dead";

/// The demo's queues are shared: one test at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running `payments-worker`, killed when dropped.
struct WorkerProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    /// Starts it on `url` with its store and ledger in `dir`, and waits for its banner.
    fn start(url: &str, dir: &Path, delay_ms: u64) -> Self {
        let mut child = Command::new(BIN)
            .env("PAYMENTS_BROKER", url)
            .env("IDEMPOTENCY_STORE", format!("sqlite:{}", dir.join("store.sqlite").display()))
            .env("PAYMENTS_LEDGER", dir.join("ledger.jsonl"))
            .env("PAYMENTS_SETTLE_DELAY_MS", delay_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn payments-worker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("payments-worker consuming payments.settle") {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut worker = Self { child, log };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            worker.kill();
            panic!("payments-worker did not start: {:?}", worker.log.lock().unwrap());
        }
        worker
    }

    /// SIGTERM, and its exit status within 20 s.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        panic!("payments-worker did not exit after SIGTERM: {:?}", self.log.lock().unwrap());
    }

    /// SIGKILL: no clean-up of any kind.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settlement lines of the ledger per payment.
fn ledger(dir: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("ledger.jsonl")).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).expect("a ledger line is JSON");
        assert_eq!(line["kind"], "settlement");
        assert!(line["amount"].as_i64().is_some_and(|a| a > 0), "{line}");
        *counts.entry(line["payment"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_ready_is_zero(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.ready(QUEUE).await > 0 {
        assert!(Instant::now() < deadline, "{QUEUE} was not consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("payments-worker-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A client, with the demo's queues emptied of what earlier runs left.
async fn client(url: &str) -> Client {
    let client = Client::connect(url).await;
    client.purge(QUEUE).await;
    client.purge(DEAD).await;
    client
}

fn reason(props: &BasicProperties) -> String {
    match props.headers().as_ref().and_then(|h| h.inner().get("Idempotent-Reason")) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("a dead letter without its reason: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_payment_is_settled_once_and_what_cannot_be_is_dead_lettered() {
    let Some(url) = amqp_url().await else { return };
    let _turn = TURN.lock().await;
    let dir = temp_dir("once");
    let client = client(&url).await;
    let mut worker = WorkerProcess::start(&url, &dir, 200);
    client.await_queue(QUEUE).await;
    for _ in 0..2 {
        client.publish_json(QUEUE, &json!({"payment": "pay-1", "amount": 500})).await;
    }
    client.publish_json(QUEUE, &json!({"payment": "pay-2", "amount": 700})).await;
    until("pay-1 settled", Duration::from_secs(20), || ledger(&dir).get("pay-1") == Some(&1)).await;
    client.publish_json(QUEUE, &json!({"payment": "pay-1", "amount": 501})).await;
    client.publish(QUEUE, b"not a settlement", BasicProperties::default()).await;
    client.publish_json(QUEUE, &json!({"payment": "pay-3", "amount": 0})).await;
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let letter = client.get(DEAD, Duration::from_secs(20)).await.expect("a dead letter");
        reasons.push((String::from_utf8_lossy(&letter.data).into_owned(), reason(&letter.properties)));
    }
    let why = |body: &str| reasons.iter().find(|(b, _)| b.contains(body)).map(|(_, r)| r.as_str()).unwrap_or_default();
    assert!(why("\"amount\":0").contains("amount must be an integer greater than 0"), "{reasons:?}");
    assert!(why("\"amount\":501").contains("the key was already used by another message"), "{reasons:?}");
    assert!(why("not a settlement").contains("the message body is not a valid"), "{reasons:?}");
    until("pay-2 settled", Duration::from_secs(20), || ledger(&dir).get("pay-2") == Some(&1)).await;
    assert!(worker.terminate().success(), "SIGTERM exits 0");
    // A duplicate that was waiting for the first delivery's outcome went back to the queue; the
    // next worker answers it from the store.
    let mut worker = WorkerProcess::start(&url, &dir, 200);
    until_ready_is_zero(&client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(worker.terminate().success(), "SIGTERM exits 0");
    assert_eq!(ledger(&dir), HashMap::from([("pay-1".to_owned(), 1), ("pay-2".to_owned(), 1)]));
    assert_eq!(client.ready(QUEUE).await, 0, "every delivery acknowledged");
    assert_eq!(client.ready(DEAD).await, 0, "three dead letters, no more");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_settlement_is_settled_once_and_sigterm_finishes_what_is_in_flight() {
    let Some(url) = amqp_url().await else { return };
    let _turn = TURN.lock().await;
    let dir = temp_dir("crash");
    let client = client(&url).await;
    let mut first = WorkerProcess::start(&url, &dir, 3000);
    client.await_queue(QUEUE).await;
    client.publish_json(QUEUE, &json!({"payment": "crash-1", "amount": 100})).await;
    // Claimed and in its processing time: then killed, before its ledger line.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    first.kill();
    assert_eq!(ledger(&dir).get("crash-1"), None);
    // The next worker gets the redelivery at once, waits out the dead worker's lease, settles it.
    let mut second = WorkerProcess::start(&url, &dir, 3000);
    until("crash-1 settled by the next worker", Duration::from_secs(40), || ledger(&dir).get("crash-1") == Some(&1))
        .await;
    client.publish_json(QUEUE, &json!({"payment": "crash-1", "amount": 100})).await;
    client.publish_json(QUEUE, &json!({"payment": "flight-1", "amount": 50})).await;
    // In flight (3 s of processing) when SIGTERM comes: finished, written, acknowledged, exit 0.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(second.terminate().success(), "SIGTERM exits 0: {:?}", second.log.lock().unwrap());
    assert_eq!(ledger(&dir), HashMap::from([("crash-1".to_owned(), 1), ("flight-1".to_owned(), 1)]));
    assert_eq!(client.ready(QUEUE).await, 0, "nothing left unacknowledged");
    assert_eq!(client.ready(DEAD).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
