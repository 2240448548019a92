//! Messages per second through a RabbitMQ consumer, printed as figures (never asserted).
//!
//! `cargo bench -p idempotent-tests --bench rabbitmq` publishes N messages (distinct keys) to a
//! fresh quorum queue, then times one consumer draining it, for:
//! - a bare consumer (the same handler, no protection, `basic.ack` per message, each message in
//!   a task of its own as the worker handles them);
//! - a hand-written dedupe (one `SET NX` per message in a process-local set, as the simplest
//!   dedupe table, acked after);
//! - `idempotent-rabbitmq` on the memory store: first deliveries (each runs its handler), then the
//!   same N messages again as duplicates (each answered from the store).
//!
//! All with a prefetch of 64 and the broker on 127.0.0.1:5672. A run is timed from the consumer's
//! start until the queue is empty and the consumer has settled what it took (its stop waits for
//! that). Machines are shared and noisy: compare the rows of one run, not runs.

use idempotent_rabbitmq::core::store::MemoryStore;
use idempotent_rabbitmq::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use idempotent_rabbitmq::lapin::types::FieldTable;
use idempotent_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use idempotent_rabbitmq::{idempotent, CancellationToken, ConsumeError, Json, Settings, Worker};
use idempotent_tests::rabbitmq::{amqp_url, unique, Client};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const N: usize = 2000;
const PREFETCH: u16 = 64;

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(serde::Deserialize)]
struct Msg {
    id: String,
}

#[idempotent(scope = "bench.amqp", key = field(id), ttl = "1d", lease = "10s")]
async fn handle(msg: Json<Msg>) -> Result<(), ConsumeError> {
    std::hint::black_box(&msg.0.id);
    RUNS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn settings(queue: &str) -> Settings {
    Settings {
        concurrency: PREFETCH,
        declare: true,
        dead_letter: Some(format!("{queue}.dead")),
        delivery_limit: Some(5),
        ..Settings::default()
    }
}

async fn publish_all(client: &Client, queue: &str) {
    let props = || BasicProperties::default().with_content_type("application/json".into());
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let body = format!(r#"{{"id":"m-{i}"}}"#);
        let publish =
            client.channel.basic_publish("".into(), queue.into(), Default::default(), body.as_bytes(), props());
        confirms.push(publish.await.expect("publish"));
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
}

async fn until_empty(client: &Client, queue: &str) {
    while client.ready(queue).await > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn row(name: &str, elapsed: Duration) {
    println!("| {name} | {N} | {:.0} |", N as f64 / elapsed.as_secs_f64());
}

/// A lapin consumer acking each message after `dedupe` (none for the bare consumer).
async fn by_hand(url: &str, client: &Client, name: &str, dedupe: bool) {
    let queue = unique("bench.hand.");
    let worker =
        Worker::new(idempotent_rabbitmq::start(Arc::new(MemoryStore::new())).unwrap(), url, &queue, settings(&queue));
    // Declared as the protected runs declare theirs (the worker refuses nothing here and stops).
    let stop = CancellationToken::new();
    stop.cancel();
    worker.run(handle, stop).await.expect("declare");
    publish_all(client, &queue).await;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let connection = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.unwrap();
    let started = Instant::now();
    let consumer =
        channel.basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default());
    let mut consumer = consumer.await.unwrap();
    // Each message handled in a task of its own, as the worker does, up to the prefetch.
    let mut tasks = tokio::task::JoinSet::new();
    use futures_util::StreamExt;
    for _ in 0..N {
        let delivery = consumer.next().await.unwrap().unwrap();
        let seen = seen.clone();
        tasks.spawn(async move {
            let msg: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
            let id = msg["id"].as_str().unwrap().to_owned();
            if !dedupe || seen.lock().unwrap().insert(id.clone()) {
                std::hint::black_box(&id);
            }
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    row(name, started.elapsed());
    let _ = connection.close(200, "OK".into()).await;
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(url) = amqp_url().await else { return };
    let client = Client::connect(&url).await;
    println!("| consumer | messages | msgs/s |\n|---|---|---|");
    by_hand(&url, &client, "bare consumer (ack per message)", false).await;
    by_hand(&url, &client, "hand-written dedupe (process-local set, then ack)", true).await;
    let queue = unique("bench.protected.");
    let runtime = idempotent_rabbitmq::start(Arc::new(MemoryStore::new())).unwrap();
    // Declare the queue, then fill it before the timed run.
    let declare = CancellationToken::new();
    declare.cancel();
    Worker::new(runtime.clone(), &url, &queue, settings(&queue)).run(handle, declare).await.unwrap();
    for first in [true, false] {
        publish_all(&client, &queue).await;
        let (stop, started) = (CancellationToken::new(), Instant::now());
        let worker = Worker::new(runtime.clone(), &url, &queue, settings(&queue));
        let run = tokio::spawn(worker.run(handle, stop.clone()));
        if first {
            while RUNS.load(Ordering::Relaxed) < N {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            until_empty(&client, &queue).await;
        }
        stop.cancel();
        run.await.unwrap().unwrap();
        let elapsed = started.elapsed();
        // What the worker had taken but not begun when it stopped went back to the queue.
        let settled = N - client.ready(&queue).await as usize;
        let name = if first { "first deliveries" } else { "duplicates" };
        println!(
            "| idempotent-rabbitmq, memory store: {name} | {settled} | {:.0} |",
            settled as f64 / elapsed.as_secs_f64()
        );
    }
    assert_eq!(RUNS.load(Ordering::Relaxed), N, "each message ran once: the duplicates did not run");
    client.delete(&[&queue, &format!("{queue}.dead")]).await;
}
