//! PostgreSQL store (feature `postgres`): durable, shared by any number of instances.
//!
//! # Table
//!
//! One row per record, primary key `(scope, actor, idem_key)`:
//! `fingerprint` (32 bytes), `state` (`in_progress` or `completed`), `token` (the claim's token;
//! kept once completed, so that a completion retried after a lost answer recognises its own
//! work), `response` ([`StoredResponse::encode`] once completed), `expires_at` and
//! `created_at`. `expires_at` is the end of the lease while the record is in progress and the end
//! of its time to live once completed, so one column decides whether a record is live.
//!
//! Every time comes from the database clock, never from the application's, so instances with
//! skewed clocks agree on leases and expiry.
//!
//! # Clock
//!
//! A statement that runs on its own (a claim, a renewal, an ordinary completion) reads the clock
//! with `now()`: one time for the whole statement. A transactional route's completion is the
//! exception: it runs inside the handler's transaction, where `now()` is the time the transaction
//! began, before the handler ran; a time to live counted from it would be shortened by the
//! handler's duration (a handler slower than the time to live would commit a record already
//! expired, and the next retry would run it again on top of its committed writes). The completion
//! therefore reads `clock_timestamp()`, the time it is written, whichever way it runs. No other
//! statement of the store runs inside that transaction.
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
//! Every part finds the key's row by the primary key: the expiry test of `takeover` is spelled so
//! that no other index can answer it (a generic plan once chose the `actor` index and read all of
//! an anonymous caller's records per claim).
//!
//! - Absent: `inserted` writes the row (a concurrent insert of the same key makes it do nothing).
//! - Expired (a crashed owner's lease, or a completed record past its time to live): `takeover`
//!   rewrites it. Under `READ COMMITTED` an `UPDATE` that meets a row changed concurrently waits
//!   for that change and re-checks `expires_at <= now()` on the newest version, so of many
//!   claimers racing for one expired lease exactly one takes it: a compare-and-set, never a blind
//!   overwrite. Expired rows are thereby invisible to claims before the sweeper deletes them.
//! - Live: the statement returns the row (fingerprint, state, response, remaining lease) and
//!   writes nothing; the mismatch, replay and in-progress answers are decided from it. A live
//!   in-progress row that carries the claim's own token (a claim run again after its answer was
//!   lost, see [lost connections](#lost-connections)) answers [`Claim::Acquired`]; one whose
//!   lease ran out is taken anew by `takeover`, with a new lease, and answers only if that
//!   update wrote it (a claim that took it over meanwhile makes the statement return no row).
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
//! mismatch or an in-progress answer costs one. Renewals add one per heartbeat. Under load, the
//! claims and completions of concurrent requests share statements (see
//! [group commit](#group-commit)). sqlx prepares each statement once per connection; connections
//! are not pinged before use (that would add a round trip to every request), see
//! [below](#lost-connections) for what happens when one turns out to be dead.
//!
//! # Group commit
//!
//! Each claim and each completion commits, and a commit waits for the server's write-ahead log to
//! reach the disk; with more concurrent requests than the pool has connections, requests also
//! queue for a connection. With [`PostgresConfig::group_commit`] above 1 (64 by default on a
//! pool the store opens, see the figures below), the claims and completions of concurrent
//! requests share statements under load, at most that many writes of a kind per statement:
//!
//! - While fewer than the pool's connections but four are taken by claims and completions sent
//!   on their own, the next is sent on its own too, exactly as without group commit: a lone
//!   request, or a few at once, wait no longer than they would without it.
//! - Beyond that, they queue for two writer tasks. A writer takes the writes waiting (at most the
//!   bound; never two claims, nor two completions, of one key: the second waits for a later
//!   batch) and sends the claims as one statement and the completions as another, at once, on two
//!   connections: the claim statement above over arrays (`unnest(...) WITH ORDINALITY`, each
//!   branch joined back to its input's number) and the fenced completion the same way. Each
//!   caller is answered from its own row once the statement committed, with the answer the single
//!   statement gives, under the same rules: a takeover is the same compare-and-set, row by row; a
//!   claim that a concurrent change hid from the snapshot gets no row and is sent again; a
//!   completion whose token was fenced out gets no row and is [`StoreError::Fenced`], alone, while
//!   the others of its batch are stored. Nothing waits for a batch to fill: the writes that come
//!   while a batch is in flight form the next. A batch of one write sends the single statement.
//! - A batch's rows are sent in the order of their keys, so two batches that meet on the same
//!   keys lock them in the same order. A batch that fails is retried whole after a conflict or a
//!   lost connection, as a single statement is; after any other error each of its writes is sent
//!   again on its own, so that a write that cannot be written fails alone. A write whose caller
//!   stopped waiting before its batch went out is not sent.
//! - The statement over arrays costs PostgreSQL more to plan (about 0.3 ms) than to run for a
//!   few rows (about 0.1 ms), and with array parameters the server keeps planning it anew at each
//!   execution. So with group commit on, the connections of a pool the store opens plan prepared
//!   statements once (`plan_cache_mode = force_generic_plan`, set with the isolation level below,
//!   on PostgreSQL 12 and later); every statement of the store is a lookup by key or a range on
//!   an index, which the generic plan serves as well. A pool the application hands in keeps its
//!   own setting.
//!
//! With a per-caller bound ([`PostgresConfig::actor_max_bytes`](super::sql::SqlConfig::actor_max_bytes))
//! every write is sent on its own: a bounded claim takes a transaction of its own, and the
//! batched statements write no byte counts (a record written by a batch counts nothing towards a
//! bound set later, until it expires).
//!
//! Renewals and releases are always sent on their own, and a transactional route's completion
//! runs inside its transaction, as before.
//!
//! It is on by default on a pool the store opens, at most 64 writes of a kind per statement (on a
//! pool handed to [`PostgresStore::from_pool`], only when set: see
//! [`PostgresConfig::group_commit`]). First executions per second over HTTP (the comparison
//! bench, `cargo bench -p idempotent-tests --bench compare -- --only "ours axum postgres,hand
//! axum postgres"`, full mode; a pool of 8; PostgreSQL 15 on a shared 2-core machine, commits
//! synced to disk), against a hand-written handler that sends each claim and each completion on
//! its own, at 1, 16 and 64 clients, two runs each (`BENCHMARKS.md`, "On by default", has four
//! more, with 1.93 to 2.97 at 64 clients):
//!
//! | store | 1 client | 16 clients | 64 clients |
//! |---|---|---|---|
//! | group commit (default) | 0.86, 0.81 | 1.40, 1.29 | 2.68, 2.68 |
//! | one statement per write (`group_commit(1)`) | 0.85, 0.85 | 0.95, 0.85 | 0.83, 0.88 |
//!
//! A lone request sends the same statements either way. At the store level (`cargo bench -p
//! idempotent-tests --bench throughput -- postgres-batch`, a claim then a completion per
//! caller), group commit served 1.50 to 1.90 times as many first executions at 16 callers and
//! 3.4 to 4.8 times at 64, in five runs of five, and was level at one. `BENCHMARKS.md` has the
//! runs. `group_commit(1)` turns it off: each claim and each completion is then a statement of
//! its own, and the pool's statements are planned as the server chooses.
//!
//! # Plans and statistics
//!
//! A generic plan is made when a connection first runs a statement, from the table's size and
//! statistics then, and made again only when the table is next analyzed. Every lookup by key is
//! written so that only the primary key can answer it, whatever the statistics. The statements
//! over arrays are not: while the table is small they join it by a sequential scan (the cheapest
//! plan then), and a connection keeps that plan as the table grows until the table is analyzed
//! again. On a table of 200,000 records planned while empty, a completion over arrays of one
//! row took 53 to 75 ms (a sequential scan; `EXPLAIN ANALYZE`, three runs), and 0.08 to 0.13 ms
//! once the table was analyzed (its primary key).
//!
//! Autovacuum analyzes a table once 50 rows and a tenth of it have changed since its last
//! analysis. Where it does not (turned off, or behind on a busy server), the sweeper does: after
//! each sweep, when that many rows have changed, it runs `ANALYZE` on the table, which makes every
//! connection's plans again. That needs the table's owner (or, on PostgreSQL 17, the `MAINTAIN`
//! privilege); without it the server skips it with a warning. With the sweeper off
//! ([`PostgresConfig::sweep_interval`] `None`), [`PostgresStore::sweep_expired`] does the same.
//!
//! # Isolation: `READ COMMITTED`, always
//!
//! The claim statement relies on `READ COMMITTED` (an `UPDATE` that meets a concurrently changed
//! row re-checks it and goes on). Under `REPEATABLE READ` or `SERIALIZABLE` it stays correct but
//! turns contention into serialization failures, which a server or a role whose
//! `default_transaction_isolation` is one of those would impose on every statement. So:
//!
//! - The pools the store opens ([`PostgresStore::connect_with`]) pin their sessions to it: each
//!   new connection runs `SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ
//!   COMMITTED` once (one round trip per connection, none per request; a session setting rather
//!   than a start-up `options` parameter, which connection poolers such as PgBouncer refuse).
//! - A pool the application hands in ([`PostgresStore::from_pool`]) is the application's: the
//!   store never changes its sessions' settings. It reads `default_transaction_isolation` once,
//!   on start-up. `read committed` (PostgreSQL's default): statements run as they are. Anything
//!   stricter: each statement runs in its own `BEGIN ISOLATION LEVEL READ COMMITTED` ... `COMMIT`,
//!   three round trips per operation instead of one. Measured on loopback against PostgreSQL 15
//!   (commits synced to disk, a shared 2-core machine), a first execution (claim, then
//!   completion) took 1.3 to 1.9 times as long, with 1 or 16 concurrent callers, over four runs
//!   (the ignored test `cost_of_read_committed_transactions` in `tests/tests/store_postgres.rs`
//!   prints it). Only such a pool pays it, and there plain statements would turn contention into
//!   serialization failures.
//! - Either way, a statement cancelled as a serialization failure or a deadlock (SQLSTATE
//!   `40001`, `40P01`; possible when connections' settings change after start-up) wrote nothing
//!   and is run again, up to 5 times, after a random pause (up to 10, 20, 40, 80 ms).
//!
//! # Lost connections
//!
//! After a server restart, a failover or `pg_terminate_backend`, the pool's idle connections are
//! dead, and the next statement on one fails (an I/O error, a closed connection, SQLSTATE class
//! `08`, `57P01`, `57P02`, `57P05`). The store then drops that connection and runs the operation
//! once more on a connection that answers a ping (dead idle connections are dropped in turn, and
//! the pool opens a new one when none is left), so a restart costs a few pings on the first
//! operation, not a failed request. It is not retried a second time: a server that stays away is
//! [`StoreError::Unavailable`].
//!
//! A lost connection may have lost only the answer: the statement may have run and committed.
//! Each operation is written so that running it again can never run a handler twice, and gives
//! the answer the first run would have given:
//!
//! - a claim presents the same token again; finding its own in-progress record, it answers
//!   [`Claim::Acquired`] with that token (without recognising it, [`Claim::InProgress`] would
//!   also be safe: the record would just wait for its lease to end);
//! - a renewal extends the lease again;
//! - a completion that finds nothing to complete looks for the record completed with its token
//!   (the token is kept in a completed row for that) and answers `Ok` when it is there;
//! - a release that finds nothing to release answers `Ok` when the key has no record left.
//!
//! # Fencing
//!
//! `complete`, `release` and `renew` carry `WHERE token = $t AND state = 'in_progress'`; zero
//! rows affected is [`StoreError::Fenced`]. They do not look at the lease: an expired lease that
//! no claim took over still belongs to its token (see [`Store`]). Under `READ COMMITTED` a
//! renewal or completion and a takeover of the same row are serialised by its row lock: the
//! later one re-checks its `WHERE` on the newer version, so either the late worker wins (and the
//! takeover sees a live lease or a completed record) or the takeover wins (and the worker, whose
//! token is gone, is fenced).
//!
//! # Expiry
//!
//! A completed record is deleted once past its time to live; an in-progress record only
//! [`ABANDONED_CLAIM_RETENTION`](super::ABANDONED_CLAIM_RETENTION) after its lease ended, so a
//! late worker can still complete it (claims do not wait for that: an expired lease can be taken
//! over at once). Records are deleted by a background task (every
//! [`PostgresConfig::sweep_interval`], in batches of [`PostgresConfig::sweep_batch`] rows locked
//! with `SKIP LOCKED`, so several instances sweeping at once do not contend), never on the
//! request path. The task stops when the store is dropped. [`PostgresStore::sweep_expired`] runs
//! one sweep on demand.
//!
//! # Per-caller bound
//!
//! Off by default; [`PostgresConfig::actor_max_bytes`] or `postgres://...?actor_max_bytes=32MiB`
//! sets it (the rule: [`quota`]). Each row's `bytes` column holds what it counts
//! ([`quota::record_bytes`]: 256 bytes, the scope's, actor's and key's
//! characters, the encoded response once completed), written by every claim and completion sent
//! on its own whether a bound is set or not (not by those of [group commit](#group-commit)); a row
//! counts while `expires_at` is ahead of `now()`.
//!
//! Without a bound a claim is the one statement above. With one, a bounded actor's claim first
//! reads the key's record (one round trip: a replay, a mismatch or an in-progress answer is that
//! read, as before); a claim that would write then runs in a `READ COMMITTED` transaction of its
//! own that takes a transaction-level advisory lock on the actor
//! (`pg_advisory_xact_lock(<class>, hashtext(actor))`), sums the actor's live rows through the
//! `(actor, expires_at, bytes)` index, and runs the claim statement only if the rule admits it: `BEGIN`,
//! lock, sum, claim, `COMMIT`, five round trips more than without a bound. The claims of one
//! actor thereby take turns, each statement's snapshot taken after the previous holder
//! committed, so of concurrent claims of one actor exactly as many acquire as the bound fits
//! (one statement could not do it: its snapshot is taken before it would wait for the lock).
//! Claims of other actors never wait for it (two actors whose hashes collide share a lock, and
//! only take turns). The cost, measured, is in the `store::sqlite` module docs ("Per-caller
//! bound"): about half the first executions per second with a bound, a quarter for one actor's
//! concurrent claims, which take turns.
//!
//! # Migrations
//!
//! By default the table is created on start-up (under an advisory lock, so instances starting
//! together do not race) and the applied version is recorded in `<table>_migrations`. An
//! application that manages its own migrations sets [`PostgresConfig::migrate`] to `false` and
//! applies [`PostgresStore::migration_sql`] itself. Version 2 adds the `bytes` column (a constant
//! default: no rewrite of the table) and the `(actor, expires_at, bytes)` index of the
//! [per-caller bound](#per-caller-bound), built while writes to the table wait (on a large table,
//! create it `CONCURRENTLY` by hand first, under the name the migration gives it). Rows already
//! there count nothing: they go within their time to live. Both statements are idempotent.
//! Version 3 rebuilds that index as a partial one, of the records that count (`WHERE bytes > 0`):
//! over the whole table, a plan made before PostgreSQL had statistics of a new table could find a
//! key through it and read every record of the actor on each claim; a partial index cannot answer
//! a lookup by key. On a large table, create the partial index `CONCURRENTLY` under another name
//! and drop the old one by hand first, then rename it to the name the migration gives it.
//!
//! # TLS
//!
//! With the cargo feature `tls` (of this crate, or of `idempotent-axum` / `idempotent-actix`),
//! connections use TLS as the URL's libpq-style parameters say, read by sqlx:
//!
//! ```text
//! postgres://user:password@db.example.com:5432/app?sslmode=verify-full
//! postgres://user@10.0.0.5:5432/app?sslmode=verify-full&sslrootcert=/etc/app/db-ca.pem
//! ```
//!
//! - `sslmode=verify-full`: TLS, the server's certificate must chain to a trusted root and name
//!   the URL's host (an IP address in the URL needs an IP address in the certificate). Use it
//!   for any server reached over a network: it is the only mode that stops an impostor.
//!   `verify-ca` checks the chain but not the name; `require` encrypts without checking the
//!   certificate at all; `prefer` (sqlx's default, as libpq's) tries TLS and falls back to a
//!   connection in clear, accepting any certificate; `disable` never uses TLS.
//! - Trusted roots: the platform's root certificates (the host's CA bundle, read by
//!   `rustls-native-certs`, or the file named by `SSL_CERT_FILE`), plus the PEM file
//!   `sslrootcert=PATH` when given (a private CA, a test's), read when each connection is
//!   opened.
//! - `sslcert=PATH&sslkey=PATH`: a client certificate, for servers that authenticate clients by
//!   certificate (`hostssl ... cert` in `pg_hba.conf`).
//!
//! A server whose certificate does not verify is refused when the store connects:
//! [`PostgresStore::connect`] fails with [`StoreError::Unavailable`] whose message gives rustls's
//! reason (e.g. `invalid peer certificate: UnknownIssuer`) and says that it is the server's TLS
//! certificate that does not verify. The same parameters apply to a pool the application builds
//! and hands to [`PostgresStore::from_pool`].
//!
//! Without the feature sqlx is built without TLS: a URL whose `sslmode` needs TLS (`require`,
//! `verify-ca`, `verify-full`) is [`StoreError::Config`] naming the feature, and `prefer` (the
//! default) connects in clear.

