//! PostgreSQL store (feature `postgres`): durable, shared by any number of instances.
//!
//! # Table
//!
//! One row per record, primary key `(scope, actor, idem_key)`:
//! `fingerprint` (32 bytes), `state` (`in_progress` or `completed`), `token` (the claim's token
//! while in progress), `response` ([`StoredResponse::encode`] once completed), `expires_at` and
//! `created_at`. `expires_at` is the end of the lease while the record is in progress and the end
//! of its time to live once completed, so one column decides whether a record is live.
//!
//! Every time comes from the database clock (`now()`), never from the application's, so
//! instances with skewed clocks agree on leases and expiry.
//!
//! # The claim: one statement, one round trip
//!
//! [`Store::claim`] is a single statement that commits on its own:
//!
//! ```sql
//! WITH existing AS (SELECT ... WHERE <key>),                       -- what the snapshot sees
//!      takeover AS (UPDATE ... SET <new claim>
//!                   WHERE <key> AND expires_at <= now() RETURNING 1),  -- compare-and-set
//!      inserted AS (INSERT ... SELECT <new claim> WHERE NOT EXISTS (SELECT 1 FROM existing)
//!                   ON CONFLICT DO NOTHING RETURNING 1)
//! SELECT 'acquired' FROM takeover UNION ALL SELECT 'acquired' FROM inserted
//! UNION ALL SELECT <existing row, remaining lease> FROM existing WHERE expires_at > now()
//! ```
//!
//! - Absent: `inserted` writes the row (a concurrent insert of the same key makes it do nothing).
//! - Expired (a crashed owner's lease, or a completed record past its time to live): `takeover`
//!   rewrites it. Under `READ COMMITTED` an `UPDATE` that meets a row changed concurrently waits
//!   for that change and re-checks `expires_at <= now()` on the newest version, so of many
//!   claimers racing for one expired lease exactly one takes it: a compare-and-set, never a blind
//!   overwrite. Expired rows are thereby invisible to claims before the sweeper deletes them.
//! - Live: the statement returns the row (fingerprint, state, response, remaining lease) and
//!   writes nothing; the mismatch, replay and in-progress answers are decided from it.
//! - A race the snapshot cannot see (the row was inserted, or taken over, or deleted between the
//!   snapshot and the write) returns no row at all; the statement is simply run again. Only
//!   contended first claims ever pay that second round trip.
//!
//! Why not `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired RETURNING`: when the row is live
//! the `WHERE` fails and `RETURNING` gives nothing, so a replay needs a second query to read the
//! stored response, and `ON CONFLICT DO UPDATE` locks the conflicting row even when it updates
//! nothing, a write (and WAL record) on every replay. A plain `INSERT` that fails on the unique
//! key is worse still: each attempt leaves a dead heap tuple for vacuum. The statement above
//! makes a replay a pure index read in one round trip, and only inserts when the snapshot saw no
//! row, with `ON CONFLICT DO NOTHING` (speculative insertion) so a lost race leaves no dead
//! tuple either.
//!
//! Round trips: a first execution costs two (claim, then complete or release); a replay, a
//! mismatch or an in-progress answer costs one. Renewals add one per heartbeat. sqlx prepares
//! each statement once per connection; connections are not pinged before use, so a broken
//! connection surfaces once as [`StoreError::Unavailable`] and is then replaced.
//!
//! # Fencing
//!
//! `complete`, `release` and `renew` carry `WHERE token = $t AND state = 'in_progress'`; zero
//! rows affected is [`StoreError::Fenced`]. `renew` also refuses a lease that already expired
//! (another claimer may have seen the key as free).
//!
//! # Expiry
//!
//! Expired rows are deleted by a background task (every [`PostgresConfig::sweep_interval`], in
//! batches of [`PostgresConfig::sweep_batch`] rows locked with `SKIP LOCKED`, so several
//! instances sweeping at once do not contend), never on the request path. The task stops when
//! the store is dropped. [`PostgresStore::sweep_expired`] runs one sweep on demand.
//!
//! # Migrations
//!
//! By default the table is created on start-up (under an advisory lock, so instances starting
//! together do not race) and the applied version is recorded in `<table>_migrations`. An
//! application that manages its own migrations sets [`PostgresConfig::migrate`] to `false` and
//! applies [`PostgresStore::migration_sql`] itself.
//!
//! Connections use sqlx's PostgreSQL driver without TLS; reach a remote server through a
//! private network or a local TLS proxy.

use super::{decide, fenced, AbortOnDrop, Claim, ClaimToken, RecordKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Migrations, in order: `(version, SQL)`. `{schema_ddl}`, `{table}` and `{index}` are replaced
/// by the configured, quoted names. Every statement is idempotent.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "{schema_ddl}CREATE TABLE IF NOT EXISTS {table} (
    scope       TEXT        NOT NULL,
    actor       TEXT        NOT NULL,
    idem_key    TEXT        NOT NULL,
    fingerprint BYTEA       NOT NULL,
    state       TEXT        NOT NULL,
    token       TEXT,
    response    BYTEA,
    expires_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, actor, idem_key)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
