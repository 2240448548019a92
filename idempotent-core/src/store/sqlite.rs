//! SQLite store (feature `sqlite`): the embedded, durable default for a single host.
//!
//! `sqlite:PATH` (or `sqlite://PATH`) opens the database file, creating it if missing, in WAL
//! mode (readers never wait for the writer) with `synchronous = NORMAL` and a busy timeout, so
//! concurrent requests queue for the write lock instead of failing with "database is locked".
//! `sqlite::memory:` gives a database shared by the store's connections and lost on drop.
//!
//! # Table
//!
//! The same layout as the PostgreSQL store: primary key `(scope, actor, idem_key)`,
//! `fingerprint` (32 bytes), `state` (`in_progress` or `completed`), `token`, `response`
//! ([`StoredResponse::encode`]), `expires_at` and `created_at` in milliseconds since the Unix
//! epoch. `expires_at` is the end of the lease while in progress and the end of the time to live
//! once completed.
//!
//! # Clock
//!
//! SQLite has no server clock: leases and expiry use this process's wall clock
//! ([`SystemTime`]). Processes sharing a database file share the host's clock; a clock step
//! shortens or lengthens leases and lifetimes by the size of the step.
//!
//! # Atomicity
//!
//! A claim first reads the record without a lock: a live record (replay, mismatch, in progress)
//! is answered from that read, with no write. Otherwise the claim runs in a `BEGIN IMMEDIATE`
//! transaction, which holds SQLite's single write lock from its start: it reads the record again
//! and, if it is still absent or expired, inserts or overwrites it. No other writer can run
//! between that read and that write, so of many concurrent claimers exactly one acquires.
//! `complete`, `release` and `renew` are single statements fenced by the token, like the
//! PostgreSQL store's.
//!
//! Expired records are treated as absent by claims and deleted by a background task in batches,
//! off the request path; the task stops when the store is dropped.

use super::{decide, fenced, AbortOnDrop, Claim, ClaimToken, RecordKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Migrations, in order: `(version, SQL)`. `{table}` and `{index}` are replaced by the
/// configured, quoted names. Every statement is idempotent.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS {table} (
    scope       TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    idem_key    TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,
    state       TEXT    NOT NULL,
    token       TEXT,
    response    BLOB,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, actor, idem_key)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
",
)];

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    table: String,
    migrate: bool,
    max_connections: u32,
    busy_timeout: Duration,
    sweep_interval: Option<Duration>,
    sweep_batch: u32,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            table: "idempotency_records".into(),
            migrate: true,
            max_connections: 4,
            busy_timeout: Duration::from_secs(10),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: 500,
        }
    }
}

impl SqliteConfig {
    /// The defaults: table `idempotency_records`, migrations on start-up, 4 connections, a 10 s
    /// busy timeout, a sweep every minute in batches of 500.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the table (default `idempotency_records`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether to create the table on start-up (default `true`).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Size of the connection pool (default 4).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a statement waits for SQLite's write lock before the store reports itself
    /// unavailable (default 10 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How often expired records are deleted; `None` disables the background sweeper (then call
    /// [`SqliteStore::sweep_expired`] yourself). Default one minute.
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Rows deleted per sweeper statement (default 500).
    pub fn sweep_batch(mut self, batch: u32) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    fn validate(&self) -> Result<(), StoreError> {
        if self.table.is_empty() || self.table.contains('\0') {
            return Err(StoreError::Config("SQLite table name must be non-empty without NUL".into()));
        }
        Ok(())
    }

