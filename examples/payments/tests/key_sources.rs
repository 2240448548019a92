//! Keys that do not come from `Idempotency-Key`, on both binaries and every store: the provider's
//! webhook (its key is the sender's `webhook-id`, its caller the verified sender) and
//! notifications (the request itself is the key, for ten minutes).

mod common;

use common::{dir, framework, start, Instance, BINS};
use idempotent_tests::mysql::TestDb;
use idempotent_tests::postgres::TestSchema;
use idempotent_tests::redis_server::redis_url;
use payments_demo::webhooks::{Secret, DEFAULT_SECRET};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
    Redis,
    Mysql,
}

/// A store specification for one test, and what keeps its backing alive.
struct Store {
    spec: String,
    _schema: Option<Arc<TestSchema>>,
    _db: Option<Arc<TestDb>>,
}

async fn store(kind: Kind, name: &str) -> Option<Store> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let plain = |spec: String| Store { spec, _schema: None, _db: None };
    Some(match kind {
        Kind::Memory => plain("memory".into()),
        Kind::Sqlite => plain(format!("sqlite:{}", dir("keys", name).join("idempotency.sqlite").display())),
        Kind::Postgres => {
            let schema = TestSchema::new().await?;
            schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.unwrap();
            let sep = if schema.url.contains('?') { '&' } else { '?' };
            let spec = format!("{}{sep}options[search_path]={}", schema.url, schema.name);
            Store { spec, _schema: Some(schema), _db: None }
        }
        Kind::Redis => {
            let url = redis_url().await?;
            let sep = if url.contains('?') { '&' } else { '?' };
            plain(format!("{url}{sep}prefix=keys:{id}:"))
        }
        Kind::Mysql => {
            let db = TestDb::new().await?;
            Store { spec: db.url.clone(), _schema: None, _db: Some(db) }
        }
    })
}

struct Demo {
    instance: Instance,
    base: String,
    client: reqwest::Client,
}

impl Demo {
    fn webhook(&self, id: Option<&str>, body: &Value, signed_by: &Secret, age: Duration) -> reqwest::RequestBuilder {
        let body = body.to_string();
        let ts = (SystemTime::now() - age).duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let mut request = self
            .client
            .post(format!("{}/webhooks/provider", self.base))
            .header("content-type", "application/json")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signed_by.sign(id.unwrap_or_default(), ts, body.as_bytes()));
        if let Some(id) = id {
            request = request.header("webhook-id", id);
        }
        request.body(body)
    }

    fn notify(&self, account: &str, body: &str) -> reqwest::RequestBuilder {
        let request = self.client.post(format!("{}/notifications", self.base)).bearer_auth(account);
        request.header("content-type", "application/json").body(body.to_owned())
    }

    fn count(&self, kind: &str) -> usize {
        common::executions(&[self.instance.ledger.as_path()], kind, None)
    }
}

async fn answer(request: reqwest::RequestBuilder) -> (u16, bool, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, replayed, response.json().await.unwrap_or(Value::Null))
}

async fn webhooks_and_notifications(bin: &'static str, kind: Kind) {
    let name = format!("{kind:?}-{}", framework(bin));
    let Some(store) = store(kind, &name).await else { return };
    let instance = start(bin, &store.spec, &dir("keys", &name).join("ledger.jsonl"), 0);
    let base = format!("http://{}", instance.demo.addr);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let demo = Demo { instance, base, client };
    let secret = Secret::parse(DEFAULT_SECRET).unwrap();
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let event = json!({"type": "charge.succeeded", "data": {"charge": "ch_1", "amount": 1250}});

    // A signature that does not verify, a stale one, or none: 401, nothing claimed or executed.
    let stranger = Secret::parse("whsec_c29tZW9uZS1lbHNlcy1zZWNyZXQ=").unwrap();
    for request in [
        demo.webhook(Some(&id), &event, &stranger, Duration::ZERO),
        demo.webhook(Some(&id), &event, &secret, Duration::from_secs(600)),
        demo.webhook(None, &event, &secret, Duration::ZERO),
    ] {
        let (status, _, body) = answer(request).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["type"], "urn:payments-demo:problem:webhook-signature");
    }
    assert_eq!(demo.count("webhook"), 0);

    // The first delivery runs, every redelivery replays it; the same id with another event is 422.
    let (status, replayed, first) = answer(demo.webhook(Some(&id), &event, &secret, Duration::ZERO)).await;
    assert_eq!((status, replayed), (200, false), "{first}");
    assert_eq!(first, json!({"received": id}));
    for _ in 0..3 {
        let (status, replayed, again) = answer(demo.webhook(Some(&id), &event, &secret, Duration::ZERO)).await;
        assert_eq!((status, replayed, &again), (200, true, &first));
    }
    let other = json!({"type": "charge.refunded", "data": {"charge": "ch_1", "amount": 1250}});
    let (status, _, body) = answer(demo.webhook(Some(&id), &other, &secret, Duration::ZERO)).await;
    assert_eq!((status, body["type"].as_str()), (422, Some("urn:idempotent:problem:key-reused")), "{body}");
    assert_eq!(demo.count("webhook"), 1, "one event, once");
    let ledger = std::fs::read_to_string(&demo.instance.ledger).unwrap();
    assert!(ledger.contains(&id), "the ledger line names its webhook-id");

    // Notifications: the request is its own key. Key order and number spelling do not matter.
    let (status, replayed, sent) = answer(demo.notify("acct_n", r#"{"to": "ana", "text": "paid 1e3"}"#)).await;
    assert_eq!((status, replayed), (201, false), "{sent}");
    let (status, replayed, again) = answer(demo.notify("acct_n", r#"{ "text": "paid 1e3", "to": "ana" }"#)).await;
    assert_eq!((status, replayed, &again), (201, true, &sent), "the same body within ten minutes");
    let (_, replayed, _) = answer(demo.notify("acct_n", r#"{"to": "ana", "text": "paid 1000"}"#)).await;
    assert!(!replayed, "another text is another notification");
    let (_, replayed, _) = answer(demo.notify("acct_other", r#"{"to": "ana", "text": "paid 1e3"}"#)).await;
    assert!(!replayed, "another account's is another notification");
    assert_eq!(demo.count("notification"), 3);
}

macro_rules! each {
    ($($name:ident: $bin:expr, $kind:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            webhooks_and_notifications($bin, $kind).await;
        }
    )*};
}

each! {
    memory_axum: BINS[0], Kind::Memory;
    memory_actix: BINS[1], Kind::Memory;
    sqlite_axum: BINS[0], Kind::Sqlite;
    sqlite_actix: BINS[1], Kind::Sqlite;
    postgres_axum: BINS[0], Kind::Postgres;
    postgres_actix: BINS[1], Kind::Postgres;
    redis_axum: BINS[0], Kind::Redis;
    redis_actix: BINS[1], Kind::Redis;
    mysql_axum: BINS[0], Kind::Mysql;
    mysql_actix: BINS[1], Kind::Mysql;
}
