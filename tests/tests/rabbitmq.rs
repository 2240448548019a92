//! RabbitMQ consumers against the real broker (127.0.0.1:5672, see `idempotent_tests::rabbitmq`):
//! duplicates and redeliveries run a handler once, a lost connection's redelivery is answered
//! from the store, a quorum queue's delivery limit stops a handler that always fails, a mismatch
//! is dead-lettered after one delivery with its reason, a duplicate request gets the identical
//! reply, and start-up refuses settings that cannot keep the promise. Exact execution counts.

use idempotent_rabbitmq::core::store::MemoryStore;
use idempotent_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use idempotent_rabbitmq::lapin::BasicProperties;
use idempotent_rabbitmq::{idempotent, CancellationToken, ConsumeError, Error, Json, Settings, Worker};
use idempotent_tests::rabbitmq::{amqp_url, close_connections, unique, Client};
use idempotent_tests::trace_capture;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(serde::Deserialize)]
struct Settle {
    payment: String,
    amount: u64,
}

/// Executions per payment of each handler, by test.
type Ledger = Arc<Mutex<HashMap<String, usize>>>;

fn record(ledger: &Ledger, payment: &str) -> usize {
    let mut ledger = ledger.lock().unwrap();
    let n = ledger.entry(payment.to_owned()).or_default();
    *n += 1;
    *n
}

fn count(ledger: &Ledger, payment: &str) -> usize {
    ledger.lock().unwrap().get(payment).copied().unwrap_or_default()
}

#[idempotent(scope = "rmq.settle", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "6s")]
async fn settle(
    idempotent_rabbitmq::State(ledger): idempotent_rabbitmq::State<Ledger>,
    msg: Json<Settle>,
) -> Result<String, ConsumeError> {
    record(&ledger, &msg.0.payment);
    Ok(format!("{} settled {}", msg.0.payment, msg.0.amount))
}

/// Runs `worker` with `handler` in the background; the token stops it.
fn spawn(
    worker: Worker,
    handler: idempotent_rabbitmq::core::protocol::consume::Handler,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), Error>>) {
    let stop = CancellationToken::new();
    (stop.clone(), tokio::spawn(worker.run(handler, stop)))
}

/// The settings of a fresh quorum queue: declared, limit 5, dead letters to `<queue>.dead`.
fn settings(queue: &str) -> Settings {
    Settings {
        declare: true,
        dead_letter: Some(format!("{queue}.dead")),
        delivery_limit: Some(5),
        ..Settings::default()
    }
}

/// A worker of a fresh quorum queue with `settings`, on the memory store.
fn worker_with(url: &str, queue: &str, settings: Settings) -> Worker {
    let runtime = idempotent_rabbitmq::start(Arc::new(MemoryStore::new())).expect("runtime");
    Worker::new(runtime, url, queue, settings)
}

/// A worker of a fresh quorum queue (see [`settings`]).
fn worker(url: &str, queue: &str) -> Worker {
    worker_with(url, queue, settings(queue))
}

/// Waits until `done` holds, up to 20 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many deliveries of `scope` the protocol has decided to acknowledge (core's "message
/// acknowledged" events, kept by [`trace_capture`], which a test installs first). A worker acknowledges
/// each after deciding, and stopping it waits for that; a delivery it holds to be redelivered
/// later (a duplicate that arrived while its key was in progress) is not counted until the store
/// answers its redelivery. The broker's own count of unacknowledged messages lags by seconds.
fn acknowledged(scope: &str) -> usize {
    let captured = trace_capture::install();
    let captured = captured.lock().unwrap();
    let is = |e: &trace_capture::EventRecord, name: &str, value: &str| e.fields.get(name).is_some_and(|v| v == value);
    captured.events.iter().filter(|e| is(e, "message", "message acknowledged") && is(e, "scope", scope)).count()
}

