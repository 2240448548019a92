//! Transactional mode over real HTTP on real PostgreSQL, SQLite and MySQL (MariaDB): the handler's writes commit
//! with the record; a retryable outcome or a panic rolls them back and releases the claim; a
//! fenced commit rolls them back (409); a replay never opens a transaction; and a store without
//! transactions refuses to start, or answers 501 when told to.

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::engine::{StartupError, WithoutTransactions};
use idempotent_axum::core::fingerprint::Fingerprint;
use idempotent_axum::core::response::StoredResponse;
use idempotent_axum::core::store::transaction::{OutcomeTransaction, TransactionalStore};
use idempotent_axum::core::store::{
    Claim, ClaimToken, Invalidated, MemoryStore, Purge, RecordInfo, RecordKey, SqliteStore, Store, StoreError,
};
use idempotent_axum::{idempotent, Idempotency, Tx};
use idempotent_tests::http::{new_key, send, Captured};
use idempotent_tests::mysql::TestDb;
use idempotent_tests::postgres::TestSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Counts the transactions opened through a store, which it wraps.
struct Counting {
    inner: Arc<dyn Store>,
    begun: AtomicUsize,
}

#[async_trait]
impl TransactionalStore for Counting {
    async fn begin(&self) -> Result<Arc<dyn OutcomeTransaction>, StoreError> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.inner.transactions().expect("a SQL store").begin().await
    }
}

#[async_trait]
impl Store for Counting {
    async fn claim_as(
        &self,
        k: &RecordKey,
        f: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.inner.claim_as(k, f, lease, token).await
    }
    async fn renew(&self, k: &RecordKey, t: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.inner.renew(k, t, lease).await
    }
    async fn complete(
        &self,
        k: &RecordKey,
        t: &ClaimToken,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(k, t, r, ttl).await
    }
    async fn release(&self, k: &RecordKey, t: &ClaimToken) -> Result<(), StoreError> {
        self.inner.release(k, t).await
    }
    async fn inspect(&self, k: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        self.inner.inspect(k).await
    }
    async fn invalidate(&self, k: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.inner.invalidate(k, purge).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }
    fn transactions(&self) -> Option<&dyn TransactionalStore> {
        Some(self)
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Db {
    Postgres,
    Sqlite,
    MySql,
}

#[derive(Clone)]
struct App {
    db: Db,
    table: String,
    executions: Arc<AtomicUsize>,
    /// Holds a `hold` request's handler after its write, until notified.
    gate: Arc<Notify>,
    entered: Arc<Notify>,
}

#[derive(Deserialize, Serialize)]
struct Effect {
    n: i64,
    /// `ok`, `fail` (503), `panic`, or `hold` (waits for the test after writing).
    mode: String,
}

#[idempotent(scope = "tx.effects", fields = [n], transactional = true, lease = "6s")]
async fn effect(State(app): State<App>, tx: Tx, Json(req): Json<Effect>) -> (StatusCode, String) {
    app.executions.fetch_add(1, Ordering::SeqCst);
    let written = match app.db {
        Db::Postgres => {
            let mut t = tx.postgres().await.expect("the route's transaction");
            let sql = format!("INSERT INTO {} (n) VALUES ($1)", app.table);
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(req.n).execute(&mut **t).await.map(|r| r.rows_affected())
        }
        Db::Sqlite => {
            let mut t = tx.sqlite().await.expect("the route's transaction");
            let sql = format!("INSERT INTO {} (n) VALUES (?1)", app.table);
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(req.n).execute(&mut **t).await.map(|r| r.rows_affected())
        }
        Db::MySql => {
            let mut t = tx.mysql().await.expect("the route's transaction");
            let sql = format!("INSERT INTO {} (n) VALUES (?)", app.table);
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(req.n).execute(&mut **t).await.map(|r| r.rows_affected())
        }
    };
    assert_eq!(written.expect("insert"), 1);
    match req.mode.as_str() {
        "fail" => (StatusCode::SERVICE_UNAVAILABLE, "try again".into()),
        "panic" => panic!("the handler fails after writing"),
        "hold" => {
            app.entered.notify_one();
            app.gate.notified().await;
            (StatusCode::CREATED, format!("effect {}", req.n))
        }
        _ => (StatusCode::CREATED, format!("effect {}", req.n)),
    }
}

/// A server on a loopback port: the route, its app state, and what the test looks at.
struct Fixture {
    base: String,
    app: App,
    store: Arc<Counting>,
    rows: RowCount,
    _schema: Option<Arc<TestSchema>>,
    _db: Option<Arc<TestDb>>,
}

async fn fixture(db: Db) -> Option<Fixture> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut mysql_db = None;
    let (inner, table, rows, schema): (Arc<dyn Store>, String, RowCount, _) = match db {
        Db::Postgres => {
            let schema = TestSchema::new().await?;
            let pg = schema.store().await.store().clone();
            let table = format!("\"{}\".effects", schema.name);
            schema.execute(&format!("CREATE TABLE {table} (n BIGINT NOT NULL)")).await.unwrap();
            let pool = pg.pool().clone();
            let count = format!("SELECT count(*) FROM {table}");
            let rows: RowCount = Box::new(move || {
                let (pool, count) = (pool.clone(), count.clone());
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(count)).fetch_one(&pool).await.unwrap()
                })
            });
            (Arc::new(pg) as Arc<dyn Store>, table, rows, Some(schema))
        }
        Db::Sqlite => {
            let path = std::env::temp_dir().join(format!("idempotent-tx-{id}.sqlite"));
            let lite = SqliteStore::connect(&format!("sqlite:{}", path.display())).await.unwrap();
            let table = "effects".to_owned();
            sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)").execute(lite.pool()).await.unwrap();
            let pool = lite.pool().clone();
            let rows: RowCount = Box::new(move || {
                let pool = pool.clone();
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM effects").fetch_one(&pool).await.unwrap()
                })
            });
            (Arc::new(lite) as Arc<dyn Store>, table, rows, None)
        }
        Db::MySql => {
            let test_db = TestDb::new().await?;
            let my = test_db.store().await.store().clone();
            let table = format!("`{}`.effects", test_db.name);
            test_db.execute(&format!("CREATE TABLE {table} (n BIGINT NOT NULL)")).await.unwrap();
            let pool = my.pool().clone();
            let count = format!("SELECT COUNT(*) FROM {table}");
            let rows: RowCount = Box::new(move || {
                let (pool, count) = (pool.clone(), count.clone());
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(count)).fetch_one(&pool).await.unwrap()
                })
            });
            mysql_db = Some(test_db);
            (Arc::new(my) as Arc<dyn Store>, table, rows, None)
        }
    };
    let store = Arc::new(Counting { inner, begun: AtomicUsize::new(0) });
    let app = App {
        db,
        table,
        executions: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Notify::new()),
        entered: Arc::new(Notify::new()),
    };
    let idem = Idempotency::builder(store.clone())
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let router = Router::new().route("/effects", post(effect)).layer(idem.layer()).with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Some(Fixture { base, app, store, rows, _schema: schema, _db: mysql_db })
}