    fn render(&self, template: &str) -> String {
        template
            .replace("{table}", &quote_ident(&self.table))
            .replace("{index}", &quote_ident(&format!("{}_expires_at_idx", self.table)))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[derive(Debug)]
struct Statements {
    select: String,
    upsert: String,
    renew: String,
    complete: String,
    release: String,
    sweep: String,
}

impl Statements {
    fn new(config: &SqliteConfig) -> Self {
        let t = quote_ident(&config.table);
        let key = "scope = ?1 AND actor = ?2 AND idem_key = ?3";
        Self {
            select: format!("SELECT fingerprint, state, response, expires_at FROM {t} WHERE {key}"),
            upsert: format!(
                "INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
VALUES (?1, ?2, ?3, ?4, 'in_progress', ?5, NULL, ?6, ?7)
ON CONFLICT (scope, actor, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,
    state = 'in_progress', token = excluded.token, response = NULL,
    expires_at = excluded.expires_at, created_at = excluded.created_at"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = ?5 WHERE {key} AND token = ?4 AND state = 'in_progress' AND expires_at > ?6"
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', token = NULL, response = ?5, expires_at = ?6
WHERE {key} AND token = ?4 AND state = 'in_progress'"
            ),
            release: format!("DELETE FROM {t} WHERE {key} AND token = ?4 AND state = 'in_progress'"),
            sweep: format!(
                "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE expires_at <= ?1 LIMIT ?2)"
            ),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pool: SqlitePool,
    config: SqliteConfig,
    sql: Arc<Statements>,
    _sweeper: Option<AbortOnDrop>,
}

/// A [`Store`] in a SQLite database; see the [module docs](self) for how it works.
///
/// Cloning is cheap and shares the pool and the sweeper.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Configuration(e) => StoreError::Config(format!("SQLite: {e}")),
        e => StoreError::Unavailable(format!("SQLite: {e}")),
    }
}

/// Milliseconds since the Unix epoch on this process's clock.
fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn millis(d: Duration) -> i64 {
    // Ten years is far beyond any lease or time to live and keeps sums in range.
    d.as_millis().min(10 * 365 * 24 * 3600 * 1000) as i64
}

impl SqliteStore {
    /// Opens `spec` (`sqlite:PATH`, `sqlite://PATH` or `sqlite::memory:`) with the default
    /// [`SqliteConfig`], creating the file and the table if missing, and starts the sweeper.
    pub async fn connect(spec: &str) -> Result<Self, StoreError> {
        Self::connect_with(spec, SqliteConfig::default()).await
    }

    /// Opens `spec` with `config`.
    pub async fn connect_with(spec: &str, config: SqliteConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let options = SqliteConnectOptions::from_str(spec)
            .map_err(|e| StoreError::Config(format!("invalid SQLite store `{spec}`: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(config.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.busy_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Self::from_pool(pool, config).await
    }

    /// A store on an existing pool. The pool's connections should have a busy timeout; in WAL
    /// mode, readers never wait.
    pub async fn from_pool(pool: SqlitePool, config: SqliteConfig) -> Result<Self, StoreError> {
        config.validate()?;
        if config.migrate {
            migrate(&pool, &config).await?;
        }
        let sql = Arc::new(Statements::new(&config));
        let sweeper = config.sweep_interval.map(|interval| {
            let (pool, sql, batch) = (pool.clone(), sql.clone(), config.sweep_batch);
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match sweep(&pool, &sql, batch).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(deleted = n, "idempotency store: expired records swept"),
                        Err(e) => tracing::warn!(error = %e, "idempotency store: sweeping expired records failed"),
                    }
                }
            }))
        });
        Ok(Self { inner: Arc::new(Inner { pool, config, sql, _sweeper: sweeper }) })
    }

    /// The SQL that creates the store's table and index for `config`, for applications that
    /// manage migrations themselves (with [`SqliteConfig::migrate`] set to `false`). Every
    /// statement is idempotent (`IF NOT EXISTS`).
    pub fn migration_sql(config: &SqliteConfig) -> String {
        MIGRATIONS.iter().map(|(_, sql)| config.render(sql)).collect::<Vec<_>>().join("\n")
    }

    /// The store's connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The store's settings.
    pub fn config(&self) -> &SqliteConfig {
        &self.inner.config
    }

    /// Deletes every expired record now, in batches; returns how many were deleted.
    pub async fn sweep_expired(&self) -> Result<u64, StoreError> {
        sweep(&self.inner.pool, &self.inner.sql, self.inner.config.sweep_batch).await
    }

    async fn read(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Result<Option<Claim>, StoreError> {
        let row = sqlx::query(&self.inner.sql.select)
            .bind(&key.scope)
            .bind(&key.actor)
            .bind(&key.key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        live(row, fingerprint, now_ms())
    }
}

/// The answer a live row gives, or `None` when the row is absent or expired.
fn live(
    row: Option<sqlx::sqlite::SqliteRow>,
    fingerprint: &Fingerprint,
    now: i64,
) -> Result<Option<Claim>, StoreError> {
    let Some(row) = row else { return Ok(None) };
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(format!("undecodable record: {e}"));
    let expires_at: i64 = row.try_get("expires_at").map_err(corrupt)?;
    if expires_at <= now {
        return Ok(None);
    }
    let stored: Vec<u8> = row.try_get("fingerprint").map_err(corrupt)?;
    let state: String = row.try_get("state").map_err(corrupt)?;
    let response: Option<Vec<u8>> = row.try_get("response").map_err(corrupt)?;
    let remaining = Duration::from_millis((expires_at - now) as u64);
    decide(fingerprint, &stored, &state, response.as_deref(), remaining).map(Some)
}

async fn sweep(pool: &SqlitePool, sql: &Statements, batch: u32) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = sqlx::query(&sql.sweep)
            .bind(now_ms())
            .bind(i64::from(batch))
            .execute(pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
        // Let waiting writers in between batches.
        tokio::task::yield_now().await;
    }
}

async fn migrate(pool: &SqlitePool, config: &SqliteConfig) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
    let versions = quote_ident(&format!("{}_migrations", config.table));
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {versions} (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    ))
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let current: Option<i64> = sqlx::query_scalar(&format!("SELECT max(version) FROM {versions}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
        sqlx::raw_sql(&config.render(sql)).execute(&mut *tx).await.map_err(unavailable)?;
        sqlx::query(&format!("INSERT INTO {versions} (version, applied_at) VALUES (?1, ?2)"))
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// A statement fenced by a claim's token, with the record's key and the token bound as its first
/// four parameters.
fn fenced_query<'q>(
    sql: &'q str,
    key: &'q RecordKey,
    token: &'q ClaimToken,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    sqlx::query(sql).bind(&key.scope).bind(&key.actor).bind(&key.key).bind(&token.0)
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, key: &RecordKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
        // Fast path: a live record is answered without taking the write lock.
        if let Some(answer) = self.read(key, fingerprint).await? {
            return Ok(answer);
        }
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let now = now_ms();
        let row = sqlx::query(&self.inner.sql.select)
            .bind(&key.scope)
            .bind(&key.actor)
            .bind(&key.key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        if let Some(answer) = live(row, fingerprint, now)? {
            tx.commit().await.map_err(unavailable)?;
            return Ok(answer);
        }
        let token = ClaimToken::generate();
        sqlx::query(&self.inner.sql.upsert)
            .bind(&key.scope)
            .bind(&key.actor)
            .bind(&key.key)
            .bind(&fingerprint.0[..])
            .bind(&token.0)
            .bind(now.saturating_add(millis(lease)))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Claim::Acquired(token))
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        let now = now_ms();
        fenced(
            fenced_query(&self.inner.sql.renew, key, token)
                .bind(now.saturating_add(millis(lease)))
                .bind(now)
                .execute(&self.inner.pool)
                .await
                .map_err(unavailable)?
                .rows_affected(),
        )
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        fenced(
            fenced_query(&self.inner.sql.complete, key, token)
                .bind(response.encode())
                .bind(now_ms().saturating_add(millis(ttl)))
                .execute(&self.inner.pool)
                .await
                .map_err(unavailable)?
                .rows_affected(),
        )
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        fenced(
            fenced_query(&self.inner.sql.release, key, token)
                .execute(&self.inner.pool)
                .await
                .map_err(unavailable)?
                .rows_affected(),
        )
    }

    fn name(&self) -> &'static str {
        "sqlite"
    }
}
