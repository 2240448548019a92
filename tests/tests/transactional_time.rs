//! Transactional mode against the clock, over real HTTP on real PostgreSQL and SQLite, with
//! leases of a second and a store timeout of 100 ms: the time to live of a transactional outcome
//! counts from its commit, not from when its transaction began (PostgreSQL's `now()`), so a slow
//! handler's retry replays.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::{RecordKey, SqliteStore, Store};
use idempotent_axum::{idempotent, Idempotency, Tx};
use idempotent_tests::http::{new_key, send, Captured};
use idempotent_tests::postgres::TestSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Db {
    Postgres,
    Sqlite,
}

#[derive(Clone)]
struct App {
    db: Db,
    table: String,
    /// Executions by scope and `n`.
    runs: Arc<Mutex<HashMap<(&'static str, i64), usize>>>,
    /// Notified when a transactional handler has written (and so holds its transaction).
    tx_entered: Arc<Notify>,
    /// Lets an escaped guard go.
    let_go: Arc<Notify>,
    /// The tasks that took a guard out of their handler.
    escaped: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl App {
    fn ran(&self, scope: &'static str, n: i64) {
        *self.runs.lock().unwrap().entry((scope, n)).or_default() += 1;
    }

    fn runs(&self, scope: &'static str, n: i64) -> usize {
        self.runs.lock().unwrap().get(&(scope, n)).copied().unwrap_or(0)
    }
}

#[derive(Deserialize, Serialize)]
struct Work {
    n: i64,
    /// How long the handler takes after its write.
    #[serde(default)]
    sleep_ms: u64,
    /// Whether the handler moves its transaction guard into a task of its own.
    #[serde(default)]
    escape: bool,
}

/// A transactional handler that writes one row, then takes `sleep_ms`.
#[idempotent(scope = "tx.slow", fields = [n], transactional = true, lease = "1s", ttl = "2s")]
async fn slow_tx(State(app): State<App>, tx: Tx, Json(w): Json<Work>) -> (StatusCode, String) {
    app.ran("tx.slow", w.n);
    write(&app, &tx, w.n, false).await;
    app.tx_entered.notify_one();
    tokio::time::sleep(Duration::from_millis(w.sleep_ms)).await;
    (StatusCode::CREATED, format!("slow {}", w.n))
}

/// A transactional handler that writes one row and, with `escape`, hands its guard to a task
/// that keeps it until the test lets it go.
#[idempotent(scope = "tx.escape", fields = [n], transactional = true, lease = "1s")]
async fn escaping(State(app): State<App>, tx: Tx, Json(w): Json<Work>) -> (StatusCode, String) {
    app.ran("tx.escape", w.n);
    write(&app, &tx, w.n, w.escape).await;
    (StatusCode::CREATED, format!("escape {}", w.n))
}

/// An ordinary handler that takes `sleep_ms`.
#[idempotent(scope = "plain.slow", fields = [n], lease = "1s")]
async fn plain(State(app): State<App>, Json(w): Json<Work>) -> (StatusCode, String) {
    app.ran("plain.slow", w.n);
    tokio::time::sleep(Duration::from_millis(w.sleep_ms)).await;
    (StatusCode::CREATED, format!("plain {}", w.n))
}

/// Inserts `n` in the route's transaction; with `escape`, the guard goes to a spawned task,
/// which writes once more when let go.
async fn write(app: &App, tx: &Tx, n: i64, escape: bool) {
    let sql = match app.db {
        Db::Postgres => format!("INSERT INTO {} (n) VALUES ($1)", app.table),
        Db::Sqlite => format!("INSERT INTO {} (n) VALUES (?1)", app.table),
    };
    macro_rules! insert {
        ($guard:expr, $n:expr) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind($n)
                .execute(&mut **$guard)
                .await
                .map(|r| r.rows_affected())
        };
    }
    match app.db {
        Db::Postgres => {
            let mut t = tx.postgres().await.expect("the route's transaction");
            assert_eq!(insert!(t, n).expect("insert"), 1);
            if escape {
                let let_go = app.let_go.clone();
                app.escaped.lock().unwrap().push(tokio::spawn(async move {
                    let_go.notified().await;
                    let _ = insert!(t, n + 1000);
                }));
            }
        }
        Db::Sqlite => {
            let mut t = tx.sqlite().await.expect("the route's transaction");
            assert_eq!(insert!(t, n).expect("insert"), 1);
            if escape {
                let let_go = app.let_go.clone();
                app.escaped.lock().unwrap().push(tokio::spawn(async move {
                    let_go.notified().await;
                    let _ = insert!(t, n + 1000);
                }));
            }
        }
    }
}

/// A server on a loopback port with the three routes on `db`.
struct Fixture {
    base: String,
    app: App,
    store: Arc<dyn Store>,
    /// The rows the handlers wrote and committed, by `n`.
    rows: RowCount,
    _schema: Option<Arc<TestSchema>>,
}

type RowCount = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<i64>> + Send>> + Send + Sync>;

async fn fixture(db: Db) -> Option<Fixture> {
    let (store, table, rows, schema): (Arc<dyn Store>, String, RowCount, _) = match db {
        Db::Postgres => {
            let schema = TestSchema::new().await?;
            let pg = schema.store().await.store().clone();
            // Connections opened ahead: opening one takes longer than the store timeout here.
            let warm: Vec<_> = futures_util::future::join_all((0..6).map(|_| pg.pool().acquire())).await;
            assert!(warm.iter().all(Result::is_ok));
            drop(warm);
            let table = format!("\"{}\".effects", schema.name);
            schema.execute(&format!("CREATE TABLE {table} (n BIGINT NOT NULL)")).await.unwrap();
            let (pool, select) = (pg.pool().clone(), format!("SELECT n FROM {table} ORDER BY n"));
            let rows: RowCount = Box::new(move || {
                let (pool, select) = (pool.clone(), select.clone());
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(select)).fetch_all(&pool).await.unwrap()
                })
            });
            (Arc::new(pg) as Arc<dyn Store>, table, rows, Some(schema))
        }
        Db::Sqlite => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let path = std::env::temp_dir().join(format!("idempotent-tx-time-{id}.sqlite"));
            let lite = SqliteStore::connect(&format!("sqlite:{}", path.display())).await.unwrap();
            sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)").execute(lite.pool()).await.unwrap();
            let pool = lite.pool().clone();
            let rows: RowCount = Box::new(move || {
                let pool = pool.clone();
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>("SELECT n FROM effects ORDER BY n").fetch_all(&pool).await.unwrap()
                })
            });
            (Arc::new(lite) as Arc<dyn Store>, "effects".to_owned(), rows, None)
        }
    };
    let app = App {
        db,
        table,
        runs: Arc::default(),
        tx_entered: Arc::new(Notify::new()),
        let_go: Arc::new(Notify::new()),
        escaped: Arc::default(),
    };
    let idem = Idempotency::builder(store.clone()).store_timeout(Duration::from_millis(100)).build().unwrap();
    let router = Router::new()
        .route("/slow-tx", post(slow_tx))
        .route("/escape", post(escaping))
        .route("/plain", post(plain))
        .layer(idem.layer())
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Some(Fixture { base, app, store, rows, _schema: schema })
}

