//! What the SQL stores share: [`SqlConfig`] and [`SqlStore`], generic over the database
//! ([`Backend`]); `PostgresConfig` and `PostgresStore` are `SqlConfig<sqlx::Postgres>` and
//! `SqlStore<sqlx::Postgres>`, `SqliteConfig` and `SqliteStore` the same over `sqlx::Sqlite`,
//! `MySqlConfig` and `MySqlStore` over `sqlx::MySql`.
//!
//! Everything the SQL stores do alike lives here, once, so that a fix reaches them all: the
//! settings and their builder, table names (validation, quoting, rendering of the migrations),
//! running the migrations, the background sweeper, statements fenced by a claim's token, the
//! retries of a statement after a conflict or a lost connection, decoding stored rows and
//! mapping driver errors. `postgres.rs`, `sqlite.rs` and `mysql.rs` keep only what is
//! theirs: their SQL, their connection setup and settings, what they learn from a pool when the
//! store starts ([`Backend::Session`]), which of their errors are worth running again
//! ([`Backend::failure`]), and their [`Store`](super::Store) impl (how a claim runs).
//!
//! # Who holds a record, in SQL
//!
//! Every SQL store follows the rule of [`Store`](super::Store): a token holds its record until the
//! record is completed or released, or another claim takes it over, whether or not its lease is
//! still running. `renew`, `complete` and `release` are therefore fenced by the token and the
//! state only (`token = ? AND state = 'in_progress'`), never by the lease: a claim that takes an
//! expired lease over writes a new token, and that is what fences the late worker out. The
//! sweeper deletes a completed record at its `expires_at`, and an in-progress record only
//! [`ABANDONED_CLAIM_RETENTION`] after its lease ended, so a worker slowed past its lease can
//! still store its outcome for that long.

use super::{
    epoch_millis, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, RecordState, StoreError,
    ABANDONED_CLAIM_RETENTION,
};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::transaction::{OutcomeTransaction, TransactionalStore, TxDatabase, TxError};
use async_trait::async_trait;
use sqlx::query::Query;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use sqlx::{pool::PoolConnection, Connection};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Pool, Row, SqlSafeStr, SqlStr, Transaction, Type};
use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

