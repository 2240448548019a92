//! The proof of the transactional mode: demo processes killed (`kill -9`) again and again while
//! many clients make deposits, on a real PostgreSQL database, a real MySQL (MariaDB) database and a
//! real SQLite file, with both frameworks. A deposit's row, the caller's balance and the idempotency record commit in one
//! transaction, so whatever instant a process dies at, each key is deposited exactly once.
//!
//! Each run (one store, one framework) starts a demo process; [`CLIENTS`] clients each deposit
//! [`KEYS`] different amounts, one key each, one account for the whole run, so every deposit
//! updates the same balance row. A client retries a key (same key, same body) on a connection
//! error, 409, 500 or 503 until it gets 201 (or 422, a failure here), and always sends to the
//! address of the current process. Meanwhile the run kills the process [`KILLS`] times, each a
//! random 50 to 400 ms after the previous process came up, and starts a new one on the same store
//! and ledger at once. A request whose process died before its transaction committed left a claim
//! behind: its retries get 409 until that claim's lease (10 s, the route's default) runs out, then
//! the retry runs the deposit. A request that committed but lost its answer is replayed.
//!
//! Once every client has its 201, the run checks, reading the database directly: one deposit row
//! per key (each amount exactly once, with the deposit id every 201 of that key carried), the
//! balance row equal to the sum of the amounts, and `GET /deposits` agreeing; then every key is
//! sent once more and must replay its deposit. Each run prints a `deposits-crash |` line: kills
//! (and how many landed with requests in flight), requests sent, retries, replays, and the
//! answers retried. The PostgreSQL runs work in a schema of their own (through
//! `options[search_path]`), the MySQL runs in a database of their own; the stores run side by
//! side, the frameworks one after the other
//! (`cargo test -p payments-demo --test deposits_crash -- --nocapture`).

mod common;

use common::{dir, framework, start, Instance, BINS};
use idempotent_axum::core::sqlx::{self, Connection};
use idempotent_tests::mysql::TestDb;
use idempotent_tests::postgres::TestSchema;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Concurrent clients per run.
const CLIENTS: usize = 16;
/// Keys (deposits) per client.
const KEYS: usize = 30;
/// Processes killed per run.
const KILLS: usize = 5;
/// A run that has not finished by then has a client stuck: a failure.
const RUN_DEADLINE: Duration = Duration::from_secs(45);

/// A uniformly random number in `lo..=hi`, from a v4 UUID's random bits.
fn random(lo: u64, hi: u64) -> u64 {
    lo + (uuid::Uuid::new_v4().as_u128() as u64) % (hi - lo + 1)
}

/// The database a run's store lives in, read directly.
#[derive(Clone)]
enum Db {
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
    Sqlite(PathBuf),
}

impl Db {
    fn name(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::MySql(_) => "mysql",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// `account`'s deposits (amount -> ids) and its balance row.
    async fn read(&self, account: &str) -> (BTreeMap<i64, Vec<String>>, Option<i64>) {
        let (rows, balance): (Vec<(String, i64)>, Option<i64>) = match self {
            Db::Postgres(pool) => {
                let rows = sqlx::query_as("SELECT id, amount FROM payments_deposits WHERE account = $1")
                    .bind(account)
                    .fetch_all(pool)
                    .await
                    .expect("read the deposits");
                let balance = sqlx::query_scalar("SELECT balance FROM payments_balances WHERE account = $1")
                    .bind(account)
                    .fetch_optional(pool)
                    .await
                    .expect("read the balance");
                (rows, balance)
            }
            Db::MySql(pool) => {
                let rows = sqlx::query_as("SELECT id, amount FROM payments_deposits WHERE account = ?")
                    .bind(account)
                    .fetch_all(pool)
                    .await
                    .expect("read the deposits");
                let balance = sqlx::query_scalar("SELECT balance FROM payments_balances WHERE account = ?")
                    .bind(account)
                    .fetch_optional(pool)
                    .await
                    .expect("read the balance");
                (rows, balance)
            }
            Db::Sqlite(path) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .busy_timeout(Duration::from_secs(10));
                let mut c = sqlx::SqliteConnection::connect_with(&options).await.expect("open the SQLite file");
                let rows = sqlx::query_as("SELECT id, amount FROM payments_deposits WHERE account = ?1")
                    .bind(account)
                    .fetch_all(&mut c)
                    .await
                    .expect("read the deposits");
                let balance = sqlx::query_scalar("SELECT balance FROM payments_balances WHERE account = ?1")
                    .bind(account)
                    .fetch_optional(&mut c)
                    .await
                    .expect("read the balance");
                let _ = c.close().await;
                (rows, balance)
            }
        };
        let mut deposits: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (id, amount) in rows {
            deposits.entry(amount).or_default().push(id);
        }
        (deposits, balance)
    }
}

