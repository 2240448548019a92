//! A real MySQL or MariaDB server for the store tests.
//!
//! [`server_url`] finds one: `IDEMPOTENT_TEST_MYSQL_URL` when set, else
//! `mysql://root@127.0.0.1:3306/test` when it answers (creating the `test` database if the server
//! has none), else a temporary server of the test binary's own ([`MariaDbProcess`]: a data
//! directory made with `mariadb-install-db`, then `mariadbd`, from `PATH`, `/usr/sbin` or
//! `/usr/bin`) on a free loopback port, else, when the tests run as root on Debian, the
//! `mariadb-server` package installed with `apt-get` and then either of the two. The temporary
//! server lives in its own directory; a small `sh` watchdog stops it and removes the directory
//! once the test binary has exited. When no server can be had the tests print a loud `SKIPPED`
//! line and pass, except under `CI=true`, where that is a failure.
//!
//! Each test works in its own database ([`TestDb`]: a random name, created first, dropped when
//! the test ends), so tests run in parallel on one server.
//!
//! [`tls_server`] starts, once per test binary, a server of its own that serves the certificate of
//! [`crate::tls::pki`] and refuses connections in clear (`require_secure_transport`).

use crate::process::after_exit;
use crate::redis_server::{free_port, in_ci};
use async_trait::async_trait;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{
    Claim, ClaimToken, Invalidated, MySqlConfig, MySqlStore, Purge, RecordInfo, RecordKey, Store, StoreError,
};
use sqlx::{AssertSqlSafe, Connection};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

const DEFAULT_URL: &str = "mysql://root@127.0.0.1:3306/test";

static URL: OnceCell<Option<String>> = OnceCell::const_new();

/// The URL of a MySQL or MariaDB database the tests may use, or `None` (after a loud `SKIPPED`
/// line on stderr) when there is none. Panics under `CI=true` instead of skipping.
pub async fn server_url() -> Option<String> {
    let url = URL.get_or_init(find).await.clone();
    if url.is_none() {
        let msg = "SKIPPED: no MySQL or MariaDB server (set IDEMPOTENT_TEST_MYSQL_URL, run one on 127.0.0.1:3306, put mariadbd and mariadb-install-db on PATH, or install mariadb-server)";
        if in_ci() {
            panic!("{msg} (a skip is a failure under CI=true)");
        }
        eprintln!("\n==================== {msg} ====================\n");
    }
    url
}

async fn find() -> Option<String> {
    if let Ok(url) = std::env::var("IDEMPOTENT_TEST_MYSQL_URL") {
        return Some(url);
    }
    if let Some(url) = answers_or_create(DEFAULT_URL).await {
        return Some(url);
    }
    if let Some(url) = temporary_server().await {
        return Some(url);
    }
    if install_mariadb() {
        // The package starts the distribution's server; a temporary one if it did not.
        for _ in 0..20 {
            if let Some(url) = answers_or_create(DEFAULT_URL).await {
                return Some(url);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        return temporary_server().await;
    }
    None
}

/// A temporary server for the whole test binary, kept until it exits.
async fn temporary_server() -> Option<String> {
    let server = MariaDbProcess::start(&[]).await?;
    let url = answers_or_create(&server.url("test")).await;
    std::mem::forget(server);
    url
}

/// Installs Debian's `mariadb-server` when the tests run as root with `apt-get`; whether its
/// server binary is there afterwards.
fn install_mariadb() -> bool {
    if !crate::postgres::is_root() || find_bin("apt-get").is_none() {
        return false;
    }
    eprintln!("mysql tests: installing mariadb-server with apt-get");
    let quiet = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = quiet(&["update", "-qq"]);
    quiet(&["install", "-y", "-qq", "mariadb-server"]) && server_bin().is_some()
}

/// `url` when its server answers; creates the database when the server has no such database.
async fn answers_or_create(url: &str) -> Option<String> {
    match connect(url).await {
        Ok(()) => Some(url.to_owned()),
        // ER_BAD_DB_ERROR: the server answers, the database is missing.
        Err(sqlx::Error::Database(e))
            if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|e| e.number()) == Some(1049) =>
        {
            let (server, db) = url.rsplit_once('/')?;
            let db = db.split('?').next()?;
            let mut c = tokio::time::timeout(Duration::from_secs(5), sqlx::MySqlConnection::connect(server))
                .await
                .ok()?
                .ok()?;
            // The name comes from the test database URL, set by whoever runs the tests.
            let _ = sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))).execute(&mut c).await;
            let _ = c.close().await;
            connect(url).await.ok().map(|()| url.to_owned())
        }
        Err(_) => None,
    }
}

