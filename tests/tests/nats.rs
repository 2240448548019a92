//! `idempotent-nats` against a real NATS server with JetStream: what each kind of redelivery
//! does, with exact execution counts. Each test has a stream and durables of its own.

use async_nats::jetstream::{self, consumer::AckPolicy};
use bytes::Bytes;
use futures_util::StreamExt;
use idempotent_nats::core::engine::Runtime;
use idempotent_nats::core::protocol::consume::{Action, Delivery, DeliveryInfo};
use idempotent_nats::core::store::MemoryStore;
use idempotent_nats::{idempotent, CancellationToken, ConsumeError, Json, State, Worker};
use idempotent_tests::nats_server::{nats_url, unique};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the handlers did: each effect (the message's id), and how many runs began.
#[derive(Clone, Default)]
struct Probe {
    effects: Arc<Mutex<Vec<String>>>,
    started: Arc<AtomicUsize>,
    /// Its handler never finishes (a worker about to die).
    hold: bool,
}

impl Probe {
    fn effects(&self) -> Vec<String> {
        self.effects.lock().unwrap().clone()
    }
}

#[derive(Deserialize, Serialize, Default)]
struct Job {
    id: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    outcome: String,
}

/// Keyed by JetStream's `Nats-Msg-Id`; works for `sleep_ms`, then does what `outcome` says.
#[idempotent(scope = "t.nats.job", key = header("Nats-Msg-Id"), ttl = "7d", lease = "6s")]
async fn job(State(probe): State<Probe>, job: Json<Job>) -> Result<String, ConsumeError> {
    probe.started.fetch_add(1, Ordering::SeqCst);
    if probe.hold {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_millis(job.0.sleep_ms)).await;
    match job.0.outcome.as_str() {
        "dead" => Err(ConsumeError::DeadLetter("poison job".into())),
        "retry" => {
            probe.effects.lock().unwrap().push(job.0.id.clone());
            Err(ConsumeError::retry(Duration::from_millis(100)))
        }
        _ => {
            probe.effects.lock().unwrap().push(job.0.id.clone());
            Ok(format!("done {}", job.0.id))
        }
    }
}

#[derive(Deserialize, Serialize)]
struct Settle {
    payment: String,
    amount: i64,
}

#[derive(Serialize)]
struct Receipt {
    payment: String,
    amount: i64,
}

/// Keyed by the body's `payment`: a payment is settled once however often it is published.
#[idempotent(scope = "t.nats.settle", key = field(payment), fields = [payment, amount], ttl = "7d", lease = "6s")]
async fn settle(State(probe): State<Probe>, msg: Json<Settle>) -> Result<Json<Receipt>, ConsumeError> {
    probe.started.fetch_add(1, Ordering::SeqCst);
    probe.effects.lock().unwrap().push(msg.0.payment.clone());
    Ok(Json(Receipt { payment: msg.0.payment, amount: msg.0.amount }))
}

/// A one-minute ttl: too short for most consumers.
#[idempotent(scope = "t.nats.short", key = header("Nats-Msg-Id"), ttl = "1m", lease = "6s")]
async fn short(_body: Bytes) -> Result<(), ConsumeError> {
    Ok(())
}

/// One test's stream `NAME` on `NAME.>`, its work subject `NAME.work` and dead letters on
/// `NAME.dead`.
struct Bench {
    js: jetstream::Context,
    client: async_nats::Client,
    stream: String,
    runtime: Runtime,
}

impl Bench {
    async fn new() -> Option<Self> {
        let url = nats_url().await?;
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client.clone());
        let stream = unique("T");
        let config = jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            ..Default::default()
        };
        js.create_stream(config).await.unwrap();
        let runtime = idempotent_nats::start(Arc::new(MemoryStore::new())).unwrap();
        Some(Self { js, client, stream, runtime })
    }

    fn work(&self) -> String {
        format!("{}.work", self.stream)
    }

    fn dead(&self) -> String {
        format!("{}.dead", self.stream)
    }

    /// Creates the durable `name` on the work subject.
    async fn durable(&self, name: &str, ack_wait: Duration, max_deliver: i64) {
        self.durable_with(jetstream::consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver,
            ..Default::default()
        })
        .await;
    }

    async fn durable_with(&self, mut config: jetstream::consumer::pull::Config) {
        config.filter_subject = self.work();
        let stream = self.js.get_stream(&self.stream).await.unwrap();
        stream.create_consumer(config).await.unwrap();
    }

    /// Publishes `body` to the work subject, with `Nats-Msg-Id: id` unless `id` is empty.
    async fn publish(&self, id: &str, body: impl Serialize, extra: &[(&str, &str)]) {
        let mut headers = async_nats::HeaderMap::new();
        if !id.is_empty() {
            headers.insert("Nats-Msg-Id", id);
        }
        for (name, value) in extra {
            headers.insert(*name, *value);
        }
        let body = Bytes::from(serde_json::to_vec(&body).unwrap());
        self.js.publish_with_headers(self.work(), headers, body).await.unwrap().await.unwrap();
    }

    fn worker(&self, durable: &str, probe: &Probe) -> Worker {
        Worker::new(self.runtime.clone(), self.js.clone(), &self.stream, durable)
            .dead_letter(&self.dead())
            .state(probe.clone())
    }

    /// Runs `worker` with `handler` on a task; cancel the token to stop it.
    fn spawn(&self, worker: Worker, handler: idempotent_nats::core::protocol::consume::Handler) -> Running {
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(handler, stop.clone()));
        Running { stop, task }
    }

    /// The durable's pending acknowledgements and redeliveries.
    async fn consumer_info(&self, durable: &str) -> (usize, usize) {
        let stream = self.js.get_stream(&self.stream).await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(durable).await.unwrap();
        let info = consumer.info().await.unwrap();
        (info.num_ack_pending, info.num_redelivered)
    }

    /// Waits up to `within` until `durable` has nothing pending and nothing unacknowledged.
    async fn drained(&self, durable: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let stream = self.js.get_stream(&self.stream).await.unwrap();
            let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(durable).await.unwrap();
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
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), idempotent_nats::Error>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("the worker stops").unwrap().unwrap();
    }
}

