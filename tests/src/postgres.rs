//! A real PostgreSQL server for the store tests.
//!
//! [`database_url`] finds one: `IDEMPOTENT_TEST_DATABASE_URL` when set, else
//! `postgres://postgres@127.0.0.1:5432/test` when it answers (creating the `test` database if the
//! server has none), else the distribution's cluster started with `pg_ctlcluster`, else a
//! temporary cluster made with `initdb` and `pg_ctl` (from `PATH` or `/usr/lib/postgresql/*/bin`)
//! on a free loopback port. The temporary cluster lives in its own directory; a small `sh`
//! watchdog stops it and removes the directory once the test binary has exited. When no server
//! can be had the tests print a loud `SKIPPED` line and pass, except under `CI=true`, where that
//! is a failure.
//!
//! Each test works in its own schema ([`TestSchema`]: random name, created by the store's
//! migration and dropped when the test ends), so tests run in parallel on one database.

use async_trait::async_trait;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{
    Claim, ClaimToken, Invalidated, PostgresConfig, PostgresStore, Purge, RecordKey, Store, StoreError,
};
use sqlx::{AssertSqlSafe, Connection};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

static URL: OnceCell<Option<String>> = OnceCell::const_new();

/// The URL of a PostgreSQL database the tests may use, or `None` (after a loud `SKIPPED` line on
/// stderr) when there is none. Panics under `CI=true` instead of skipping.
pub async fn database_url() -> Option<String> {
    let url = URL.get_or_init(find).await.clone();
    if url.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("no PostgreSQL server for the store tests (CI=true forbids skipping): set IDEMPOTENT_TEST_DATABASE_URL or install PostgreSQL");
        }
        eprintln!("SKIPPED: no PostgreSQL server (set IDEMPOTENT_TEST_DATABASE_URL, run one on 127.0.0.1:5432, or put initdb on PATH)");
    }
    url
}

async fn find() -> Option<String> {
    if let Ok(url) = std::env::var("IDEMPOTENT_TEST_DATABASE_URL") {
        return Some(url);
    }
    if let Some(url) = answers_or_create(DEFAULT_URL).await {
        return Some(url);
    }
    if let Ok(versions) = std::fs::read_dir("/etc/postgresql") {
        for v in versions.flatten() {
            let _ = Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &v.file_name().to_string_lossy(), "main", "start"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for _ in 0..20 {
            if let Some(url) = answers_or_create(DEFAULT_URL).await {
                return Some(url);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    start_temporary_cluster().await
}

/// `url` when its server answers; creates the database when the server has no such database.
async fn answers_or_create(url: &str) -> Option<String> {
    match connect(url).await {
        Ok(()) => Some(url.to_owned()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let (server, db) = url.rsplit_once('/')?;
            let mut c = tokio::time::timeout(
                Duration::from_secs(5),
                sqlx::PgConnection::connect(&format!("{server}/postgres")),
            )
            .await
            .ok()?
            .ok()?;
            // The name comes from the test database URL, set by whoever runs the tests.
            let _ = sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{db}\""))).execute(&mut c).await;
            connect(url).await.ok().map(|()| url.to_owned())
        }
        Err(_) => None,
    }
}

async fn connect(url: &str) -> Result<(), sqlx::Error> {
    let c = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    c.close().await
}

fn bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = versions.flatten().map(|e| e.path().join("bin")).collect();
        v.sort();
        dirs.extend(v.into_iter().rev());
    }
    dirs
}