/// What a run's clients counted.
#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    retries: AtomicUsize,
    replays: AtomicUsize,
    /// Requests sent and not yet answered (or failed), at any moment.
    in_flight: AtomicUsize,
    connection_errors: AtomicUsize,
    conflicts: AtomicUsize,
    internal_errors: AtomicUsize,
    unavailable: AtomicUsize,
    /// The first few bodies of 500 and 503 answers, to explain them.
    samples: Mutex<Vec<String>>,
}

/// One key's deposit as the client saw it: its 201 bodies' deposit ids (one per 201).
struct KeyResult {
    key: String,
    amount: i64,
    ids: Vec<String>,
}

/// One client: deposits its amounts one key after the other, retrying each until 201.
async fn client(
    http: reqwest::Client,
    addr: Arc<RwLock<String>>,
    account: String,
    keys: Vec<(String, i64)>,
    counts: Arc<Counts>,
) -> Result<Vec<KeyResult>, String> {
    let mut results = Vec::new();
    for (key, amount) in keys {
        let mut ids = Vec::new();
        loop {
            let current = addr.read().unwrap().clone();
            counts.requests.fetch_add(1, Ordering::SeqCst);
            counts.in_flight.fetch_add(1, Ordering::SeqCst);
            let answer = async {
                let r = http
                    .post(format!("http://{current}/deposits"))
                    .bearer_auth(&account)
                    .header("Idempotency-Key", &key)
                    .json(&serde_json::json!({ "amount": amount }))
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
                let body = r.bytes().await?;
                Ok::<_, reqwest::Error>((status, replayed, body))
            }
            .await;
            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
            let pause = match answer {
                Err(_) => {
                    counts.connection_errors.fetch_add(1, Ordering::SeqCst);
                    random(10, 30)
                }
                Ok((201, replayed, body)) => {
                    if replayed {
                        counts.replays.fetch_add(1, Ordering::SeqCst);
                    }
                    let deposit: serde_json::Value =
                        serde_json::from_slice(&body).map_err(|e| format!("{key}: {e}"))?;
                    if deposit["amount"] != amount {
                        return Err(format!("{key}: deposited {amount}, answered {deposit}"));
                    }
                    ids.push(deposit["id"].as_str().unwrap_or_default().to_owned());
                    break;
                }
                Ok((409, _, _)) => {
                    counts.conflicts.fetch_add(1, Ordering::SeqCst);
                    random(50, 150)
                }
                Ok((status @ (500 | 503), _, body)) => {
                    let counter = if status == 500 { &counts.internal_errors } else { &counts.unavailable };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut samples = counts.samples.lock().unwrap();
                    if samples.len() < 5 {
                        samples.push(format!("{status} {}", String::from_utf8_lossy(&body)));
                    }
                    random(20, 80)
                }
                Ok((status, _, body)) => {
                    return Err(format!("{key}: answered {status}: {}", String::from_utf8_lossy(&body)));
                }
            };
            counts.retries.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        results.push(KeyResult { key, amount, ids });
    }
    Ok(results)
}

/// Starts `bin` on `store` with `ledger`, off the async workers (starting waits for its banner).
async fn launch(bin: &'static str, store: &str, ledger: &Path) -> Instance {
    let (store, ledger) = (store.to_owned(), ledger.to_owned());
    tokio::task::spawn_blocking(move || start(bin, &store, &ledger, 0)).await.expect("start a demo")
}

/// The demo's warnings and errors of a process, for a failure's message.
fn warnings(instance: &Instance) -> Vec<String> {
    instance.demo.log().into_iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect()
}

/// One run: `bin` on `store` (in `db`), killed [`KILLS`] times under [`CLIENTS`] clients.
async fn run(bin: &'static str, store: String, db: Db, work: PathBuf) -> Result<String, String> {
    let name = format!("{} / {}", db.name(), framework(bin));
    let started = Instant::now();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let account = format!("acct_dep_{}_{}_{}", db.name(), framework(bin), &id[..8]);
    let ledger = work.join(format!("{}-{}.jsonl", db.name(), framework(bin)));
    let mut demo = launch(bin, &store, &ledger).await;
    let addr = Arc::new(RwLock::new(demo.demo.addr.clone()));
    let counts = Arc::new(Counts::default());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let keys: Vec<(String, i64)> =
            (0..KEYS).map(|k| (format!("dep-{id}-{c}-{k}"), (c * KEYS + k + 1) as i64)).collect();
        expected.extend(keys.iter().cloned());
        clients.push(tokio::spawn(client(http.clone(), addr.clone(), account.clone(), keys, counts.clone())));
    }

    // The killer: kills the process a random 50-400 ms after it came up, and starts the next.
    let (mut kills, mut in_flight_kills, mut cut) = (0, 0, 0);
    let mut killed_logs = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(random(50, 400))).await;
        if clients.iter().all(|c| c.is_finished()) {
            break;
        }
        let flying = counts.in_flight.load(Ordering::SeqCst);
        demo.demo.kill();
        kills += 1;
        if flying > 0 {
            in_flight_kills += 1;
            cut += flying;
        }
        killed_logs.extend(warnings(&demo));
        demo = launch(bin, &store, &ledger).await;
        *addr.write().unwrap() = demo.demo.addr.clone();
    }
    let killing_ended = started.elapsed();

    let mut seen: Vec<KeyResult> = Vec::new();
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE.saturating_sub(started.elapsed());
    for c in clients {
        match tokio::time::timeout_at(deadline, c).await {
            Ok(Ok(Ok(results))) => seen.extend(results),
            Ok(Ok(Err(e))) => return Err(format!("{name}: {e}")),
            Ok(Err(e)) => return Err(format!("{name}: a client panicked: {e}")),
            Err(_) => {
                return Err(format!(
                    "{name}: clients still retrying after {RUN_DEADLINE:?}; process log: {:?}; killed processes: {killed_logs:?}",
                    warnings(&demo)
                ))
            }
        }
    }
    let clients_done = started.elapsed();

    // Every key deposited exactly once, with the id of its 201 answers, and the balance their sum.
    let (deposits, balance) = db.read(&account).await;
    let rows: usize = deposits.values().map(Vec::len).sum();
    let total: i64 = expected.values().sum();
    let mut problems = Vec::new();
    if rows != expected.len() {
        problems.push(format!("{rows} deposit rows for {} keys", expected.len()));
    }
    for result in &seen {
        match deposits.get(&result.amount).map(Vec::as_slice) {
            Some([id]) if result.ids.iter().all(|i| i == id) => {}
            Some([id]) => problems.push(format!("{}: answered {:?}, stored {id}", result.key, result.ids)),
            Some(ids) => problems.push(format!(
                "{}: amount {} deposited {} times: {ids:?}",
                result.key,
                result.amount,
                ids.len()
            )),
            None => problems.push(format!("{}: amount {} never deposited", result.key, result.amount)),
        }
    }
    if balance != Some(total) {
        problems.push(format!("balance {balance:?}, the deposits sum to {total}"));
    }
    let summary: serde_json::Value = http
        .get(format!("http://{}/deposits", demo.demo.addr))
        .bearer_auth(&account)
        .send()
        .await
        .map_err(|e| format!("{name}: GET /deposits: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{name}: GET /deposits: {e}"))?;
    if summary["count"] != expected.len() || summary["balance"] != total {
        problems.push(format!("GET /deposits: {summary}, expected count {} balance {total}", expected.len()));
    }
    // Every key replays its deposit.
    for result in &seen {
        let r = http
            .post(format!("http://{}/deposits", demo.demo.addr))
            .bearer_auth(&account)
            .header("Idempotency-Key", &result.key)
            .json(&serde_json::json!({ "amount": result.amount }))
            .send()
            .await
            .map_err(|e| format!("{name}: replay of {}: {e}", result.key))?;
        let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if status != 201 || !replayed || body["id"] != result.ids[0].as_str() {
            problems.push(format!("{}: the last send answered {status} replayed={replayed} {body}", result.key));
            break;
        }
    }
    let load = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    let line = format!(
        "deposits-crash | {:<8} | {:<5} | kills {kills} ({in_flight_kills} with requests in flight, {cut} requests cut) | \
         requests {} | retries {} | replays {} | retried: {} connection errors, {} x 409, {} x 500, {} x 503 | \
         {rows} deposits, balance {} | kills over at {:.1}s, clients done at {:.1}s, checked at {:.1}s",
        db.name(),
        framework(bin),
        load(&counts.requests),
        load(&counts.retries),
        load(&counts.replays),
        load(&counts.connection_errors),
        load(&counts.conflicts),
        load(&counts.internal_errors),
        load(&counts.unavailable),
        balance.unwrap_or_default(),
        killing_ended.as_secs_f64(),
        clients_done.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    println!("{line}");
    let samples = counts.samples.lock().unwrap().clone();
    if !samples.is_empty() {
        println!("deposits-crash | {name}: answers retried, for instance: {samples:?}");
    }
    if problems.is_empty() {
        Ok(line)
    } else {
        Err(format!("{name}: {}\n{line}\nprocess log: {:?}", problems.join("; "), warnings(&demo)))
    }
}