/// A database the SQL stores run on: what its store does differently, besides its `Store` impl.
///
/// Implemented by `sqlx::Postgres` (feature `postgres`), `sqlx::Sqlite` (feature `sqlite`) and
/// `sqlx::MySql` (feature `mysql`); sealed.
#[async_trait]
pub trait Backend: Database + sealed::Sealed {
    /// The store's name ([`Store::name`](super::Store::name)): the `store` label of its metrics.
    const STORE: &'static str;
    /// Default size of the connection pool.
    const MAX_CONNECTIONS: u32;
    /// Default number of rows deleted per sweeper statement.
    const SWEEP_BATCH: u32;
    /// Longest table or schema name, in bytes.
    const MAX_NAME_LEN: usize;
    /// The rule table and schema names break when they are invalid, as the error says it.
    const NAME_RULE: &'static str;
    /// Migrations, in order: `(version, SQL)`. `{schema_ddl}`, `{table}`, `{index}`,
    /// `{lease_index}` and `{actor_index}` are replaced by the configured, quoted names
    /// (`{qualified_actor_index}`: in the table's schema, as `DROP INDEX` names it). A version once released is
    /// never edited: a change of the table is a new version. Version 1 is idempotent (`IF NOT
    /// EXISTS`); a later one may not be (SQLite cannot add a column only if it is missing), and
    /// runs once, as the table of applied versions records.
    const MIGRATIONS: &'static [(i32, &'static str)];
    /// What a conflict the database cancels a statement for is called, for the log line of a
    /// statement run again after one.
    const CONFLICT: &'static str = "conflict";

    /// The settings only this database has (timeouts, connection names).
    type Settings: fmt::Debug + Clone + Default + Send + Sync + 'static;
    /// The statements of one configured store, rendered once (with `rendered`).
    type Statements: fmt::Debug + Send + Sync + 'static;
    /// What the store learns from its pool when it starts and keeps beside it (PostgreSQL: how
    /// its statements get `READ COMMITTED`; SQLite: the connection that keeps an in-memory
    /// database alive).
    type Session: fmt::Debug + Send + Sync + 'static;

    /// Renders the statements for `config`, which has been validated.
    fn statements(config: &SqlConfig<Self>) -> Self::Statements;

    /// Looks at `pool` when the store starts; `own` when the store opened the pool itself (with
    /// its own connection settings), not when an application handed it in.
    async fn attach(pool: &Pool<Self>, own: bool) -> Result<Self::Session, sqlx::Error>;

    /// The statements every SQL store runs alike.
    fn common(sql: &Self::Statements) -> &CommonStatements;

    /// `name` as a quoted identifier of this database (`"name"`; MySQL: `` `name` ``).
    fn quote_ident(name: &str) -> String {
        quote_ident(name)
    }

    /// Binds `key` as the first parameters of `query`: its scope, actor and key (PostgreSQL,
    /// SQLite), or the digest the record is filed under (MySQL).
    fn bind_key(query: Query<'static, Self, Self::Arguments>, key: &RecordKey) -> Query<'static, Self, Self::Arguments>
    where
        String: Type<Self> + for<'e> Encode<'e, Self>,
    {
        query.bind(&key.scope).bind(&key.actor).bind(&key.key)
    }

    /// What `e` tells about running its statement again (after a conflict, once more after a lost
    /// connection); by default nothing: it is not run again.
    fn failure(_e: &sqlx::Error) -> Failure {
        Failure::Other
    }

    /// The fenced completion: stores `response` (encoded) as `key`'s outcome for `ttl` if
    /// `token` holds the claim; no row touched when it does not.
    fn complete_query(
        sql: &Self::Statements,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> Query<'static, Self, Self::Arguments>;

    /// The fenced completion inside a transactional route's transaction (see
    /// [`OutcomeTransaction::commit`]); by default [`complete_query`](Self::complete_query).
    fn outcome_query(
        sql: &Self::Statements,
        _session: &Self::Session,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> Query<'static, Self, Self::Arguments> {
        Self::complete_query(sql, key, token, response, ttl)
    }

    /// Opens the transaction a transactional route's handler writes in.
    async fn begin_outcome(
        pool: &Pool<Self>,
        session: &Self::Session,
    ) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// Runs `query` inside `tx`; returns how many rows it affected.
    async fn execute_in(
        tx: &mut Transaction<'static, Self>,
        query: Query<'static, Self, Self::Arguments>,
    ) -> Result<u64, sqlx::Error>;

    /// Right after [`begin_outcome`](Self::begin_outcome), in the new transaction: what this
    /// database does when a transactional route's transaction opens. The answer identifies the
    /// transaction to the hooks below. By default nothing.
    async fn outcome_opened(store: &SqlStore<Self>, tx: &mut Transaction<'static, Self>) -> Result<u64, sqlx::Error> {
        let _ = (store, tx);
        Ok(0)
    }

    /// In transaction `id`, before its outcome is written and it commits (or after the
    /// handler's writes were rolled back, by [`outcome_rollback`](Self::outcome_rollback)): what
    /// else it commits. By default nothing.
    async fn outcome_closing(
        store: &SqlStore<Self>,
        tx: &mut Transaction<'static, Self>,
        id: u64,
    ) -> Result<(), sqlx::Error> {
        let _ = (store, tx, id);
        Ok(())
    }

    /// Rolls back the writes of transaction `id`'s handler. By default the whole transaction.
    async fn outcome_rollback(
        store: &SqlStore<Self>,
        tx: Transaction<'static, Self>,
        id: u64,
    ) -> Result<(), sqlx::Error> {
        let _ = (store, id);
        tx.rollback().await
    }

    /// Transaction `id` ended, however it did (committed, rolled back, or dropped with its
    /// task); `settled` when what [`outcome_closing`](Self::outcome_closing) wrote was
    /// committed. Called from `Drop`: it must not block. By default nothing.
    fn outcome_ended(store: &SqlStore<Self>, id: u64, settled: bool) {
        let _ = (store, id, settled);
    }

    /// After a `COMMIT` whose answer was lost: whether it committed, which the record shows by
    /// being completed under `token`.
    async fn committed(store: &SqlStore<Self>, key: &RecordKey, token: &ClaimToken) -> Result<bool, StoreError>;

    /// One sweeper statement: deletes at most `batch` records that are past their time to live
    /// (completed) or abandoned for [`ABANDONED_CLAIM_RETENTION`] (in progress).
    fn sweep_query(sql: &Self::Statements, batch: i64) -> Query<'static, Self, Self::Arguments>;

    /// After a sweep, what keeps the store's statements fast as the table grows: PostgreSQL
    /// analyzes the table when autovacuum has not (see its module docs, "Plans and statistics").
    /// By default nothing.
    async fn maintain(pool: &Pool<Self>, sql: &Self::Statements) -> Result<(), sqlx::Error> {
        let _ = (pool, sql);
        Ok(())
    }

    /// Runs `query` on `pool`; returns how many rows it affected.
    async fn execute(
        pool: &Pool<Self>,
        session: &Self::Session,
        query: Query<'static, Self, Self::Arguments>,
    ) -> Result<u64, sqlx::Error>;

    /// Opens the migrations' transaction, which keeps other instances from migrating until it
    /// ends, and creates the schema and the table of applied versions (`versions`) if missing.
    async fn begin_migration(
        pool: &Pool<Self>,
        config: &SqlConfig<Self>,
        versions: &str,
    ) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// The newest version recorded in `versions`, if any.
    async fn applied_version(conn: &mut Self::Connection, versions: &str) -> Result<Option<i32>, sqlx::Error>;

    /// Runs one migration's rendered `sql` and records its `version` in `versions`.
    async fn apply_migration(
        conn: &mut Self::Connection,
        versions: &str,
        version: i32,
        sql: SqlStr,
    ) -> Result<(), sqlx::Error>;

    /// Ends the migrations' transaction: commits it (MySQL also lets the next instance in).
    async fn end_migration(tx: Transaction<'static, Self>) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    /// Connection failures and server errors: the store is unavailable (503, fail closed); a
    /// driver configuration error is a configuration error.
    fn unavailable(e: sqlx::Error) -> StoreError {
        match e {
            sqlx::Error::Configuration(e) => StoreError::Config(format!("{}: {e}", <Self as Database>::NAME)),
            e => StoreError::Unavailable(format!("{}: {e}", <Self as Database>::NAME)),
        }
    }
}

/// Settings of a SQL store: `PostgresConfig` (`SqlConfig<sqlx::Postgres>`), `SqliteConfig`
/// (`SqlConfig<sqlx::Sqlite>`) or `MySqlConfig` (`SqlConfig<sqlx::MySql>`).
///
/// The setters in the first block apply to all; each database adds its own: `schema`,
/// `acquire_timeout` and `application_name` for PostgreSQL, `busy_timeout` and `synchronous` for
/// SQLite, `database` and `acquire_timeout` for MySQL.
#[derive(Debug)]
pub struct SqlConfig<B: Backend> {
    pub(super) schema: Option<String>,
    pub(super) table: String,
    pub(super) migrate: bool,
    pub(super) max_connections: u32,
    pub(super) sweep_interval: Option<Duration>,
    pub(super) sweep_batch: u32,
    pub(super) actor_max_bytes: Option<usize>,
    pub(super) settings: B::Settings,
}

impl<B: Backend> Default for SqlConfig<B> {
    fn default() -> Self {
        Self {
            schema: None,
            table: "idempotency_records".into(),
            migrate: true,
            max_connections: B::MAX_CONNECTIONS,
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: B::SWEEP_BATCH,
            actor_max_bytes: None,
            settings: B::Settings::default(),
        }
    }
}

impl<B: Backend> Clone for SqlConfig<B> {
    fn clone(&self) -> Self {
        Self { schema: self.schema.clone(), table: self.table.clone(), settings: self.settings.clone(), ..*self }
    }
}

impl<B: Backend> SqlConfig<B> {
    /// The defaults: table `idempotency_records`, migrations on start-up, a sweep every minute.
    /// PostgreSQL: the table on the connection's `search_path`, 10 connections, a 5 s acquire
    /// timeout, sweeps in batches of 1000. SQLite: 4 connections, a 10 s busy timeout,
    /// `synchronous = FULL`, sweeps in batches of 500. MySQL: the table in the connection's
    /// database, 10 connections, a 5 s acquire timeout, sweeps in batches of 1000.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the table (default `idempotency_records`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether to apply the embedded migrations (create the table) on start-up (default `true`).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Size of the connection pool (default 10 for PostgreSQL and MySQL, 4 for SQLite).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How often expired records are deleted; `None` disables the background sweeper (then call
    /// the store's `sweep_expired` yourself). Default one minute.
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Rows deleted per sweeper statement (default 1000 for PostgreSQL and MySQL, 500 for SQLite).
    pub fn sweep_batch(mut self, batch: u32) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    /// One caller's byte bound (default `None`: no per-caller bound): a claim for a new key, or
    /// for an expired record it takes over, by an actor whose live records, with the new claim,
    /// would hold more than `max_bytes` is refused with [`StoreError::QuotaExceeded`] (429 with
    /// `Retry-After`: the time until that actor's earliest live record expires), while other
    /// actors still get in. The rule is [`super::quota`]'s; each record counts
    /// [`quota::record_bytes`](super::quota::record_bytes) (a fixed overhead, the key's
    /// characters and the stored response) while it is live: a claim until its lease ends, a
    /// completed record until its time to live ends. Replays, in-progress answers, renewals and
    /// completions are never refused, so the responses of claims in flight may take an actor past
    /// its bound. Anonymous callers (the empty actor) are not bounded. What a bound costs, per
    /// database, is in the module docs of `store::postgres`, `store::sqlite` and
    /// `store::mysql`; without one, a claim runs exactly the statements it runs without this
    /// setting. From a specification string: `?actor_max_bytes=32MiB`
    /// ([`SharedSpec`](super::spec::SharedSpec)).
    pub fn actor_max_bytes(mut self, max_bytes: Option<usize>) -> Self {
        self.actor_max_bytes = max_bytes.filter(|n| *n > 0);
        self
    }

    /// Whether a per-caller bound is set (PostgreSQL's group commit stands aside for one).
    #[cfg(feature = "postgres")]
    pub(super) fn bounded(&self) -> bool {
        self.actor_max_bytes.is_some()
    }

    /// The bound on what `actor` may hold, if it is bounded at all.
    pub(super) fn bound_for(&self, actor: &str) -> Option<usize> {
        self.actor_max_bytes.filter(|_| !super::quota::exempt(actor))
    }

    pub(super) fn validate(&self) -> Result<(), StoreError> {
        let ok = |s: &str| !s.is_empty() && s.len() <= B::MAX_NAME_LEN && !s.contains('\0');
        if !ok(&self.table) || self.schema.as_deref().is_some_and(|s| !ok(s)) {
            return Err(StoreError::Config(B::NAME_RULE.into()));
        }
        Ok(())
    }

    /// The table's name, quoted, in its schema if one is set.
    pub(super) fn qualified_table(&self) -> String {
        self.qualified(&self.table)
    }

    /// The name of the table of applied migrations, quoted, in the table's schema.
    fn versions_table(&self) -> String {
        self.qualified(&format!("{}_migrations", self.table))
    }

    fn qualified(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", B::quote_ident(schema), B::quote_ident(name)),
            None => B::quote_ident(name),
        }
    }

    /// A migration with the configured names put in.
    fn render(&self, template: &str) -> String {
        let schema_ddl = match &self.schema {
            Some(schema) => format!("CREATE SCHEMA IF NOT EXISTS {};\n", B::quote_ident(schema)),
            None => String::new(),
        };
        template
            .replace("{schema_ddl}", &schema_ddl)
            .replace("{table}", &self.qualified_table())
            .replace("{index}", &B::quote_ident(&format!("{}_expires_at_idx", self.table)))
            .replace("{lease_index}", &B::quote_ident(&format!("{}_lease_idx", self.table)))
            .replace("{actor_index}", &B::quote_ident(&format!("{}_actor_idx", self.table)))
            .replace("{qualified_actor_index}", &self.qualified(&format!("{}_actor_idx", self.table)))
    }
}

/// `name` as a quoted SQL identifier.
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A statement of this crate with the configured names put in, as the text sqlx runs. Shared:
/// cloning the result for a request costs a reference count, not a copy of the text.
///
/// Every SQL text the stores hand to sqlx that is not a literal passes through here.
pub(super) fn rendered(sql: String) -> SqlStr {
    // The assertion holds because the text is one of this crate's own templates into which only
    // table, index and schema names are put, and those come from the store's configuration,
    // checked by `SqlConfig::validate` and quoted by `Backend::quote_ident` (an embedded `"`, or
    // MySQL's `` ` ``, is doubled, so a name can never end its identifier). No request data ever reaches the text: keys, actors,
    // tokens, fingerprints, responses, times and limits are always bound parameters.
    AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str()
}

/// A [`Store`](super::Store) in a SQL database: `PostgresStore` (`SqlStore<sqlx::Postgres>`),
/// `SqliteStore` (`SqlStore<sqlx::Sqlite>`) or `MySqlStore` (`SqlStore<sqlx::MySql>`); the module
/// docs of `store::postgres`, `store::sqlite` and `store::mysql` say how each works.
///
/// Cloning is cheap and shares the pool and the sweeper.
#[derive(Debug)]
pub struct SqlStore<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for SqlStore<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

#[derive(Debug)]
struct Inner<B: Backend> {
    pool: Pool<B>,
    /// Where every write runs: `pool` itself, or (SQLite, on a database the store opened) a pool
    /// of one connection, so that writers queue in the process instead of polling the database's
    /// write lock.
    writer: Pool<B>,
    config: SqlConfig<B>,
    sql: Arc<B::Statements>,
    session: Arc<B::Session>,
    _sweeper: Option<AbortOnDrop>,
}

impl<B: Backend> SqlStore<B> {
    /// A store on an existing pool (shared with the application, for instance): applies the
    /// migrations (unless [`SqlConfig::migrate`] is off) and starts the sweeper.
    ///
    /// The pool is a sqlx 0.9 pool (`sqlx::PgPool`, `sqlx::SqlitePool` or `sqlx::MySqlPool`,
    /// re-exported as [`crate::sqlx`]); a pool from another major version of sqlx is another type
    /// and does not compile. Its settings are the application's and the store keeps them: a connection that
    /// cannot be had within the pool's acquire timeout, or that fails, is
    /// [`StoreError::Unavailable`] (fail closed). [`SqlConfig::max_connections`] and the database's
    /// own settings in [`SqlConfig`] (timeouts, SQLite's `synchronous`) apply only to the pools
    /// `connect_with` opens. With SQLite, the pool's connections should have a busy timeout
    /// (sqlx's default is 5 s); in WAL mode, readers never wait.
    ///
    /// The store never changes the settings of the pool's sessions. With PostgreSQL it reads
    /// their `default_transaction_isolation` once: if it is stricter than `READ COMMITTED`, each
    /// of the store's statements runs in a `READ COMMITTED` transaction of its own (two more round
    /// trips; see the `store::postgres` module docs). With an in-memory SQLite database, the store
    /// holds one more connection to it, outside the pool, so that the database outlives the
    /// pool's idle connections. With MySQL it reads their `autocommit` and isolation once and
    /// refuses ([`StoreError::Config`]) sessions with `autocommit` off or at `READ UNCOMMITTED`;
    /// its migrations run on a connection of their own, opened with the pool's connect options
    /// and closed afterwards (see the `store::mysql` module docs).
    pub async fn from_pool(pool: Pool<B>, config: SqlConfig<B>) -> Result<Self, StoreError> {
        Self::start(pool, config, false).await
    }

    /// A store on `pool`, which it opened itself (`own`) or was handed.
    pub(super) async fn start(pool: Pool<B>, config: SqlConfig<B>, own: bool) -> Result<Self, StoreError> {
        let writer = pool.clone();
        Self::start_with_writer(pool, writer, config, own).await
    }

    /// A store on `pool` whose writes all run on `writer` (which may be `pool` itself).
    pub(super) async fn start_with_writer(
        pool: Pool<B>,
        writer: Pool<B>,
        config: SqlConfig<B>,
        own: bool,
    ) -> Result<Self, StoreError> {
        config.validate()?;
        let session = Arc::new(B::attach(&pool, own).await.map_err(B::unavailable)?);
        if config.migrate {
            migrate(&writer, &config).await?;
        }
        let sql = Arc::new(B::statements(&config));
        let sweeper = config.sweep_interval.map(|interval| {
            let (pool, sql, session, batch) = (writer.clone(), sql.clone(), session.clone(), config.sweep_batch);
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match sweep(&pool, &sql, &session, batch).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(deleted = n, "idempotency store: expired records swept"),
                        Err(e) => tracing::warn!(error = %e, "idempotency store: sweeping expired records failed"),
                    }
                }
            }))
        });
        Ok(Self { inner: Arc::new(Inner { pool, writer, config, sql, session, _sweeper: sweeper }) })
    }

    /// The SQL that creates the store's table and indexes for `config`, every version in order,
    /// for applications that manage migrations themselves (with [`SqlConfig::migrate`] set to
    /// `false`). Version 1 is idempotent (`IF NOT EXISTS`); SQLite's version 2 adds columns and
    /// runs once: a database made with an earlier release needs only the versions after its
    /// own, which [`migrations`](Self::migrations) lists.
    pub fn migration_sql(config: &SqlConfig<B>) -> String {
        B::MIGRATIONS.iter().map(|(_, sql)| config.render(sql)).collect::<Vec<_>>().join("\n")
    }

    /// The migrations of [`migration_sql`](Self::migration_sql) one by one: `(version, SQL)`, in
    /// order. The store records the versions it applied in `<table>_migrations`.
    pub fn migrations(config: &SqlConfig<B>) -> Vec<(i32, String)> {
        B::MIGRATIONS.iter().map(|(version, sql)| (*version, config.render(sql))).collect()
    }

    /// The store's connection pool.
    pub fn pool(&self) -> &Pool<B> {
        &self.inner.pool
    }

    /// The pool every write of the store runs on: the store's pool, or (SQLite, on a database the
    /// store opened) its one writer connection.
    // Shared by the backends that use it; a build with only the others has no caller.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) fn writer(&self) -> &Pool<B> {
        &self.inner.writer
    }

    /// The store's settings.
    pub fn config(&self) -> &SqlConfig<B> {
        &self.inner.config
    }

    /// Deletes now, in batches, every completed record past its time to live and every
    /// in-progress record whose lease ended more than [`ABANDONED_CLAIM_RETENTION`] ago; returns
    /// how many were deleted.
    pub async fn sweep_expired(&self) -> Result<u64, StoreError> {
        sweep(&self.inner.writer, &self.inner.sql, &self.inner.session, self.inner.config.sweep_batch).await
    }

    /// The store's statements.
    pub(super) fn sql(&self) -> &B::Statements {
        &self.inner.sql
    }

    /// What the store learnt from its pool when it started.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn session(&self) -> &B::Session {
        &self.inner.session
    }

    /// A statement with the record's key bound as its first parameters ([`Backend::bind_key`]).
    pub(super) fn key_query(sql: &SqlStr, key: &RecordKey) -> Query<'static, B, B::Arguments>
    where
        String: Type<B> + for<'e> Encode<'e, B>,
    {
        B::bind_key(sqlx::query(sql.clone()), key)
    }

    /// A statement fenced by a claim's token, with the record's key and then the token bound as
    /// its first parameters; no row touched means the token no longer holds the claim.
    pub(super) fn fenced_query(sql: &SqlStr, key: &RecordKey, token: &ClaimToken) -> Query<'static, B, B::Arguments>
    where
        String: Type<B> + for<'e> Encode<'e, B>,
    {
        Self::key_query(sql, key).bind(&token.0)
    }

    /// Deletes `key`'s record as `purge` allows ([`Store::invalidate`](super::Store::invalidate)):
    /// one statement, conditional on the state for [`Purge::Completed`], so a record claimed in
    /// between is never deleted; when it deleted nothing, a read tells a claim in progress from
    /// no record. A record that the read finds completed was completed after the statement ran
    /// (it was in progress then): the statement runs again, so that the answer is one the record
    /// gave at a single moment (answering "absent" for it would be no state the record ever had:
    /// `tests/tests/store_linearizable.rs` found it).
    pub(super) async fn invalidate_record(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError>
    where
        String: Type<B> + for<'e> Encode<'e, B>,
        for<'r> String: Decode<'r, B>,
        for<'n> &'n str: ColumnIndex<B::Row>,
        B::Arguments: sqlx::IntoArguments<B>,
        for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
    {
        let common = B::common(&self.inner.sql);
        let statement = match purge {
            Purge::Any => &common.invalidate,
            Purge::Completed => &common.invalidate_completed,
        };
        for _ in 0..INVALIDATE_ATTEMPTS {
            let query = Self::key_query(statement, key);
            if B::execute(&self.inner.writer, &self.inner.session, query).await.map_err(B::unavailable)? > 0 {
                return Ok(Invalidated::Deleted);
            }
            if purge == Purge::Any {
                return Ok(Invalidated::Absent);
            }
            let row =
                Self::key_query(&common.state, key).fetch_optional(&self.inner.pool).await.map_err(B::unavailable)?;
            let Some(row) = row else { return Ok(Invalidated::Absent) };
            if column::<_, String>(&row, "state")? == "in_progress" {
                return Ok(Invalidated::InProgress);
            }
            // Completed since the statement ran: delete it now.
        }
        Err(StoreError::Unavailable(format!(
            "{}: invalidation kept racing completions of one key",
            <B as Database>::NAME
        )))
    }

    /// One round trip to the database ([`Store::health`](super::Store::health)).
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        B::execute(&self.inner.pool, &self.inner.session, sqlx::query("SELECT 1")).await.map_err(B::unavailable)?;
        Ok(())
    }
}