pub(crate) fn find_bin(name: &str) -> Option<PathBuf> {
    bin_dirs().into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_cluster_owner(bin: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

async fn start_temporary_cluster() -> Option<String> {
    let initdb = find_bin("initdb")?;
    let pg_ctl = find_bin("pg_ctl")?;
    let root = is_root();
    let dir = std::env::temp_dir().join(format!("idempotent-test-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    if root {
        Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().ok()?;
    }
    let data = dir.join("data");
    let ok = as_cluster_owner(&initdb, root)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let ok = as_cluster_owner(&pg_ctl, root)
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .arg("-o")
        .arg(format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", dir.display()))
        .args(["-w", "start"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    // Stop the cluster and remove its directory once this test binary exits.
    let stop = format!(
        "{} '{}' -D '{}' -m immediate stop",
        if root { "runuser -u postgres --" } else { "" },
        pg_ctl.display(),
        data.display()
    );
    let _ = crate::process::after_exit(&format!("{stop} >/dev/null 2>&1; rm -rf '{}'", dir.display()));
    answers_or_create(&format!("postgres://postgres@127.0.0.1:{port}/test")).await
}

/// A schema of its own for one test: a random name, created by the store's migration, dropped
/// (with everything in it) when the value is dropped.
#[derive(Debug)]
pub struct TestSchema {
    /// The database URL.
    pub url: String,
    /// The schema's name, also the `application_name` of the test's connections.
    pub name: String,
}

impl TestSchema {
    /// A fresh schema name on the test database, or `None` when the tests are skipped.
    pub async fn new() -> Option<Arc<Self>> {
        let url = database_url().await?;
        Some(Arc::new(Self { url, name: format!("idem_test_{}", uuid::Uuid::new_v4().simple()) }))
    }

    /// The store settings for this schema: short sweeps, connections named after the schema.
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig::new()
            .schema(&self.name)
            .application_name(&self.name)
            .sweep_interval(Some(Duration::from_millis(500)))
            .max_connections(8)
    }

    /// A store on this schema with [`config`](Self::config).
    pub async fn store(self: &Arc<Self>) -> Arc<PgTestStore> {
        self.store_with(self.config()).await
    }

    /// A store on this schema with `config`.
    pub async fn store_with(self: &Arc<Self>, config: PostgresConfig) -> Arc<PgTestStore> {
        let store = PostgresStore::connect_with(&self.url, config).await.expect("connect to the test database");
        Arc::new(PgTestStore { store, schema: self.clone() })
    }

    /// Runs `sql`, written by the test, on the test database (a fresh connection).
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let mut c = sqlx::PgConnection::connect(&self.url).await?;
        let n = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut c).await?.rows_affected();
        c.close().await?;
        Ok(n)
    }

    /// The one `bigint` that `sql`, written by the test, selects (a fresh connection).
    pub async fn query_scalar(&self, sql: &str) -> Result<i64, sqlx::Error> {
        let mut c = sqlx::PgConnection::connect(&self.url).await?;
        let n = sqlx::query_scalar(AssertSqlSafe(sql.to_owned())).fetch_one(&mut c).await?;
        c.close().await?;
        Ok(n)
    }

    /// Terminates (`pg_terminate_backend`) every backend whose `application_name` is
    /// `application_name`, as a server restart would, and waits until they are gone; returns how
    /// many there were.
    pub async fn kill_backends(&self, application_name: &str) -> usize {
        let mut c = sqlx::PgConnection::connect(&self.url).await.expect("connect to the test database");
        let killed: Vec<bool> =
            sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                .bind(application_name)
                .fetch_all(&mut c)
                .await
                .expect("pg_terminate_backend");
        for _ in 0..100 {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(application_name)
                .fetch_one(&mut c)
                .await
                .expect("pg_stat_activity");
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.close().await;
        killed.len()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Dropping runs inside the test's runtime; do the blocking clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
                // The schema's name is random hex made by this module.
                let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")))
                    .execute(&mut c)
                    .await;
                c.close().await.ok()
            })
        })
        .join();
    }
}

/// A [`PostgresStore`] that keeps its [`TestSchema`] alive: the schema is dropped after the last
/// store on it.
#[derive(Debug)]
pub struct PgTestStore {
    store: PostgresStore,
    schema: Arc<TestSchema>,
}

impl PgTestStore {
    /// The store.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// The schema the store works in.
    pub fn schema(&self) -> &Arc<TestSchema> {
        &self.schema
    }

    /// A second, independent store (its own pool) on the same schema, as after a restart.
    pub async fn reopen(&self) -> Arc<PgTestStore> {
        self.schema.store_with(self.store.config().clone()).await
    }
}

#[async_trait]
impl Store for PgTestStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.store.claim_as(key, fingerprint, lease, token).await
    }
    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.store.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.complete(key, token, response, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        self.store.release(key, token).await
    }
    async fn inspect(&self, key: &RecordKey) -> Result<Option<idempotent_core::store::RecordInfo>, StoreError> {
        self.store.inspect(key).await
    }
    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.store.invalidate(key, purge).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.store.health().await
    }
    fn name(&self) -> &'static str {
        self.store.name()
    }
}

