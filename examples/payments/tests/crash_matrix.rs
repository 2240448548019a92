//! The crash matrix: a demo process killed (`kill -9`) at each step of a protected request, or its
//! store failing under it, for every store (SQLite file, PostgreSQL, MySQL (MariaDB), Redis) and
//! both frameworks.
//! After each fault the same request (same account, same key) is retried through a second demo
//! process on the same store, and the row asserts the exact number of executions, counted in the
//! demos' ledgers (the demo appends and flushes a ledger entry before it answers, at the END of a
//! transfer's processing time, so a process killed during it has executed nothing).
//!
//! | scenario | fault | executions |
//! |---|---|---|
//! | before the claim | the store is held (nothing reaches it), the process killed | 1 |
//! | during the handler | killed during the transfer's processing time | 1 |
//! | before completion | ledger written, the completion never reaches the store, killed | 2 |
//! | during completion | completion sent, its answer lost, killed | 1 if stored, else 2 |
//! | store outage | Redis restarted / PostgreSQL or MySQL connections reset mid-handler | 1 |
//! | slow store | every byte delayed past the lease mid-handler, then recovered | 1 |
//! | slow store, concurrent retry | the same, with a retry arriving meanwhile | 2 if the retry's claim wins, 1 if the late completion does |
//!
//! PostgreSQL, MySQL and Redis are reached through a [`FaultProxy`] whose live switches stall, cut or
//! slow the connections at an exact moment. SQLite has no connection to break: the test holds the
//! database's write lock instead (`BEGIN IMMEDIATE` on a connection of its own), which stops every
//! write of the demo's store (claims, renewals, completions) where a stalled network would. The
//! moment to strike is found by looking at the store itself: a row waits until the claim's
//! in-progress record is there before it stalls the store for the end of the handler.
//!
//! The transfer lease is read from the demo's policy report (`payments-axum policies --format
//! json`); every wait is derived from it. Rows run concurrently; each prints one `crash-matrix |`
//! line as it ends and the test prints the whole table last (`cargo test -p payments-demo --test
//! crash_matrix -- --nocapture`). Each row has its own account and key, its own Redis key prefix,
//! the PostgreSQL rows share a schema of their own and the MySQL rows a database of their own,
//! dropped at the end.

mod common;

use common::{executions, framework, start, Instance, BINS};
use idempotent_axum::core::actor;
use idempotent_axum::core::redis;
use idempotent_axum::core::sqlx::{self, Connection};
use idempotent_axum::core::store::{RecordKey, RedisStore};
use idempotent_tests::fault_proxy::{Direction, FaultProxy, Flow};
use idempotent_tests::http::Captured;
use idempotent_tests::mysql::TestDb;
use idempotent_tests::postgres::TestSchema;
use idempotent_tests::redis_server::{free_port, RedisProcess};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Semaphore};

/// The protected route every row drives, and its scope.
const SCOPE: &str = "transfers.create";
/// Processing time of a transfer where a row needs the handler to run a while.
const DELAY_MS: u64 = 1_500;
/// Rows running at once: enough to finish the matrix in well under two minutes on two cores,
/// few enough that the timing of each row is not at the mercy of the others.
const PARALLEL_ROWS: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    BeforeClaim,
    DuringHandler,
    BeforeCompletion,
    DuringCompletion,
    StoreOutage,
    SlowStore,
    SlowStoreConcurrentRetry,
    /// Not a crash: the handler's progress while a renewal waits for a store that stopped
    /// answering (see [`stalled_renewal`]).
    StalledRenewal,
    /// Not a crash: a claim sent to a store that stopped answering (see [`stalled_claim`]).
    StalledClaim,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::BeforeClaim,
        Scenario::DuringHandler,
        Scenario::BeforeCompletion,
        Scenario::DuringCompletion,
        Scenario::StoreOutage,
        Scenario::SlowStore,
        Scenario::SlowStoreConcurrentRetry,
    ];

    fn label(self) -> &'static str {
        match self {
            Scenario::BeforeClaim => "1 kill before the claim",
            Scenario::DuringHandler => "2 kill during the handler",
            Scenario::BeforeCompletion => "3 kill before completion",
            Scenario::DuringCompletion => "4 kill during completion",
            Scenario::StoreOutage => "5 store outage mid-handler",
            Scenario::SlowStore => "6 store slower than the lease",
            Scenario::SlowStoreConcurrentRetry => "6b slow store + concurrent retry",
            Scenario::StalledRenewal => "handler during a stalled renewal",
            Scenario::StalledClaim => "claim to a stalled store",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Sqlite,
    Postgres,
    MySql,
    Redis,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::MySql => "mysql",
            StoreKind::Redis => "redis",
        }
    }
}

/// The servers every row shares.
struct Servers {
    /// PostgreSQL: the URL of the rows' schema (through `search_path`), the schema, a pool to
    /// look at records with.
    postgres: Option<(String, Arc<TestSchema>, sqlx::PgPool)>,
    /// MySQL: the URL of the rows' database, the database, a pool to look at records with.
    mysql: Option<(String, Arc<TestDb>, sqlx::MySqlPool)>,
    /// Redis: the server's URL.
    redis: Option<String>,
}