/// The open transaction of a transactional route on a SQL store (see [`crate::store::transaction`]).
///
/// The handler locks it through [`TxGuard`]s; once the handler has returned, the engine takes it
/// to commit or roll back, and it is closed for good. A guard still held then (one the handler
/// moved into a task or a response stream) cannot be waited for: the engine does not take the
/// transaction from under it, and the guard rolls it back when it is dropped (see
/// [`OutcomeTransaction::escaped`]).
pub struct SqlTransaction<B: Backend> {
    open: Arc<tokio::sync::Mutex<Option<Open<B>>>>,
    /// Set once the engine is done with the transaction, taken or not: a guard dropped after it
    /// rolls back what it still holds. Guards read it under this lock while they let go of the
    /// transaction, so the engine either takes the transaction or leaves it to the guard.
    closed: Arc<std::sync::Mutex<bool>>,
}

/// A transaction of a transactional route that is still open, with what its database's hooks
/// need; when it is dropped, however it ended, [`Backend::outcome_ended`] is told.
struct Open<B: Backend> {
    tx: Option<Transaction<'static, B>>,
    store: SqlStore<B>,
    /// What [`Backend::outcome_opened`] answered.
    id: u64,
    /// What [`Backend::outcome_closing`] wrote was committed.
    settled: bool,
}