async fn connect(url: &str) -> Result<(), sqlx::Error> {
    let c = tokio::time::timeout(Duration::from_secs(5), sqlx::MySqlConnection::connect(url))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    c.close().await
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")]);
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The server binary: MariaDB's, or MySQL's under its old name.
fn server_bin() -> Option<PathBuf> {
    find_bin("mariadbd").or_else(|| find_bin("mysqld"))
}

/// `bin` run as the `mysql` user when we are root (the server refuses to run as root).
fn as_mysql(bin: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=mysql", "--regid=mysql", "--init-groups", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A `mariadbd` child process of the tests: a fresh data directory in a temporary directory of
/// its own (users `root` without a password), listening on `127.0.0.1` and `127.0.0.2` on a free
/// port, without binary log, its redo log flushed once a second. Dropping it stops the server; a
/// watchdog does so anyway when the test binary exits.
#[derive(Debug)]
pub struct MariaDbProcess {
    /// The port.
    pub port: u16,
    child: Child,
    watchdog: Option<Child>,
    /// The server's directory (data, socket, log).
    pub dir: PathBuf,
}

impl MariaDbProcess {
    /// Makes a data directory and starts the server with `extra` arguments (which may name files
    /// in [`dir_for`](Self::dir_for)'s directory), and waits until it answers; `None` when the
    /// server is not installed or does not come up.
    pub async fn start(extra: &[&str]) -> Option<Self> {
        let port = free_port(false)?;
        let dir = Self::dir_for(port);
        Self::start_in(port, dir, extra).await
    }

    /// The directory a server on `port` lives in: files for its `extra` arguments go there.
    pub fn dir_for(port: u16) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("idempotent-test-mariadb-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    /// [`start`](Self::start) on `port` in `dir` (from [`dir_for`](Self::dir_for)).
    pub async fn start_in(port: u16, dir: PathBuf, extra: &[&str]) -> Option<Self> {
        let server = server_bin()?;
        let install = find_bin("mariadb-install-db").or_else(|| find_bin("mysql_install_db"))?;
        let root = crate::postgres::is_root();
        if root && !Command::new("chown").args(["-R", "mysql:"]).arg(&dir).status().ok()?.success() {
            eprintln!("cannot give {} to the mysql user", dir.display());
            return None;
        }
        let data = dir.join("data");
        let out = as_mysql(&install, root)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let child = as_mysql(&server, root)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1,127.0.0.2", "--skip-name-resolve", "--skip-log-bin"])
            .args(["--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-size=64M"])
            .args(extra)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let watchdog =
            after_exit(&format!("kill -9 {pid} 2>/dev/null; rm -rf '{dir}'", pid = child.id(), dir = dir.display()));
        let mut server = Self { port, child, watchdog, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A server that refuses this connection in clear (a TLS server's) answers all the same.
            if matches!(connect(&server.url("mysql")).await, Ok(()) | Err(sqlx::Error::Database(_))) {
                return Some(server);
            }
            if Instant::now() > deadline || matches!(server.child.try_wait(), Ok(Some(_))) {
                eprintln!("mariadbd on port {port} did not start:\n{}", server.log());
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// `mysql://root@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for MariaDbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `url` with its database (the path) replaced by `database`, its query kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{database}{query}")
}

/// A database of its own for one test: a random name, created at once, dropped (with everything
/// in it) when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// The server's URL (its own database, `test` by default).
    pub server_url: String,
    /// The URL of the test's database.
    pub url: String,
    /// The database's name.
    pub name: String,
}

impl TestDb {
    /// A fresh database on the test server, or `None` when the tests are skipped.
    pub async fn new() -> Option<Arc<Self>> {
        let server_url = server_url().await?;
        let name = format!("idem_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_database(&server_url, &name);
        let db = Arc::new(Self { server_url, url, name });
        db.admin(&format!("CREATE DATABASE `{}`", db.name)).await.expect("create the test database");
        Some(db)
    }

    /// The store settings for this database: short sweeps, 8 connections.
    pub fn config(&self) -> MySqlConfig {
        MySqlConfig::new().database(&self.name).sweep_interval(Some(Duration::from_millis(500))).max_connections(8)
    }

    /// A store on this database with [`config`](Self::config).
    pub async fn store(self: &Arc<Self>) -> Arc<MyTestStore> {
        self.store_with(self.config()).await
    }

    /// A store on this database with `config`.
    pub async fn store_with(self: &Arc<Self>, config: MySqlConfig) -> Arc<MyTestStore> {
        let store = MySqlStore::connect_with(&self.url, config).await.expect("connect to the test database");
        Arc::new(MyTestStore { store, db: self.clone() })
    }

    /// Runs `sql`, written by the test, in the test's database (a fresh connection); returns
    /// the rows it affected.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let mut c = sqlx::MySqlConnection::connect(&self.url).await?;
        let n = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut c).await?.rows_affected();
        c.close().await?;
        Ok(n)
    }

    /// Runs `sql` on the server's own database.
    async fn admin(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let mut c = sqlx::MySqlConnection::connect(&self.server_url).await?;
        let n = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut c).await?.rows_affected();
        c.close().await?;
        Ok(n)
    }

    /// A connection to the test's database, for a test that holds a transaction open.
    pub async fn connection(&self) -> sqlx::MySqlConnection {
        sqlx::MySqlConnection::connect(&self.url).await.expect("connect to the test database")
    }

    /// Kills (`KILL`) every connection to the test's database but the caller's, as a server
    /// restart would, and waits until they are gone; returns how many there were.
    pub async fn kill_connections(&self) -> usize {
        let mut c = sqlx::MySqlConnection::connect(&self.server_url).await.expect("connect to the test server");
        let others =
            "SELECT CAST(id AS SIGNED) FROM information_schema.PROCESSLIST WHERE db = ? AND id <> CONNECTION_ID()";
        let ids: Vec<i64> = sqlx::query_scalar(others).bind(&self.name).fetch_all(&mut c).await.expect("PROCESSLIST");
        for id in &ids {
            let _ = sqlx::query("KILL ?").bind(id).execute(&mut c).await;
        }
        for _ in 0..100 {
            let left: Vec<i64> =
                sqlx::query_scalar(others).bind(&self.name).fetch_all(&mut c).await.expect("PROCESSLIST");
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.close().await;
        ids.len()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, name) = (self.server_url.clone(), self.name.clone());
        // Dropping runs inside the test's runtime; do the blocking clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut c = sqlx::MySqlConnection::connect(&url).await.ok()?;
                // The database's name is random hex made by this module.
                let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`"))).execute(&mut c).await;
                c.close().await.ok()
            })
        })
        .join();
    }
}

/// A [`MySqlStore`] that keeps its [`TestDb`] alive: the database is dropped after the last store
/// on it.
#[derive(Debug)]
pub struct MyTestStore {
    store: MySqlStore,
    db: Arc<TestDb>,
}

impl MyTestStore {
    /// The store.
    pub fn store(&self) -> &MySqlStore {
        &self.store
    }

    /// The database the store works in.
    pub fn db(&self) -> &Arc<TestDb> {
        &self.db
    }

    /// A second, independent store (its own pool) on the same database, as after a restart.
    pub async fn reopen(&self) -> Arc<MyTestStore> {
        self.db.store_with(self.store.config().clone()).await
    }
}

#[async_trait]
impl Store for MyTestStore {
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
    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
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

static TLS: OnceCell<Option<u16>> = OnceCell::const_new();

/// The port of a MariaDB server with TLS shared by the test binary's tests (it presents the
/// certificate of [`crate::tls::pki`] for `localhost` and `127.0.0.1`, listens on `127.0.0.1`
/// and `127.0.0.2`, and refuses connections in clear); `None` (after a loud `SKIPPED` line) when
/// it cannot be started.
pub async fn tls_server() -> Option<u16> {
    let port = TLS
        .get_or_init(|| async {
            let pki = crate::tls::pki();
            let port = free_port(false)?;
            let dir = MariaDbProcess::dir_for(port);
            std::fs::write(dir.join("server.crt"), &pki.server_cert_pem).ok()?;
            std::fs::write(dir.join("server.key"), &pki.server_key_pem).ok()?;
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            let args = [
                format!("--ssl-cert={}", cert.display()),
                format!("--ssl-key={}", key.display()),
                "--require-secure-transport=ON".to_owned(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server = MariaDbProcess::start_in(port, dir, &args).await?;
            std::mem::forget(server);
            Some(port)
        })
        .await;
    if port.is_none() {
        crate::tls::skip(
            "MariaDB server with TLS",
            "install mariadb-server (mariadbd and mariadb-install-db on PATH or in /usr/sbin, /usr/bin; as root, a `mysql` user and setpriv)",
        );
    }
    *port
}

/// `mysql://root@HOST:PORT/DATABASE?ssl-mode=MODE&ssl-ca=ROOT`.
pub fn tls_url(port: u16, host: &str, database: &str, ssl_mode: &str, root: &Path) -> String {
    format!("mysql://root@{host}:{port}/{database}?ssl-mode={ssl_mode}&ssl-ca={}", root.display())
}