/// The runs of one store, one framework after the other.
async fn runs(store: String, db: Db, work: PathBuf) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for bin in BINS {
        let (store, db) = match &db {
            // A SQLite file of each run's own.
            Db::Sqlite(_) => {
                let path = work.join(format!("{}.sqlite", framework(bin)));
                (format!("sqlite:{}", path.display()), Db::Sqlite(path))
            }
            Db::Postgres(_) | Db::MySql(_) => (store.clone(), db.clone()),
        };
        out.push(run(bin, store, db, work.clone()).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deposits_survive_kill_9_exactly_once() {
    let started = Instant::now();
    let work = dir("deposits", "crash");
    let mut stores = vec![tokio::spawn(runs(String::new(), Db::Sqlite(PathBuf::new()), work.clone()))];
    let schema = TestSchema::new().await;
    if let Some(schema) = &schema {
        schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.expect("create the runs' schema");
        let sep = if schema.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options[search_path]={}", schema.url, schema.name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.expect("connect");
        stores.push(tokio::spawn(runs(url, Db::Postgres(pool), work.clone())));
    }
    let mysql = TestDb::new().await;
    if let Some(db) = &mysql {
        let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(2).connect(&db.url).await.expect("connect");
        stores.push(tokio::spawn(runs(db.url.clone(), Db::MySql(pool), work.clone())));
    }
    let mut failures = Vec::new();
    let mut passed = 0;
    for s in stores {
        for result in s.await.expect("a store's runs") {
            match result {
                Ok(_) => passed += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    println!("deposits-crash: {passed} runs passed in {:.1}s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} runs failed:\n{}", failures.len(), failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&work);
}