impl<B: Backend> Drop for Open<B> {
    fn drop(&mut self) {
        B::outcome_ended(&self.store, self.id, self.settled);
    }
}

impl<B: Backend> Open<B> {
    /// Rolls the handler's writes back ([`Backend::outcome_rollback`]).
    async fn roll_back(mut self) {
        let Some(tx) = self.tx.take() else { return };
        match B::outcome_rollback(&self.store, tx, self.id).await {
            Ok(()) => self.settled = true,
            // The connection is gone, and the server rolls back what it held.
            Err(e) => tracing::debug!(error = %e, "rolling back a transactional route's writes failed"),
        }
    }
}

impl<B: Backend> fmt::Debug for SqlTransaction<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlTransaction").field("database", &<B as Database>::NAME).finish_non_exhaustive()
    }
}

impl<B: Backend> SqlTransaction<B> {
    /// Locks the transaction for the handler's writes.
    async fn lock(&self) -> Result<TxGuard<B>, TxError> {
        let guard = self.open.clone().lock_owned().await;
        match *guard {
            Some(_) => Ok(TxGuard { guard: Some(guard), closed: self.closed.clone() }),
            None => Err(TxError::Finished),
        }
    }

    /// Closes the transaction for good and takes it, unless a guard holds it (then that guard
    /// rolls it back when dropped). Never waits.
    fn take(&self) -> Option<Open<B>> {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        *closed = true;
        let taken = self.open.try_lock().ok().and_then(|mut open| open.take());
        drop(closed);
        taken
    }
}