/// What a row found: executions counted, what it expected, and what happened on the way.
struct RowResult {
    scenario: Scenario,
    store: StoreKind,
    framework: &'static str,
    executions: usize,
    expected: String,
    passed: bool,
    detail: String,
}

/// The transfer lease `bin` declares, from its policy report.
fn transfer_lease(bin: &str) -> Duration {
    common::route_lease(bin, SCOPE)
}

/// The engine renews a claim every third of its lease. A row that stalls the store before the
/// handler ends keeps the handler shorter than that, so no renewal is on the wire when the store
/// stops answering: the only store operation left to fail is the completion.
fn before_first_renewal(lease: Duration) -> u64 {
    let period = lease.as_millis() as u64 / 3;
    (period * 3 / 4).min(DELAY_MS)
}

/// `url` with its `host:port` replaced by `addr`.
fn with_addr(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// The server address in `url`.
async fn server_addr(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:{default_port}") };
    let mut addrs = tokio::net::lookup_host(host).await.expect("resolve the store's host");
    addrs.next().expect("an address")
}

fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// How a row looks at its record in the store: `Some("in_progress" | "completed")` or `None`.
enum Probe {
    Sqlite(PathBuf),
    Postgres { pool: sqlx::PgPool, schema: String },
    MySql(sqlx::MySqlPool),
    Redis { url: String, key: String },
}

impl Probe {
    async fn state(&self, account: &str, key: &str) -> Result<Option<String>, String> {
        let actor = actor::digest(account);
        match self {
            Probe::Sqlite(path) => {
                let mut c = sqlite_connection(path).await?;
                let state = sqlx::query_scalar::<_, String>(
                    "SELECT state FROM idempotency_records WHERE scope = ?1 AND actor = ?2 AND idem_key = ?3",
                )
                .bind(SCOPE)
                .bind(&actor)
                .bind(key)
                .fetch_optional(&mut c)
                .await
                .map_err(|e| e.to_string());
                let _ = c.close().await;
                state
            }
            Probe::Postgres { pool, schema } => {
                // The schema's name is random hex made by the test harness.
                let sql = format!(
                    "SELECT state FROM \"{schema}\".idempotency_records WHERE scope = $1 AND actor = $2 AND idem_key = $3"
                );
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                    .bind(SCOPE)
                    .bind(&actor)
                    .bind(key)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| e.to_string())
            }
            Probe::MySql(pool) => sqlx::query_scalar::<_, String>(
                "SELECT state FROM idempotency_records WHERE scope = ? AND actor = ? AND idem_key = ?",
            )
            .bind(SCOPE)
            .bind(&actor)
            .bind(key)
            .fetch_optional(pool)
            .await
            .map_err(|e| e.to_string()),
            Probe::Redis { url, key } => {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                let get = async {
                    let mut c = client.get_multiplexed_async_connection().await?;
                    redis::cmd("HGET").arg(key).arg("s").query_async::<Option<String>>(&mut c).await
                };
                let state = tokio::time::timeout(Duration::from_secs(2), get)
                    .await
                    .map_err(|_| "Redis did not answer".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok(state.map(|s| if s == "c" { "completed".to_owned() } else { "in_progress".to_owned() }))
            }
        }
    }
}

async fn sqlite_connection(path: &Path) -> Result<sqlx::SqliteConnection, String> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::SqliteConnection::connect_with(&options).await.map_err(|e| format!("open {}: {e}", path.display()))
}

/// One row: its demos' store, the fault proxy in front of it, and the request it drives.
struct Row {
    scenario: Scenario,
    store: StoreKind,
    bin: &'static str,
    lease: Duration,
    dir: PathBuf,
    account: String,
    key: String,
    /// The store as the demos name it when they connect straight to it.
    direct: String,
    /// In front of the PostgreSQL, MySQL or Redis server, for demos that connect through it.
    proxy: Option<FaultProxy>,
    /// The SQLite write lock the test holds, if it holds it.
    lock: Mutex<Option<sqlx::SqliteConnection>>,
    probe: Probe,
    client: reqwest::Client,
    ledgers: std::sync::Mutex<Vec<PathBuf>>,
    notes: std::sync::Mutex<Vec<String>>,
}

impl Row {
    fn name(&self) -> String {
        format!("{} / {} / {}", self.scenario.label(), self.store.name(), framework(self.bin))
    }

    fn note(&self, note: impl Into<String>) {
        self.notes.lock().unwrap().push(note.into());
    }

    /// Starts a demo (off the async workers: starting waits for its banner) with a ledger of its
    /// own, connected through the proxy when `via_proxy`.
    async fn demo(&self, name: &str, delay_ms: u64, via_proxy: bool) -> Instance {
        let store = match (&self.proxy, via_proxy) {
            (Some(proxy), true) => with_addr(&self.direct, proxy.addr()),
            _ => self.direct.clone(),
        };
        let ledger = self.dir.join(format!("{name}.jsonl"));
        self.ledgers.lock().unwrap().push(ledger.clone());
        let bin = self.bin;
        tokio::task::spawn_blocking(move || start(bin, &store, &ledger, delay_ms)).await.expect("start a demo")
    }

