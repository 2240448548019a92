//! Messages per second through a JetStream consumer: `idempotent-nats` on the memory, Redis and
//! PostgreSQL stores, beside a bare consumer (the same handler, no protection) and hand-written
//! dedupes (one `SET NX` or one `INSERT ... ON CONFLICT DO NOTHING` per message, acknowledged
//! after), for first deliveries and for duplicates (the same messages published again).
//!
//! `cargo bench -p idempotent-tests --bench consumers` (NATS with JetStream on 4222, or
//! `IDEMPOTENT_TEST_NATS_URL`; Redis and PostgreSQL as the store tests find them). Figures only.

use async_nats::jetstream::{self, consumer::AckPolicy, AckKind};
use futures_util::StreamExt;
use idempotent_nats::core::store::{MemoryStore, RedisStore, Store};
use idempotent_nats::{idempotent, CancellationToken, ConsumeError, Json, Worker};
use idempotent_tests::nats_server::{nats_url, unique};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages per run.
const MESSAGES: usize = 2_000;
/// Messages handled at once.
const CONCURRENCY: usize = 16;

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    id: String,
    amount: u64,
}

/// The handler every variant runs: counts its runs.
async fn work(order: &Order) -> u64 {
    RUNS.fetch_add(1, Ordering::Relaxed);
    order.amount
}

#[idempotent(scope = "bench.consume", key = field(id), fields = [id, amount], ttl = "1h", lease = "6s")]
async fn protected(order: Json<Order>) -> Result<(), ConsumeError> {
    work(&order.0).await;
    Ok(())
}

/// A hand-written dedupe: answers whether this message's key is new (and marks it seen).
type Dedupe = Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, bool> + Send + Sync>;

struct Bench {
    js: jetstream::Context,
    stream: String,
}