use super::sql::{
    abandoned_claim_retention_ms, admit_row, column, decide_row, millis, quote_ident, record_bytes, record_info,
    rendered, retrying, sealed, Backend, CommonStatements, Failure, SqlConfig, SqlStore,
};
use super::{quota, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::transaction::TransactionalStore;
use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{Connection, Executor, Postgres, SqlStr, Transaction};
use std::str::FromStr;
use std::time::Duration;

mod batch;
use super::batch::Batches;
use batch::Write;

/// What each connection of a pool the store opens runs once: its transactions `READ COMMITTED`
/// (see "Isolation" in the module docs).
const PIN_READ_COMMITTED: &str = "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// [`PIN_READ_COMMITTED`], and with group commit on, prepared statements planned once, generically
/// (`plan_cache_mode`, PostgreSQL 12 and later; earlier servers keep their default).
const PIN_READ_COMMITTED_GENERIC_PLANS: &str =
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED;
SELECT set_config('plan_cache_mode', 'force_generic_plan', false)
WHERE current_setting('server_version_num')::int >= 120000";

/// How many claims, and how many completions, share one statement by default on a pool the store
/// opens ([`PostgresConfig::group_commit`]; see "Group commit" in the module docs for the figures).
const DEFAULT_BATCH: usize = 64;

/// Settings of a [`PostgresStore`]: the shared ones, and [`schema`](SqlConfig::schema),
/// [`acquire_timeout`](SqlConfig::acquire_timeout) and
/// [`application_name`](SqlConfig::application_name).
pub type PostgresConfig = SqlConfig<Postgres>;

/// A [`Store`] in a PostgreSQL table; see the [module docs](self) for how it works.
///
/// Cloning is cheap and shares the pool and the sweeper.
pub type PostgresStore = SqlStore<Postgres>;

/// Key of the advisory lock taken while migrating (an arbitrary constant).
const MIGRATION_LOCK: i64 = 0x1de0_7e47_5701_2e01;

/// First key of the advisory locks that serialise one actor's claims under a per-caller bound
/// (an arbitrary constant; the second key is a hash of the actor).
const ACTOR_LOCK: i32 = 0x1de0_7e47;

/// What the shared SQL store code keeps for PostgreSQL (public only to be named by [`Backend`]).
mod own {
    use super::{Batches, CommonStatements, Write};
    use sqlx::SqlStr;
    use std::time::Duration;

    /// PostgreSQL's own settings.
    #[derive(Debug, Clone)]
    pub struct Settings {
        pub(super) acquire_timeout: Duration,
        pub(super) application_name: Option<String>,
        /// At most this many claims, and this many completions, share one statement; `None`:
        /// [`DEFAULT_BATCH`](super::DEFAULT_BATCH) on a pool the store opens, 1 on one handed in.
        pub(super) batch: Option<usize>,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self { acquire_timeout: Duration::from_secs(5), application_name: None, batch: None }
        }
    }

    impl Settings {
        /// At most how many writes of a kind share one statement (1: group commit is off).
        pub(super) fn max_batch(&self) -> usize {
            self.batch.unwrap_or(1).max(1)
        }
    }

    /// The statements of one configured store, rendered once.
    #[derive(Debug)]
    pub struct Statements {
        pub(super) claim: SqlStr,
        pub(super) answer: SqlStr,
        pub(super) actor_lock: SqlStr,
        pub(super) quota: SqlStr,
        /// The claim over arrays: one row per claim answered, numbered as its input.
        pub(super) claim_batch: SqlStr,
        pub(super) renew: SqlStr,
        pub(super) complete: SqlStr,
        /// The completion over arrays: one row per record completed, numbered as its input.
        pub(super) complete_batch: SqlStr,
        pub(super) release: SqlStr,
        pub(super) present: SqlStr,
        pub(super) inspect: SqlStr,
        pub(super) sweep: SqlStr,
        /// Whether the table changed enough since it was last analyzed that autovacuum would
        /// have analyzed it ($1: the table's qualified name).
        pub(super) stale_statistics: SqlStr,
        pub(super) analyze: SqlStr,
        /// The table's qualified name, for `stale_statistics`.
        pub(super) table: String,
        pub(super) common: CommonStatements,
    }

    /// How the store's statements get `READ COMMITTED` on its pool.
    #[derive(Debug)]
    pub struct Session {
        /// The pool's sessions default to a stricter isolation: each statement runs in a
        /// `READ COMMITTED` transaction of its own.
        pub(super) explicit_read_committed: bool,
        /// The claims and completions waiting for a writer task (group commit).
        pub(super) batches: Batches<Write>,
        /// How many claims and completions are being sent on their own, outside the batches.
        pub(super) alone: std::sync::atomic::AtomicUsize,
    }
}

