//! Transactional mode against the clock, over real HTTP on real PostgreSQL and SQLite, with
//! leases of a second and a store timeout of 100 ms:
//! - the time to live of a transactional outcome counts from its commit, not from when its
//!   transaction began (PostgreSQL's `now()`), so a slow handler's retry replays;
//! - a transaction guard that the handler moves out of itself (into a spawned task) does not hang
//!   the request, the key or a graceful shutdown: the request is refused with a 500 problem, its
//!   writes are rolled back, and a retry runs;
//! - on SQLite, a transactional handler that holds the database's one writer for seconds lets no
//!   other request's live claim lapse: retries racing ordinary requests with short leases never
//!   run them a second time.

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
use std::time::{Duration, Instant};
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
    idem: Idempotency,
    store: Arc<dyn Store>,
    /// The rows the handlers wrote and committed, by `n`.
    rows: RowCount,
    _schema: Option<Arc<TestSchema>>,
    _file: Option<TempFile>,
}

/// A SQLite database file, removed with its WAL files on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

type RowCount = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<i64>> + Send>> + Send + Sync>;

async fn fixture(db: Db) -> Option<Fixture> {
    let mut file = None;
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
            file = Some(TempFile(path));
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
    let idem = Idempotency::builder(store.clone())
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let router = Router::new()
        .route("/slow-tx", post(slow_tx))
        .route("/escape", post(escaping))
        .route("/plain", post(plain))
        .layer(idem.layer())
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Some(Fixture { base, app, idem, store, rows, _schema: schema, _file: file })
}

async fn post_to(base: &str, path: &str, key: &str, body: serde_json::Value) -> Captured {
    send(reqwest::Client::new().post(format!("{base}{path}")).header("Idempotency-Key", key).json(&body)).await
}

fn text(answer: &Captured) -> String {
    format!("{} {}", answer.status, String::from_utf8_lossy(&answer.body))
}

/// Lets the escaped guard go when dropped, also when the test fails: the test's schema can only
/// be dropped once the escaped transaction has ended.
struct LetGo(Arc<Notify>);

impl Drop for LetGo {
    fn drop(&mut self) {
        self.0.notify_one();
    }
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
    assert!(left > Duration::from_secs(1), "the ttl counts from the commit: {left:?} left of 2 s");
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

/// A guard moved into a spawned task outlives the handler: the request still ends at once (500,
/// nothing stored), a graceful shutdown finishes, the escaped writes never commit, and a retry
/// runs the handler (on PostgreSQL at once; on SQLite, whose one writer the escaped guard keeps,
/// once it lets go).
async fn an_escaped_guard_neither_hangs_nor_commits(db: Db) {
    let Some(f) = fixture(db).await else { return };
    let _let_go = LetGo(f.app.let_go.clone());
    let key = new_key();
    let started = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(3),
        post_to(&f.base, "/escape", &key, json!({"n": 7, "escape": true})),
    )
    .await
    .expect("the request ends while the escaped guard is still held");
    refused.assert_problem(500, "urn:idempotent:problem:misconfigured");
    assert!(refused.json()["detail"].as_str().unwrap().contains("transaction"), "{}", text(&refused));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(f.idem.drain(Duration::from_secs(3)).await, "a graceful shutdown finishes");