async fn post_to(base: &str, path: &str, key: &str, body: serde_json::Value) -> Captured {
    send(reqwest::Client::new().post(format!("{base}{path}")).header("Idempotency-Key", key).json(&body)).await
}

fn text(answer: &Captured) -> String {
    format!("{} {}", answer.status, String::from_utf8_lossy(&answer.body))
}

/// A transactional outcome's time to live counts from its commit. PostgreSQL's `now()` is the
/// time the transaction began: a completion written with it inside the handler's transaction
/// would count the time to live from before the handler ran. With a ttl of 2 s and a handler of
/// 2.5 s the record would commit already expired, and the retry would run the handler again on
/// top of the first run's committed write.
async fn a_transactional_outcome_lives_its_ttl_from_the_commit(db: Db) {
    let Some(f) = fixture(db).await else { return };
    let key = new_key();
    let first = post_to(&f.base, "/slow-tx", &key, json!({"n": 1, "sleep_ms": 2500})).await;
    assert_eq!(first.status, 201, "{}", text(&first));
    let info = f.store.inspect(&RecordKey::of("tx.slow", None, &key)).await.unwrap().expect("the record, live");
    let left = info.expires_at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(left > Duration::from_millis(1500), "the ttl counts from the commit: {left:?} left of 2 s");
    let retry = post_to(&f.base, "/slow-tx", &key, json!({"n": 1, "sleep_ms": 2500})).await;
    assert_eq!(retry.status, 201, "{}", text(&retry));
    assert!(retry.replayed(), "the retry replays instead of running again");
    assert_eq!(retry.body, first.body);
    assert_eq!(f.app.runs("tx.slow", 1), 1);
    assert_eq!((f.rows)().await, [1], "the handler's write exists once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_transactional_outcome_lives_its_ttl_from_the_commit() {
    a_transactional_outcome_lives_its_ttl_from_the_commit(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_transactional_outcome_lives_its_ttl_from_the_commit() {
    a_transactional_outcome_lives_its_ttl_from_the_commit(Db::Sqlite).await;
}