/// A worker died after claiming a message and while working on it (its task gone, its claim
/// left to lapse, the message never acknowledged): the redelivery waits for the lease, then runs
/// it once. In all, one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_worker_crashed_runs_once_in_all() {
    let Some(b) = Bench::new().await else { return };
    b.durable("w", Duration::from_secs(1), 10).await;
    b.publish("crash-1", Job { id: "crash-1".into(), ..Job::default() }, &[]).await;
    let doomed_probe = Probe { hold: true, ..Probe::default() };
    // The doomed worker: fetches the message, claims it and starts the handler, then dies.
    let stream = b.js.get_stream(&b.stream).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer("w").await.unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let message = batch.next().await.unwrap().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("nats-msg-id", "crash-1".parse().unwrap());
    let delivery = Delivery::new(b.runtime.clone(), headers, message.payload.clone(), DeliveryInfo::new("w"))
        .with_state(Arc::new(doomed_probe.clone()));
    let doomed = tokio::spawn((job.call)(delivery));
    while doomed_probe.started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.abort();
    let probe = Probe::default();
    let running = b.spawn(b.worker("w", &probe), job);
    assert!(b.drained("w", Duration::from_secs(30)).await, "the redelivery is processed once the lease lapsed");
    running.stop().await;
    assert_eq!(probe.effects(), ["crash-1"], "run once, after the crashed claim's lease");
    assert_eq!(probe.started.load(Ordering::SeqCst), 1);
}

/// A completed message whose acknowledgement was lost is redelivered, and acknowledged without
/// running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_message_whose_ack_was_lost_is_acknowledged_without_running() {
    let Some(b) = Bench::new().await else { return };
    b.durable("w", Duration::from_secs(1), 10).await;
    b.publish("lost-1", Job { id: "lost-1".into(), ..Job::default() }, &[]).await;
    let probe = Probe::default();
    let stream = b.js.get_stream(&b.stream).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer("w").await.unwrap();
    let message = consumer.fetch().max_messages(1).messages().await.unwrap().next().await.unwrap().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("nats-msg-id", "lost-1".parse().unwrap());
    let delivery = Delivery::new(b.runtime.clone(), headers, message.payload.clone(), DeliveryInfo::new("w"))
        .with_state(Arc::new(probe.clone()));
    let settled = (job.call)(delivery).await;
    assert_eq!(settled.action, Action::Ack { reply: None }, "done and stored; its ack is lost");
    drop(message);
    let running = b.spawn(b.worker("w", &probe), job);
    assert!(b.drained("w", Duration::from_secs(15)).await);
    running.stop().await;
    assert_eq!(probe.effects(), ["lost-1"]);
    assert_eq!(probe.started.load(Ordering::SeqCst), 1, "the redelivery was acknowledged without running");
    assert_eq!(b.consumer_info("w").await.1, 0, "acknowledged for good: no further redelivery");
}