use own::{Session, Settings, Statements};

/// Opens a statement's own transaction at the isolation the store's statements are written for.
const BEGIN_READ_COMMITTED: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

impl SqlConfig<Postgres> {
    /// Puts the table in `schema` (created by the migration if missing).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// How long a request waits for a connection before the store reports itself unavailable
    /// (default 5 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.settings.acquire_timeout = timeout;
        self
    }

    /// The `application_name` the store's connections report to the server.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.settings.application_name = Some(name.into());
        self
    }

    /// At most how many claims of concurrent requests share one statement, and how many
    /// completions another, under load; 1 turns group commit off (each claim and each completion
    /// is a statement of its own). Nothing waits for a batch to fill, and a request that finds a
    /// connection free never waits for a batch: see "Group commit" in the
    /// [module docs](self#group-commit), which also give the measured figures.
    ///
    /// Default: 64 on a pool the store opens ([`PostgresStore::connect_with`]), whose connections
    /// then plan the statements once; 1 on a pool handed to [`PostgresStore::from_pool`], whose
    /// sessions keep their own `plan_cache_mode`, under which PostgreSQL plans the statement over
    /// arrays anew at each execution (set it there only if those sessions use
    /// `force_generic_plan`, or after measuring).
    pub fn group_commit(mut self, max_writes: usize) -> Self {
        self.settings.batch = Some(max_writes.max(1));
        self
    }
}

