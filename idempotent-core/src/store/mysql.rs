//! MySQL and MariaDB store (feature `mysql`): durable, shared by any number of instances, in the
//! database the application's own data lives in, transactional mode included.
//!
//! `mysql://user:password@host:3306/database` (or `mariadb://...`, the same URL under another
//! name) opens a pool of its own ([`MySqlStore::connect`]); [`MySqlStore::from_pool`] takes the
//! application's sqlx 0.9 pool.
//!
//! # Versions
//!
//! Tested against MariaDB 10.11 (InnoDB, `REPEATABLE READ`, binary log off): the
//! store contract, the transactional routes, the crash matrix and the deposits killed with
//! `kill -9`, contention, provoked deadlocks and lock wait timeouts, TLS. The SQL is written for
//! MySQL 8 too (no `RETURNING`, no `INSERT ... ON CONFLICT`, no `CREATE INDEX IF NOT EXISTS`,
//! no `VALUES()` in an update, which MySQL 8.0.20 deprecated; only `UTC_TIMESTAMP(6)`,
//! `TIMESTAMPDIFF`, `DATETIME(6)`, `GET_LOCK`, `ORDER BY ... LIMIT` on `DELETE`), but MySQL 8
//! itself is not tested. What would differ there, as far as the documentation of each says:
//!
//! - MySQL 8 (8.0.20 and later) grants waiting row locks by the age of their transactions
//!   (CATS): which of two waiting writers goes first may differ from MariaDB (where the tests see
//!   either, too), not the outcome of either (see
//!   [interleavings](#the-claim-and-the-interleavings-it-survives)).
//! - MySQL names the isolation variable `transaction_isolation`, MariaDB 10.11 `tx_isolation`
//!   (11.1 has both); the store reads whichever the server has.
//! - MariaDB's `innodb_snapshot_isolation` (on by default from 11.6), which MySQL does not
//!   have: see [transactional mode](#transactional-mode).
//! - MySQL 8's default authentication, `caching_sha2_password`, sends the password in clear over
//!   TLS only, or encrypted with the server's RSA key, which sqlx does only with its `mysql-rsa`
//!   feature (not enabled here; sqlx's own advice is to prefer TLS). Without TLS such an account
//!   can log in only while the server has its password cached: use TLS (feature `tls`, any
//!   `ssl-mode` but `DISABLED`), or an account with `mysql_native_password`. MariaDB's default
//!   accounts are not affected.
//! - Vitess and PlanetScale: the statements are single-row and single-table, and `GET_LOCK` (the
//!   migrations') needs a reserved connection there; neither is tested.
//!
//! # Table
//!
//! One row per record, primary key `key_hash`: the SHA-256 of the record's key
//! ([`RecordKey::storage_key`], scope, actor and client key, each length-prefixed) as 32 bytes.
//! The raw parts are kept beside it (`scope`, `actor`, `idem_key`, `utf8mb4_bin` text) for
//! operators, but no index is built on them: a key of 255 characters in `utf8mb4` is 1020 bytes,
//! with the scope and the actor more than InnoDB's 3072-byte index key limit (767 bytes a column
//! on the old `COMPACT` row format) allows, and MySQL's default collations compare
//! case-insensitively and ignore trailing spaces, so `Order-1` and `order-1 ` would be one key.
//! The digest has a fixed size and compares byte for byte.
//!
//! The other columns are those of the PostgreSQL store: `fingerprint` (32 bytes), `state`
//! (`in_progress` or `completed`), `token` (the claim's token; kept once completed, so that a
//! completion retried after a lost answer recognises its own work), `response`
//! ([`StoredResponse::encode`], `LONGBLOB`), `expires_at` and `created_at` (`DATETIME(6)`, UTC),
//! and one secondary index on `expires_at` for the sweeper. `expires_at` is the end of the lease
//! while the record is in progress and the end of its time to live once completed.
//!
//! A completed record's response travels in one packet: the server's `max_allowed_packet`
//! (16 MiB on MariaDB 10.11, 64 MiB on MySQL 8) must exceed the largest stored response (the
//! engine's cap is 1 MiB by default).
//!
//! # Clock
//!
//! Every time comes from the database server's clock, `UTC_TIMESTAMP(6)` (independent of the
//! session's `time_zone`), never from the application's. MySQL and MariaDB evaluate it once per
//! statement, when the statement starts, not when its transaction started (unlike PostgreSQL's
//! `now()`); the store relies on that in [transactional mode](#transactional-mode), where the
//! completion runs when the handler is done, maybe seconds after the transaction opened, and its
//! time to live must count from then. A test checks it (`tests/tests/store_mysql.rs`,
//! `a_transactional_completion_counts_its_ttl_from_the_commit`). A session whose `timestamp`
//! variable is set (`SET timestamp = ...`, as replication does) would freeze that clock: the
//! store's connections must not set it.
//!
//! # The claim and the interleavings it survives
//!
//! MySQL has no `INSERT ... RETURNING`, so one statement cannot both write a claim and return the
//! row a replay needs. [`Store::claim`] therefore starts with a read, which is all a replay, a
//! mismatch or an in-progress answer costs, and writes only when that read found the key free,
//! with a statement whose own condition makes it a compare-and-set:
//!
//! 1. `SELECT fingerprint, state, token, response, <µs left on expires_at> WHERE key_hash = ?`,
//!    a consistent read that takes no lock. A live row (`expires_at` in the future) is the
//!    answer: the stored response, a mismatch, or in progress with its remaining lease; or
//!    [`Claim::Acquired`] when it is in progress under the claim's own token (a claim run again
//!    after its answer was lost, see [lost connections](#lost-connections)); once that claim's
//!    lease has run out, it is taken anew as in 3.
//! 2. No row: `INSERT` the claim. The primary key lets one concurrent insert of the key succeed;
//!    the others fail with a duplicate key (error 1062; InnoDB makes them wait for the winner's
//!    commit) and go back to 1, where they see the winner's row.
//! 3. An expired row (a crashed owner's lease, or a completed record past its time to live):
//!    `UPDATE ... SET <new claim> WHERE key_hash = ? AND expires_at <= UTC_TIMESTAMP(6)` (and
//!    the row is completed, or of the same request, or the claim's own, or past its retention). An
//!    `UPDATE` reads the newest committed version of the row under its exclusive row lock, not
//!    the snapshot, whatever the isolation level: of several concurrent takeovers the first
//!    takes the lock and writes, the others wait for its commit, find the lease live and change
//!    nothing (zero rows), and go back to 1.
//!
//! Steps 2 and 3 each commit on their own (`autocommit`); the claim is fenced by the row itself,
//! so no transaction spans 1 and 2 and nothing is locked between them. What happens between the
//! read and the write, and why the answer stays right:
//!
//! | between the read and the write, another request... | the claim's write | answer |
//! |---|---|---|
//! | inserts the same key (the read saw no row) | duplicate key | reads again: in progress (or a mismatch) |
//! | takes the same expired row over | matches no row (the lease is live again) | reads again: in progress |
//! | renews or completes the expired claim it took over (the late worker) | matches no row | reads again: in progress, or the stored response |
//! | deletes the row (release, `invalidate`, the sweeper) | the takeover matches no row; an insert succeeds | reads again and inserts: acquired |
//! | inserts the key and rolls back while two claims wait on that insert | InnoDB's deadlock detector cancels one (error 1213) | that one runs again: in progress |
//!
//! and in the other order, a late worker's `renew` or `complete` (`UPDATE ... WHERE token = ?
//! AND state = 'in_progress'`) that meets a takeover is serialised with it by the row lock: if
//! the takeover commits first, the worker's token is gone and it is [`StoreError::Fenced`]; if
//! the worker commits first, the takeover finds a live lease or a completed record and changes
//! nothing. `tests/tests/store_mysql.rs` holds each of these interleavings open with a lock of
//! its own (`interleavings_*`) and checks the answers, and runs 32 concurrent claims of one key
//! on 16 connections, many times over, for exactly one [`Claim::Acquired`].
//!
//! Round trips: a replay, a mismatch or an in-progress answer costs one (the read); a first
//! execution three (the read, the insert, the completion); a claim that loses a race one or two
//! more. Renewals add one per heartbeat. sqlx prepares each statement once per connection;
//! connections are not pinged before use, see [below](#lost-connections).
//!
//! Why not `INSERT ... ON DUPLICATE KEY UPDATE` with conditional assignments, in one round trip:
//! its answer is a count of affected rows only, which under sqlx's `CLIENT_FOUND_ROWS` is 1 both
//! for a new row and for an existing row left as it was, so the claim could not tell whether it
//! won without a second statement; and on a live row (every replay) it would take the row's
//! exclusive lock and go through the write path, where the read above takes no lock at all.
//!
//! # Isolation, deadlocks, lock wait timeouts
//!
//! Every statement of the store touches one row by its primary key and commits on its own, so
//! it behaves the same under `READ COMMITTED`, `REPEATABLE READ` (InnoDB's default) and
//! `SERIALIZABLE` (where a plain `SELECT` in `autocommit` stays a non-locking read), and the
//! store never changes a session's isolation (`READ COMMITTED` would fail every write on a
//! server whose binary log is in `STATEMENT` format). Under `REPEATABLE READ` InnoDB still takes
//! gap locks: an `UPDATE` or `DELETE` of a key that has no row locks the gap where it would be,
//! and the sweeper's range `DELETE` locks the gaps of the `expires_at` index it scans, each for
//! the length of one statement. A statement the server cancels to break a deadlock (error 1213),
//! whose lock wait timed out (error 1205, after `innodb_lock_wait_timeout`, 50 s by default) or
//! that MariaDB's `innodb_snapshot_isolation` refused (error 1020) wrote nothing, and is run
//! again, up to 5 times, after a random pause (up to 10, 20, 40, 80 ms); after that the
//! operation fails as [`StoreError::Unavailable`] (fail closed).
//!
//! The pool's sessions must run in `autocommit` mode (the default; with it off a read would
//! open a transaction that nothing ends) and at `READ COMMITTED` or stricter (a replay must not
//! read a completion that may still roll back): on start-up the store reads both on one of the
//! pool's connections and refuses, with [`StoreError::Config`], a pool whose sessions are not.
//!
//! # Lost connections
//!
//! After a server restart, a failover, `KILL` or the server's `wait_timeout`, the pool's idle
//! connections are dead, and the next statement on one fails (an I/O error; MariaDB's error
//! 1927, the server shutting down (1053), MySQL's 3169 and 4031). The store then drops that
//! connection and runs the statement once more on a connection that answers a ping (dead idle
//! connections are dropped in turn, and the pool opens a new one when none is left), so a
//! restart costs a few pings on the first operation, not a failed request. It is not retried a
//! second time: a server that stays away is [`StoreError::Unavailable`].
//!
//! A lost connection may have lost only the answer: the statement may have run and committed.
//! Each operation is written so that running it again can never run a handler twice, and gives
//! the answer the first run would have given, as the PostgreSQL store's:
//!
//! - a claim presents the same token on every attempt: an insert or takeover that committed
//!   before its answer was lost makes the next read find an in-progress row with that token,
//!   answered [`Claim::Acquired`];
//! - a renewal extends the lease again;
//! - a completion that finds nothing to complete looks for the record completed with its token
//!   and answers `Ok` when it is there;
//! - a release that finds nothing to release answers `Ok` when the key has no record left.
//!
//! # Fencing
//!
//! `complete`, `release` and `renew` carry `WHERE key_hash = ? AND token = ? AND state =
//! 'in_progress'`; no row matched is [`StoreError::Fenced`] (sqlx asks for the rows matched, not
//! changed, so a renewal that writes the same deadline twice still counts). They do not look at
//! the lease: an expired lease that no claim took over still belongs to its token (see
//! [`Store`]).
//!
//! # Expiry
//!
//! A completed record is deleted once past its time to live; an in-progress record only
//! [`ABANDONED_CLAIM_RETENTION`](super::ABANDONED_CLAIM_RETENTION) after its lease ended, so a
//! late worker can still complete it (claims do not wait for that: an expired lease can be taken
//! over at once). A background task deletes them every [`MySqlConfig::sweep_interval`], with
//! `DELETE ... ORDER BY expires_at LIMIT n` ([`MySqlConfig::sweep_batch`] rows a statement, so
//! no statement holds its locks for long), never on the request path; several instances
//! sweeping at once may deadlock each other, which is run again like any conflict. The task
//! stops when the store is dropped. [`MySqlStore::sweep_expired`] runs one sweep on demand.
//!
//! # Migrations
//!
//! By default the table is created on start-up and the applied version recorded in
//! `<table>_migrations`. MySQL commits each DDL statement on its own, so instances starting
//! together take turns on a named lock (`GET_LOCK`, on a connection of its own that is closed
//! afterwards, so that a failed migration cannot leave the lock on a pooled connection). An
//! application that manages its own migrations sets [`MySqlConfig::migrate`] to `false` and
//! applies [`MySqlStore::migration_sql`] itself. [`MySqlConfig::database`] puts the table in
//! another database than the connection's (created if missing). Version 2 adds the `bytes`
//! column and the `(actor(191), expires_at, bytes)` index of the [per-caller bound](#per-caller-bound)
//! (rows already there count nothing: they go within their time to live); unlike version 1 it
//! is not idempotent (MySQL 8 has no `ADD COLUMN IF NOT EXISTS`) and runs once.
//!
//! # Per-caller bound
//!
//! Off by default; [`MySqlConfig::actor_max_bytes`] or `mysql://...?actor_max_bytes=32MiB` sets
//! it (the rule: [`quota`]). Each row's `bytes` column holds what it counts
//! ([`quota::record_bytes`]: 256 bytes, the scope's, actor's and key's
//! characters, the encoded response once completed), written by every claim and completion
//! whether a bound is set or not; a row counts while `expires_at` is ahead of `UTC_TIMESTAMP(6)`.
//!
//! Without a bound a claim runs the statements above. With one, the claim's first read is
//! unchanged (a replay, a mismatch or an in-progress answer costs nothing more); a bounded
//! actor's insert or takeover runs on one connection that holds a named lock of the actor
//! (`GET_LOCK('idempotent actor <hash>')`, waiting at most the acquire timeout, then 503): the sum
//! of the actor's live rows through the `(actor, expires_at, bytes)` index, the admission, the write
//! (committed on its own), `RELEASE_LOCK`, three round trips more. The claims of one actor thereby
//! take turns and each sees the rows of those before it, so of concurrent claims of one actor
//! exactly as many acquire as the bound fits. A connection that fails meanwhile is closed, which
//! releases its lock, and the claim fails with [`StoreError::Unavailable`] rather than run again
//! (a retry with the same key then finds the record in progress if the write went in). On Vitess and PlanetScale `GET_LOCK` needs a reserved connection (see
//! [versions](#versions)); a bound there is untested.
//!
//! # Transactional mode
//!
//! A transactional route's handler writes in a transaction the engine opens on the store's pool
//! (`BEGIN`, at the session's isolation) and locks with `Tx::mysql`; the completion is an
//! `UPDATE` of the record fenced by the claim's token inside that transaction, then `COMMIT`.
//! The record's row is locked only from that `UPDATE` to the `COMMIT`: renewals of the claim go
//! on while the handler runs. The `UPDATE` reads the newest committed row, not the transaction's
//! snapshot, so a takeover that committed while the handler ran fences it (zero rows: the
//! handler's writes roll back, the client gets 409). Its time to live counts from the
//! completion's own statement ([clock](#clock)).
//!
//! MariaDB has `innodb_snapshot_isolation` in its recent releases (10.11.19 here, off by
//! default) and turns it on by default from 11.6: a locking read of a row that changed after the
//! transaction's snapshot was taken then fails with error 1020. A renewal changes the record's
//! row while the handler runs, so on a server that has the variable (the store looks for it on
//! start-up) the completion runs as `SET STATEMENT innodb_snapshot_isolation = OFF FOR UPDATE
//! ...`: that one statement is exempt, the handler's own statements keep the session's setting.
//! A test opens a route's transaction with the variable on, reads in it, renews the claim, and
//! commits (and shows that a plain update of the renewed row in such a transaction fails).
//!
//! A commit whose answer is lost is checked: the record carries the claim's token once it
//! committed.
//!
//! # TLS
//!
//! With the cargo feature `tls` (of this crate, or of `idempotent-axum` / `idempotent-actix`),
//! connections use TLS as the URL's parameters say, read by sqlx:
//!
//! ```text
//! mysql://app:password@db.example.com:3306/app?ssl-mode=VERIFY_IDENTITY
//! mysql://app@10.0.0.5:3306/app?ssl-mode=VERIFY_IDENTITY&ssl-ca=/etc/app/db-ca.pem
//! ```
//!
//! - `ssl-mode=VERIFY_IDENTITY`: TLS, the server's certificate must chain to a trusted root and
//!   name the URL's host. Use it for any server reached over a network. `VERIFY_CA` checks the
//!   chain but not the name; `REQUIRED` encrypts without checking the certificate at all;
//!   `PREFERRED` (sqlx's default) tries TLS and falls back to a connection in clear, accepting
//!   any certificate; `DISABLED` never uses TLS.
//! - Trusted roots: the platform's root certificates, plus the PEM file `ssl-ca=PATH` when given.
//! - `ssl-cert=PATH&ssl-key=PATH`: a client certificate.
//!
//! A server whose certificate does not verify is refused when the store connects:
//! [`MySqlStore::connect`] fails with [`StoreError::Unavailable`] whose message gives rustls's
//! reason and says that it is the server's certificate that does not verify. Without the feature
//! sqlx is built without TLS: a URL whose `ssl-mode` needs TLS is [`StoreError::Config`] naming
//! the feature, and `PREFERRED` connects in clear.