/// A 5 s handler on a consumer whose AckWait is 2 s: progress acknowledgements keep JetStream
/// from redelivering it; without them it is redelivered, and the claim keeps the redelivery
/// from running it. One execution either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_ack_wait_runs_once() {
    for (durable, progress) in [("with", true), ("without", false)] {
        let Some(b) = Bench::new().await else { return };
        b.durable(durable, Duration::from_secs(2), 10).await;
        let probe = Probe::default();
        let running = b.spawn(b.worker(durable, &probe).progress_acks(progress), job);
        b.publish(&format!("long-{durable}"), Job { id: durable.into(), sleep_ms: 5_000, ..Job::default() }, &[]).await;
        // Watched while the handler runs: how many of the pending messages were redelivered.
        let mut redelivered = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe.effects().is_empty() {
            assert!(Instant::now() < deadline, "the job never finished");
            redelivered = redelivered.max(b.consumer_info(durable).await.1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(b.drained(durable, Duration::from_secs(30)).await);
        running.stop().await;
        assert_eq!(probe.effects(), [durable], "one execution");
        assert_eq!(probe.started.load(Ordering::SeqCst), 1);
        if progress {
            assert_eq!(redelivered, 0, "progress acks extend AckWait: never redelivered");
        } else {
            assert!(redelivered >= 1, "without progress acks JetStream redelivers it meanwhile");
        }
    }
}

/// Dead letters on the dead-letter subject, with their reasons, each after one delivery: the
/// same payment with another amount (a mismatch), a body that is not a settlement, and a job the
/// handler dead-letters itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatch_and_poison_are_dead_lettered_once() {
    let Some(b) = Bench::new().await else { return };
    b.durable("s", Duration::from_secs(2), 5).await;
    b.durable_with(jetstream::consumer::pull::Config {
        durable_name: Some("j".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(2),
        max_deliver: 5,
        ..Default::default()
    })
    .await;
    let mut dead = b.client.subscribe(b.dead()).await.unwrap();
    let probe = Probe::default();
    let settler = b.spawn(b.worker("s", &probe), settle);
    b.publish("", Settle { payment: "p-1".into(), amount: 5 }, &[]).await;
    assert!(b.drained("s", Duration::from_secs(10)).await);
    b.publish("", Settle { payment: "p-1".into(), amount: 6 }, &[]).await;
    b.publish("", serde_json::json!({"note": "not a settlement"}), &[]).await;
    b.publish("x-1", Job { id: "x-1".into(), outcome: "dead".into(), ..Job::default() }, &[]).await;
    assert!(b.drained("s", Duration::from_secs(10)).await);
    settler.stop().await;
    let jobs = b.spawn(b.worker("j", &probe), job);
    assert!(b.drained("j", Duration::from_secs(10)).await);
    jobs.stop().await;

    let mut reasons = Vec::new();
    while let Ok(Some(letter)) = tokio::time::timeout(Duration::from_secs(2), dead.next()).await {
        let headers = letter.headers.unwrap();
        reasons.push(headers.get("Idempotent-Reason").unwrap().to_string());
        assert_eq!(headers.get("Idempotent-Subject").unwrap().as_str(), b.work());
    }
    // "s": the mismatch, and the two bodies that are no settlement; "j": the three that are no
    // job, and the job that dead-letters itself. Each message once.
    let count = |what: &str| reasons.iter().filter(|r| r.contains(what)).count();
    assert_eq!(reasons.len(), 7, "{reasons:?}");
    assert_eq!(count("the key was already used by another message"), 1, "{reasons:?}");
    assert_eq!(count("the message body is not a valid"), 5, "{reasons:?}");
    assert_eq!(count("poison job"), 1, "{reasons:?}");
    assert_eq!(probe.effects(), ["p-1"]);
    assert_eq!(b.consumer_info("s").await.1, 0, "terminated after one delivery, never redelivered");
    assert_eq!(b.consumer_info("j").await.1, 0);
}

/// A handler that asks to retry every time runs `max_deliver` times, then its message is
/// dead-lettered saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_stops_at_max_deliver() {
    let Some(b) = Bench::new().await else { return };
    b.durable("w", Duration::from_secs(2), 3).await;
    let mut dead = b.client.subscribe(b.dead()).await.unwrap();
    let probe = Probe::default();
    let running = b.spawn(b.worker("w", &probe), job);
    b.publish("r-1", Job { id: "r-1".into(), outcome: "retry".into(), ..Job::default() }, &[]).await;
    let letter = tokio::time::timeout(Duration::from_secs(20), dead.next()).await.unwrap().unwrap();
    assert!(b.drained("w", Duration::from_secs(10)).await);
    running.stop().await;
    assert_eq!(
        letter.headers.unwrap().get("Idempotent-Reason").unwrap().as_str(),
        "the handler asked to retry on delivery 3 of at most 3; no delivery is left"
    );
    assert_eq!(probe.effects(), ["r-1", "r-1", "r-1"], "once per delivery JetStream makes");
}