    let retry = || post_to(&f.base, "/escape", &key, json!({"n": 7}));
    let runs_soon = || async {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = retry().await;
            if answer.status == 201 {
                assert!(!answer.replayed(), "{}", text(&answer));
                break;
            }
            assert!(matches!(answer.status, 409 | 503), "{}", text(&answer));
            assert!(Instant::now() < until, "a retry runs");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if db == Db::Postgres {
        // The claim was released: the retry runs while the escaped guard still holds its
        // transaction open.
        runs_soon().await;
        f.app.let_go.notify_one();
    } else {
        // The escaped guard keeps SQLite's writer: nothing runs until it lets go.
        for _ in 0..5 {
            let held = retry().await;
            assert!(matches!(held.status, 409 | 503), "{}", text(&held));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        f.app.let_go.notify_one();
        runs_soon().await;
    }
    let escaped: Vec<_> = std::mem::take(&mut *f.app.escaped.lock().unwrap());
    for task in escaped {
        task.await.unwrap();
    }
    assert_eq!(f.app.runs("tx.escape", 7), 2, "the refused run and the retry");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((f.rows)().await, [7], "only the retry's write committed");
    let replay = retry().await;
    assert_eq!((replay.status, replay.replayed()), (201, true), "{}", text(&replay));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_escaped_guard_neither_hangs_nor_commits() {
    an_escaped_guard_neither_hangs_nor_commits(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_escaped_guard_neither_hangs_nor_commits() {
    an_escaped_guard_neither_hangs_nor_commits(Db::Sqlite).await;
}

/// On SQLite a transactional handler holds the database's one writer for its whole run (3 s
/// here), so no other claim can renew, complete or be taken over meanwhile. Six ordinary requests
/// with leases of one second run beside it (three finish while it holds the writer, three after)
/// while retries of each hammer the store: none of them ever runs a handler a second time, and
/// every request's outcome is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_long_transactional_handler_lets_no_live_claim_lapse() {
    let Some(f) = fixture(Db::Sqlite).await else { return };
    let f = Arc::new(f);
    let keys: Vec<(i64, String, u64)> = (0..6).map(|n| (n, new_key(), if n % 2 == 0 { 1500 } else { 4000 })).collect();
    let originals: Vec<_> = keys
        .iter()
        .map(|(n, key, sleep_ms)| {
            let (f, key, body) = (f.clone(), key.clone(), json!({"n": n, "sleep_ms": sleep_ms}));
            tokio::spawn(async move { post_to(&f.base, "/plain", &key, body).await })
        })
        .collect();
    while keys.iter().any(|(n, ..)| f.app.runs("plain.slow", *n) == 0) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let entered = f.app.tx_entered.notified();
    let holder = {
        let f = f.clone();
        tokio::spawn(async move { post_to(&f.base, "/slow-tx", &new_key(), json!({"n": 100, "sleep_ms": 3000})).await })
    };
    entered.await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let retries: Vec<_> = keys
        .iter()
        .flat_map(|(n, key, sleep_ms)| (0..2).map(move |_| (*n, key.clone(), *sleep_ms)))
        .map(|(n, key, sleep_ms)| {
            let (f, stop) = (f.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen: Vec<(u16, bool)> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let answer = post_to(&f.base, "/plain", &key, json!({"n": n, "sleep_ms": sleep_ms})).await;
                    seen.push((answer.status, answer.replayed()));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (n, seen)
            })
        })
        .collect();
    let held = holder.await.unwrap();
    assert_eq!(held.status, 201, "{}", text(&held));
    for original in originals {
        let answer = original.await.unwrap();
        assert_eq!((answer.status, answer.replayed()), (201, false), "{}", text(&answer));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers: HashMap<(u16, bool), usize> = HashMap::new();
    let mut ran_again: Vec<i64> = Vec::new();
    for retry in retries {
        let (n, seen) = retry.await.unwrap();
        for (status, replayed) in seen {
            if status == 201 && !replayed {
                ran_again.push(n);
            }
            *answers.entry((status, replayed)).or_default() += 1;
        }
    }
    let runs: Vec<(i64, usize)> = keys.iter().map(|(n, ..)| (*n, f.app.runs("plain.slow", *n))).collect();
    eprintln!("retries' answers by (status, replayed): {answers:?}; executions by request: {runs:?}");
    assert!(ran_again.is_empty(), "retries of {ran_again:?} ran their handler again; executions: {runs:?}");
    for (n, key, sleep_ms) in &keys {
        assert_eq!(f.app.runs("plain.slow", *n), 1, "request {n} ran once");
        let replay = post_to(&f.base, "/plain", key, json!({"n": n, "sleep_ms": sleep_ms})).await;
        assert_eq!(
            (replay.status, replay.replayed()),
            (201, true),
            "request {n}'s outcome was stored: {}",
            text(&replay)
        );
    }
    assert_eq!(f.app.runs("tx.slow", 100), 1);
    assert_eq!((f.rows)().await, [100]);
}