",
)];

/// Key of the advisory lock taken while migrating (an arbitrary constant).
const MIGRATION_LOCK: i64 = 0x1de0_7e47_5701_2e01;

/// Settings of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    schema: Option<String>,
    table: String,
    migrate: bool,
    max_connections: u32,
    acquire_timeout: Duration,
    sweep_interval: Option<Duration>,
    sweep_batch: u32,
    application_name: Option<String>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            schema: None,
            table: "idempotency_records".into(),
            migrate: true,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: 1000,
            application_name: None,
        }
    }
}

impl PostgresConfig {
    /// The defaults: table `idempotency_records` on the connection's `search_path`, migrations on
    /// start-up, 10 connections, a 5 s acquire timeout, a sweep every minute in batches of 1000.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the table in `schema` (created by the migration if missing).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Names the table (default `idempotency_records`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether to apply the embedded migrations on start-up (default `true`).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Size of the connection pool (default 10).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a request waits for a connection before the store reports itself unavailable
    /// (default 5 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How often expired records are deleted; `None` disables the background sweeper (then call
    /// [`PostgresStore::sweep_expired`] yourself). Default one minute.
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Rows deleted per sweeper statement (default 1000).
    pub fn sweep_batch(mut self, batch: u32) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    /// The `application_name` the store's connections report to the server.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    fn validate(&self) -> Result<(), StoreError> {
        let ok = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('\0');
        if !ok(&self.table) || self.schema.as_deref().is_some_and(|s| !ok(s)) {
            return Err(StoreError::Config(
                "PostgreSQL table and schema names must be 1 to 63 bytes without NUL".into(),
            ));
        }
        Ok(())
    }

    fn qualified_table(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.table)),
            None => quote_ident(&self.table),
        }
    }

    fn versions_table(&self) -> String {
        let name = format!("{}_migrations", self.table);
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&name)),
            None => quote_ident(&name),
        }
    }

    fn render(&self, template: &str) -> String {
        let schema_ddl = match &self.schema {
            Some(schema) => format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)),
            None => String::new(),
        };
        template
            .replace("{schema_ddl}", &schema_ddl)
            .replace("{table}", &self.qualified_table())
            .replace("{index}", &quote_ident(&format!("{}_expires_at_idx", self.table)))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The statements of one configured store, rendered once.
#[derive(Debug)]
struct Statements {
    claim: String,
    renew: String,
    complete: String,
    release: String,
    sweep: String,
}

impl Statements {
    fn new(config: &PostgresConfig) -> Self {
        let t = config.qualified_table();
        let key = "scope = $1 AND actor = $2 AND idem_key = $3";
        Self {
            claim: format!(
                "WITH existing AS (
    SELECT fingerprint, state, response, expires_at FROM {t} WHERE {key}
), takeover AS (
    UPDATE {t} SET fingerprint = $4, state = 'in_progress', token = $5, response = NULL,
        expires_at = now() + $6::int8 * interval '1 millisecond', created_at = now()
    WHERE {key} AND expires_at <= now()
    RETURNING 1
), inserted AS (
    INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, expires_at)
    SELECT $1, $2, $3, $4, 'in_progress', $5, now() + $6::int8 * interval '1 millisecond'
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (scope, actor, idem_key) DO NOTHING
    RETURNING 1
)
SELECT TRUE AS acquired, NULL::bytea AS fingerprint, NULL::text AS state, NULL::bytea AS response,
    NULL::int8 AS remaining_ms FROM takeover
UNION ALL
SELECT TRUE, NULL, NULL, NULL, NULL FROM inserted
UNION ALL
SELECT FALSE, fingerprint, state, response,
    GREATEST(0, CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::int8
FROM existing WHERE expires_at > now()"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = now() + $5::int8 * interval '1 millisecond'
WHERE {key} AND token = $4 AND state = 'in_progress' AND expires_at > now()"
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', token = NULL, response = $5,
    expires_at = now() + $6::int8 * interval '1 millisecond'
WHERE {key} AND token = $4 AND state = 'in_progress'"
            ),
            release: format!("DELETE FROM {t} WHERE {key} AND token = $4 AND state = 'in_progress'"),
            sweep: format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {t} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED
)) AND expires_at <= now()"
            ),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    config: PostgresConfig,
    sql: Arc<Statements>,
    _sweeper: Option<AbortOnDrop>,
}

/// A [`Store`] in a PostgreSQL table; see the [module docs](self) for how it works.
///
/// Cloning is cheap and shares the pool and the sweeper.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

/// Connection failures and server errors: the store is unavailable (503, fail closed).
fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Configuration(e) => StoreError::Config(format!("PostgreSQL: {e}")),
        e => StoreError::Unavailable(format!("PostgreSQL: {e}")),
    }
}