use super::sql::{
    abandoned_claim_retention_ms, admit_row, column, decide_row, millis, record_bytes, record_info, rendered, retrying,
    sealed, Backend, CommonStatements, Failure, SqlConfig, SqlStore,
};
use super::{quota, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::transaction::TransactionalStore;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::mysql::{
    MySqlArguments, MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlPool, MySqlPoolOptions, MySqlRow,
};
use sqlx::query::Query;
use sqlx::{Execute, Executor, MySql, SqlStr, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// Settings of a [`MySqlStore`]: the shared ones, and [`database`](SqlConfig::database) and
/// [`acquire_timeout`](SqlConfig::acquire_timeout).
pub type MySqlConfig = SqlConfig<MySql>;

/// A [`Store`] in a MySQL or MariaDB table; see the [module docs](self) for how it works.
///
/// Cloning is cheap and shares the pool and the sweeper.
pub type MySqlStore = SqlStore<MySql>;

/// The named lock (`GET_LOCK`) instances take turns on while migrating. Named locks are the
/// server's, not a database's: stores of other databases on the server wait for each other's
/// migrations too, which costs nothing but a short wait at start-up.
const MIGRATION_LOCK: &str = "idempotent-core migrations";

/// How long an instance waits for another's migrations, in seconds.
const MIGRATION_LOCK_WAIT: i64 = 60;

/// How many times a claim is retried when a concurrent write came between its read and its
/// write.
const CLAIM_ATTEMPTS: usize = 16;

/// MySQL's and MariaDB's error numbers the store acts on.
mod code {
    /// `ER_CHECKREAD`: MariaDB's `innodb_snapshot_isolation` refused a locking read.
    pub const CHECKREAD: u16 = 1020;
    /// `ER_SERVER_SHUTDOWN`.
    pub const SERVER_SHUTDOWN: u16 = 1053;
    /// `ER_LOCK_WAIT_TIMEOUT`.
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// `ER_LOCK_DEADLOCK`.
    pub const DEADLOCK: u16 = 1213;
    /// `ER_UNKNOWN_SYSTEM_VARIABLE`.
    pub const UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;
    /// MariaDB's `ER_CONNECTION_KILLED`.
    pub const CONNECTION_KILLED: u16 = 1927;
    /// MySQL's `ER_SESSION_WAS_KILLED`.
    pub const SESSION_WAS_KILLED: u16 = 3169;
    /// MySQL's `ER_CLIENT_INTERACTION_TIMEOUT` (`wait_timeout`).
    pub const CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
}

/// What the shared SQL store code keeps for MySQL (public only to be named by [`Backend`]).
mod own {
    use super::CommonStatements;
    use sqlx::SqlStr;
    use std::time::Duration;

    /// MySQL's own settings.
    #[derive(Debug, Clone)]
    pub struct Settings {
        pub(super) acquire_timeout: Duration,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self { acquire_timeout: Duration::from_secs(5) }
        }
    }

    /// The statements of one configured store, rendered once.
    #[derive(Debug)]
    pub struct Statements {
        pub(super) select: SqlStr,
        pub(super) insert: SqlStr,
        pub(super) quota: SqlStr,
        pub(super) takeover: SqlStr,
        pub(super) renew: SqlStr,
        pub(super) complete: SqlStr,
        /// `complete` exempt from MariaDB's `innodb_snapshot_isolation`, for the transactional
        /// commit.
        pub(super) complete_in_snapshot: SqlStr,
        pub(super) release: SqlStr,
        pub(super) present: SqlStr,
        pub(super) inspect: SqlStr,
        pub(super) sweep: SqlStr,
        pub(super) common: CommonStatements,
    }

    /// What the store learnt about the server when it started.
    #[derive(Debug)]
    pub struct Session {
        /// The server has `innodb_snapshot_isolation` (MariaDB 10.6.18 and later): the
        /// transactional completion turns it off for its one statement.
        pub(super) snapshot_isolation: bool,
    }
}

use own::{Session, Settings, Statements};

impl SqlConfig<MySql> {
    /// Puts the table in `database` instead of the connection's (created by the migration if
    /// missing).
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.schema = Some(database.into());
        self
    }

    /// How long a request waits for a connection before the store reports itself unavailable
    /// (default 5 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.settings.acquire_timeout = timeout;
        self
    }
}