/// `url` with another user name (and password) and another `host:port`, where given.
pub fn url_with(url: &str, user: Option<(&str, &str)>, host_port: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (userinfo, rest) = match rest.split_once('@') {
        Some((u, r)) if !u.contains('/') => (Some(u), r),
        _ => (None, rest),
    };
    let (host, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let userinfo = match (user, userinfo) {
        (Some((user, password)), _) => Some(format!("{user}:{password}")),
        (None, u) => u.map(str::to_owned),
    };
    let host = host_port.unwrap_or(host);
    match userinfo {
        Some(u) => format!("{scheme}://{u}@{host}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// A login role of its own for one test (superuser, so it can create the test's schema), with
/// settings of its own (`ALTER ROLE ... SET`); dropped, with what it owns, when the value is
/// dropped. Drop the stores connected as the role first.
#[derive(Debug)]
pub struct TestRole {
    admin_url: String,
    /// The role's name.
    pub name: String,
    /// The test database's URL, connecting as the role.
    pub url: String,
}

impl TestRole {
    /// A new role on the test database behind `schema`.
    pub async fn new(schema: &TestSchema) -> Self {
        let name = format!("idem_role_{}", uuid::Uuid::new_v4().simple());
        schema
            .execute(&format!("CREATE ROLE \"{name}\" LOGIN SUPERUSER PASSWORD '{name}'"))
            .await
            .expect("create the test role");
        let url = url_with(&schema.url, Some((&name, &name)), None);
        Self { admin_url: schema.url.clone(), name, url }
    }

    /// Sets `default_transaction_isolation` for the role's new sessions.
    pub async fn set_default_isolation(&self, level: &str) {
        let mut c = sqlx::PgConnection::connect(&self.admin_url).await.expect("connect to the test database");
        // The level is one of PostgreSQL's four, written by the test.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER ROLE \"{}\" SET default_transaction_isolation = '{level}'",
            self.name
        )))
        .execute(&mut c)
        .await
        .expect("ALTER ROLE");
        let _ = c.close().await;
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
                // The role's name is random hex made by this module.
                let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
                     DROP OWNED BY \"{name}\" CASCADE; DROP ROLE IF EXISTS \"{name}\""
                )))
                .execute(&mut c)
                .await;
                c.close().await.ok()
            })
        })
        .join();
    }
}

/// A TCP proxy in front of the test server that can lose an answer or refuse connections.
///
/// [`lose_next_answer`](Self::lose_next_answer): the next time the server answers on any
/// connection ([`lose_answer_after`](Self::lose_answer_after): once it has answered that many
/// times), the proxy closes that connection (both ways) instead of passing the answer on: the
/// statement ran and committed, its caller never hears of it.
/// [`refuse`](Self::refuse): new connections are closed at once, as by a server that is down.
#[derive(Debug)]
pub struct LossyProxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// 0: pass every answer; n: lose the n-th answer from now.
    lose: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    /// A proxy on a free loopback port in front of the server of `url`.
    pub async fn start(url: &str) -> Self {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("a PostgreSQL URL");
        Self::start_at(format!("{}:{}", opts.get_host(), opts.get_port())).await
    }

    /// A proxy on a free loopback port in front of the server at `upstream` (`host:port`).
    pub async fn start_at(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address").to_string();
        let (lose, refuse) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (l, r) = (lose.clone(), refuse.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let (upstream, lose) = (upstream.clone(), l.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let forward = tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_server).await });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from_server.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let countdown = lose.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                        if countdown == Ok(1) || to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Dropping every half closes both connections.
                    forward.abort();
                });
            }
        });
        Self { addr, lose, refuse, task }
    }

    /// `url` through the proxy.
    pub fn url(&self, url: &str) -> String {
        url_with(url, None, Some(&self.addr))
    }

    /// Loses the next answer the server sends on any connection (and that connection).
    pub fn lose_next_answer(&self) {
        self.lose_answer_after(0);
    }

    /// Passes the server's next `answers` answers (on any connection), then loses the one after
    /// (and its connection).
    pub fn lose_answer_after(&self, answers: usize) {
        self.lose.store(answers + 1, Ordering::SeqCst);
    }

    /// Whether an answer is still to be lost.
    pub fn losing(&self) -> bool {
        self.lose.load(Ordering::SeqCst) != 0
    }

    /// Closes new connections at once (`true`) or forwards them again (`false`).
    pub fn refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