/// Start-up reads the consumer and the stream, and refuses what cannot keep the promise, naming
/// the consumer and the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_consumer_that_cannot_keep_the_promise() {
    let Some(b) = Bench::new().await else { return };
    let refusal = |durable: &'static str| {
        let worker = b.worker(durable, &Probe::default());
        async move { worker.run(short, CancellationToken::new()).await.unwrap_err().to_string() }
    };
    b.durable_with(jetstream::consumer::pull::Config {
        durable_name: Some("all".into()),
        ack_policy: AckPolicy::All,
        ack_wait: Duration::from_secs(1),
        max_deliver: 3,
        ..Default::default()
    })
    .await;
    b.durable("unbounded", Duration::from_secs(1), -1).await;
    b.durable("long", Duration::from_secs(30), 3).await;
    let all = refusal("all").await;
    assert!(all.contains("consumer `all` (scope `t.nats.short`): its ack policy is not explicit"), "{all}");
    let unbounded = refusal("unbounded").await;
    assert!(unbounded.contains("consumer `unbounded` (scope `t.nats.short`): max_deliver is unlimited"), "{unbounded}");
    let long = refusal("long").await;
    assert!(
        long.contains("ttl 60s is shorter than its redelivery horizon 90s (ack_wait 30s × 3 deliveries + backoff 0ns)"),
        "{long}"
    );
    // The stream's duplicate window is JetStream's default, two minutes.
    assert!(long.contains("ttl 60s is shorter than the stream's duplicate window 120s"), "{long}");
    let missing = b.worker("nobody", &Probe::default()).run(short, CancellationToken::new()).await.unwrap_err();
    assert!(missing.to_string().starts_with("JetStream: "), "{missing}");
}

/// Two durables of one stream (fan-out) each settle each payment once, however often it was
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_durables_of_one_stream_each_process_each_message_once() {
    let Some(b) = Bench::new().await else { return };
    let (ledger, audit) = (Probe::default(), Probe::default());
    b.durable("ledger", Duration::from_secs(2), 5).await;
    b.durable("audit", Duration::from_secs(2), 5).await;
    let (l, a) = (b.spawn(b.worker("ledger", &ledger), settle), b.spawn(b.worker("audit", &audit), settle));
    for round in 0..2 {
        for p in ["f-1", "f-2", "f-3"] {
            b.publish("", Settle { payment: p.into(), amount: 10 }, &[("Round", &round.to_string())]).await;
        }
    }
    assert!(b.drained("ledger", Duration::from_secs(15)).await && b.drained("audit", Duration::from_secs(15)).await);
    l.stop().await;
    a.stop().await;
    for probe in [ledger, audit] {
        let mut effects = probe.effects();
        effects.sort();
        assert_eq!(effects, ["f-1", "f-2", "f-3"]);
    }
}

/// A message that asks for a reply gets the handler's; its duplicate gets the stored one again,
/// marked replayed, without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_and_its_duplicate_gets_the_stored_reply() {
    let Some(b) = Bench::new().await else { return };
    b.durable("w", Duration::from_secs(2), 5).await;
    let probe = Probe::default();
    let running = b.spawn(b.worker("w", &probe), settle);
    let inbox = b.client.new_inbox();
    let mut replies = b.client.subscribe(inbox.clone()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        b.publish("", Settle { payment: "q-1".into(), amount: 3 }, &[(idempotent_nats::REPLY_TO, &inbox)]).await;
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap();
        let replayed = reply.headers.as_ref().and_then(|h| h.get("Idempotent-Replayed")).map(|v| v.to_string());
        got.push((String::from_utf8(reply.payload.to_vec()).unwrap(), replayed));
    }
    running.stop().await;
    let receipt = r#"{"payment":"q-1","amount":3}"#.to_owned();
    assert_eq!(got, [(receipt.clone(), None), (receipt, Some("true".into()))]);
    assert_eq!(probe.started.load(Ordering::SeqCst), 1);
}

/// Stopping a worker lets the handler in flight finish and acknowledge its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_finishes_and_acknowledges_what_is_in_flight() {
    let Some(b) = Bench::new().await else { return };
    b.durable("w", Duration::from_secs(30), 5).await;
    let probe = Probe::default();
    let running = b.spawn(b.worker("w", &probe), job);
    b.publish("g-1", Job { id: "g-1".into(), sleep_ms: 1_500, ..Job::default() }, &[]).await;
    while probe.started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
    assert_eq!(probe.effects(), ["g-1"]);
    assert_eq!(b.consumer_info("w").await, (0, 0), "acknowledged before the worker returned");
}