/// Counts the rows the handler wrote and committed.
type RowCount = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = i64> + Send>> + Send + Sync>;

async fn post_effect(f: &Fixture, key: &str, n: i64, mode: &str) -> Captured {
    let client = reqwest::Client::new();
    send(client.post(format!("{}/effects", f.base)).header("Idempotency-Key", key).json(&json!({"n": n, "mode": mode})))
        .await
}

fn record_key(key: &str) -> RecordKey {
    RecordKey::of("tx.effects", None, key)
}

async fn writes_commit_with_the_record_and_a_replay_opens_no_transaction(db: Db) {
    let Some(f) = fixture(db).await else { return };
    let key = new_key();
    let first = post_effect(&f, &key, 1, "ok").await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!((f.rows)().await, 1, "the write committed");
    let info = f.store.inspect(&record_key(&key)).await.unwrap().expect("the record");
    assert_eq!(info.status, Some(201), "the record committed with it");
    let replay = post_effect(&f, &key, 1, "ok").await;
    assert_eq!(replay.status, 201);
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(f.app.executions.load(Ordering::SeqCst), 1);
    assert_eq!(f.store.begun.load(Ordering::SeqCst), 1, "the replay opened no transaction");
    assert_eq!((f.rows)().await, 1);
}

async fn a_retryable_outcome_or_a_panic_rolls_back_and_releases(db: Db) {
    let Some(f) = fixture(db).await else { return };
    let key = new_key();
    let failed = post_effect(&f, &key, 2, "fail").await;
    assert_eq!(failed.status, 503);
    assert_eq!((f.rows)().await, 0, "a retryable outcome's writes are rolled back");
    assert_eq!(f.store.inspect(&record_key(&key)).await.unwrap(), None, "and its claim released");
    let panicked = post_effect(&f, &key, 2, "panic").await;
    panicked.assert_problem(500, "urn:idempotent:problem:handler-panicked");
    assert_eq!((f.rows)().await, 0, "a panic's writes are rolled back");
    let ok = post_effect(&f, &key, 2, "ok").await;
    assert_eq!(ok.status, 201, "the retry runs cleanly");
    assert!(!ok.replayed());
    assert_eq!((f.rows)().await, 1);
    assert_eq!(f.app.executions.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_writes_with_the_record() {
    writes_commit_with_the_record_and_a_replay_opens_no_transaction(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commits_writes_with_the_record() {
    writes_commit_with_the_record_and_a_replay_opens_no_transaction(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_commits_writes_with_the_record() {
    writes_commit_with_the_record_and_a_replay_opens_no_transaction(Db::MySql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rolls_back_what_it_releases() {
    a_retryable_outcome_or_a_panic_rolls_back_and_releases(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rolls_back_what_it_releases() {
    a_retryable_outcome_or_a_panic_rolls_back_and_releases(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_rolls_back_what_it_releases() {
    a_retryable_outcome_or_a_panic_rolls_back_and_releases(Db::MySql).await;
}

/// While the handler runs, its claim is taken over (an operator invalidates it and another
/// request claims the key): the commit is fenced, the writes roll back, the client gets 409, and
/// the new holder's claim is untouched. On PostgreSQL and MySQL: on SQLite the handler's
/// transaction holds the database's write lock, so nothing can take its claim over while it runs.
async fn a_fenced_commit_rolls_back(db: Db) {
    let Some(f) = fixture(db).await else { return };
    let key = new_key();
    let entered = f.app.entered.notified();
    let held = {
        let (client, base, key) = (reqwest::Client::new(), f.base.clone(), key.clone());
        tokio::spawn(async move {
            send(
                client
                    .post(format!("{base}/effects"))
                    .header("Idempotency-Key", key)
                    .json(&json!({"n": 3, "mode": "hold"})),
            )
            .await
        })
    };
    entered.await;
    let record = record_key(&key);
    assert_eq!(f.store.invalidate(&record, Purge::Any).await.unwrap(), Invalidated::Deleted);
    let fp = Fingerprint([9; 32]);
    assert!(matches!(f.store.claim(&record, &fp, Duration::from_secs(30)).await.unwrap(), Claim::Acquired(_)));
    f.app.gate.notify_one();
    let answer = held.await.unwrap();
    answer.assert_problem(409, "urn:idempotent:problem:in-progress");
    assert_eq!((f.rows)().await, 0, "the fenced commit rolled the write back");
    let info = f.store.inspect(&record).await.unwrap().expect("the new holder's claim");
    assert_eq!(info.status, None, "still the new holder's, in progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fenced_commit_rolls_back() {
    a_fenced_commit_rolls_back(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_fenced_commit_rolls_back() {
    a_fenced_commit_rolls_back(Db::MySql).await;
}

/// A store that cannot run transactions refuses to start with a transactional route, naming it,
/// unless the runtime is told to answer such routes 501; then nothing runs.
#[tokio::test]
async fn a_store_without_transactions_refuses_to_start_or_answers_501() {
    let memory = || Arc::new(MemoryStore::new());
    match Idempotency::builder(memory()).actor(idempotent_axum::ActorSource::Anonymous).build() {
        Err(StartupError::NoTransactions { store, routes }) => {
            assert_eq!(store, "memory");
            assert!(routes.iter().any(|r| r.contains("tx.effects")), "{routes:?}");
        }
        other => panic!("expected NoTransactions, got {other:?}"),
    }
    let idem = Idempotency::builder(memory())
        .actor(idempotent_axum::ActorSource::Anonymous)
        .without_transactions(WithoutTransactions::NotImplemented)
        .build()
        .unwrap();
    let app = App {
        db: Db::Sqlite,
        table: "unused".into(),
        executions: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Notify::new()),
        entered: Arc::new(Notify::new()),
    };
    let router = Router::new().route("/effects", post(effect)).layer(idem.layer()).with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    let answer = send(
        client
            .post(format!("{base}/effects"))
            .header("Idempotency-Key", new_key())
            .json(&json!({"n": 1, "mode": "ok"})),
    )
    .await;
    answer.assert_problem(501, "urn:idempotent:problem:transactions-unsupported");
    assert_eq!(app.executions.load(Ordering::SeqCst), 0);
}

/// `Tx` outside a transactional route's handler says so instead of writing outside it.
#[tokio::test]
async fn tx_outside_a_transactional_handler_is_an_error() {
    let err = idempotent_axum::core::store::transaction::Tx::new().postgres().await.unwrap_err();
    assert!(err.to_string().contains("transactional = true"), "{err}");
}