/// The handler's hold on its transaction ([`crate::store::transaction::Tx`]): derefs to the
/// `sqlx::Transaction`, so a statement runs with `.execute(&mut **tx)`. Drop it before the
/// handler returns; the engine commits.
///
/// A guard that outlives its handler (moved into a spawned task or a response stream) makes the
/// request fail with a 500 problem and nothing stored; the transaction is rolled back when the
/// guard is dropped, and until then it keeps its connection (on SQLite, the database's one
/// writer).
pub struct TxGuard<B: Backend> {
    /// Always `Some` until dropped.
    guard: Option<tokio::sync::OwnedMutexGuard<Option<Open<B>>>>,
    closed: Arc<std::sync::Mutex<bool>>,
}

impl<B: Backend> fmt::Debug for TxGuard<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard").field("database", &<B as Database>::NAME).finish_non_exhaustive()
    }
}

impl<B: Backend> std::ops::Deref for TxGuard<B> {
    type Target = Transaction<'static, B>;
    fn deref(&self) -> &Self::Target {
        // `lock` hands out a guard only over an open transaction, and nothing takes it while a
        // guard holds it.
        self.guard.as_ref().and_then(|g| g.as_ref()).and_then(|open| open.tx.as_ref()).expect("an open transaction")
    }
}

