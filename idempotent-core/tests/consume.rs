//! The consumer protocol's table, row by row, on the memory store: what each claim result and
//! handler outcome becomes (acknowledge, redeliver, terminate), with exact execution counts, and
//! real concurrency where two deliveries of one message race.

use bytes::Bytes;
use idempotent_core::engine::{Config, Fence, Runtime};
use idempotent_core::policy::{KeySource, Part, Policy};
use idempotent_core::protocol::consume::{
    check_redelivery, Action, ConsumeError, Delivery, DeliveryInfo, FromDelivery, Json, Redelivery, Rejection, Reply,
    SettingNames, Settlement, State,
};
use idempotent_core::registry::Framework;
use idempotent_core::store::{MemoryStore, Store};
use idempotent_core::telemetry::RequestOutcome;
use idempotent_core::testing::fault::{Failure, Fault, FaultStore, Op};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

static POLICY: Policy = Policy {
    key_source: KeySource::NamedHeader("nats-msg-id"),
    lease: Duration::from_secs(6),
    ..Policy::new("c.table")
};

fn runtime() -> Runtime {
    Runtime::new(Arc::new(MemoryStore::new()), Config::default())
}

/// A delivery of `body` with message id `key` (none for `""`) to `consumer`.
fn delivery(rt: &Runtime, consumer: &str, key: &str, body: &str, info: impl FnOnce(&mut DeliveryInfo)) -> Delivery {
    let mut headers = http::HeaderMap::new();
    if !key.is_empty() {
        headers.insert("nats-msg-id", key.parse().unwrap());
    }
    headers.insert("content-type", "application/json".parse().unwrap());
    let mut d = DeliveryInfo::new(consumer);
    info(&mut d);
    Delivery::new(rt.clone(), headers, Bytes::copy_from_slice(body.as_bytes()), d)
}

/// Runs `d` through a handler that counts its runs in `runs` and answers `answer`.
async fn run(d: Delivery, runs: &Arc<AtomicUsize>, answer: Result<&'static str, ConsumeError>) -> Settlement {
    let fp = d.fingerprint(&POLICY, Ok);
    let runs = runs.clone();
    d.run(Framework::Nats, &POLICY, fp, async move {
        runs.fetch_add(1, Ordering::SeqCst);
        answer
    })
    .await
}

fn ack() -> Action {
    Action::Ack { reply: None }
}

#[tokio::test]
async fn a_completed_message_is_acknowledged_and_its_redelivery_acknowledged_without_running() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let first = run(delivery(&rt, "settler", "m-1", "{\"a\":1}", |_| {}), &runs, Ok("done")).await;
    assert_eq!(first, Settlement { action: ack(), outcome: Some(RequestOutcome::Executed) });
    let again = run(delivery(&rt, "settler", "m-1", "{\"a\":1}", |i| i.attempt = 2), &runs, Ok("other")).await;
    assert_eq!(again, Settlement { action: ack(), outcome: Some(RequestOutcome::Replayed) });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_gets_its_reply_and_a_duplicate_request_the_stored_one() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let asks = |i: &mut DeliveryInfo| i.wants_reply = true;
    let first = run(delivery(&rt, "settler", "r-1", "{}", asks), &runs, Ok("receipt 1")).await;
    let reply = |replayed| Some(Reply { body: Bytes::from("receipt 1"), error: None, replayed });
    assert_eq!(first.action, Action::Ack { reply: reply(false) });
    let again = run(delivery(&rt, "settler", "r-1", "{}", asks), &runs, Ok("receipt 2")).await;
    assert_eq!(again.action, Action::Ack { reply: reply(true) });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_retry_is_redelivered_with_its_delay_and_runs_again_until_the_last_delivery() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let retry = || Err(ConsumeError::retry(Duration::from_millis(250)));
    let mut actions = Vec::new();
    for attempt in 1..=3 {
        let d = delivery(&rt, "settler", "t-1", "{}", |i| (i.attempt, i.max_attempts) = (attempt, Some(3)));
        actions.push(run(d, &runs, retry()).await);
    }
    assert_eq!(
        actions[0],
        Settlement {
            action: Action::Nak { delay: Duration::from_millis(250) },
            outcome: Some(RequestOutcome::Released)
        }
    );
    assert_eq!(actions[1].action, actions[0].action);
    let Action::Terminate { reason } = &actions[2].action else {
        panic!("the last delivery is dead-lettered: {:?}", actions[2])
    };
    assert_eq!(reason, "the handler asked to retry on delivery 3 of at most 3; no delivery is left");
    assert_eq!(runs.load(Ordering::SeqCst), 3, "every delivery ran: each retry released its claim");
}