impl Bench {
    async fn new(url: &str) -> Self {
        let js = jetstream::new(async_nats::connect(url).await.unwrap());
        let stream = unique("BENCH");
        let config = jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            ..Default::default()
        };
        js.create_stream(config).await.unwrap();
        Self { js, stream }
    }

    /// A durable of its own on the stream, and its name.
    async fn durable(&self) -> String {
        let name = unique("d");
        let stream = self.js.get_stream(&self.stream).await.unwrap();
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            ..Default::default()
        };
        stream.create_consumer(config).await.unwrap();
        name
    }

    /// Publishes the `MESSAGES` orders (again, for duplicates).
    async fn publish(&self) {
        let mut acks = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let body = serde_json::to_vec(&Order { id: format!("o-{i}"), amount: 10 }).unwrap();
            acks.push(self.js.publish(format!("{}.orders", self.stream), body.into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }

    /// Waits until `durable` has acknowledged `total` messages; the time it took from `start`.
    async fn until_acked(&self, durable: &str, total: u64, start: Instant) -> Duration {
        loop {
            let stream = self.js.get_stream(&self.stream).await.unwrap();
            let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(durable).await.unwrap();
            let info = consumer.info().await.unwrap();
            if info.ack_floor.stream_sequence >= total && info.num_ack_pending == 0 {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A consumer loop written by hand: `CONCURRENCY` at a time, each message through `dedupe` (when
/// given) and the handler, then `double_ack`.
async fn hand_written(b: &Bench, durable: &str, dedupe: Option<Dedupe>, stop: CancellationToken) {
    let stream = b.js.get_stream(&b.stream).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer(durable).await.unwrap();
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    while !stop.is_cancelled() {
        drop(permits.acquire().await.unwrap());
        let batch = consumer.batch().max_messages(permits.available_permits()).expires(Duration::from_millis(200));
        let mut messages = batch.messages().await.unwrap();
        while let Some(Ok(message)) = messages.next().await {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let dedupe = dedupe.clone();
            tokio::spawn(async move {
                let order: Order = serde_json::from_slice(&message.payload).unwrap();
                let new = match dedupe {
                    Some(dedupe) => dedupe(order.id.clone()).await,
                    None => true,
                };
                if new {
                    work(&order).await;
                }
                if message.double_ack().await.is_err() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                drop(permit);
            });
        }
    }
}

/// One variant: first deliveries, then the same messages again; msgs/s of each and the runs.
async fn measure(
    url: &str,
    name: &str,
    run: impl Fn(Arc<Bench>, String, CancellationToken) -> tokio::task::JoinHandle<()>,
) {
    let b = Arc::new(Bench::new(url).await);
    let durable = b.durable().await;
    RUNS.store(0, Ordering::SeqCst);
    b.publish().await;
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = run(b.clone(), durable.clone(), stop.clone());
    let first = b.until_acked(&durable, MESSAGES as u64, start).await;
    let runs_first = RUNS.load(Ordering::SeqCst);
    b.publish().await;
    let start = Instant::now();
    let again = b.until_acked(&durable, 2 * MESSAGES as u64, start).await;
    let runs_again = RUNS.load(Ordering::SeqCst) - runs_first;
    stop.cancel();
    let _ = task.await;
    let _ = b.js.delete_stream(&b.stream).await;
    let rate = |d: Duration| MESSAGES as f64 / d.as_secs_f64();
    println!("| {name:<34} | {:>9.0} | {:>9.0} | {runs_first:>6} | {runs_again:>6} |", rate(first), rate(again));
}

fn worker_variant(
    store: Arc<dyn Store>,
) -> impl Fn(Arc<Bench>, String, CancellationToken) -> tokio::task::JoinHandle<()> {
    move |b, durable, stop| {
        let runtime = idempotent_nats::start(store.clone()).unwrap();
        tokio::spawn(async move {
            Worker::new(runtime, b.js.clone(), &b.stream, &durable)
                .concurrency(CONCURRENCY)
                .run(protected, stop)
                .await
                .unwrap();
        })
    }
}

fn hand_variant(
    dedupe: Option<Dedupe>,
) -> impl Fn(Arc<Bench>, String, CancellationToken) -> tokio::task::JoinHandle<()> {
    move |b, durable, stop| {
        let dedupe = dedupe.clone();
        tokio::spawn(async move { hand_written(&b, &durable, dedupe, stop).await })
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("consumers: run with `cargo bench -p idempotent-tests --bench consumers`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let Some(url) = nats_url().await else { return };
        println!("{MESSAGES} messages, {CONCURRENCY} at a time, one worker; msgs/s (runs of the handler)\n");
        println!("| consumer                           | first/s   | again/s   | runs 1 | runs 2 |");
        println!("|---|---:|---:|---:|---:|");
        measure(&url, "bare (no protection)", hand_variant(None)).await;
        measure(&url, "idempotent-nats, memory", worker_variant(Arc::new(MemoryStore::new()))).await;
        if let Some(redis_url) = idempotent_tests::redis_server::redis_url().await {
            let prefix = format!("bench-consume:{}:", std::process::id());
            let store = RedisStore::builder(&redis_url).prefix(prefix.clone()).build().await.unwrap();
            measure(&url, "idempotent-nats, Redis", worker_variant(Arc::new(store))).await;
            let client = redis::Client::open(redis_url.as_str()).unwrap();
            let conn = client.get_multiplexed_async_connection().await.unwrap();
            let dedupe: Dedupe = Arc::new(move |id| {
                let (mut conn, key) = (conn.clone(), format!("{prefix}hand:{id}"));
                Box::pin(async move {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(1)
                        .arg("NX")
                        .arg("EX")
                        .arg(3600)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    set.is_some()
                })
            });
            measure(&url, "hand-written SET NX, Redis", hand_variant(Some(dedupe))).await;
        }
        if let Some(pg) = idempotent_tests::postgres::TestSchema::new().await {
            let store = pg.store().await;
            measure(&url, "idempotent-nats, PostgreSQL", worker_variant(store)).await;
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&pg.url).await.unwrap();
            let table = format!("hand_dedupe_{}", std::process::id());
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY)")))
                .execute(&pool)
                .await
                .unwrap();
            let insert = format!("INSERT INTO {table} (id) VALUES ($1) ON CONFLICT DO NOTHING");
            let dedupe: Dedupe = Arc::new({
                let pool = pool.clone();
                move |id| {
                    let (pool, insert) = (pool.clone(), insert.clone());
                    Box::pin(async move {
                        let done = sqlx::query(sqlx::AssertSqlSafe(insert)).bind(id).execute(&pool).await.unwrap();
                        done.rows_affected() == 1
                    })
                }
            });
            measure(&url, "hand-written INSERT ON CONFLICT, PG", hand_variant(Some(dedupe))).await;
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await;
        }
    });
}