impl<B: Backend> std::ops::DerefMut for TxGuard<B> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard.as_mut().and_then(|g| g.as_mut()).and_then(|open| open.tx.as_mut()).expect("an open transaction")
    }
}

impl<B: Backend> Drop for TxGuard<B> {
    fn drop(&mut self) {
        let closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut guard) = self.guard.take() else { return };
        let abandoned = if *closed { guard.take() } else { None };
        drop(guard);
        drop(closed);
        if let Some(open) = abandoned {
            // The engine closed the transaction while this guard, outside the handler, still held
            // it: nothing of it may commit.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(open.roll_back())),
                Err(_) => drop(open),
            }
        }
    }
}

#[async_trait]
impl<B: Backend> TxDatabase for B {
    type Guard = TxGuard<B>;

    async fn lock(transaction: &dyn OutcomeTransaction) -> Result<TxGuard<B>, TxError> {
        let transaction = transaction
            .as_any()
            .downcast_ref::<SqlTransaction<B>>()
            .ok_or(TxError::OtherDatabase(<B as Database>::NAME))?;
        transaction.lock().await
    }
}

#[async_trait]
impl<B: Backend> TransactionalStore for SqlStore<B> {
    async fn begin(&self) -> Result<Arc<dyn OutcomeTransaction>, StoreError> {
        let tx = B::begin_outcome(&self.inner.writer, &self.inner.session).await.map_err(B::unavailable)?;
        let mut open = Open { tx: Some(tx), store: self.clone(), id: 0, settled: false };
        let tx = open.tx.as_mut().expect("just opened");
        open.id = B::outcome_opened(self, tx).await.map_err(B::unavailable)?;
        Ok(Arc::new(SqlTransaction {
            open: Arc::new(tokio::sync::Mutex::new(Some(open))),
            closed: Arc::new(std::sync::Mutex::new(false)),
        }))
    }
}