    fn executions(&self) -> usize {
        let ledgers = self.ledgers.lock().unwrap().clone();
        let paths: Vec<&Path> = ledgers.iter().map(PathBuf::as_path).collect();
        executions(&paths, "transfer", Some(&self.account))
    }

    /// The row's transfer, sent to `demo`.
    fn transfer(&self, demo: &Instance) -> impl std::future::Future<Output = Result<Captured, String>> + 'static {
        let request = self
            .client
            .post(format!("http://{}/transfers", demo.demo.addr))
            .bearer_auth(&self.account)
            .header("Idempotency-Key", &self.key)
            .json(&serde_json::json!({"amount": 70, "from": "acct_from", "to": "acct_to"}));
        async move {
            let response = request.send().await.map_err(|e| format!("no response: {e}"))?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|e| format!("body lost: {e}"))?.to_vec();
            Ok(Captured { status, headers, body })
        }
    }

    /// One payment through `demo` before the fault ([`common::warm_up`]).
    async fn warm_up(&self, demo: &Instance) -> Result<(), String> {
        common::warm_up(&self.client, demo, &self.account, &self.key).await
    }

    async fn state(&self) -> Option<String> {
        match self.probe.state(&self.account, &self.key).await {
            Ok(s) => s,
            Err(e) => Some(format!("unreadable ({e})")),
        }
    }

    /// Waits until the record is in `want` state.
    async fn wait_state(&self, want: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let state = self.state().await;
            if state.as_deref() == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the record never became {want} (last: {state:?})"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the claim is done: its record is in the store and, through the proxy, its
    /// answer is on its way back to the demo (`answered` is the proxy's count of bytes to the
    /// demo before the request was sent). A store commits before it answers: stalling the proxy
    /// as soon as the record shows would often swallow the claim's own answer.
    async fn wait_claimed(&self, answered: Option<u64>) -> Result<(), String> {
        self.wait_state("in_progress", Duration::from_secs(5)).await?;
        if let (Some(proxy), Some(answered)) = (&self.proxy, answered) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while proxy.forwarded(Direction::ToClient) == answered {
                if Instant::now() > deadline {
                    return Err("the claim's answer never came back through the proxy".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The proxy's count of bytes delivered to the demo, when there is a proxy.
    fn answered(&self) -> Option<u64> {
        self.proxy.as_ref().map(|p| p.forwarded(Direction::ToClient))
    }

    /// Waits until `demo`'s ledger has the row's transfer.
    async fn wait_ledger(&self, demo: &Instance, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while executions(&[demo.ledger.as_path()], "transfer", Some(&self.account)) == 0 {
            if Instant::now() > deadline {
                return Err(format!("the transfer never reached the ledger within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Stops every store operation of the proxied demo: the proxy blackholes both ways, or the
    /// test takes SQLite's write lock.
    async fn hold_store(&self) -> Result<(), String> {
        match &self.proxy {
            Some(proxy) => proxy.stall(),
            None => {
                let Probe::Sqlite(path) = &self.probe else { unreachable!("only SQLite rows have no proxy") };
                let mut c = sqlite_connection(path).await?;
                sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut c).await.map_err(|e| format!("lock: {e}"))?;
                *self.lock.lock().await = Some(c);
            }
        }
        Ok(())
    }

    async fn release_store(&self) {
        if let Some(proxy) = &self.proxy {
            proxy.heal();
        }
        if let Some(mut c) = self.lock.lock().await.take() {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut c).await;
            let _ = c.close().await;
        }
    }

    /// Retries on `demo` as a client would while it answers 409 (the claim still held) or 503
    /// (the store unavailable), up to `within`: the first other answer, and how many 409 came
    /// before it (a 503 is noted).
    async fn retry(&self, demo: &Instance, within: Duration) -> Result<(Captured, usize), String> {
        let deadline = Instant::now() + within;
        let (mut conflicts, mut unavailable) = (0, 0);
        loop {
            let r = self.transfer(demo).await?;
            if r.status != 409 && r.status != 503 {
                if unavailable > 0 {
                    self.note(format!("the retry got {unavailable} x 503 (store unavailable) first"));
                }
                return Ok((r, conflicts));
            }
            if r.header("retry-after").is_none() {
                return Err(format!("a {} without Retry-After", r.status));
            }
            if r.status == 503 {
                unavailable += 1;
            } else {
                conflicts += 1;
            }
            if Instant::now() > deadline {
                return Err(format!("still {} after {within:?}", r.status));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// After the row's retry on `b` executed or replayed: one more request must replay the
    /// stored response byte for byte.
    /// The retry through `b` waits out the killed request's lease (409s), then runs the handler
    /// itself (201, not a replay), and its own outcome replays.
    async fn retry_runs_again(&self, b: &Instance) -> Result<(), String> {
        let (done, conflicts) = self.retry(b, self.lease * 4).await?;
        self.note(format!("retry: {conflicts} x 409 while the lease ran, then {}", done.status));
        if done.status != 201 || done.replayed() {
            return Err(format!("the retry: {} replayed={}", done.status, done.replayed()));
        }
        self.assert_replays(b, &done).await
    }

    async fn assert_replays(&self, b: &Instance, stored: &Captured) -> Result<(), String> {
        let again = self.transfer(b).await?;
        if !again.replayed() || again.status != stored.status || again.body != stored.body {
            return Err(format!(
                "a later request does not replay the stored response: {} replayed={} {}",
                again.status,
                again.replayed(),
                String::from_utf8_lossy(&again.body)
            ));
        }
        Ok(())
    }

    /// The warnings and errors `demo` logged, to explain a surprising count.
    fn log_of(&self, who: &str, demo: &Instance) {
        for line in demo.demo.log() {
            if line.contains("WARN") || line.contains("ERROR") {
                let line = line.split_once(" WARN ").or_else(|| line.split_once(" ERROR ")).map_or(&*line, |(_, l)| l);
                self.note(format!("{who}: {}", line.trim()));
            }
        }
    }
}

/// Builds the row's store: a SQLite file of its own, or the shared PostgreSQL schema or MySQL
/// database, or the shared Redis under a prefix of its own (a Redis server of its own for the outage row), with a
/// fault proxy in front of the server.
async fn row(
    scenario: Scenario,
    store: StoreKind,
    bin: &'static str,
    lease: Duration,
    servers: &Servers,
    root: &Path,
) -> Option<(Row, Option<RedisProcess>)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = root.join(format!("{scenario:?}-{}-{}", store.name(), framework(bin)));
    std::fs::create_dir_all(&dir).unwrap();
    let account = format!("acct_crash_{}", &id[..12]);
    let key = format!("crash-{id}");
    let mut own_redis = None;
    let (direct, server, probe) = match store {
        StoreKind::Sqlite => {
            let path = dir.join("idempotency.sqlite");
            (format!("sqlite:{}", path.display()), None, Probe::Sqlite(path))
        }
        StoreKind::Postgres => {
            let (url, schema, pool) = servers.postgres.as_ref()?;
            let probe = Probe::Postgres { pool: pool.clone(), schema: schema.name.clone() };
            (url.clone(), Some(server_addr(url, 5432).await), probe)
        }
        StoreKind::MySql => {
            let (url, _, pool) = servers.mysql.as_ref()?;
            (url.clone(), Some(server_addr(url, 3306).await), Probe::MySql(pool.clone()))
        }
        StoreKind::Redis => {
            let base = if scenario == Scenario::StoreOutage {
                // Persistent, as a production Redis must be (see the store's docs).
                let redis =
                    RedisProcess::start(free_port(false)?, &["--appendonly", "yes", "--appendfsync", "always"]).await?;
                let url = redis.url();
                own_redis = Some(redis);
                url
            } else {
                servers.redis.clone()?
            };
            let prefix = format!("crash:{id}:");
            let direct = with_param(&base, &format!("prefix={prefix}"));
            let record = RedisStore::builder(&direct).build().await.expect("a Redis store to name keys with");
            let redis_key = record.redis_key(&RecordKey::new(SCOPE, actor::digest(&account), &*key));
            (direct, Some(server_addr(&base, 6379).await), Probe::Redis { url: base, key: redis_key })
        }
    };
    // The Redis outage row restarts a server of its own instead: its demos connect straight to it.
    let proxy = match server {
        Some(addr) if own_redis.is_none() => Some(FaultProxy::start(addr).await),
        _ => None,
    };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(45)).build().unwrap();
    let row = Row {
        scenario,
        store,
        bin,
        lease,
        dir,
        account,
        key,
        direct,
        proxy,
        lock: Mutex::new(None),
        probe,
        client,
        ledgers: std::sync::Mutex::new(Vec::new()),
        notes: std::sync::Mutex::new(Vec::new()),
    };
    Some((row, own_redis))
}

/// What a scenario returns: the executions it counted, what it expected, and whether they agree.
struct Verdict {
    executions: usize,
    expected: String,
    passed: bool,
}

fn exactly(row: &Row, n: usize) -> Verdict {
    let executions = row.executions();
    Verdict { executions, expected: n.to_string(), passed: executions == n }
}

/// 1. The request never reaches the claim: the store is held (nothing the demo sends arrives)
///    when the request comes in, and the process is killed while its claim waits. Nothing was
///    claimed, so the retry runs at once: exactly 1 execution.
async fn before_claim(row: &Row) -> Result<Verdict, String> {
    let via_proxy = row.proxy.is_some();
    let mut a = row.demo("a", DELAY_MS, via_proxy).await;
    let b = row.demo("b", DELAY_MS, false).await;
    if via_proxy {
        row.warm_up(&a).await?;
    }
    row.hold_store().await?;
    let doomed = tokio::spawn(row.transfer(&a));
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.demo.kill();
    row.release_store().await;
    never_answered(doomed).await?;
    row.note(format!("store after the kill: {:?}", row.state().await));
    let (done, conflicts) = row.retry(&b, Duration::from_secs(5)).await?;
    if done.status != 201 || done.replayed() || conflicts > 0 {
        return Err(format!("the retry: {} replayed={} after {conflicts} 409", done.status, done.replayed()));
    }
    row.assert_replays(&b, &done).await?;
    Ok(exactly(row, 1))
}

/// The request sent to a demo that was then killed got no answer.
async fn never_answered(doomed: tokio::task::JoinHandle<Result<Captured, String>>) -> Result<(), String> {
    match doomed.await {
        Ok(Ok(r)) => Err(format!("the killed demo answered {}", r.status)),
        _ => Ok(()),
    }
}

/// 2. Killed during the handler (mid transfer delay): the ledger was never written, the claim
///    expires with its lease and the retry executes: exactly 1.
async fn during_handler(row: &Row) -> Result<Verdict, String> {
    let mut a = row.demo("a", DELAY_MS, false).await;
    let b = row.demo("b", DELAY_MS, false).await;
    let doomed = tokio::spawn(row.transfer(&a));
    row.wait_state("in_progress", Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(DELAY_MS / 3)).await;
    a.demo.kill();
    never_answered(doomed).await?;
    if row.executions() != 0 {
        return Err("the killed demo executed the transfer".into());
    }
    row.retry_runs_again(&b).await?;
    Ok(exactly(row, 1))
}

/// 3. Killed between the handler and the completion: the transfer is in the ledger, but the
///    completion never reaches the store (stalled from just after the claim, before the handler
///    ends, so it is certainly stalled when the completion leaves). The claim expires with its
///    lease and the retry runs the handler again: exactly 2 executions. This is the inherent
///    window of the non-transactional mode (effect done, process dead before the record is
///    written); the transactional mode closes it for effects in the store's database.
async fn before_completion(row: &Row) -> Result<Verdict, String> {
    let via_proxy = row.proxy.is_some();
    let mut a = row.demo("a", before_first_renewal(row.lease), via_proxy).await;
    let b = row.demo("b", DELAY_MS, false).await;
    if via_proxy {
        row.warm_up(&a).await?;
    }
    let answered = row.answered();
    let doomed = tokio::spawn(row.transfer(&a));
    row.wait_claimed(answered).await?;
    row.hold_store().await?;
    let written = row.wait_ledger(&a, Duration::from_secs(10)).await;
    a.demo.kill();
    row.release_store().await;
    written?;
    never_answered(doomed).await?;
    let state = row.state().await;
    row.note(format!("store after the kill: {state:?}"));
    if state.as_deref() != Some("in_progress") {
        return Err(format!("the completion reached the store: {state:?}"));
    }
    row.retry_runs_again(&b).await?;
    Ok(exactly(row, 2))
}

/// 4. Killed during the completion: the completion has left for the store but its answer never
///    comes back (only the store-to-demo direction is blackholed), then the process dies. Whether
///    the write landed decides: a stored record is replayed (1 execution), a missing one lets the
///    retry run again (2). The row asserts that the count matches what the store holds. SQLite
///    has no answer to lose: its row kills the process the moment the ledger line appears, and
///    the race decides.
async fn during_completion(row: &Row) -> Result<Verdict, String> {
    let via_proxy = row.proxy.is_some();
    let mut a = row.demo("a", before_first_renewal(row.lease), via_proxy).await;
    let b = row.demo("b", DELAY_MS, false).await;
    if via_proxy {
        row.warm_up(&a).await?;
    }
    let answered = row.answered();
    let doomed = tokio::spawn(row.transfer(&a));
    row.wait_claimed(answered).await?;
    let sent = row.proxy.as_ref().map(|proxy| {
        proxy.set_flow(Direction::ToClient, Flow::Blackhole);
        proxy.forwarded(Direction::ToServer)
    });
    let written = row.wait_ledger(&a, Duration::from_secs(10)).await;
    if let (Some(proxy), Some(sent)) = (&row.proxy, sent) {
        // The completion is the first thing the demo sends after the handler.
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.forwarded(Direction::ToServer) == sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if proxy.forwarded(Direction::ToServer) == sent {
            row.note("the completion never left the demo");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.demo.kill();
    row.release_store().await;
    written?;
    match doomed.await {
        // SQLite's completion is local: the answer may have left before the kill.
        Ok(Ok(r)) if row.proxy.is_none() => row.note(format!("the response ({}) left before the kill", r.status)),
        Ok(Ok(r)) => return Err(format!("the killed demo answered {}", r.status)),
        _ => {}
    }
    let state = row.state().await;
    let (done, conflicts) = row.retry(&b, row.lease * 4).await?;
    let landed = done.replayed();
    row.note(format!(
        "the completion {} (store after the kill: {state:?}); retry: {conflicts} x 409, then {} replayed={landed}",
        if landed { "landed" } else { "was lost" },
        done.status
    ));
    if done.status != 201 {
        return Err(format!("the retry: {}", done.status));
    }
    if landed != (state.as_deref() == Some("completed")) {
        return Err(format!("the store held {state:?} but the retry replayed={landed}"));
    }
    row.assert_replays(&b, &done).await?;
    let executions = row.executions();
    let expected = if landed { 1 } else { 2 };
    Ok(Verdict {
        executions,
        expected: format!("{expected} ({})", if landed { "stored" } else { "not stored" }),
        passed: executions == expected,
    })
}

/// 5. The store goes away while the handler runs and comes back before it ends: Redis is
///    killed and restarted (a server of the row's own, with an append-only file synced on every
///    write, as the store's docs ask of a production Redis, so its records survive); PostgreSQL's
///    and MySQL's connections are all reset and new ones refused for a moment (the shared servers
///    are not restarted). The handler's outcome must still be stored once the
///    store is back: the retry replays, exactly 1 execution.
async fn store_outage(row: &Row, redis: &mut Option<RedisProcess>) -> Result<Verdict, String> {
    let via_proxy = matches!(row.store, StoreKind::Postgres | StoreKind::MySql);
    let a = row.demo("a", DELAY_MS, via_proxy).await;
    let b = row.demo("b", DELAY_MS, false).await;
    row.warm_up(&a).await?;
    let answered = row.answered();
    let first = tokio::spawn(row.transfer(&a));
    row.wait_claimed(answered).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outage = Instant::now();
    match (&row.proxy, redis.as_mut()) {
        (_, Some(server)) => {
            if !server.restart().await {
                return Err("redis-server did not restart".into());
            }
        }
        (Some(proxy), None) => {
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(800)).await;
            proxy.heal();
        }
        (None, None) => unreachable!("no outage for SQLite"),
    }
    row.note(format!("store back after {:?}", outage.elapsed()));
    let first = first.await.map_err(|e| e.to_string())??;
    row.note(format!("first request: {}; store then: {:?}", first.status, row.state().await));
    if first.status != 201 {
        row.log_of("a", &a);
        return Err(format!("the first request failed: {}", first.status));
    }
    let (done, conflicts) = row.retry(&b, row.lease * 4).await?;
    row.note(format!("retry: {conflicts} x 409, then {} replayed={}", done.status, done.replayed()));
    if !done.replayed() {
        row.log_of("a", &a);
    }
    row.assert_replays(&b, &done).await?;
    Ok(exactly(row, 1))
}

/// 6. The store becomes slower than the lease while the handler runs (every byte delayed by more
///    than the lease, both ways; for SQLite the write lock held that long), then recovers. With
///    no retry in the meantime nobody else may take the claim, so the outcome must be stored
///    when the store answers again: exactly 1 execution, and the retry replays.
///
///    With `concurrent_retry` (6b), a second process retries all along, straight to the store,
///    which is fast for it. What it sees: 409 with `Retry-After` while the lease runs; once the
///    lease has expired without a renewal landing, the claim is free, and whichever reaches the
///    store first wins. Through the slow network it is always the retry's claim: the retry runs
///    the handler a second time (2 executions), its response is the one stored, and the first
///    process's late completion is fenced off. With SQLite both wait for the write lock, and
///    either may get it first: the late completion (the retry replays it, 1 execution) or the
///    retry's claim (2). The row asserts that the count matches what the retry saw. A lease is
///    the bound of at-most-once: a store slower than the lease cannot keep a claim alive
///    against a concurrent retry.
async fn slow_store(row: &Row, concurrent_retry: bool) -> Result<Verdict, String> {
    let via_proxy = row.proxy.is_some();
    let a = row.demo("a", DELAY_MS, via_proxy).await;
    let b = row.demo("b", DELAY_MS, false).await;
    if via_proxy {
        row.warm_up(&a).await?;
    }
    let answered = row.answered();
    let sent = Instant::now();
    let first = tokio::spawn(row.transfer(&a));
    row.wait_claimed(answered).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let slow = row.lease + Duration::from_millis(500);
    match &row.proxy {
        Some(proxy) => {
            proxy.set_flow(Direction::ToServer, Flow::Delay(slow));
            proxy.set_flow(Direction::ToClient, Flow::Delay(slow));
        }
        None => row.hold_store().await?,
    }
    let recover = async {
        tokio::time::sleep(slow).await;
        row.release_store().await;
    };
    let retry = async {
        if !concurrent_retry {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some(row.retry(&b, row.lease * 4 + slow).await)
    };
    let executed = async {
        let written = row.wait_ledger(&a, Duration::from_secs(30)).await;
        written.map(|()| sent.elapsed())
    };
    let ((), retried, executed) = tokio::join!(recover, retry, executed);
    let first = first.await.map_err(|e| e.to_string())??;
    row.note(format!(
        "first request: {} replayed={}, its transfer ({DELAY_MS} ms) in the ledger {:.1}s after it was sent",
        first.status,
        first.replayed(),
        executed?.as_secs_f64()
    ));
    if let Some(retried) = retried {
        let (done, conflicts) = retried?;
        let won = !done.replayed();
        row.note(format!(
            "concurrent retry: {conflicts} x 409 while the lease ran, then {} replayed={} ({})",
            done.status,
            done.replayed(),
            if won { "its claim reached the store first" } else { "the late completion reached the store first" }
        ));
        if done.status != 201 {
            return Err(format!("the concurrent retry: {}", done.status));
        }
        row.assert_replays(&b, &done).await?;
        let executions = row.executions();
        let expected = if won { 2 } else { 1 };
        return Ok(Verdict {
            executions,
            expected: format!("{expected} ({})", if won { "retry first" } else { "completion first" }),
            passed: executions == expected,
        });
    }
    let (done, conflicts) = row.retry(&b, row.lease * 4).await?;
    row.note(format!("retry after recovery: {conflicts} x 409, then {} replayed={}", done.status, done.replayed()));
    if !done.replayed() {
        row.log_of("a", &a);
    }
    row.assert_replays(&b, &done).await?;
    Ok(exactly(row, 1))
}

/// The handler while a renewal waits for a store that stopped answering: a transfer half a
/// second longer than one heartbeat period (a third of the lease), the store stalled just after
/// the claim (SQLite: the write lock taken), so the first renewal waits. The transfer must reach
/// the ledger on time all the same: within its processing time and a second.
async fn stalled_renewal(row: &Row) -> Result<Verdict, String> {
    let delay = row.lease / 3 + Duration::from_millis(500);
    let via_proxy = row.proxy.is_some();
    let mut a = row.demo("a", delay.as_millis() as u64, via_proxy).await;
    if via_proxy {
        row.warm_up(&a).await?;
    }
    let answered = row.answered();
    let sent = Instant::now();
    let _first = tokio::spawn(row.transfer(&a));
    row.wait_claimed(answered).await?;
    row.hold_store().await?;
    let bound = delay + Duration::from_secs(1);
    let on_time = row.wait_ledger(&a, bound.saturating_sub(sent.elapsed())).await.is_ok();
    let executions = row.executions();
    let late = if on_time { Ok(()) } else { row.wait_ledger(&a, Duration::from_secs(5)).await };
    row.note(match late {
        Ok(()) => {
            format!("the {delay:?} transfer reached the ledger {:.1}s after it was sent", sent.elapsed().as_secs_f64())
        }
        Err(_) => format!(
            "the {delay:?} transfer was not in the ledger {:.1}s after it was sent",
            sent.elapsed().as_secs_f64()
        ),
    });
    a.demo.kill();
    row.release_store().await;
    row.log_of("a", &a);
    Ok(Verdict { executions, expected: format!("1 within {:.1}s", bound.as_secs_f64()), passed: on_time })
}

/// A claim sent to a store that stopped answering (the proxy blackholes both ways, so no
/// connection is refused either): the demo must fail closed, 503 with `Retry-After`, within ten
/// seconds, and execute nothing.
async fn stalled_claim(row: &Row) -> Result<Verdict, String> {
    let mut a = row.demo("a", DELAY_MS, true).await;
    row.warm_up(&a).await?;
    row.hold_store().await?;
    let sent = Instant::now();
    let bound = Duration::from_secs(10);
    let answer = tokio::time::timeout(bound, row.transfer(&a)).await;
    a.demo.kill();
    row.release_store().await;
    let executions = row.executions();
    let passed = match answer {
        Ok(Ok(r)) => {
            row.note(format!("{} after {:.1}s", r.status, sent.elapsed().as_secs_f64()));
            r.status == 503 && r.header("retry-after").is_some()
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            row.note(format!("no answer within {bound:?}"));
            false
        }
    };
    Ok(Verdict {
        executions,
        expected: format!("0, 503 within {}s", bound.as_secs()),
        passed: passed && executions == 0,
    })
}

async fn run_row(row: Row, mut redis: Option<RedisProcess>) -> RowResult {
    let started = Instant::now();
    let verdict = match row.scenario {
        Scenario::BeforeClaim => before_claim(&row).await,
        Scenario::DuringHandler => during_handler(&row).await,
        Scenario::BeforeCompletion => before_completion(&row).await,
        Scenario::DuringCompletion => during_completion(&row).await,
        Scenario::StoreOutage => store_outage(&row, &mut redis).await,
        Scenario::SlowStore => slow_store(&row, false).await,
        Scenario::SlowStoreConcurrentRetry => slow_store(&row, true).await,
        Scenario::StalledRenewal => stalled_renewal(&row).await,
        Scenario::StalledClaim => stalled_claim(&row).await,
    };
    let mut detail = row.notes.lock().unwrap().join("; ");
    let (executions, expected, passed) = match verdict {
        Ok(v) => (v.executions, v.expected, v.passed),
        Err(e) => {
            detail = format!("{e}; {detail}");
            (row.executions(), "-".into(), false)
        }
    };
    let result = RowResult {
        scenario: row.scenario,
        store: row.store,
        framework: framework(row.bin),
        executions,
        expected,
        passed,
        detail: format!("{detail} [{:.1}s]", started.elapsed().as_secs_f64()),
    };
    println!("{}", line(&result));
    result
}

fn line(r: &RowResult) -> String {
    format!(
        "crash-matrix | {:<33} | {:<8} | {:<5} | executions {} | expected {} | {} | {}",
        r.scenario.label(),
        r.store.name(),
        r.framework,
        r.executions,
        r.expected,
        if r.passed { "PASS" } else { "FAIL" },
        r.detail
    )
}

/// PostgreSQL, MySQL and Redis for the matrix, each `None` after the harness's loud skip line.
async fn servers() -> Servers {
    let mut postgres = None;
    if let Some(schema) = TestSchema::new().await {
        schema.execute(&format!("CREATE SCHEMA \"{}\"", schema.name)).await.expect("create the rows' schema");
        let url = with_param(&schema.url, &format!("options[search_path]={}", schema.name));
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&schema.url).await.unwrap();
        postgres = Some((url, schema, pool));
    }
    let mut mysql = None;
    if let Some(db) = TestDb::new().await {
        let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(4).connect(&db.url).await.unwrap();
        mysql = Some((db.url.clone(), db, pool));
    }
    let redis = idempotent_tests::redis_server::redis_url().await;
    Servers { postgres, mysql, redis }
}

/// Builds and runs `rows` concurrently (at most [`PARALLEL_ROWS`] at once), prints each as it
/// ends and then the whole table, and fails unless every row passed.
async fn run_rows(title: &str, rows: Vec<(Scenario, StoreKind)>) {
    let started = Instant::now();
    let servers = servers().await;
    let root = common::dir("crash", title);
    let leases = BINS.map(transfer_lease);
    for (bin, lease) in BINS.iter().zip(leases) {
        println!("{title}: {} transfer lease {lease:?} (from its policy report)", framework(bin));
    }
    let gate = Arc::new(Semaphore::new(PARALLEL_ROWS));
    let mut tasks = Vec::new();
    let mut skipped = Vec::new();
    for (scenario, store) in rows {
        for (bin, lease) in BINS.into_iter().zip(leases) {
            let Some((row, redis)) = row(scenario, store, bin, lease, &servers, &root).await else {
                skipped.push(format!("{} / {} / {}", scenario.label(), store.name(), framework(bin)));
                continue;
            };
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let _turn = gate.acquire_owned().await.unwrap();
                let name = row.name();
                match tokio::time::timeout(Duration::from_secs(60), run_row(row, redis)).await {
                    Ok(r) => r,
                    Err(_) => panic!("{name}: no verdict within 60 s"),
                }
            }));
        }
    }
    let mut results = Vec::new();
    let mut broken = Vec::new();
    for task in tasks {
        match task.await {
            Ok(r) => results.push(r),
            Err(e) => broken.push(e.to_string()),
        }
    }
    let mut table = String::from(
        "\n| scenario | store | framework | executions | expected | result |\n|---|---|---|---|---|---|\n",
    );
    for r in &results {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario.label(),
            r.store.name(),
            r.framework,
            r.executions,
            r.expected,
            if r.passed { "pass" } else { "FAIL" }
        );
    }
    println!("{table}");
    println!("{title}: {} rows in {:.1}s", results.len(), started.elapsed().as_secs_f64());
    for s in &skipped {
        println!("SKIPPED (no server): {s}");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(skipped.is_empty(), "CI=true forbids skipping rows: {skipped:?}");
    }
    let failed: Vec<String> = results.iter().filter(|r| !r.passed).map(line).chain(broken).collect();
    assert!(failed.is_empty(), "{} of {} rows failed:\n{}", failed.len(), results.len(), failed.join("\n"));
    // Kept after a failure: the ledgers and SQLite files of every row.
    let _ = std::fs::remove_dir_all(&root);
}

const STORES: [StoreKind; 4] = [StoreKind::Sqlite, StoreKind::Postgres, StoreKind::MySql, StoreKind::Redis];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_matrix() {
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        for store in STORES {
            // An embedded file has no server to lose.
            if !(scenario == Scenario::StoreOutage && store == StoreKind::Sqlite) {
                rows.push((scenario, store));
            }
        }
    }
    run_rows("crash-matrix", rows).await;
}

/// A store that stops answering while the handler runs must not hold up the handler: the
/// heartbeat runs on its own, and the handler runs to completion whatever the store does. A
/// transfer a little longer than one heartbeat period must reach the ledger on time while its
/// first renewal waits for a stalled store (see [`stalled_renewal`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_stops_answering_does_not_hold_up_the_handler() {
    run_rows("stalled-renewal", STORES.map(|s| (Scenario::StalledRenewal, s)).to_vec()).await;
}

/// A store that stops answering (a partition: nothing comes back, and no connection is refused
/// either) must fail closed in bounded time: 503 with `Retry-After`, nothing executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_stops_answering_fails_closed_in_bounded_time() {
    let stores = [StoreKind::Postgres, StoreKind::MySql, StoreKind::Redis];
    run_rows("stalled-claim", stores.map(|s| (Scenario::StalledClaim, s)).to_vec()).await;
}