/// Waits until the queue has no message ready. Messages in flight are not ready either, so
/// callers check their counts after stopping the worker, which settles them first.
async fn drained(client: &Client, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.ready(queue).await > 0 {
        assert!(Instant::now() < deadline, "queue {queue} not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`settle`], taking 300 ms: duplicates published with the first arrive while it runs.
#[idempotent(scope = "rmq.slow", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "6s")]
async fn settle_slowly(
    idempotent_rabbitmq::State(ledger): idempotent_rabbitmq::State<Ledger>,
    msg: Json<Settle>,
) -> Result<String, ConsumeError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    record(&ledger, &msg.0.payment);
    Ok(format!("{} settled {}", msg.0.payment, msg.0.amount))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_published_twice_runs_once_and_its_duplicate_is_acknowledged() {
    let Some(url) = amqp_url().await else { return };
    trace_capture::install();
    let queue = unique("rmq.dup.");
    let ledger = Ledger::default();
    let (stop, run) = spawn(worker(&url, &queue).state(ledger.clone()), settle_slowly);
    let client = Client::connect(&url).await;
    client.await_queue(&queue).await;
    for _ in 0..3 {
        client.publish_json(&queue, &json!({"payment": "p-1", "amount": 5})).await;
    }
    client.publish_json(&queue, &json!({"payment": "p-2", "amount": 7})).await;
    // The duplicates arrive while the first runs: the worker holds them for the store's retry
    // delay and returns them, and the store answers their redelivery. Every one of the four
    // messages is acknowledged once; stopping the worker earlier would return a held duplicate
    // to the queue (for another worker), which is not what this test looks at.
    until("every message acknowledged", || acknowledged("rmq.slow") == 4).await;
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    assert_eq!((count(&ledger, "p-1"), count(&ledger, "p-2")), (1, 1));
    assert_eq!(client.ready(&queue).await, 0, "every delivery was acknowledged");
    assert_eq!(client.ready(&format!("{queue}.dead")).await, 0, "nothing dead-lettered");
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}

static CUT: Notify = Notify::const_new();
static CUT_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Settles, then (first run only) waits until the test has cut the worker's connection: its
/// outcome is stored after the cut, and its acknowledgement cannot be sent.
#[idempotent(scope = "rmq.cut", key = header("message-id"), ttl = "7d", lease = "6s")]
async fn cut(body: bytes::Bytes) -> Result<String, ConsumeError> {
    if CUT_RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
        CUT.notified().await;
    }
    Ok(format!("done {}", body.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_lost_before_the_ack_redelivers_a_message_answered_from_the_store() {
    let Some(url) = amqp_url().await else { return };
    trace_capture::install();
    let queue = unique("rmq.cut.");
    let (stop, run) = spawn(worker(&url, &queue), cut);
    let client = Client::connect(&url).await;
    client.await_queue(&queue).await;
    let props = BasicProperties::default().with_message_id("order-1".into());
    client.publish(&queue, b"payload", props).await;
    until("the handler runs", || CUT_RUNS.load(Ordering::SeqCst) == 1).await;
    let closed = tokio::task::spawn_blocking({
        let name = format!("idempotent-rabbitmq {queue}");
        move || close_connections(&name)
    });
    assert_eq!(closed.await.unwrap(), 1, "the worker's connection was found and closed");
    CUT.notify_one();
    // The message comes back on the worker's new connection, and the store answers it: the
    // second acknowledgement decided (the first could not be sent). Stopping settles what is in
    // flight; a delivery left unacknowledged would be ready again after.
    until("the redelivery acknowledged", || acknowledged("rmq.cut") == 2).await;
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    assert_eq!(CUT_RUNS.load(Ordering::SeqCst), 1, "the redelivery did not run the handler");
    assert_eq!(client.ready(&queue).await, 0, "the redelivery was acknowledged");
    assert_eq!(client.ready(&format!("{queue}.dead")).await, 0);
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}

static FAILING: AtomicUsize = AtomicUsize::new(0);

#[idempotent(scope = "rmq.failing", key = header("message-id"), ttl = "7d", lease = "6s")]
async fn always_fails(_body: bytes::Bytes) -> Result<(), ConsumeError> {
    FAILING.fetch_add(1, Ordering::SeqCst);
    Err(ConsumeError::retry(Duration::from_millis(20)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quorum_queues_delivery_limit_stops_a_handler_that_always_fails() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.limit.");
    let dead = format!("{queue}.dead");
    let (stop, run) =
        spawn(worker_with(&url, &queue, Settings { delivery_limit: Some(3), ..settings(&queue) }), always_fails);
    let client = Client::connect(&url).await;
    client.await_queue(&queue).await;
    client.publish(&queue, b"x", BasicProperties::default().with_message_id("poison-1".into())).await;
    let letter = client.get(&dead, Duration::from_secs(20)).await.expect("the message is dead-lettered");
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    // The first delivery and the limit's three returns, rejected each time (counted by the
    // queue in x-delivery-count); the last one is dead-lettered with why.
    assert_eq!(FAILING.load(Ordering::SeqCst), 4);
    let reason = header(&letter.properties, "Idempotent-Reason").expect("a reason");
    assert!(reason.contains("on delivery 4 of at most 4; no delivery is left"), "{reason}");
    assert_eq!(letter.data, b"x");
    assert_eq!(header(&letter.properties, "Idempotent-Queue").as_deref(), Some(queue.as_str()));
    assert_eq!(client.ready(&queue).await, 0);
    assert_eq!(client.ready(&dead).await, 0, "one dead letter");
    client.delete(&[&queue, &dead]).await;
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mismatch_or_a_malformed_body_is_dead_lettered_after_one_delivery() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.mismatch.");
    let dead = format!("{queue}.dead");
    let ledger = Ledger::default();
    let (stop, run) = spawn(worker(&url, &queue).state(ledger.clone()), settle);
    let client = Client::connect(&url).await;
    client.await_queue(&queue).await;
    client.publish_json(&queue, &json!({"payment": "m-1", "amount": 5})).await;
    until("the first settles", || count(&ledger, "m-1") == 1).await;
    client.publish_json(&queue, &json!({"payment": "m-1", "amount": 6})).await;
    let letter = client.get(&dead, Duration::from_secs(20)).await.expect("the mismatch is dead-lettered");
    let reason = header(&letter.properties, "Idempotent-Reason").unwrap();
    assert!(reason.contains("the key was already used by another message"), "{reason}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&letter.data).unwrap()["amount"], 6);
    assert_eq!(letter.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    client.publish(&queue, b"not json", BasicProperties::default()).await;
    let letter = client.get(&dead, Duration::from_secs(20)).await.expect("the malformed body is dead-lettered");
    let reason = header(&letter.properties, "Idempotent-Reason").unwrap();
    assert!(reason.contains("the message body is not a valid"), "{reason}");
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    assert_eq!(count(&ledger, "m-1"), 1, "the mismatch did not run");
    assert_eq!(client.ready(&queue).await, 0, "neither came back: one delivery each");
    assert_eq!(client.ready(&dead).await, 0);
    client.delete(&[&queue, &dead]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_request_gets_the_identical_reply_with_its_own_correlation_id() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.rpc.");
    let ledger = Ledger::default();
    let (stop, run) = spawn(worker(&url, &queue).state(ledger.clone()), settle);
    let client = Client::connect(&url).await;
    let replies = client.reply_queue().await;
    client.await_queue(&queue).await;
    let body = json!({"payment": "r-1", "amount": 9}).to_string();
    let request = |id: &str| {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(replies.as_str().into())
            .with_correlation_id(id.into())
    };
    client.publish(&queue, body.as_bytes(), request("call-1")).await;
    let first = client.get(&replies, Duration::from_secs(20)).await.expect("a reply");
    client.publish(&queue, body.as_bytes(), request("call-2")).await;
    let second = client.get(&replies, Duration::from_secs(20)).await.expect("a reply to the duplicate");
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    assert_eq!(count(&ledger, "r-1"), 1);
    assert_eq!(first.data, b"r-1 settled 9");
    assert_eq!(second.data, first.data, "the stored reply, byte for byte");
    let correlation = |d: &idempotent_rabbitmq::lapin::message::Delivery| {
        d.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned())
    };
    assert_eq!(correlation(&first).as_deref(), Some("call-1"));
    assert_eq!(correlation(&second).as_deref(), Some("call-2"));
    assert_eq!(header(&first.properties, "Idempotent-Replayed"), None);
    assert_eq!(header(&second.properties, "Idempotent-Replayed").as_deref(), Some("true"));
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_up_refuses_a_consumer_timeout_too_short_or_a_queue_without_a_delivery_limit() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.refused.");
    let runtime = || idempotent_rabbitmq::start(Arc::new(MemoryStore::new())).unwrap();
    let short = Settings {
        delivery_limit: Some(5),
        consumer_timeout: Duration::from_secs(15),
        max_processing: Duration::from_secs(30),
        ..Settings::default()
    };
    let short = Worker::new(runtime(), &url, &queue, short);
    let error = short.run(settle, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, Error::Refused(_)), "{error}");
    let error = error.to_string();
    assert!(
        error.contains(&format!("consumer `{queue}` (scope `rmq.settle`): a delivery may stay unacknowledged for max processing 30s + lease 6s = 36s, longer than the broker's deadline of 15s")),
        "{error}"
    );
    let unbounded = Worker::new(runtime(), &url, &queue, Settings::default());
    let error = unbounded.run(settle, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(
        error.contains(&format!("consumer `{queue}` (scope `rmq.settle`): x-delivery-limit is unlimited")),
        "{error}"
    );
    // A queue that does not exist (not declared by the worker): refused, not waited for.
    let missing = Worker::new(runtime(), &url, &queue, Settings { delivery_limit: Some(5), ..Settings::default() });
    let error = missing.run(settle, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, Error::Amqp(_)), "{error}");
    assert!(error.to_string().contains("NOT_FOUND"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_is_reported_with_its_queue_binding_and_key_source() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.report.");
    let client = Client::connect(&url).await;
    let bind = Some(("amq.direct".to_owned(), queue.clone()));
    let ledger = Ledger::default();
    let worker = worker_with(&url, &queue, Settings { bind, ..settings(&queue) }).state(ledger.clone());
    let (stop, run) = spawn(worker, settle);
    let records =
        idempotent_rabbitmq::core::registry::routes_of(idempotent_rabbitmq::core::registry::Framework::RabbitMq);
    let deadline = Instant::now() + Duration::from_secs(20);
    let row = loop {
        let json = idempotent_rabbitmq::core::report::render(&records, idempotent_rabbitmq::core::report::Format::Json);
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let row = json["routes"].as_array().unwrap().iter().find(|r| r["scope"] == "rmq.settle").cloned().unwrap();
        if row["consumes"].as_array().unwrap().iter().any(|b| b["source"] == queue.as_str()) {
            break row;
        }
        assert!(Instant::now() < deadline, "the worker never bound its handler");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row["framework"], "rabbitmq");
    assert_eq!(row["transport"], "amqp");
    assert_eq!(row["key_source"], "fields:payment");
    let binding = row["consumes"].as_array().unwrap().iter().find(|b| b["source"] == queue.as_str()).unwrap();
    assert_eq!(binding["filter"], format!("amq.direct:{queue}"));
    assert_eq!(binding["consumer"], queue.as_str());
    // The binding is real: a message routed by the exchange reaches the handler.
    let confirm = client.channel.basic_publish(
        "amq.direct".into(),
        queue.as_str().into(),
        Default::default(),
        br#"{"payment":"b-1","amount":1}"#,
        BasicProperties::default().with_headers(FieldTable::default()),
    );
    assert!(confirm.await.unwrap().await.unwrap().is_ack());
    drained(&client, &queue).await;
    // Delivered is not yet settled: wait for the handler's run before stopping the worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&ledger, "b-1") == 0 {
        assert!(Instant::now() < deadline, "the routed message never reached the handler");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    assert_eq!(count(&ledger, "b-1"), 1);
    assert_eq!(client.ready(&queue).await, 0, "settled");
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}

static KEYED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keyed by a header of the message's table.
#[idempotent(scope = "rmq.header", key = header("X-Order"), ttl = "7d", lease = "6s")]
async fn by_header(msg: Json<Settle>) -> Result<(), ConsumeError> {
    KEYED.lock().unwrap().push(format!("{}/{}", msg.0.payment, msg.0.amount));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_from_the_header_table_whatever_the_headers_type() {
    let Some(url) = amqp_url().await else { return };
    let queue = unique("rmq.header.");
    let (stop, run) = spawn(worker(&url, &queue), by_header);
    let client = Client::connect(&url).await;
    client.await_queue(&queue).await;
    let with = |order: AMQPValue| {
        let mut table = FieldTable::default();
        table.insert("X-Order".into(), order);
        BasicProperties::default().with_content_type("application/json".into()).with_headers(table)
    };
    let body = |payment: &str| json!({"payment": payment, "amount": 1}).to_string();
    // The same order twice (a text header, then the same number as an integer header): one key.
    // Another order: another key. No header: no key. The second is sent once the first has run:
    // sent together, it may arrive while the first runs, be held to be redelivered later, and be
    // back in the queue when the worker stops (the protocol working, not what this test looks at).
    client.publish(&queue, body("h-1").as_bytes(), with(AMQPValue::LongString("7".into()))).await;
    until("the first order settled", || !KEYED.lock().unwrap().is_empty()).await;
    client.publish(&queue, body("h-1").as_bytes(), with(AMQPValue::LongLongInt(7))).await;
    client.publish(&queue, body("h-2").as_bytes(), with(AMQPValue::LongInt(8))).await;
    let no_key = BasicProperties::default().with_content_type("application/json".into());
    client.publish(&queue, body("h-3").as_bytes(), no_key).await;
    let letter = client.get(&format!("{queue}.dead"), Duration::from_secs(20)).await.expect("no key: dead letter");
    let reason = header(&letter.properties, "Idempotent-Reason").unwrap();
    assert!(reason.contains("no usable idempotency key"), "{reason}");
    until("both keys settled", || KEYED.lock().unwrap().len() >= 2).await;
    drained(&client, &queue).await;
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");
    let mut runs = KEYED.lock().unwrap().clone();
    runs.sort();
    assert_eq!(runs, ["h-1/1", "h-2/1"]);
    assert_eq!(client.ready(&queue).await, 0);
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}