#[async_trait]
impl<B: Backend> OutcomeTransaction for SqlTransaction<B> {
    async fn commit(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let Some(mut open) = self.take() else {
            return Err(StoreError::Unavailable(
                "the transaction was already finished, or is held outside its handler".into(),
            ));
        };
        let store = open.store.clone();
        let Some(tx) = open.tx.as_mut() else { return Err(StoreError::Unavailable("no transaction".into())) };
        let complete = B::outcome_query(&store.inner.sql, &store.inner.session, key, token, response.encode(), ttl);
        let written = match B::outcome_closing(&store, tx, open.id).await {
            Ok(()) => B::execute_in(tx, complete).await,
            Err(e) => Err(e),
        };
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                open.roll_back().await;
                return Err(B::unavailable(e));
            }
        };
        if written == 0 {
            // The claim was taken over: its new holder's outcome is the key's, not ours.
            open.roll_back().await;
            return Err(StoreError::Fenced);
        }
        let tx = open.tx.take().expect("still open");
        match tx.commit().await {
            Ok(()) => {
                open.settled = true;
                Ok(())
            }
            Err(e) => match B::committed(&store, key, token).await {
                Ok(true) => {
                    open.settled = true;
                    Ok(())
                }
                _ => Err(B::unavailable(e)),
            },
        }
    }

    async fn rollback(&self) {
        if let Some(open) = self.take() {
            open.roll_back().await;
        }
    }

    fn escaped(&self) -> bool {
        self.open.try_lock().is_err()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// How many times an invalidation of completed records runs again when the record it found in
/// progress was completed before it could read it (each time a new claim of the key must have
/// been acquired and completed in between).
const INVALIDATE_ATTEMPTS: usize = 16;

/// Statements whose parameters and results are the same on every SQL store; each [`Backend`]
/// renders them in its own placeholder syntax.
#[derive(Debug)]
pub struct CommonStatements {
    /// Deletes the record of the key bound as parameters 1 to 3, whatever its state.
    pub(super) invalidate: SqlStr,
    /// Deletes the record of the key bound as parameters 1 to 3 if it is completed.
    pub(super) invalidate_completed: SqlStr,
    /// The state of the record of the key bound as parameters 1 to 3.
    pub(super) state: SqlStr,
    /// A row when the record of the key bound as parameters 1 to 3 is completed under the token
    /// bound as parameter 4: what a completion finds after an earlier attempt stored it.
    pub(super) completed_by: SqlStr,
}

async fn sweep<B: Backend>(
    pool: &Pool<B>,
    sql: &B::Statements,
    session: &B::Session,
    batch: u32,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = B::execute(pool, session, B::sweep_query(sql, i64::from(batch))).await.map_err(B::unavailable)?;
        crate::telemetry::records_swept(B::STORE, n);
        total += n;
        if n < u64::from(batch) {
            // The records are deleted whatever this does: a failure is told, not returned.
            if let Err(e) = B::maintain(pool, sql).await {
                tracing::warn!(error = %e, "idempotency store: keeping the table's statistics current failed");
            }
            return Ok(total);
        }
        // Let waiting writers in between batches.
        tokio::task::yield_now().await;
    }
}

/// Applies, in one transaction, the migrations newer than the newest recorded one.
async fn migrate<B: Backend>(pool: &Pool<B>, config: &SqlConfig<B>) -> Result<(), StoreError> {
    let versions = config.versions_table();
    let mut tx = B::begin_migration(pool, config, &versions).await.map_err(B::unavailable)?;
    let current = B::applied_version(&mut tx, &versions).await.map_err(B::unavailable)?;
    for (version, sql) in B::MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
        B::apply_migration(&mut tx, &versions, *version, rendered(config.render(sql))).await.map_err(B::unavailable)?;
    }
    B::end_migration(tx).await.map_err(B::unavailable)
}

/// What a failed statement tells about running it again ([`Backend::failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database cancelled the statement for a conflict with another transaction (a
    /// serialization failure, a deadlock, a lock wait that timed out): it wrote nothing.
    Conflict,
    /// The connection is gone: the statement may not have reached the server, or may have run
    /// and lost only its answer.
    Lost,
    /// Anything else.
    Other,
}

// The SQL stores that reach their database over a network.
#[cfg(any(feature = "postgres", feature = "mysql"))]
/// How many times a statement runs when the database cancels it for a conflict.
pub(super) const CONFLICT_ATTEMPTS: u32 = 5;

// The SQL stores that reach their database over a network.
#[cfg(any(feature = "postgres", feature = "mysql"))]
/// A random pause before running a statement again after its `n`th conflict: up to
/// 10 ms × 2ⁿ⁻¹, so that the statements that collided do not collide again.
pub(super) fn jitter(n: u32) -> Duration {
    let ceiling = 10u64 << (n.saturating_sub(1).min(6));
    Duration::from_millis(1 + (uuid::Uuid::new_v4().as_u128() as u64) % ceiling)
}

// The SQL stores that reach their database over a network.
#[cfg(any(feature = "postgres", feature = "mysql"))]
/// Runs `attempt` on a connection of `pool`, again after a conflict ([`Failure::Conflict`], up
/// to [`CONFLICT_ATTEMPTS`] runs, after a [`jitter`]), and once more on a live connection after
/// the connection was lost ([`Failure::Lost`]; see [`live_connection`]). Returns the answer and
/// whether an attempt was lost with its connection before the one that answered (it may have
/// run: its effect is unknown). A connection that was lost is never given back to the pool.
pub(super) async fn retrying<B, T, F>(pool: &Pool<B>, mut attempt: F) -> Result<(T, bool), sqlx::Error>
where
    B: Backend,
    F: for<'c> FnMut(&'c mut B::Connection) -> futures_util::future::BoxFuture<'c, Result<T, sqlx::Error>>,
{
    let (mut conflicts, mut lost) = (0, false);
    loop {
        let mut conn = if lost { live_connection(pool).await } else { pool.acquire().await }?;
        let e = match attempt(&mut conn).await {
            Ok(answer) => return Ok((answer, lost)),
            Err(e) => e,
        };
        match B::failure(&e) {
            Failure::Conflict if conflicts + 1 < CONFLICT_ATTEMPTS => {
                tracing::debug!(error = %e, "idempotency store: {}; running the statement again", B::CONFLICT);
                conflicts += 1;
                drop(conn);
                tokio::time::sleep(jitter(conflicts)).await;
            }
            Failure::Lost if !lost => {
                tracing::debug!(error = %e, "idempotency store: connection lost; running the operation again on a live one");
                drop(conn.detach());
                lost = true;
            }
            kind => {
                if kind == Failure::Lost {
                    drop(conn.detach());
                }
                return Err(e);
            }
        }
    }
}