#[tokio::test]
async fn a_panicking_handler_releases_its_claim_and_is_redelivered() {
    let rt = runtime();
    let mut actions = Vec::new();
    for attempt in [1, 2] {
        let d = delivery(&rt, "settler", "p-1", "{}", |i| (i.attempt, i.max_attempts) = (attempt, Some(2)));
        let fp = d.fingerprint(&POLICY, Ok);
        let handler = async {
            if attempt > 0 {
                panic!("handler bug");
            }
            Ok::<_, ConsumeError>(())
        };
        actions.push(d.run(Framework::Nats, &POLICY, fp, handler).await.action);
    }
    assert!(matches!(actions[0], Action::Nak { .. }), "{actions:?}");
    assert!(
        matches!(&actions[1], Action::Terminate { reason } if reason.contains("panicked on delivery 2 of at most 2"))
    );
}

#[tokio::test]
async fn a_final_error_is_stored_and_acknowledged_with_its_reason() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let asks = |i: &mut DeliveryInfo| i.wants_reply = true;
    let refused = || Err(ConsumeError::Final("account closed".into()));
    let first = run(delivery(&rt, "settler", "f-1", "{}", asks), &runs, refused()).await;
    let reply = |replayed| Some(Reply { body: Bytes::new(), error: Some("account closed".into()), replayed });
    assert_eq!(first.action, Action::Ack { reply: reply(false) });
    let again = run(delivery(&rt, "settler", "f-1", "{}", asks), &runs, Ok("would succeed now")).await;
    assert_eq!(again.action, Action::Ack { reply: reply(true) });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dead_letter_is_stored_and_terminated_again_on_redelivery() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let poison = || Err(ConsumeError::DeadLetter("amount overflows".into()));
    let first = run(delivery(&rt, "settler", "d-1", "{}", |_| {}), &runs, poison()).await;
    let terminated = Action::Terminate { reason: "amount overflows".into() };
    assert_eq!(first, Settlement { action: terminated.clone(), outcome: Some(RequestOutcome::Executed) });
    let again = run(delivery(&rt, "settler", "d-1", "{}", |_| {}), &runs, Ok("no")).await;
    assert_eq!(again, Settlement { action: terminated, outcome: Some(RequestOutcome::Replayed) });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_key_on_another_message_is_terminated_without_running() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    run(delivery(&rt, "settler", "k-1", "{\"amount\":1}", |_| {}), &runs, Ok("")).await;
    let other = run(delivery(&rt, "settler", "k-1", "{\"amount\":2}", |_| {}), &runs, Ok("")).await;
    assert_eq!(other.outcome, Some(RequestOutcome::Mismatch));
    assert!(
        matches!(&other.action, Action::Terminate { reason } if reason.contains("already used by another message"))
    );
    // The same content, keys in another order and spaces aside, is the same message.
    let same = run(delivery(&rt, "settler", "k-1", "{ \"amount\": 1 }", |_| {}), &runs, Ok("")).await;
    assert_eq!(same.action, ack());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_message_without_a_key_is_terminated_without_running() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let s = run(delivery(&rt, "settler", "", "{}", |_| {}), &runs, Ok("")).await;
    assert_eq!(s.outcome, Some(RequestOutcome::MissingKey));
    assert_eq!(
        s.action,
        Action::Terminate { reason: "no usable idempotency key in the message's `nats-msg-id` header".into() }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Two deliveries of one message at once on two threads (a redelivery while the first worker
/// still runs): one runs, the other is redelivered later and never acknowledged meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_progress_elsewhere_is_redelivered_not_acknowledged() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let first = {
        let (d, runs, release) = (delivery(&rt, "settler", "c-1", "{}", |_| {}), runs.clone(), release.clone());
        tokio::spawn(async move {
            let fp = d.fingerprint(&POLICY, Ok);
            d.run(Framework::Nats, &POLICY, fp, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                started_tx.send(()).unwrap();
                release.notified().await;
                Ok::<_, ConsumeError>("first")
            })
            .await
        })
    };
    started_rx.await.unwrap();
    let second = tokio::spawn({
        let (d, runs) = (delivery(&rt, "settler", "c-1", "{}", |i| i.attempt = 2), runs.clone());
        async move { run(d, &runs, Ok("second")).await }
    })
    .await
    .unwrap();
    assert_eq!(second.outcome, Some(RequestOutcome::InProgress));
    assert!(matches!(second.action, Action::Nak { delay } if delay > Duration::ZERO), "{second:?}");
    release.notify_one();
    assert_eq!(first.await.unwrap().action, ack());
    let third = run(delivery(&rt, "settler", "c-1", "{}", |i| i.attempt = 3), &runs, Ok("third")).await;
    assert_eq!(third.outcome, Some(RequestOutcome::Replayed));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Many deliveries of one message at once, on four threads: exactly one execution, and exactly