impl sealed::Sealed for Postgres {}

#[async_trait]
impl Backend for Postgres {
    const STORE: &'static str = "postgres";
    const MAX_CONNECTIONS: u32 = 10;
    const SWEEP_BATCH: u32 = 1000;
    const MAX_NAME_LEN: usize = 63;
    const NAME_RULE: &'static str = "PostgreSQL table and schema names must be 1 to 63 bytes without NUL";
    const CONFLICT: &'static str = "serialization failure or deadlock";
    const MIGRATIONS: &'static [(i32, &'static str)] = &[
        (
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
        ),
        // What each record counts towards its actor's bound (`PostgresConfig::actor_max_bytes`),
        // and the index that sums an actor's live records. Rows written before count nothing.
        (
            2,
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS bytes BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS {actor_index} ON {table} (actor, expires_at, bytes);
",
        ),
        // The bound's index holds only records that count (`bytes > 0`): a lookup by key can
        // then never use it. Over the whole table, a plan made while the table had no
        // statistics (a new table, a statement prepared in its first minute) could find a key
        // through it and read every record of the actor, all of them for anonymous callers.
        (
            3,
            "DROP INDEX IF EXISTS {qualified_actor_index};
CREATE INDEX IF NOT EXISTS {actor_index} ON {table} (actor, expires_at, bytes) WHERE bytes > 0;
",
        ),
    ];

    type Settings = Settings;
    type Statements = Statements;
    type Session = Session;

    fn statements(config: &PostgresConfig) -> Statements {
        let t = config.qualified_table();
        let key = "scope = $1 AND actor = $2 AND idem_key = $3";
        let (claim_batch, complete_batch) = batch::statements(&t);
        Statements {
            claim_batch: rendered(claim_batch),
            complete_batch: rendered(complete_batch),
            // `takeover` finds the key's row by the primary key only: its expiry test is written
            // `(expires_at <= now()) IS TRUE`, which no index answers. Written plainly, a generic
            // plan may find the row through the `expires_at` or `actor` index instead and read
            // every expired record, or every record of the actor (all of them for anonymous
            // callers), on each claim.
            claim: rendered(format!(
                "WITH existing AS (
    SELECT fingerprint, state, token, response, expires_at FROM {t} WHERE {key}
), takeover AS (
    UPDATE {t} SET fingerprint = $4, state = 'in_progress', token = $5, response = NULL,
        expires_at = now() + $6::int8 * interval '1 millisecond', created_at = now(), bytes = $8
    WHERE {key} AND (expires_at <= now()) IS TRUE
        AND (state <> 'in_progress' OR fingerprint = $4 OR token = $5
            OR expires_at <= now() - $7::int8 * interval '1 millisecond')
    RETURNING 1
), inserted AS (
    INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, expires_at, bytes)
    SELECT $1, $2, $3, $4, 'in_progress', $5, now() + $6::int8 * interval '1 millisecond', $8
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (scope, actor, idem_key) DO NOTHING
    RETURNING 1
)
SELECT TRUE AS acquired, NULL::bytea AS fingerprint, NULL::text AS state, NULL::bytea AS response,
    NULL::int8 AS remaining_ms FROM takeover
UNION ALL
SELECT TRUE, NULL, NULL, NULL, NULL FROM inserted
UNION ALL
SELECT COALESCE(state = 'in_progress' AND token = $5, FALSE), fingerprint, state, response,
    GREATEST(0, CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::int8
FROM existing WHERE expires_at > now() OR (state = 'in_progress' AND fingerprint <> $4 AND token <> $5
    AND expires_at > now() - $7::int8 * interval '1 millisecond')"
            )),
            // The claim's answer when the key's record answers it (the last part of `claim`),
            // writing nothing: $6 is the retention of an abandoned claim.
            answer: rendered(format!(
                "SELECT COALESCE(state = 'in_progress' AND token = $5, FALSE) AS acquired, fingerprint, state, response,
    GREATEST(0, CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::int8 AS remaining_ms
FROM {t} WHERE {key} AND (expires_at > now() OR (state = 'in_progress' AND (token = $5
    OR (fingerprint <> $4 AND expires_at > now() - $6::int8 * interval '1 millisecond'))))"
            )),
            // Serialises the claims of one actor ($1) until their transaction ends (class
            // `ACTOR_LOCK` of the two-key advisory locks, apart from the migrations' lock).
            actor_lock: rendered(format!("SELECT pg_advisory_xact_lock({ACTOR_LOCK}, hashtext($1))")),
            // The bytes of the actor's live records that count (`bytes > 0`, the records the
            // partial index holds) other than the key's own, and the milliseconds until the
            // earliest of them expires.
            quota: rendered(format!(
                "SELECT COALESCE(SUM(bytes), 0)::int8 AS used,
    CEIL(EXTRACT(EPOCH FROM (MIN(expires_at) - now())) * 1000)::int8 AS earliest_ms
FROM {t} WHERE actor = $2 AND bytes > 0 AND expires_at > now() AND NOT (scope = $1 AND idem_key = $3)"
            )),
            renew: rendered(format!(
                "UPDATE {t} SET expires_at = now() + $5::int8 * interval '1 millisecond'
WHERE {key} AND token = $4 AND state = 'in_progress'
RETURNING 1"
            )),
            // The time to live counts from when the outcome is written: `clock_timestamp()`, not
            // `now()`, which inside a transactional route's transaction is when the transaction
            // began, before the handler ran (see "Clock" in the module docs).
            complete: rendered(format!(
                "UPDATE {t} SET state = 'completed', response = $5,
    expires_at = clock_timestamp() + $6::int8 * interval '1 millisecond', bytes = $7
WHERE {key} AND token = $4 AND state = 'in_progress'
RETURNING 1"
            )),
            release: rendered(format!(
                "DELETE FROM {t} WHERE {key} AND token = $4 AND state = 'in_progress' RETURNING 1"
            )),
            present: rendered(format!("SELECT 1 FROM {t} WHERE {key}")),
            // Live records, and in-progress ones until `ABANDONED_CLAIM_RETENTION` ($4) after
            // their lease, as the sweeper keeps them.
            inspect: rendered(format!(
                "SELECT state, response, (EXTRACT(EPOCH FROM created_at) * 1000)::int8 AS created_ms,
    (EXTRACT(EPOCH FROM expires_at) * 1000)::int8 AS expires_ms
FROM {t} WHERE {key} AND (expires_at > now()
    OR (state = 'in_progress' AND expires_at > now() - $4::int8 * interval '1 millisecond'))"
            )),
            common: CommonStatements {
                invalidate: rendered(format!("DELETE FROM {t} WHERE {key}")),
                invalidate_completed: rendered(format!("DELETE FROM {t} WHERE {key} AND state = 'completed'")),
                state: rendered(format!("SELECT state FROM {t} WHERE {key}")),
                completed_by: rendered(format!("SELECT 1 FROM {t} WHERE {key} AND token = $4 AND state = 'completed'")),
            },
            // Completed records go at the end of their time to live, in-progress ones only
            // `ABANDONED_CLAIM_RETENTION` ($2) after their lease; the condition is checked again
            // on the locked rows.
            sweep: rendered(format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {t} WHERE expires_at <= now()
        AND (state <> 'in_progress' OR expires_at <= now() - $2::int8 * interval '1 millisecond')
    LIMIT $1 FOR UPDATE SKIP LOCKED
)) AND expires_at <= now()
    AND (state <> 'in_progress' OR expires_at <= now() - $2::int8 * interval '1 millisecond')"
            )),
            // Autovacuum's default rule: 50 rows and a tenth of the table changed since the last
            // analysis (`reltuples` is -1 before the first).
            stale_statistics: rendered(
                "SELECT s.n_mod_since_analyze > 50 + 0.1 * GREATEST(c.reltuples, 0)
FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid WHERE c.oid = to_regclass($1)"
                    .to_owned(),
            ),
            analyze: rendered(format!("ANALYZE {t}")),
            table: t.clone(),
        }
    }

    async fn attach(pool: &PgPool, own: bool) -> Result<Session, sqlx::Error> {
        if own {
            // `connect_with` set READ COMMITTED on every connection of the pool.
            return Ok(Session {
                explicit_read_committed: false,
                batches: Batches::default(),
                alone: Default::default(),
            });
        }
        let default: String =
            sqlx::query_scalar("SELECT current_setting('default_transaction_isolation')").fetch_one(pool).await?;
        // PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
        let explicit_read_committed = !matches!(default.as_str(), "read committed" | "read uncommitted");
        if explicit_read_committed {
            tracing::info!(
                default_transaction_isolation = %default,
                "idempotency store: the pool's sessions default to a stricter isolation; each statement runs in a READ COMMITTED transaction of its own"
            );
        }
        Ok(Session { explicit_read_committed, batches: Batches::default(), alone: Default::default() })
    }

    fn common(sql: &Statements) -> &CommonStatements {
        &sql.common
    }

    fn failure(e: &sqlx::Error) -> Failure {
        match e {
            sqlx::Error::Database(e) => match e.code().as_deref() {
                Some("40001" | "40P01") => Failure::Conflict,
                // Connection exceptions; administrator or crash shutdown; idle session timeout.
                Some(code) if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P05") => Failure::Lost,
                _ => Failure::Other,
            },
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
    ) -> Query<'static, Postgres, PgArguments> {
        let bytes = record_bytes(key, response.len());
        PostgresStore::fenced_query(&sql.complete, key, token).bind(response).bind(millis(ttl)).bind(bytes)
    }

    async fn begin_outcome(pool: &PgPool, session: &Session) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        match session.explicit_read_committed {
            true => pool.begin_with(BEGIN_READ_COMMITTED).await,
            false => pool.begin().await,
        }
    }

    async fn execute_in(
        tx: &mut Transaction<'static, Postgres>,
        query: Query<'static, Postgres, PgArguments>,
    ) -> Result<u64, sqlx::Error> {
        Ok(query.execute(&mut **tx).await?.rows_affected())
    }

    async fn committed(store: &PostgresStore, key: &RecordKey, token: &ClaimToken) -> Result<bool, StoreError> {
        // Completed rows keep their token.
        let (row, _) = store.run(|| PostgresStore::fenced_query(&store.sql().common.completed_by, key, token)).await?;
        Ok(row.is_some())
    }

    fn sweep_query(sql: &Statements, batch: i64) -> Query<'static, Postgres, PgArguments> {
        sqlx::query(sql.sweep.clone()).bind(batch).bind(abandoned_claim_retention_ms())
    }

    async fn maintain(pool: &PgPool, sql: &Statements) -> Result<(), sqlx::Error> {
        let stale: Option<bool> =
            sqlx::query_scalar(sql.stale_statistics.clone()).bind(&sql.table).fetch_optional(pool).await?;
        if stale == Some(true) {
            // Without the table's ownership (or PostgreSQL 17's MAINTAIN privilege) the server
            // skips it with a warning, and autovacuum remains the only one to analyze it.
            sqlx::query(sql.analyze.clone()).execute(pool).await?;
            tracing::debug!(table = %sql.table, "idempotency store: table analyzed, its plans made again");
        }
        Ok(())
    }

    async fn execute(
        pool: &PgPool,
        session: &Session,
        query: Query<'static, Postgres, PgArguments>,
    ) -> Result<u64, sqlx::Error> {
        if !session.explicit_read_committed {
            return Ok(query.execute(pool).await?.rows_affected());
        }
        let mut tx = pool.begin_with(BEGIN_READ_COMMITTED).await?;
        let n = query.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn begin_migration(
        pool: &PgPool,
        config: &PostgresConfig,
        versions: &str,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
        if let Some(schema) = &config.schema {
            (&mut *tx)
                .execute(sqlx::raw_sql(rendered(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)))))
                .await?;
        }
        (&mut *tx)
            .execute(sqlx::raw_sql(rendered(format!(
            "CREATE TABLE IF NOT EXISTS {versions} (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ))))
            .await?;
        Ok(tx)
    }

    async fn applied_version(conn: &mut PgConnection, versions: &str) -> Result<Option<i32>, sqlx::Error> {
        sqlx::query_scalar(rendered(format!("SELECT max(version) FROM {versions}"))).fetch_one(conn).await
    }

    async fn apply_migration(
        conn: &mut PgConnection,
        versions: &str,
        version: i32,
        sql: SqlStr,
    ) -> Result<(), sqlx::Error> {
        (&mut *conn).execute(sqlx::raw_sql(sql)).await?;
        sqlx::query(rendered(format!("INSERT INTO {versions} (version) VALUES ($1)")))
            .bind(version)
            .execute(conn)
            .await?;
        Ok(())
    }
}

impl SqlStore<Postgres> {
    /// Connects to `url` (`postgres://user:password@host:port/database`) with the default
    /// [`PostgresConfig`], applies the migrations and starts the sweeper.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresConfig::default()).await
    }

    /// Connects to `url` with `config`. The pool's sessions run `READ COMMITTED` whatever the
    /// server's or the role's default (see [isolation](self#isolation-read-committed-always)).
    ///
    /// An unreachable server is [`StoreError::Unavailable`]; a malformed URL or configuration is
    /// [`StoreError::Config`].
    pub async fn connect_with(url: &str, mut config: PostgresConfig) -> Result<Self, StoreError> {
        config.validate()?;
        config.settings.batch.get_or_insert(DEFAULT_BATCH);
        let mut options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        #[cfg(not(feature = "tls"))]
        if !matches!(
            options.get_ssl_mode(),
            sqlx::postgres::PgSslMode::Disable | sqlx::postgres::PgSslMode::Allow | sqlx::postgres::PgSslMode::Prefer
        ) {
            return Err(StoreError::Config(
                "a PostgreSQL URL with `sslmode=require`, `verify-ca` or `verify-full` needs the `tls` cargo feature (of idempotent-axum, idempotent-actix or idempotent-core)".into(),
            ));
        }
        if let Some(name) = &config.settings.application_name {
            options = options.application_name(name);
        }
        // Group commit's statements over arrays are planned once per connection (see "Group
        // commit" in the module docs).
        let generic_plans = config.settings.max_batch() > 1;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.settings.acquire_timeout)
            // A ping before every query would double the round trips; an operation that meets a
            // dead connection runs again on a live one (see `run`).
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let session = match generic_plans {
                        true => PIN_READ_COMMITTED_GENERIC_PLANS,
                        false => PIN_READ_COMMITTED,
                    };
                    conn.execute(sqlx::raw_sql(session)).await.map(|_| ())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| match Postgres::unavailable(e) {
                StoreError::Unavailable(detail) => StoreError::Unavailable(super::explain_tls(
                    detail,
                    "one in the URL's `sslrootcert=` file",
                    "the URL's `sslcert=` and `sslkey=`",
                )),
                other => other,
            })?;
        Self::start(pool, config, true).await
    }

    /// Runs the statement `make` builds, with the retries the module docs describe: again after a
    /// serialization failure or a deadlock, and once more on a live connection after the
    /// connection was lost. Returns the statement's row, if any, and whether an attempt was lost
    /// with its connection before the one that answered (it may have run: its effect is unknown).
    async fn run(&self, make: impl Fn() -> PgQuery) -> Result<(Option<PgRow>, bool), StoreError> {
        let explicit = self.session().explicit_read_committed;
        retrying(self.pool(), |conn| Box::pin(fetch(conn, explicit, make()))).await.map_err(Postgres::unavailable)
    }

    /// Like [`run`](Self::run), for a statement that answers with any number of rows.
    async fn run_rows(&self, make: impl Fn() -> PgQuery) -> Result<Vec<PgRow>, StoreError> {
        let explicit = self.session().explicit_read_committed;
        let (rows, _) = retrying(self.pool(), |conn| Box::pin(fetch_all(conn, explicit, make())))
            .await
            .map_err(Postgres::unavailable)?;
        Ok(rows)
    }

    /// The claim statement, sent once: the claim's answer, or `None` when a concurrent change hid
    /// the row from its snapshot and it must be sent again.
    async fn claim_once(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Option<Claim>, StoreError> {
        let (row, _) = self.run(|| Self::claim_query(self.sql(), key, fingerprint, lease, token)).await?;
        row.map(|row| claim_answer(&row, fingerprint, token)).transpose()
    }

    /// The claim statement of `key`, as sent alone.
    fn claim_query(
        sql: &Statements,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> PgQuery {
        Self::key_query(&sql.claim, key)
            .bind(fingerprint.0.to_vec())
            .bind(token.0.clone())
            .bind(millis(lease))
            .bind(abandoned_claim_retention_ms())
            .bind(record_bytes(key, 0))
    }

    /// A claim of `key` under its actor's bound `max`: a record that answers the claim is
    /// answered without the actor's lock (a replay costs what it costs without a bound); a new
    /// claim is admitted and written under the lock ([`claim_bounded`]). `None` when it must be
    /// sent again.
    async fn claim_bounded_once(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
        max: usize,
    ) -> Result<Option<Claim>, StoreError> {
        let retention = abandoned_claim_retention_ms();
        let answer = || {
            Self::key_query(&self.sql().answer, key).bind(fingerprint.0.to_vec()).bind(token.0.clone()).bind(retention)
        };
        if let (Some(row), _) = self.run(answer).await? {
            return claim_answer(&row, fingerprint, token).map(Some);
        }
        let sql = self.sql();
        let (row, _) = retrying(self.pool(), |conn| {
            let lock = sqlx::query(sql.actor_lock.clone()).bind(key.actor.clone());
            let queries = [Self::claim_query(sql, key, fingerprint, lease, token), answer()];
            let (quota, key) = (Self::key_query(&sql.quota, key), key.clone());
            Box::pin(async move { claim_bounded(conn, lock, quota, queries, &key, max).await })
        })
        .await
        .map_err(Postgres::unavailable)?;
        row?.map(|row| claim_answer(&row, fingerprint, token)).transpose()
    }

    /// The fenced completion, sent once: whether it completed the record.
    async fn complete_once(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        encoded: Vec<u8>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (row, _) = self.run(|| Postgres::complete_query(self.sql(), key, token, encoded.clone(), ttl)).await?;
        Ok(row.is_some())
    }
}

type PgQuery = Query<'static, Postgres, PgArguments>;

/// Runs `query` on `conn`, in a `READ COMMITTED` transaction of its own when `explicit`.
async fn fetch(conn: &mut PgConnection, explicit: bool, query: PgQuery) -> Result<Option<PgRow>, sqlx::Error> {
    if !explicit {
        return query.fetch_optional(conn).await;
    }
    let mut tx = conn.begin_with(BEGIN_READ_COMMITTED).await?;
    let row = query.fetch_optional(&mut *tx).await?;
    tx.commit().await?;
    Ok(row)
}

/// Runs `query` on `conn` as [`fetch`] does; answers all its rows.
async fn fetch_all(conn: &mut PgConnection, explicit: bool, query: PgQuery) -> Result<Vec<PgRow>, sqlx::Error> {
    if !explicit {
        return query.fetch_all(conn).await;
    }
    let mut tx = conn.begin_with(BEGIN_READ_COMMITTED).await?;
    let rows = query.fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(rows)
}

/// How many times a claim is retried when a concurrent change hid the row from its snapshot.
const CLAIM_ATTEMPTS: usize = 16;

/// The claim's answer from a row of `claim` or `answer`.
pub(super) fn claim_answer(row: &PgRow, fingerprint: &Fingerprint, token: &ClaimToken) -> Result<Claim, StoreError> {
    if column::<_, bool>(row, "acquired")? {
        return Ok(Claim::Acquired(token.clone()));
    }
    let remaining: i64 = column(row, "remaining_ms")?;
    decide_row(row, fingerprint, Duration::from_millis(remaining.max(0) as u64))
}

/// A claim of `key` under its actor's bound `max`, on `conn`, in a `READ COMMITTED` transaction
/// that holds the actor's lock: the sum of the actor's live records, the admission, then the
/// claim statement (`claim`, then `answer` in `queries`), each seeing every claim of the actor
/// committed before the lock was granted. A refused claim whose key meanwhile got a record that
/// answers it gets that answer. `Ok(Err(_))` is the refusal; `Ok(Ok(None))`, a claim that lost a
/// race its snapshot could not see, is run again.
async fn claim_bounded(
    conn: &mut PgConnection,
    lock: PgQuery,
    quota: PgQuery,
    [claim, answer]: [PgQuery; 2],
    key: &RecordKey,
    max: usize,
) -> Result<Result<Option<PgRow>, StoreError>, sqlx::Error> {
    let mut tx = conn.begin_with(BEGIN_READ_COMMITTED).await?;
    lock.execute(&mut *tx).await?;
    let used = quota.fetch_one(&mut *tx).await?;
    let row = match admit_row(&used, key, quota::record_bytes(key, 0), max) {
        Ok(()) => claim.fetch_optional(&mut *tx).await?,
        Err(refused) => match answer.fetch_optional(&mut *tx).await? {
            Some(row) => Some(row),
            None => {
                tx.rollback().await?;
                return Ok(Err(refused));
            }
        },
    };
    tx.commit().await?;
    Ok(Ok(row))
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        // One token for every attempt: a claim run again after a lost answer finds its own record.
        let max = self.config().bound_for(&key.actor);
        for _ in 0..CLAIM_ATTEMPTS {
            let answer = match max {
                // A bound takes a transaction of its own per claim: never in a batch.
                Some(max) => self.claim_bounded_once(key, fingerprint, lease, token, max).await?,
                None => match self.alone() {
                    Some(_alone) => self.claim_once(key, fingerprint, lease, token).await?,
                    None => self.claim_batched(key, fingerprint, lease, token).await?,
                },
            };
            if let Some(claim) = answer {
                return Ok(claim);
            }
        }
        Err(StoreError::Unavailable("PostgreSQL: claim kept losing races on one key".into()))
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        // Running it twice extends the lease twice: no check needed after a lost answer.
        let (row, _) = self.run(|| Self::fenced_query(&self.sql().renew, key, token).bind(millis(lease))).await?;
        row.map(drop).ok_or(StoreError::Fenced)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let encoded = response.encode();
        let stored = match self.alone() {
            Some(_alone) => self.complete_once(key, token, encoded, ttl).await?,
            None => self.complete_batched(key, token, encoded, ttl).await?,
        };
        if stored {
            return Ok(());
        }
        // An earlier attempt whose answer was lost (with its connection here, or before the call
        // was sent again) may have completed the record: then it carries our token.
        let (ours, _) = self.run(|| Self::fenced_query(&self.sql().common.completed_by, key, token)).await?;
        if ours.is_some() {
            return Ok(());
        }
        Err(StoreError::Fenced)
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        let (row, lost) = self.run(|| Self::fenced_query(&self.sql().release, key, token)).await?;
        if row.is_some() {
            return Ok(());
        }
        if lost {
            // The lost attempt may have deleted the record: then the key has none.
            let (present, _) = self.run(|| Self::key_query(&self.sql().present, key)).await?;
            if present.is_none() {
                return Ok(());
            }
        }
        Err(StoreError::Fenced)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let retention = abandoned_claim_retention_ms();
        let (row, _) = self.run(|| Self::key_query(&self.sql().inspect, key).bind(retention)).await?;
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
        Postgres::STORE
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
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgres://u@127.0.0.1:1/db?sslmode={mode}");
            let Err(StoreError::Config(msg)) = PostgresStore::connect(&url).await else { panic!("{mode}") };
            assert!(msg.contains("`tls` cargo feature"), "{msg}");
        }
    }

    #[test]
    fn migration_sql_quotes_names() {
        let sql = PostgresStore::migration_sql(&PostgresConfig::new().schema("app").table("we\"ird"));
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS \"app\";"));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"app\".\"we\"\"ird\""));
        assert!(sql.contains("\"we\"\"ird_expires_at_idx\""));
    }
}