/// The digest a record is filed under: SHA-256 of its length-prefixed key.
fn digest(key: &RecordKey) -> Vec<u8> {
    Sha256::digest(key.storage_key().as_bytes()).to_vec()
}

/// A lease or time to live in microseconds, for `INTERVAL ? MICROSECOND`.
fn micros(d: Duration) -> i64 {
    millis(d) * 1000
}

type MyQuery = Query<'static, MySql, MySqlArguments>;

impl sealed::Sealed for MySql {}

#[async_trait]
impl Backend for MySql {
    const STORE: &'static str = "mysql";
    const MAX_CONNECTIONS: u32 = 10;
    const SWEEP_BATCH: u32 = 1000;
    // MySQL's identifiers are at most 64 characters, and the table of applied migrations adds
    // `_migrations` (11) to the table's name.
    const MAX_NAME_LEN: usize = 53;
    const NAME_RULE: &'static str = "MySQL table and database names must be 1 to 53 bytes without NUL (MySQL's limit of 64, less the `_migrations` suffix of the migrations' table)";
    const CONFLICT: &'static str = "deadlock or lock wait timeout";
    const MIGRATIONS: &'static [(i32, &'static str)] = &[
        (
            1,
        "{schema_ddl}CREATE TABLE IF NOT EXISTS {table} (
    key_hash    BINARY(32)    NOT NULL,
    scope       TEXT          CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    actor       TEXT          CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    idem_key    TEXT          CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    fingerprint VARBINARY(64) NOT NULL,
    state       VARCHAR(16)   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    token       VARCHAR(64)   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    response    LONGBLOB      NULL,
    expires_at  DATETIME(6)   NOT NULL,
    created_at  DATETIME(6)   NOT NULL,
    PRIMARY KEY (key_hash),
    KEY expires_at_idx (expires_at)
) ENGINE = InnoDB;
",
        ),
        // What each record counts towards its actor's bound (`MySqlConfig::actor_max_bytes`),
        // and the index that sums an actor's live records. Rows written before count nothing.
        (
            2,
            "ALTER TABLE {table} ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0, ADD KEY actor_idx (actor(191), expires_at, bytes);
",
        ),
    ];

    type Settings = Settings;
    type Statements = Statements;
    type Session = Session;

    fn statements(config: &MySqlConfig) -> Statements {
        let t = config.qualified_table();
        let now = "UTC_TIMESTAMP(6)";
        // Milliseconds since the Unix epoch of a DATETIME(6) column in UTC.
        let epoch_ms =
            |col: &str| format!("CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {col}) DIV 1000 AS SIGNED)");
        let complete = format!(
            "UPDATE {t} SET state = 'completed', response = ?, expires_at = {now} + INTERVAL ? MICROSECOND, bytes = ?
WHERE key_hash = ? AND token = ? AND state = 'in_progress'"
        );
        Statements {
            select: rendered(format!(
                "SELECT fingerprint, state, token, response, TIMESTAMPDIFF(MICROSECOND, {now}, expires_at) AS remaining_us
FROM {t} WHERE key_hash = ?"
            )),
            insert: rendered(format!(
                "INSERT INTO {t} (key_hash, scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at,
    bytes)
VALUES (?, ?, ?, ?, ?, 'in_progress', ?, NULL, {now} + INTERVAL ? MICROSECOND, {now}, ?)"
            )),
            // The bytes of the actor's live records other than the key's own, and the
            // milliseconds until the earliest of them expires.
            quota: rendered(format!(
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS SIGNED) AS used,
    CAST(TIMESTAMPDIFF(MICROSECOND, {now}, MIN(expires_at)) DIV 1000 AS SIGNED) AS earliest_ms
FROM {t} WHERE actor = ? AND expires_at > {now} AND key_hash <> ?"
            )),
            // The compare-and-set: only a row whose lease or time to live has passed, checked on
            // the newest committed version under the row's lock; an abandoned claim only by the
            // same request (its fingerprint), or once its retention is over.
            takeover: rendered(format!(
                "UPDATE {t} SET scope = ?, actor = ?, idem_key = ?, fingerprint = ?, state = 'in_progress', token = ?,
    response = NULL, created_at = {now}, expires_at = {now} + INTERVAL ? MICROSECOND, bytes = ?
WHERE key_hash = ? AND expires_at <= {now}
    AND (state <> 'in_progress' OR fingerprint = ? OR token = ? OR expires_at <= {now} - INTERVAL ? MICROSECOND)"
            )),
            renew: rendered(format!(
                "UPDATE {t} SET expires_at = {now} + INTERVAL ? MICROSECOND
WHERE key_hash = ? AND token = ? AND state = 'in_progress'"
            )),
            complete_in_snapshot: rendered(format!("SET STATEMENT innodb_snapshot_isolation = OFF FOR {complete}")),
            complete: rendered(complete),
            release: rendered(format!("DELETE FROM {t} WHERE key_hash = ? AND token = ? AND state = 'in_progress'")),
            present: rendered(format!("SELECT 1 FROM {t} WHERE key_hash = ?")),
            // Live records, and in-progress ones until `ABANDONED_CLAIM_RETENTION` after their
            // lease, as the sweeper keeps them.
            inspect: rendered(format!(
                "SELECT state, response, {} AS created_ms, {} AS expires_ms FROM {t}
WHERE key_hash = ? AND (expires_at > {now}
    OR (state = 'in_progress' AND expires_at > {now} - INTERVAL ? MICROSECOND))",
                epoch_ms("created_at"),
                epoch_ms("expires_at"),
            )),
            common: CommonStatements {
                invalidate: rendered(format!("DELETE FROM {t} WHERE key_hash = ?")),
                invalidate_completed: rendered(format!("DELETE FROM {t} WHERE key_hash = ? AND state = 'completed'")),
                state: rendered(format!("SELECT state FROM {t} WHERE key_hash = ?")),
                completed_by: rendered(format!(
                    "SELECT 1 FROM {t} WHERE key_hash = ? AND token = ? AND state = 'completed'"
                )),
            },
            // Completed records go at the end of their time to live, in-progress ones only
            // `ABANDONED_CLAIM_RETENTION` after their lease; oldest first, a batch at a time.
            sweep: rendered(format!(
                "DELETE FROM {t} WHERE expires_at <= {now}
    AND (state <> 'in_progress' OR expires_at <= {now} - INTERVAL ? MICROSECOND)
ORDER BY expires_at LIMIT ?"
            )),
        }
    }

    async fn attach(pool: &MySqlPool, _own: bool) -> Result<Session, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let autocommit: i64 = sqlx::query_scalar("SELECT CAST(@@autocommit AS SIGNED)").fetch_one(&mut *conn).await?;
        if autocommit != 1 {
            return Err(sqlx::Error::Configuration(
                "the pool's sessions run with autocommit off; the idempotency store's statements must each commit on their own (set autocommit = 1)".into(),
            ));
        }
        // MySQL 8 and MariaDB 11.1 call it `transaction_isolation`, MariaDB 10 `tx_isolation`.
        let isolation: String = match optional_variable(&mut conn, "SELECT @@transaction_isolation").await? {
            Some(level) => level,
            None => sqlx::query_scalar("SELECT @@tx_isolation").fetch_one(&mut *conn).await?,
        };
        if isolation.eq_ignore_ascii_case("READ-UNCOMMITTED") {
            return Err(sqlx::Error::Configuration(
                "the pool's sessions run READ UNCOMMITTED; the idempotency store needs READ COMMITTED or stricter (a replay must never read a completion that may still roll back)".into(),
            ));
        }
        let snapshot_isolation =
            optional_variable(&mut conn, "SELECT CAST(@@innodb_snapshot_isolation AS CHAR)").await?.is_some();
        Ok(Session { snapshot_isolation })
    }

    fn common(sql: &Statements) -> &CommonStatements {
        &sql.common
    }

    fn quote_ident(name: &str) -> String {
        format!("`{}`", name.replace('`', "``"))
    }

    fn bind_key(query: MyQuery, key: &RecordKey) -> MyQuery {
        query.bind(digest(key))
    }

    fn failure(e: &sqlx::Error) -> Failure {
        match e {
            sqlx::Error::Database(e) => {
                match e.try_downcast_ref::<MySqlDatabaseError>().map(MySqlDatabaseError::number) {
                    Some(code::DEADLOCK | code::LOCK_WAIT_TIMEOUT | code::CHECKREAD) => Failure::Conflict,
                    Some(
                        code::CONNECTION_KILLED
                        | code::SERVER_SHUTDOWN
                        | code::SESSION_WAS_KILLED
                        | code::CLIENT_INTERACTION_TIMEOUT,
                    ) => Failure::Lost,
                    _ => Failure::Other,
                }
            }
            sqlx::Error::Io(_) => Failure::Lost,
            _ => Failure::Other,
        }
    }

    fn complete_query(
        sql: &Statements,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> MyQuery {
        complete(&sql.complete, key, token, response, ttl)
    }

    fn outcome_query(
        sql: &Statements,
        session: &Session,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> MyQuery {
        let statement = if session.snapshot_isolation { &sql.complete_in_snapshot } else { &sql.complete };
        complete(statement, key, token, response, ttl)
    }

    async fn begin_outcome(pool: &MySqlPool, _session: &Session) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        pool.begin().await
    }

    async fn execute_in(tx: &mut Transaction<'static, MySql>, query: MyQuery) -> Result<u64, sqlx::Error> {
        Ok(query.execute(&mut **tx).await?.rows_affected())
    }

    async fn committed(store: &MySqlStore, key: &RecordKey, token: &ClaimToken) -> Result<bool, StoreError> {
        // Completed rows keep their token.
        let (row, _) = store.fetch(MySqlStore::fenced_query(&store.sql().common.completed_by, key, token)).await?;
        Ok(row.is_some())
    }

    fn sweep_query(sql: &Statements, batch: i64) -> MyQuery {
        sqlx::query(sql.sweep.clone()).bind(abandoned_claim_retention_ms() * 1000).bind(batch)
    }

    async fn execute(pool: &MySqlPool, _session: &Session, query: MyQuery) -> Result<u64, sqlx::Error> {
        Ok(run(pool, query, false).await?.0.affected())
    }

    async fn begin_migration(
        pool: &MySqlPool,
        config: &MySqlConfig,
        versions: &str,
    ) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        // A pool of one connection of its own, dropped (and its connection closed) with the
        // transaction: a named lock belongs to its session, and a session that went back to the
        // application's pool after a failed migration would keep it.
        let own = MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool.options().get_acquire_timeout())
            .connect_with((*pool.connect_options()).clone())
            .await?;
        let mut tx = own.begin().await?;
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(MIGRATION_LOCK)
            .bind(MIGRATION_LOCK_WAIT)
            .fetch_one(&mut *tx)
            .await?;
        if locked != Some(1) {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("another instance held the migrations' lock for {MIGRATION_LOCK_WAIT} s"),
            )));
        }
        if let Some(database) = &config.schema {
            (&mut *tx)
                .execute(sqlx::raw_sql(rendered(format!(
                    "CREATE DATABASE IF NOT EXISTS {}",
                    <MySql as Backend>::quote_ident(database)
                ))))
                .await?;
        }
        (&mut *tx)
            .execute(sqlx::raw_sql(rendered(format!(
                "CREATE TABLE IF NOT EXISTS {versions} (version INT NOT NULL PRIMARY KEY, applied_at DATETIME(6) NOT NULL) ENGINE = InnoDB"
            ))))
            .await?;
        Ok(tx)
    }

    async fn applied_version(conn: &mut MySqlConnection, versions: &str) -> Result<Option<i32>, sqlx::Error> {
        sqlx::query_scalar(rendered(format!("SELECT MAX(version) FROM {versions}"))).fetch_one(conn).await
    }

    async fn apply_migration(
        conn: &mut MySqlConnection,
        versions: &str,
        version: i32,
        sql: SqlStr,
    ) -> Result<(), sqlx::Error> {
        (&mut *conn).execute(sqlx::raw_sql(sql)).await?;
        sqlx::query(rendered(format!("INSERT INTO {versions} (version, applied_at) VALUES (?, UTC_TIMESTAMP(6))")))
            .bind(version)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn end_migration(mut tx: Transaction<'static, MySql>) -> Result<(), sqlx::Error> {
        sqlx::query("DO RELEASE_LOCK(?)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
        tx.commit().await
    }
}

/// The fenced completion `statement` of `key` by `token`: stores `response` for `ttl`.
fn complete(statement: &SqlStr, key: &RecordKey, token: &ClaimToken, response: Vec<u8>, ttl: Duration) -> MyQuery {
    let bytes = record_bytes(key, response.len());
    sqlx::query(statement.clone()).bind(response).bind(micros(ttl)).bind(bytes).bind(digest(key)).bind(&token.0)
}

/// The value `select` (one system variable) reads, or `None` when the server has no such
/// variable.
async fn optional_variable(conn: &mut MySqlConnection, select: &'static str) -> Result<Option<String>, sqlx::Error> {
    match sqlx::query_scalar::<_, String>(select).fetch_one(conn).await {
        Ok(value) => Ok(Some(value)),
        Err(sqlx::Error::Database(e))
            if e.try_downcast_ref::<MySqlDatabaseError>().map(MySqlDatabaseError::number)
                == Some(code::UNKNOWN_SYSTEM_VARIABLE) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a statement answered: its row, or the rows it matched.
enum Answer {
    Row(Option<MySqlRow>),
    Affected(u64),
}

impl Answer {
    fn row(self) -> Option<MySqlRow> {
        match self {
            Answer::Row(row) => row,
            Answer::Affected(_) => None,
        }
    }

    fn affected(self) -> u64 {
        match self {
            Answer::Row(row) => u64::from(row.is_some()),
            Answer::Affected(n) => n,
        }
    }
}

/// Runs `query` on `pool` with the retries the module docs describe (again after a deadlock or
/// a lock wait timeout, once more on a live connection after a lost one): its row when `fetch`,
/// else the rows it matched, and whether an attempt was lost with its connection first.
async fn run(pool: &MySqlPool, mut query: MyQuery, fetch: bool) -> Result<(Answer, bool), sqlx::Error> {
    let arguments = query.take_arguments().map_err(sqlx::Error::Encode)?.unwrap_or_default();
    let sql = query.sql();
    retrying(pool, |conn| {
        let query = sqlx::query_with(sql.clone(), arguments.clone());
        Box::pin(async move {
            if fetch {
                query.fetch_optional(conn).await.map(Answer::Row)
            } else {
                query.execute(conn).await.map(|done| Answer::Affected(done.rows_affected()))
            }
        })
    })
    .await
}

/// The named lock (`GET_LOCK`) the claims of `actor` take turns on under a per-caller bound: at
/// most 64 characters, as MySQL allows, whatever the actor.
fn actor_lock(actor: &str) -> String {
    let mut name = String::from("idempotent actor ");
    crate::push_hex(&mut name, &Sha256::digest(actor.as_bytes())[..20]);
    name
}

/// Whether `e` is a duplicate key: another claim inserted the key first.
fn duplicate_key(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(e) if e.is_unique_violation())
}

impl SqlStore<MySql> {
    /// Connects to `url` (`mysql://user:password@host:port/database`, or `mariadb://...`) with
    /// the default [`MySqlConfig`], applies the migrations and starts the sweeper.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, MySqlConfig::default()).await
    }

    /// Connects to `url` with `config`.
    ///
    /// An unreachable server is [`StoreError::Unavailable`]; a malformed URL or configuration is
    /// [`StoreError::Config`], and so is a server whose sessions run with `autocommit` off or at
    /// `READ UNCOMMITTED` (see [isolation](self#isolation-deadlocks-lock-wait-timeouts)).
    pub async fn connect_with(url: &str, config: MySqlConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let options =
            MySqlConnectOptions::from_str(url).map_err(|e| StoreError::Config(format!("invalid MySQL URL: {e}")))?;
        #[cfg(not(feature = "tls"))]
        if !matches!(options.get_ssl_mode(), sqlx::mysql::MySqlSslMode::Disabled | sqlx::mysql::MySqlSslMode::Preferred)
        {
            return Err(StoreError::Config(
                "a MySQL URL with `ssl-mode=REQUIRED`, `VERIFY_CA` or `VERIFY_IDENTITY` needs the `tls` cargo feature (of idempotent-axum, idempotent-actix or idempotent-core)".into(),
            ));
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.settings.acquire_timeout)
            // A ping before every query would double the round trips; an operation that meets a
            // dead connection runs again on a live one (see `retrying`).
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| match MySql::unavailable(e) {
                StoreError::Unavailable(detail) => StoreError::Unavailable(super::explain_tls(
                    detail,
                    "one in the URL's `ssl-ca=` file",
                    "the URL's `ssl-cert=` and `ssl-key=`",
                )),
                other => other,
            })?;
        Self::start(pool, config, true).await
    }

    /// Runs `query` with the store's retries: its row, and whether an attempt was lost first.
    async fn fetch(&self, query: MyQuery) -> Result<(Option<MySqlRow>, bool), StoreError> {
        let (answer, lost) = run(self.pool(), query, true).await.map_err(MySql::unavailable)?;
        Ok((answer.row(), lost))
    }

    /// Runs `query` with the store's retries: the rows it matched, and whether an attempt was
    /// lost first.
    async fn exec(&self, query: MyQuery) -> Result<(u64, bool), StoreError> {
        let (answer, lost) = run(self.pool(), query, false).await.map_err(MySql::unavailable)?;
        Ok((answer.affected(), lost))
    }

    /// Runs `write`, the claim of `key` (filed under `hash`) as an insert or a takeover, under
    /// its actor's bound `max`: on one connection that holds the actor's named lock
    /// (`GET_LOCK`), the sum of the actor's live records, the admission, then `write`, so that
    /// the claims of one actor take turns and each sees those before it. The rows `write`
    /// changed, or its error (a duplicate key: another claim inserted the key first); a refusal
    /// is `Err`. The lock is released at the end; on a failure the connection is closed, which
    /// releases it.
    async fn bounded(
        &self,
        key: &RecordKey,
        hash: &[u8],
        write: MyQuery,
        max: usize,
    ) -> Result<Result<u64, sqlx::Error>, StoreError> {
        let name = actor_lock(&key.actor);
        let mut conn = self.pool().acquire().await.map_err(MySql::unavailable)?;
        let wait = i64::try_from(self.config().settings.acquire_timeout.as_secs()).unwrap_or(5).max(1);
        let locked: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT GET_LOCK(?, ?)").bind(&name).bind(wait).fetch_one(&mut *conn).await;
        match locked {
            Ok(Some(1)) => {}
            Ok(_) => {
                return Err(StoreError::Unavailable(format!("MySQL: the caller's claims lock was busy for {wait} s")))
            }
            Err(e) => {
                drop(conn.detach());
                return Err(MySql::unavailable(e));
            }
        }
        let quota = sqlx::query(self.sql().quota.clone()).bind(&key.actor).bind(hash.to_vec());
        let answer = async {
            let used = quota.fetch_one(&mut *conn).await?;
            if let Err(refused) = admit_row(&used, key, quota::record_bytes(key, 0), max) {
                return Ok(Err(refused));
            }
            Ok(Ok(write.execute(&mut *conn).await.map(|done| done.rows_affected())))
        };
        let answer: Result<Result<Result<u64, sqlx::Error>, StoreError>, sqlx::Error> = answer.await;
        match answer {
            Ok(answer) => {
                // Released before the connection goes back to the pool; if that fails, the
                // connection is closed, which releases it.
                if sqlx::query("DO RELEASE_LOCK(?)").bind(&name).execute(&mut *conn).await.is_err() {
                    drop(conn.detach());
                }
                answer
            }
            Err(e) => {
                drop(conn.detach());
                Err(MySql::unavailable(e))
            }
        }
    }

    /// A statement with `hash` bound first.
    fn on(sql: &SqlStr, hash: &[u8]) -> MyQuery {
        sqlx::query(sql.clone()).bind(hash.to_vec())
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        // One token for every attempt: a claim run again after a lost answer finds its own record.
        let hash = digest(key);
        let retention_us = abandoned_claim_retention_ms() * 1000;
        let sql = self.sql();
        let max = self.config().bound_for(&key.actor);
        for _ in 0..CLAIM_ATTEMPTS {
            let (row, _) = self.fetch(Self::on(&sql.select, &hash)).await?;
            let Some(row) = row else {
                let insert = Self::on(&sql.insert, &hash)
                    .bind(&key.scope)
                    .bind(&key.actor)
                    .bind(&key.key)
                    .bind(&fingerprint.0[..])
                    .bind(&token.0)
                    .bind(micros(lease))
                    .bind(record_bytes(key, 0));
                let written = match max {
                    Some(max) => self.bounded(key, &hash, insert, max).await?.map(|_| ()),
                    None => run(self.pool(), insert, false).await.map(drop),
                };
                match written {
                    Ok(_) => return Ok(Claim::Acquired(token.clone())),
                    // Another claim inserted the key since the read: read it.
                    Err(e) if duplicate_key(&e) => continue,
                    // Under the actor's lock, a conflict is not run again by `run`: read again.
                    Err(e) if max.is_some() && MySql::failure(&e) == Failure::Conflict => continue,
                    Err(e) => return Err(MySql::unavailable(e)),
                }
            };
            let remaining_us: i64 = column(&row, "remaining_us")?;
            let state: String = column(&row, "state")?;
            let held: Option<String> = column(&row, "token")?;
            let own = state == "in_progress" && held.as_deref() == Some(token.0.as_str());
            if own && remaining_us > 0 {
                return Ok(Claim::Acquired(token.clone()));
            }
            if remaining_us > 0 {
                return decide_row(&row, fingerprint, Duration::from_micros(remaining_us as u64));
            }
            // Its own claim whose lease ran out is taken anew below, with a new lease.
            let stored: Vec<u8> = column(&row, "fingerprint")?;
            if state == "in_progress" && !own && stored != fingerprint.0 && remaining_us > -retention_us {
                // An abandoned claim of another request: its outcome is unknown.
                return Ok(Claim::Mismatch);
            }
            let takeover = sqlx::query(sql.takeover.clone())
                .bind(&key.scope)
                .bind(&key.actor)
                .bind(&key.key)
                .bind(&fingerprint.0[..])
                .bind(&token.0)
                .bind(micros(lease))
                .bind(record_bytes(key, 0))
                .bind(hash.clone())
                .bind(&fingerprint.0[..])
                .bind(&token.0)
                .bind(retention_us);
            let taken = match max {
                Some(max) => match self.bounded(key, &hash, takeover, max).await? {
                    Ok(rows) => rows,
                    // A conflict: read the row again.
                    Err(e) if MySql::failure(&e) == Failure::Conflict => continue,
                    Err(e) => return Err(MySql::unavailable(e)),
                },
                None => self.exec(takeover).await?.0,
            };
            if taken == 1 {
                return Ok(Claim::Acquired(token.clone()));
            }
            // The row was taken over, renewed, completed or deleted since the read: read it.
        }
        Err(StoreError::Unavailable("MySQL: claim kept losing races on one key".into()))
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        // Running it twice extends the lease twice: no check needed after a lost answer.
        let query = sqlx::query(self.sql().renew.clone()).bind(micros(lease)).bind(digest(key)).bind(&token.0);
        match self.exec(query).await?.0 {
            0 => Err(StoreError::Fenced),
            _ => Ok(()),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (done, _) = self.exec(MySql::complete_query(self.sql(), key, token, response.encode(), ttl)).await?;
        if done > 0 {
            return Ok(());
        }
        // An earlier attempt (lost with its connection here, or sent again by the caller) may have
        // completed the record: then it carries our token.
        if MySql::committed(self, key, token).await? {
            return Ok(());
        }
        Err(StoreError::Fenced)
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        let (done, lost) = self.exec(Self::fenced_query(&self.sql().release, key, token)).await?;
        if done > 0 {
            return Ok(());
        }
        if lost {
            // The lost attempt may have deleted the record: then the key has none.
            let (present, _) = self.fetch(Self::key_query(&self.sql().present, key)).await?;
            if present.is_none() {
                return Ok(());
            }
        }
        Err(StoreError::Fenced)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let query = Self::key_query(&self.sql().inspect, key).bind(abandoned_claim_retention_ms() * 1000);
        let (row, _) = self.fetch(query).await?;
        row.as_ref().map(record_info).transpose()
    }

    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.invalidate_record(key, purge).await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    fn transactions(&self) -> Option<&dyn TransactionalStore> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        MySql::STORE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the `tls` feature, a URL that requires TLS is refused before connecting, naming
    /// the feature.
    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn tls_urls_need_the_feature() {
        for mode in ["REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY"] {
            let url = format!("mysql://u@127.0.0.1:1/db?ssl-mode={mode}");
            let Err(StoreError::Config(msg)) = MySqlStore::connect(&url).await else { panic!("{mode}") };
            assert!(msg.contains("`tls` cargo feature"), "{msg}");
        }
    }

    #[test]
    fn migration_sql_quotes_names() {
        let sql = MySqlStore::migration_sql(&MySqlConfig::new().database("app").table("we`ird"));
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS `app`;"), "{sql}");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS `app`.`we``ird`"), "{sql}");
    }

    #[test]
    fn names_too_long_for_mysql_are_a_configuration_error() {
        assert!(MySqlConfig::new().table("t".repeat(53)).validate().is_ok());
        let Err(StoreError::Config(msg)) = MySqlConfig::new().table("t".repeat(54)).validate() else { panic!() };
        assert!(msg.contains("53 bytes"), "{msg}");
        assert!(MySqlConfig::new().database("").validate().is_err());
    }

    /// The digest is the key's, length-prefixed: parts that would run together differ.
    #[test]
    fn keys_are_filed_under_a_digest_of_their_length_prefixed_parts() {
        let a = digest(&RecordKey::new("a", "b|c", "d"));
        let b = digest(&RecordKey::new("a|b", "c", "d"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_ne!(digest(&RecordKey::new("s", "a", "Key")), digest(&RecordKey::new("s", "a", "key")));
        assert_ne!(digest(&RecordKey::new("s", "a", "k")), digest(&RecordKey::new("s", "a", "k ")));
    }
}