/// the deliveries that found it stored are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_message_run_it_once() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (d, runs) = (delivery(&rt, "settler", "many", "{}", |info| info.attempt = i + 1), runs.clone());
            tokio::spawn(async move {
                let fp = d.fingerprint(&POLICY, Ok);
                d.run(Framework::Nats, &POLICY, fp, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok::<_, ConsumeError>(())
                })
                .await
            })
        })
        .collect();
    let mut acked = 0;
    for task in tasks {
        let s = task.await.unwrap();
        match s.action {
            Action::Ack { .. } => acked += 1,
            Action::Nak { .. } => assert_eq!(s.outcome, Some(RequestOutcome::InProgress)),
            Action::Terminate { .. } => panic!("{s:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(acked >= 1);
}

#[tokio::test]
async fn two_consumers_of_one_stream_each_process_a_message_once() {
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    for consumer in ["settler", "auditor", "settler", "auditor"] {
        let s = run(delivery(&rt, consumer, "fan-1", "{}", |_| {}), &runs, Ok("")).await;
        assert_eq!(s.action, ack());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "once per consumer");
}

#[tokio::test]
async fn an_unreachable_store_redelivers_without_running() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.push(Op::Claim, Fault::Fail(Failure::Unavailable));
    let (rt, runs) = (Runtime::new(store, Config::default()), Arc::new(AtomicUsize::new(0)));
    let s = run(delivery(&rt, "settler", "u-1", "{}", |_| {}), &runs, Ok("")).await;
    assert_eq!(s.outcome, Some(RequestOutcome::StoreUnavailable));
    assert_eq!(s.action, Action::Nak { delay: Config::default().store_retry_after });
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let s = run(delivery(&rt, "settler", "u-1", "{}", |_| {}), &runs, Ok("")).await;
    assert_eq!((s.action, runs.load(Ordering::SeqCst)), (ack(), 1));
}

/// An outcome that cannot be stored (the store fails every completion past the patience) is
/// never acknowledged: the redelivery finds the claim, then (once its lease lapsed) runs it.
#[tokio::test(start_paused = true)]
async fn an_outcome_that_could_not_be_stored_is_not_acknowledged() {
    let store = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
    store.always(Op::Complete, Fault::Fail(Failure::Unavailable));
    let config = Config { completion_patience: Duration::from_secs(2), ..Config::default() };
    let (rt, runs) = (Runtime::new(store, config), Arc::new(AtomicUsize::new(0)));
    let s = run(delivery(&rt, "settler", "n-1", "{}", |_| {}), &runs, Ok("")).await;
    assert_eq!(s.action, Action::Nak { delay: POLICY.lease });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A worker cut off from the store past its lease (renewals fail, a pause): another takes the
/// message over and completes it; the first one's completion is fenced and it does not
/// acknowledge. The progress hook stops once its lease cannot be vouched for.
#[tokio::test(start_paused = true)]
async fn a_worker_whose_claim_was_taken_over_does_not_acknowledge() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cut_off = Arc::new(FaultStore::new(store.clone()));
    cut_off.always(Op::Renew, Fault::Fail(Failure::Unavailable));
    let (a, b) = (Runtime::new(cut_off, Config::default()), Runtime::new(store, Config::default()));
    let (runs, progress) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stale = {
        let (runs, progress) = (runs.clone(), progress.clone());
        let hook: idempotent_core::protocol::consume::ProgressHook = Arc::new(move || {
            progress.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        });
        let d = delivery(&a, "settler", "s-1", "{}", |_| {}).with_progress(Duration::from_secs(1), hook);
        tokio::spawn(async move { run_for(d, &runs, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let taken = run(delivery(&b, "settler", "s-1", "{}", |i| i.attempt = 2), &runs, Ok("")).await;
    assert_eq!(taken.action, ack(), "the lease lapsed: the redelivery runs it");
    let stale = stale.await.unwrap();
    assert!(matches!(stale.action, Action::Nak { .. }), "the stale worker does not acknowledge: {stale:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // One call a second while the 6 s lease was vouched for (less its margin), none after.
    assert_eq!(progress.load(Ordering::SeqCst), 5);
}

/// A handler that works for `work`, counting its run.
async fn run_for(d: Delivery, runs: &Arc<AtomicUsize>, work: Duration) -> Settlement {
    let fp = d.fingerprint(&POLICY, Ok);
    let runs = runs.clone();
    d.run(Framework::Nats, &POLICY, fp, async move {
        runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(work).await;
        Ok::<_, ConsumeError>(())
    })
    .await
}

/// A handler that outlives the broker's deadline keeps extending it while its lease is renewed:
/// a 5 s handler gets a progress call every second.
#[tokio::test(start_paused = true)]
async fn progress_is_reported_while_a_long_handler_runs() {
    let (rt, runs, progress) = (runtime(), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hook: idempotent_core::protocol::consume::ProgressHook = {
        let progress = progress.clone();
        Arc::new(move || {
            progress.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        })
    };
    let d = delivery(&rt, "settler", "l-1", "{}", |_| {}).with_progress(Duration::from_millis(990), hook);
    let s = run_for(d, &runs, Duration::from_secs(5)).await;
    assert_eq!(s.action, ack());
    assert_eq!(progress.load(Ordering::SeqCst), 5);
}

#[derive(serde::Deserialize, Debug)]
struct Settle {
    #[allow(dead_code)]
    payment: String,
}

#[tokio::test]
async fn arguments_come_from_the_delivery_and_a_body_that_does_not_decode_is_dead_lettered() {
    let rt = runtime();
    let bad = delivery(&rt, "settler", "b-1", "{\"amount\":1}", |_| {});
    let rejection = Json::<Settle>::from_delivery(&bad).unwrap_err();
    assert!(matches!(&rejection, Rejection::Malformed(r) if r.contains("missing field `payment`")), "{rejection:?}");
    let s = bad.rejected(&POLICY, rejection);
    assert_eq!((matches!(s.action, Action::Terminate { .. }), s.outcome), (true, None));

    let good = delivery(&rt, "settler", "b-2", "{\"payment\":\"p1\"}", |_| {}).with_state(Arc::new(7u32));
    assert!(Json::<Settle>::from_delivery(&good).is_ok());
    assert_eq!(State::<u32>::from_delivery(&good).unwrap().0, 7);
    let missing = State::<String>::from_delivery(&good).unwrap_err();
    assert!(matches!(missing, Rejection::Misconfigured(_)));
    assert!(
        matches!(good.rejected(&POLICY, missing).action, Action::Nak { .. }),
        "the application's bug, not the message's"
    );
}

/// A key read from body fields, and the declared fields as the identity.
#[tokio::test]
async fn a_key_from_body_fields() {
    static FIELDS: Policy = Policy {
        key_source: KeySource::Fields(&["payment"]),
        identity: idempotent_core::policy::Identity {
            body: Part::Only(&["payment", "amount"]),
            ..idempotent_core::policy::Identity::WHOLE
        },
        ..Policy::new("c.fields")
    };
    let (rt, runs) = (runtime(), Arc::new(AtomicUsize::new(0)));
    let mut actions = Vec::new();
    for (amount, note) in [(5, "a"), (5, "b"), (6, "c")] {
        let d = delivery(&rt, "settler", "", "{}", |_| {}).key_from_fields(|mut k| {
            k.0.push("pay-1".to_owned());
            Ok(k)
        });
        let fp = d.fingerprint(&FIELDS, |b| b.field("payment", &"pay-1")?.field("amount", &amount));
        let runs = runs.clone();
        let s = d
            .run(Framework::Nats, &FIELDS, fp, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ConsumeError>(note)
            })
            .await;
        actions.push((s.outcome.unwrap(), matches!(s.action, Action::Terminate { .. })));
    }
    assert_eq!(
        actions,
        [(RequestOutcome::Executed, false), (RequestOutcome::Replayed, false), (RequestOutcome::Mismatch, true)]
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The fence a consumer handler reads is its claim's.
#[tokio::test]
async fn a_consumer_handler_runs_under_its_claim() {
    let rt = runtime();
    let d = delivery(&rt, "settler", "fence-1", "{}", |_| {});
    let fp = d.fingerprint(&POLICY, Ok);
    let s = d
        .run(Framework::Nats, &POLICY, fp, async {
            Fence::new().claim().map(|_| ()).ok_or(ConsumeError::Final("no claim".into()))
        })
        .await;
    assert_eq!(s.action, ack());
}

fn redelivery() -> Redelivery {
    Redelivery {
        consumer: "settler".into(),
        explicit_ack: true,
        ack_wait: Duration::from_secs(30),
        max_deliver: Some(5),
        backoff: Vec::new(),
        duplicate_window: Some(Duration::from_secs(120)),
        names: SettingNames::JETSTREAM,
    }
}

#[test]
fn start_up_refuses_a_consumer_whose_settings_outlive_the_ttl() {
    let week = Policy { ttl: Duration::from_secs(7 * 86_400), ..Policy::new("settlements.create") };
    assert_eq!(check_redelivery(&week, &redelivery()), Ok(()));
    let short = Policy { ttl: Duration::from_secs(60), ..week };
    let error = check_redelivery(&short, &redelivery()).unwrap_err();
    assert_eq!(
        error.0,
        [
            "consumer `settler` (scope `settlements.create`): ttl 60s is shorter than its redelivery horizon 150s (ack_wait 30s × 5 deliveries + backoff 0ns); lengthen the ttl or lower ack_wait or max_deliver",
            "consumer `settler` (scope `settlements.create`): ttl 60s is shorter than the stream's duplicate window 120s; lengthen the ttl to at least the window",
        ]
    );
    let backoff = Redelivery { backoff: vec![Duration::from_secs(60), Duration::from_secs(600)], ..redelivery() };
    assert_eq!(backoff.horizon(), Some(Duration::from_secs(810)));
    let unbounded = Redelivery { max_deliver: None, explicit_ack: false, ..redelivery() };
    let error = check_redelivery(&week, &unbounded).unwrap_err().to_string();
    assert!(
        error.starts_with("the consumer cannot keep its promise of running each message once:\n  - consumer `settler`"),
        "{error}"
    );
    assert!(error.contains("its ack policy is not explicit"), "{error}");
    assert!(error.contains("max_deliver is unlimited"), "{error}");
}

idempotent_core::inventory::submit! {
    idempotent_core::registry::RouteRecord::protected(POLICY, "consume::settle", file!(), line!(), Framework::Nats)
}

/// A consumer handler is registered like a route, and the report shows what its runner bound it
/// to (stream, filter, durable) and its transport.
#[test]
fn a_consumer_appears_in_the_report_with_its_binding() {
    use idempotent_core::registry::{self, ConsumerBinding};
    use idempotent_core::report::{render, Format};
    let records = registry::routes_of(Framework::Nats);
    let md = render(&records, Format::Markdown);
    assert!(md.contains("| `c.table` | nats consumer (not bound yet) | body: whole body |"), "{md}");
    assert!(md.contains("| redelivered later |"), "{md}");
    let binding =
        ConsumerBinding { source: "PAYMENTS".into(), filter: "payments.settle".into(), consumer: "settler".into() };
    registry::bind_consumer(Framework::Nats, "consume::settle", binding);
    let json: serde_json::Value = serde_json::from_str(&render(&records, Format::Json)).unwrap();
    let row = &json["routes"][0];
    assert_eq!(row["framework"], "nats");
    assert_eq!(row["transport"], "nats");
    assert_eq!(row["key_source"], "header:nats-msg-id");
    assert_eq!(
        row["consumes"],
        serde_json::json!([{ "source": "PAYMENTS", "filter": "payments.settle", "consumer": "settler" }])
    );
    let md = render(&records, Format::Markdown);
    assert!(md.contains("| `c.table` | nats PAYMENTS, filter payments.settle, consumer settler |"), "{md}");
    assert!(render(&records, Format::Html).contains("nats PAYMENTS, filter payments.settle, consumer settler"));
}