fn millis(d: Duration) -> i64 {
    // Ten years is far beyond any lease or time to live and keeps timestamps in range.
    d.as_millis().min(10 * 365 * 24 * 3600 * 1000) as i64
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) with the default
    /// [`PostgresConfig`], applies the migrations and starts the sweeper.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresConfig::default()).await
    }

    /// Connects to `url` with `config`.
    ///
    /// An unreachable server is [`StoreError::Unavailable`]; a malformed URL or configuration is
    /// [`StoreError::Config`].
    pub async fn connect_with(url: &str, config: PostgresConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let mut options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        if let Some(name) = &config.application_name {
            options = options.application_name(name);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            // A ping before every query would double the round trips; a dead connection fails
            // one request and is then dropped by the pool.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Self::from_pool(pool, config).await
    }

    /// A store on an existing pool (shared with the application, for instance).
    pub async fn from_pool(pool: PgPool, config: PostgresConfig) -> Result<Self, StoreError> {
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
    /// manage migrations themselves (with [`PostgresConfig::migrate`] set to `false`). Every
    /// statement is idempotent (`IF NOT EXISTS`).
    pub fn migration_sql(config: &PostgresConfig) -> String {
        MIGRATIONS.iter().map(|(_, sql)| config.render(sql)).collect::<Vec<_>>().join("\n")
    }

    /// The store's connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The store's settings.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// Deletes every expired record now, in batches; returns how many were deleted.
    pub async fn sweep_expired(&self) -> Result<u64, StoreError> {
        sweep(&self.inner.pool, &self.inner.sql, self.inner.config.sweep_batch).await
    }
}

async fn sweep(pool: &PgPool, sql: &Statements, batch: u32) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n =
            sqlx::query(&sql.sweep).bind(i64::from(batch)).execute(pool).await.map_err(unavailable)?.rows_affected();
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

async fn migrate(pool: &PgPool, config: &PostgresConfig) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    if let Some(schema) = &config.schema {
        sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    let versions = config.versions_table();
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {versions} (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let current: Option<i32> = sqlx::query_scalar(&format!("SELECT max(version) FROM {versions}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
        sqlx::raw_sql(&config.render(sql)).execute(&mut *tx).await.map_err(unavailable)?;
        sqlx::query(&format!("INSERT INTO {versions} (version) VALUES ($1)"))
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// How many times a claim is retried when a concurrent change hid the row from its snapshot.
const CLAIM_ATTEMPTS: usize = 16;

/// A statement fenced by a claim's token, with the record's key and the token bound as its first
/// four parameters.
fn fenced_query<'q>(
    sql: &'q str,
    key: &'q RecordKey,
    token: &'q ClaimToken,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).bind(&key.scope).bind(&key.actor).bind(&key.key).bind(&token.0)
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, key: &RecordKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let token = ClaimToken::generate();
            let row = sqlx::query(&self.inner.sql.claim)
                .bind(&key.scope)
                .bind(&key.actor)
                .bind(&key.key)
                .bind(&fingerprint.0[..])
                .bind(&token.0)
                .bind(millis(lease))
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(unavailable)?;
            let Some(row) = row else { continue };
            let corrupt = |e: sqlx::Error| StoreError::Corrupt(format!("undecodable record: {e}"));
            if row.try_get::<bool, _>("acquired").map_err(corrupt)? {
                return Ok(Claim::Acquired(token));
            }
            let stored: Vec<u8> = row.try_get("fingerprint").map_err(corrupt)?;
            let state: String = row.try_get("state").map_err(corrupt)?;
            let response: Option<Vec<u8>> = row.try_get("response").map_err(corrupt)?;
            let remaining: i64 = row.try_get("remaining_ms").map_err(corrupt)?;
            return decide(
                fingerprint,
                &stored,
                &state,
                response.as_deref(),
                Duration::from_millis(remaining.max(0) as u64),
            );
        }
        Err(StoreError::Unavailable("PostgreSQL: claim kept losing races on one key".into()))
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        fenced(
            fenced_query(&self.inner.sql.renew, key, token)
                .bind(millis(lease))
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
                .bind(millis(ttl))
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
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_sql_quotes_names() {
        let sql = PostgresStore::migration_sql(&PostgresConfig::new().schema("app").table("we\"ird"));
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS \"app\";"));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"app\".\"we\"\"ird\""));
        assert!(sql.contains("\"we\"\"ird_expires_at_idx\""));
    }

    #[test]
    fn undecodable_rows_are_corrupt() {
        let fp = Fingerprint([7; 32]);
        let d = Duration::ZERO;
        assert!(matches!(decide(&fp, &[7; 5], "completed", None, d), Err(StoreError::Corrupt(_))));
        assert!(matches!(decide(&fp, &[7; 32], "done", None, d), Err(StoreError::Corrupt(_))));
        assert!(matches!(decide(&fp, &[7; 32], "completed", None, d), Err(StoreError::Corrupt(_))));
        assert!(matches!(decide(&fp, &[7; 32], "completed", Some(b"xx"), d), Err(StoreError::Corrupt(_))));
        assert!(matches!(decide(&fp, &[8; 32], "completed", Some(b"xx"), d), Ok(Claim::Mismatch)));
        assert!(matches!(decide(&fp, &[7; 32], "in_progress", None, d), Ok(Claim::InProgress { .. })));
    }
}