// The SQL stores that reach their database over a network.
#[cfg(any(feature = "postgres", feature = "mysql"))]
/// A pooled connection that answers a ping. After one connection was found dead, the pool's
/// other idle connections may be dead too (a server restart ends them all): each that fails its
/// ping is dropped, and once none is left the pool opens a new one.
async fn live_connection<B: Backend>(pool: &Pool<B>) -> Result<PoolConnection<B>, sqlx::Error> {
    for _ in 0..pool.options().get_max_connections() {
        let mut conn = pool.acquire().await?;
        match conn.ping().await {
            Ok(()) => return Ok(conn),
            Err(e) if B::failure(&e) == Failure::Lost => drop(conn.detach()),
            Err(e) => return Err(e),
        }
    }
    let mut conn = pool.acquire().await?;
    conn.ping().await?;
    Ok(conn)
}

/// Keeps [`Backend`] to the databases this crate implements it for.
pub(super) mod sealed {
    /// Implemented by each [`Backend`](super::Backend).
    pub trait Sealed {}
}

/// Aborts the background sweeper when the store is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long after its lease an abandoned in-progress record is kept, in milliseconds.
pub(super) fn abandoned_claim_retention_ms() -> i64 {
    millis(ABANDONED_CLAIM_RETENTION)
}

/// A lease or time to live in milliseconds, for the database.
pub(super) fn millis(d: Duration) -> i64 {
    // Ten years is far beyond any lease or time to live and keeps timestamps and sums in range.
    d.as_millis().min(10 * 365 * 24 * 3600 * 1000) as i64
}

/// The admission of a claim of `key` needing `need` bytes under `max` ([`super::quota::admit`]),
/// from a row of the store's quota statement: `used`, the bytes of the actor's other live records,
/// and `earliest_ms`, the milliseconds until the earliest of them expires (`NULL` when none).
pub(super) fn admit_row<R>(row: &R, key: &RecordKey, need: usize, max: usize) -> Result<(), StoreError>
where
    R: Row,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    let used: i64 = column(row, "used")?;
    let earliest: Option<i64> = column(row, "earliest_ms")?;
    let until = || Duration::from_millis(earliest.unwrap_or(0).max(0) as u64);
    super::quota::admit(&key.actor, usize::try_from(used).unwrap_or(0), need, Some(max), until)
}

/// What a record of `key` holding an encoded response of `response_len` bytes counts towards its
/// actor's bound, as the `bytes` column stores it.
pub(super) fn record_bytes(key: &RecordKey, response_len: usize) -> i64 {
    i64::try_from(super::quota::record_bytes(key, response_len)).unwrap_or(i64::MAX)
}

/// Column `name` of a stored row; a value that cannot be decoded is [`StoreError::Corrupt`].
pub(super) fn column<'r, R, T>(row: &'r R, name: &str) -> Result<T, StoreError>
where
    R: Row,
    T: Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    row.try_get(name).map_err(|e| StoreError::Corrupt(format!("undecodable record: {e}")))
}

/// What an inspected row holds: its `state`, `response`, and `created_ms` and `expires_ms`
/// (milliseconds since the Unix epoch).
pub(super) fn record_info<R>(row: &R) -> Result<RecordInfo, StoreError>
where
    R: Row,
    Vec<u8>: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    let state: String = column(row, "state")?;
    let response: Option<Vec<u8>> = column(row, "response")?;
    let created: i64 = column(row, "created_ms")?;
    let expires: i64 = column(row, "expires_ms")?;
    let (state, status) = match state.as_str() {
        "in_progress" => (RecordState::InProgress, None),
        "completed" => {
            let bytes = response.ok_or_else(|| StoreError::Corrupt("completed record without a response".into()))?;
            let stored = StoredResponse::decode(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            (RecordState::Completed, Some(stored.status))
        }
        other => return Err(StoreError::Corrupt(format!("unknown record state {other:?}"))),
    };
    Ok(RecordInfo { state, status, created_at: Some(epoch_millis(created)), expires_at: epoch_millis(expires) })
}

/// The claim's answer from a live row (its `fingerprint`, `state` and `response` columns), with
/// `remaining` left on its lease.
pub(super) fn decide_row<R>(row: &R, fingerprint: &Fingerprint, remaining: Duration) -> Result<Claim, StoreError>
where
    R: Row,
    Vec<u8>: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    let stored: Vec<u8> = column(row, "fingerprint")?;
    let state: String = column(row, "state")?;
    let response: Option<Vec<u8>> = column(row, "response")?;
    decide(fingerprint, &stored, &state, response.as_deref(), remaining)
}

/// Turns a live record into the claim's answer; anything undecodable is [`StoreError::Corrupt`].
fn decide(
    fingerprint: &Fingerprint,
    stored_fingerprint: &[u8],
    state: &str,
    response: Option<&[u8]>,
    remaining: Duration,
) -> Result<Claim, StoreError> {
    let stored: [u8; 32] = stored_fingerprint
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("fingerprint is {} bytes, expected 32", stored_fingerprint.len())))?;
    let in_progress = match state {
        "in_progress" => true,
        "completed" => false,
        other => return Err(StoreError::Corrupt(format!("unknown record state {other:?}"))),
    };
    if stored != fingerprint.0 {
        return Ok(Claim::Mismatch);
    }
    if in_progress {
        return Ok(Claim::InProgress { retry_after: remaining });
    }
    let bytes = response.ok_or_else(|| StoreError::Corrupt("completed record without a response".into()))?;
    StoredResponse::decode(bytes).map(Claim::Completed).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
