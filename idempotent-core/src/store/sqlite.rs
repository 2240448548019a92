//! SQLite store (feature `sqlite`): the embedded, durable default for a single host.
//!
//! `sqlite:PATH` (or `sqlite://PATH`) opens the database file, creating it if missing, in WAL
//! mode (readers never wait for the writer) with `synchronous = FULL` (see
//! [durability](#durability)) and a busy timeout. Every write of the store runs on one writer
//! connection of its own, so concurrent requests queue for it in the process, each taking the
//! write lock as the one before lets it go, instead of polling the lock on several connections
//! (SQLite's busy handler sleeps between polls, and a sleeper can leave the lock idle); reads
//! (a replay's lookup, `inspect`) run on the pool, beside the writer. `sqlite::memory:` gives a
//! database shared by the store's connections, kept as long as the store (see
//! [in memory](#in-memory)). A store on a pool the application hands in
//! ([`SqlStore::from_pool`]) runs its writes on that pool.
//!
//! # Durability
//!
//! A completed record that a power cut (or an operating system crash) takes away lets the next
//! retry run its handler again, so by default every commit waits for the disk: in WAL mode,
//! `synchronous = FULL` syncs the write-ahead log at each commit. `NORMAL` syncs it only at
//! checkpoints: faster, and still safe against a crash of the process, but the last commits
//! before a power cut can be lost (the database itself stays consistent). Choose with
//! [`SqliteConfig::synchronous`].
//!
//! Measured cost: first executions per second through the store (each a claim then a
//! completion, so two writes), on a database file on the ext4 disk of a shared 2-core virtual
//! machine, in one run that alternates the rows, best of three
//! (`cargo bench -p idempotent-tests --bench throughput -- sqlite-sync`):
//!
//! | `synchronous` | 1 caller | 16 concurrent callers |
//! |---|---|---|
//! | `FULL` (default) | 483 /s | 2880 /s |
//! | `FULL`, one write per transaction (`group_commit(1)`) | 1077 /s | 702 /s |
//! | `NORMAL` | 2541 /s | 5172 /s |
//!
//! One caller's writes run alone whatever the setting (the first two rows take the same path
//! there, and differ by the disk's sync latency from one moment to the next, which other tenants
//! of the machine moved by four times within minutes). Concurrent callers share commits (see
//! [group commit](#group-commit)): with `FULL`, 16 callers got 4.1 times the first executions of
//! one write per transaction in that run, and 3.5 to 7.6 times what the store did before it
//! had group commit, across three runs (`BENCHMARKS.md`). `NORMAL` syncs only at checkpoints; replays only read
//! and cost the same either way. The figures depend on the disk's sync latency far more than on
//! the CPU: measure on yours.
//!
//! # In memory
//!
//! An in-memory database (`sqlite::memory:`, shared by the pool's connections) disappears when
//! its last connection closes, and a pool closes idle connections by itself (sqlx's idle timeout
//! and maximum lifetime). The store therefore keeps one connection of its own open to an
//! in-memory database, outside the pool and never used, from start-up until the store is
//! dropped: records and the table stay whatever the pool does, also on a pool the application
//! hands in. Records still live only as long as the process.
//!
//! # Table
//!
//! The same layout as the PostgreSQL store: primary key `(scope, actor, idem_key)`,
//! `fingerprint` (32 bytes), `state` (`in_progress` or `completed`), `token` (the claim's token;
//! kept once completed), `response` ([`StoredResponse::encode`]), `expires_at` and `created_at`
//! in milliseconds since the Unix epoch; and, while in progress, the lease's own clock and
//! deadline, `lease_boot` and `lease_until` (see [clock](#clock)). `expires_at` is the end of the
//! time to live once completed, and the wall-clock estimate of the lease's end while in progress
//! (what `inspect` shows, and what an older release reads).
//!
//! # Migrations
//!
//! By default the table is created, or brought up to date, on start-up, and the applied versions
//! are recorded in `<table>_migrations`. Version 1 creates the table; version 2 adds the lease
//! columns and an index of the claims in progress; version 3 the `bytes` column and the
//! `(actor, expires_at, bytes)` index of the [per-caller bound](#per-caller-bound) (rows already there
//! count nothing: they go within their time to live). A database made by an earlier release keeps
//! its records: its claims in progress, which have no lease columns, are judged on the wall
//! clock as before. An application that manages its own migrations applies
//! [`SqliteStore::migrations`] in order, each version once.
//!
//! # Per-caller bound
//!
//! Off by default; [`SqliteConfig::actor_max_bytes`] or `sqlite:PATH?actor_max_bytes=32MiB` sets
//! it (the rule: [`quota`]). Each row's `bytes` column holds what it counts
//! ([`quota::record_bytes`]: 256 bytes, the scope's, actor's and key's
//! characters, the encoded response once completed), written by every claim and completion
//! whether a bound is set or not; a row counts while `expires_at` (the lease's wall-clock
//! estimate, or the end of the time to live) is ahead of the wall clock. A claim that would write
//! (its key absent or expired) sums its actor's live rows through the `(actor, expires_at, bytes)` index
//! inside its write transaction, under SQLite's one write lock, and is refused with
//! [`StoreError::QuotaExceeded`] when the actor's rows and the new claim would exceed the bound:
//! no claim can come between the sum and the insert, so of concurrent claims of one actor exactly
//! as many acquire as the bound fits. A refused claim of a batch (see
//! [group commit](#group-commit)) fails alone; the others of its batch are written. Without a
//! bound a claim runs the statements it runs without this setting; with one, a claim that writes
//! runs one more indexed `SELECT` in its transaction, and replays none. Rows written before version 3
//! of the [migrations](#migrations) count nothing.
//!
//! The sum is an index-only range scan of the caller's live rows, so its cost grows with what the
//! caller holds (at most the bound over the smallest record, about 300 bytes: a 32 MiB bound is
//! up to about 110,000 rows). Measured on a shared 2-core virtual machine, first executions
//! (claim and completion) per second, without / with a bound that never refused, each actor
//! holding up to 3,000 live records (`cargo bench -p idempotent-tests --bench throughput --
//! actor-quota`; `BENCHMARKS.md` is not updated):
//!
//! | store | 1 caller | 16 callers, 16 actors | 16 callers, 1 actor |
//! |---|---|---|---|
//! | SQLite file, `FULL` | 1448 / 799 | 4297 / 2225 | 4969 / 1880 |
//! | PostgreSQL 15, loopback | 962 / 544 | 3169 / 1680 | 2981 / 838 |
//!
//! Replays (a read, as without a bound) are not slowed.
//!
//! # Clock
//!
//! SQLite has no server clock: the store reads the host's, through [`SqliteConfig::clock`]
//! ([`SystemClock`] unless a test sets another), and keeps two apart:
//!
//! - **Leases** are counted on the host's monotonic clock (Linux: `CLOCK_MONOTONIC`, the clock of
//!   the engine's own timers, which a step of the wall clock never moves and which every process
//!   of the host shares), under the boot it counts from (`/proc/sys/kernel/random/boot_id`). A
//!   wall-clock step, forward or back, neither shortens nor lengthens a lease: a retry never takes
//!   a live claim over because the clock jumped. A deadline written under another boot has ended,
//!   whatever its value: the process that held it did not survive the reboot; the same request
//!   takes it over (another request under the key is still a mismatch, for
//!   [`ABANDONED_CLAIM_RETENTION`](super::ABANDONED_CLAIM_RETENTION) after the lease's
//!   wall-clock estimate).
//! - **The time to live** of completed records, and the times `inspect` reports, are on the wall
//!   clock (`SystemTime`): a record must outlive a reboot. A step of the wall clock moves them by
//!   its size: an hour forward forgets every completed record an hour early (a retry in that hour
//!   runs its handler again, as after the end of its time to live), an hour back keeps them an
//!   hour longer. The sweeper deletes abandoned claims of this boot on the lease's clock, others
//!   on the wall clock.
//!
//! Elsewhere than Linux (or where the boot id cannot be read, which is logged once), there is no
//! monotonic clock that the host's processes share and can tell apart across reboots: leases
//! follow the wall clock (`lease_boot` is `wall`), and a step of the wall clock larger than what
//! is left of a lease shortens it, letting a concurrent retry take a live claim over. Keep the
//! clock stepped only at boot there (NTP's slewing never steps it). Processes that share a
//! database file must share one clock: containers on one host do, unless put in time namespaces
//! of their own.
//!
//! # Atomicity
//!
//! A claim first reads the record without a lock: a live record (replay, mismatch, in progress,
//! or the claim's own, sent again) is answered from that read, with no write. Otherwise the claim
//! runs in a `BEGIN IMMEDIATE` transaction, which holds SQLite's single write lock from its
//! start: it reads the record again and, if it is still absent or expired, inserts or overwrites
//! it. No other writer can run between that read and that write, so of many concurrent claimers
//! exactly one acquires (two claims of one key in one batch run one after the other in it: the
//! second reads the first's record).
//! `complete`, `release` and `renew` are single statements fenced by the token and the state
//! only, like the PostgreSQL store's: a lease that expired and that no claim took over still
//! belongs to its token (see [`Store`]). Every write takes the single write lock, so a late
//! renewal or completion and a takeover of the same record never interleave: whichever comes
//! second sees the other's result.
//!
//! # Group commit
//!
//! With `synchronous = FULL` a commit costs a sync of the disk, a millisecond or more, and the
//! store's writes (claims that found no live record, renewals, completions, releases) would
//! otherwise pass one commit at a time. Writes of concurrent requests therefore share
//! transactions: each is queued for the writer, and a task takes every write waiting (at most
//! [`SqliteConfig::group_commit`], 64 by default), runs them in one `BEGIN IMMEDIATE`
//! transaction in the order they came, commits once, and answers each caller with its own
//! result: a claim its own answer, a completion whose token was fenced out [`StoreError::Fenced`]
//! while the others of its batch are stored. Nothing waits for a batch to fill: a write that finds
//! no write running or waiting runs at once, alone, in its caller's task, with the statements of
//! one write per transaction (a renewal, completion or release is one statement in autocommit,
//! no `BEGIN` and `COMMIT` around it), so a caller alone pays nothing for batching; writes that
//! arrive meanwhile, or while a transaction commits, form the next batch. A caller waits at most
//! for the batch in flight and then its own.
//!
//! The guarantees are those of one write per transaction: a caller is answered only once the
//! transaction holding its write committed (with `FULL`, synced); each write is judged on what the
//! writes before it in the batch left, under the same write lock. If a statement of a batch
//! fails (a full disk, an I/O error), the batch is rolled back and each of its writes runs again in
//! a transaction of its own, so that one write that cannot be written fails alone; a failed commit
//! is treated the same way. A write whose caller stopped waiting (its request timed out) before its
//! batch began is not run.
//!
//! A transactional route's transaction ([`crate::store::transaction`]) is not batched: it holds
//! the writer from before its handler runs until it commits, with the handler's own statements
//! in it, and commits alone. Its claim, before it, and the writes of every other request are
//! batched as above; while it holds the writer they queue, and the first transaction after it
//! carries them all.
//!
//! Expired records are treated as absent by claims and deleted by a background task in batches,
//! off the request path: a completed record once past its time to live, an in-progress record
//! only [`ABANDONED_CLAIM_RETENTION`](super::ABANDONED_CLAIM_RETENTION) after its lease ended, so a
//! late worker can still complete it. The task stops when the store is dropped.
//!
//! # A transactional route holds the writer
//!
//! A transactional route's transaction ([`crate::store::transaction`]) holds SQLite's one write
//! lock (`BEGIN IMMEDIATE`) from before its handler runs until it commits or rolls back, seconds
//! for a slow handler. Meanwhile no other write can happen, in this process or another: claims
//! that need to write wait for it and, past the store timeout, answer 503; completions and
//! releases wait too. Renewals could not be written either, and a lease that lapsed only because
//! its holder could not renew it would let a retry, queued for the writer, take a live claim over
//! the moment the writer frees up: the handler would run twice with no crash at all. So no lease
//! may lapse because of the hold, and two things see to it:
//!
//! - **Renewals of this store wait for nothing.** While one of its transactions holds the writer,
//!   the store answers a renewal from a read (the token still holds its record: nothing can change
//!   that until the writer is free) and writes it when the hold ends, in the hold's own
//!   transaction, as a renewal made then. The engine therefore keeps vouching for its claims'
//!   leases, and a handler that finished meanwhile keeps retrying its completion, which goes in
//!   once the writer is free. A hold that ends without committing (its commit failed, its task was
//!   cancelled) leaves those renewals owed: the next claim that takes the writer writes them
//!   first, before it judges any lease.
//! - **Every other lease moves on by the hold.** When the transaction commits, or rolls back, it
//!   extends, in the same write transaction, every lease that was running when it took the writer
//!   by the time it held it (on the lease's clock, so only leases of this boot): the claims of
//!   other processes on the file, whose renewals waited in vain, come out of the hold with the
//!   lease they had going in. A rollback keeps this: it rolls back to a savepoint taken when the
//!   transaction opened (`idempotent_handler`, which a handler must leave alone), extends the
//!   leases and commits that. Leases written by an earlier release (no lease clock) are not
//!   extended.
//!
//! What remains: another process's engine cannot know why its renewals failed, so it stops
//! vouching for its leases after a lease without an answer; a handler there that finished during
//! the hold may then give up storing its outcome, and its retry runs it again once the extended
//! lease ends. Within one process (the usual case), nothing lapses. Keep transactional handlers on
//! SQLite short all the same: every other write waits for them.

use super::sql::{
    abandoned_claim_retention_ms, admit_row, column, decide_row, millis, record_bytes, record_info, rendered, sealed,
    Backend, CommonStatements, SqlConfig, SqlStore,
};
use super::{epoch_millis, quota, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::transaction::TransactionalStore;
use async_trait::async_trait;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Executor, SqlStr, Sqlite, Transaction};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod batch;
mod clock;
mod hold;
use super::batch::Batches;
use batch::{Fenced, Write};
use clock::LeaseClock;
pub use clock::{SqliteClock, SystemClock};
use hold::{Holds, Renewal};

/// How many writes share one transaction by default ([`SqliteConfig::group_commit`]).
const DEFAULT_BATCH: usize = 64;

/// Where a transactional route's transaction rolls its handler's writes back to.
const HANDLER_SAVEPOINT: &str = "SAVEPOINT idempotent_handler";
/// Rolls a transactional route's handler's writes back, keeping its transaction.
const ROLLBACK_HANDLER: &str = "ROLLBACK TO idempotent_handler";

/// Settings of a [`SqliteStore`]: the shared ones, and
/// [`busy_timeout`](SqlConfig::busy_timeout) and [`synchronous`](SqlConfig::synchronous).
pub type SqliteConfig = SqlConfig<Sqlite>;

/// A [`Store`] in a SQLite database; see the [module docs](self) for how it works.
///
/// Cloning is cheap and shares the pool and the sweeper.
pub type SqliteStore = SqlStore<Sqlite>;

/// What the shared SQL store code keeps for SQLite (public only to be named by [`Backend`]).
mod own {
    use super::{Batches, CommonStatements, Holds, SqliteClock, SystemClock, Write};
    use sqlx::sqlite::{SqliteConnection, SqliteSynchronous};
    use sqlx::SqlStr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// SQLite's own settings.
    #[derive(Debug, Clone)]
    pub struct Settings {
        pub(super) busy_timeout: Duration,
        pub(super) synchronous: SqliteSynchronous,
        pub(super) create_if_missing: bool,
        pub(super) clock: Arc<dyn SqliteClock>,
        /// At most this many writes share one transaction (group commit).
        pub(super) batch: usize,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                busy_timeout: Duration::from_secs(10),
                synchronous: SqliteSynchronous::Full,
                create_if_missing: true,
                clock: Arc::new(SystemClock),
                batch: super::DEFAULT_BATCH,
            }
        }
    }

    /// What the store keeps beside its pool.
    #[derive(Debug)]
    pub struct Session {
        /// For an in-memory database: a connection of the store's own, never used, that keeps
        /// the database alive while the pool closes and opens its connections.
        pub(super) _keeper: Option<Mutex<SqliteConnection>>,
        /// The writer's holds by transactional routes, and the renewals they owe.
        pub(super) holds: Holds,
        /// The writes waiting for the writer (group commit).
        pub(super) batches: Batches<Write>,
    }

    /// The statements of one configured store, rendered once.
    #[derive(Debug)]
    pub struct Statements {
        pub(super) select: SqlStr,
        pub(super) upsert: SqlStr,
        pub(super) quota: SqlStr,
        pub(super) renew: SqlStr,
        pub(super) complete: SqlStr,
        pub(super) release: SqlStr,
        pub(super) inspect: SqlStr,
        pub(super) sweep: SqlStr,
        pub(super) held: SqlStr,
        pub(super) extend: SqlStr,
        pub(super) common: CommonStatements,
        /// The clocks the store reads ([`SqliteConfig::clock`](super::SqliteConfig::clock)).
        pub(super) clock: Arc<dyn SqliteClock>,
    }
}

use own::{Session, Settings, Statements};

impl SqlConfig<Sqlite> {
    /// How long a statement waits for SQLite's write lock before the store reports itself
    /// unavailable (default 10 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.settings.busy_timeout = timeout;
        self
    }

    /// How much each commit waits for the disk: SQLite's `PRAGMA synchronous`, on the
    /// connections the store opens ([`SqliteStore::connect_with`]; a pool handed to
    /// [`SqliteStore::from_pool`] keeps its own setting).
    ///
    /// The default, [`SqliteSynchronous::Full`], loses no completed record to a power cut.
    /// [`SqliteSynchronous::Normal`] trades that for speed: a crash of the process loses
    /// nothing, but a power cut or an operating system crash can lose the last records stored,
    /// and a retry of those requests then runs its handler again. The
    /// [module docs](self#durability) give the measured cost of each. `Off` is not durable at
    /// all; `Extra` adds a sync that WAL mode does not need.
    pub fn synchronous(mut self, synchronous: SqliteSynchronous) -> Self {
        self.settings.synchronous = synchronous;
        self
    }

    /// The clocks the store reads (default [`SystemClock`]): for tests, to step the wall clock or
    /// play another boot of the host. See "Clock" in the [module docs](self#clock).
    pub fn clock(mut self, clock: Arc<dyn SqliteClock>) -> Self {
        self.settings.clock = clock;
        self
    }

    /// At most how many writes (claims, renewals, completions, releases) of concurrent requests
    /// share one write transaction, and so one sync of the disk (default 64); 1 gives each write
    /// a transaction of its own. Nothing waits for a batch to fill: see "Group commit" in the
    /// [module docs](self#group-commit).
    pub fn group_commit(mut self, max_writes: usize) -> Self {
        self.settings.batch = max_writes.max(1);
        self
    }

    /// Whether [`SqliteStore::connect_with`] creates the database file when it does not exist
    /// (default `true`). Off, a mistyped path is an error instead of an empty new store: what an
    /// operator's tool wants.
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.settings.create_if_missing = create;
        self
    }
}

impl sealed::Sealed for Sqlite {}

#[async_trait]
impl Backend for Sqlite {
    const STORE: &'static str = "sqlite";
    const MAX_CONNECTIONS: u32 = 4;
    const SWEEP_BATCH: u32 = 500;
    const MAX_NAME_LEN: usize = usize::MAX;
    const NAME_RULE: &'static str = "SQLite table name must be non-empty without NUL";
    const MIGRATIONS: &'static [(i32, &'static str)] = &[
        (
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
        ),
        // Leases on the host's monotonic clock (see "Clock" in the module docs): the clock a
        // lease's deadline is counted on (a boot id, or `wall`) and that deadline. Rows written
        // before have neither, and their leases follow `expires_at`. The index holds only the
        // claims in progress, which a transactional route's commit extends.
        (
            2,
            "ALTER TABLE {table} ADD COLUMN lease_boot TEXT;
ALTER TABLE {table} ADD COLUMN lease_until INTEGER;
CREATE INDEX IF NOT EXISTS {lease_index} ON {table} (lease_until) WHERE state = 'in_progress';
",
        ),
        // What each record counts towards its actor's bound (`SqliteConfig::actor_max_bytes`),
        // and the index that sums an actor's live records. Rows written before count nothing.
        (
            3,
            "ALTER TABLE {table} ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS {actor_index} ON {table} (actor, expires_at, bytes);
",
        ),
    ];

    type Settings = Settings;
    type Statements = Statements;
    type Session = Session;

    fn statements(config: &SqliteConfig) -> Statements {
        let t = config.qualified_table();
        let key = "scope = ?1 AND actor = ?2 AND idem_key = ?3";
        Statements {
            select: rendered(format!(
                "SELECT fingerprint, state, token, response, expires_at, lease_boot, lease_until FROM {t} WHERE {key}"
            )),
            // ?6 is the wall-clock estimate of the lease's end, ?8 and ?9 the lease's clock and
            // its deadline on it.
            upsert: rendered(format!(
                "INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at,
    lease_boot, lease_until, bytes)
VALUES (?1, ?2, ?3, ?4, 'in_progress', ?5, NULL, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (scope, actor, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,
    state = 'in_progress', token = excluded.token, response = NULL,
    expires_at = excluded.expires_at, created_at = excluded.created_at,
    lease_boot = excluded.lease_boot, lease_until = excluded.lease_until, bytes = excluded.bytes"
            )),
            // The bytes of the actor's live records other than the key's own (?4: the wall
            // clock's now), and the milliseconds until the earliest of them expires.
            quota: rendered(format!(
                "SELECT COALESCE(SUM(bytes), 0) AS used, MIN(expires_at) - ?4 AS earliest_ms FROM {t}
WHERE actor = ?2 AND expires_at > ?4 AND NOT (scope = ?1 AND idem_key = ?3)"
            )),
            renew: rendered(format!(
                "UPDATE {t} SET expires_at = ?5, lease_boot = ?6, lease_until = ?7
WHERE {key} AND token = ?4 AND state = 'in_progress'"
            )),
            complete: rendered(format!(
                "UPDATE {t} SET state = 'completed', response = ?5, expires_at = ?6, lease_boot = NULL, lease_until = NULL,
    bytes = ?7
WHERE {key} AND token = ?4 AND state = 'in_progress'"
            )),
            release: rendered(format!("DELETE FROM {t} WHERE {key} AND token = ?4 AND state = 'in_progress'")),
            held: rendered(format!("SELECT 1 FROM {t} WHERE {key} AND token = ?4 AND state = 'in_progress'")),
            // Every lease on the clock ?1 that was running at ?3, when a transactional route took
            // the writer, moves on by ?2, the time it held it (and its wall-clock estimate too).
            extend: rendered(format!(
                "UPDATE {t} SET lease_until = lease_until + ?2, expires_at = expires_at + ?2
WHERE state = 'in_progress' AND lease_boot = ?1 AND lease_until > ?3"
            )),
            inspect: rendered(format!(
                "SELECT state, response, created_at AS created_ms, expires_at AS expires_ms, expires_at, lease_boot,
    lease_until
FROM {t} WHERE {key}"
            )),
            common: CommonStatements {
                invalidate: rendered(format!("DELETE FROM {t} WHERE {key}")),
                invalidate_completed: rendered(format!("DELETE FROM {t} WHERE {key} AND state = 'completed'")),
                state: rendered(format!("SELECT state FROM {t} WHERE {key}")),
                completed_by: rendered(format!("SELECT 1 FROM {t} WHERE {key} AND token = ?4 AND state = 'completed'")),
            },
            clock: config.settings.clock.clone(),
            // Completed records go at the end of their time to live (?1, the wall clock's now),
            // in-progress ones only `ABANDONED_CLAIM_RETENTION` after their lease: on the lease's
            // clock (?4) when it is this one's (?5, its now less the retention), else on the wall
            // clock (?3, its now less the retention), as `lease_left` judges them.
            sweep: rendered(format!(
                "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE expires_at <= ?1 AND (
    state <> 'in_progress'
    OR (lease_boot = ?4 AND lease_until <= ?5)
    OR ((lease_boot IS NULL OR lease_boot <> ?4) AND expires_at <= ?3)) LIMIT ?2)"
            )),
        }
    }

    async fn attach(pool: &SqlitePool, _own: bool) -> Result<Session, sqlx::Error> {
        // The main database of an in-memory database has no file.
        let file: Option<String> =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'").fetch_one(pool).await?;
        let keeper = match file {
            Some(file) if !file.is_empty() => None,
            _ => Some(Mutex::new(pool.connect_options().connect().await?)),
        };
        Ok(Session { _keeper: keeper, holds: Holds::default(), batches: Batches::default() })
    }

    fn common(sql: &Statements) -> &CommonStatements {
        &sql.common
    }

    fn complete_query(
        sql: &Statements,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> Query<'static, Sqlite, SqliteArguments> {
        let bytes = record_bytes(key, response.len());
        SqliteStore::fenced_query(&sql.complete, key, token)
            .bind(response)
            .bind(sql.clock.wall_ms().saturating_add(millis(ttl)))
            .bind(bytes)
    }

    async fn begin_outcome(pool: &SqlitePool, _session: &Session) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        // The write lock up front: a transaction that reads first and writes later could find
        // another writer in its way and fail instead of waiting.
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn outcome_opened(store: &SqliteStore, tx: &mut Transaction<'static, Sqlite>) -> Result<u64, sqlx::Error> {
        // What a rollback of the handler's writes goes back to, keeping the hold's dues.
        (&mut **tx).execute(sqlx::raw_sql(SqlStr::from_static(HANDLER_SAVEPOINT))).await?;
        // Nothing awaits after this: the hold is recorded and its id returned in one poll, so
        // the transaction it belongs to is there to end it.
        let clock = LeaseClock::read(&*store.sql().clock);
        Ok(store.session().holds.open(clock.basis, clock.now))
    }

    async fn outcome_closing(
        store: &SqliteStore,
        tx: &mut Transaction<'static, Sqlite>,
        id: u64,
    ) -> Result<(), sqlx::Error> {
        let Some(dues) = store.session().holds.close(id) else { return Ok(()) };
        let now = Now::read(&*store.sql().clock);
        if now.lease.basis == dues.basis {
            let held = now.lease.now.saturating_sub(dues.began);
            if held > 0 {
                sqlx::query(store.sql().extend.clone())
                    .bind(dues.basis)
                    .bind(held)
                    .bind(dues.began)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        for renewal in &dues.renewals {
            let renew = SqliteStore::fenced_query(&store.sql().renew, &renewal.key, &renewal.token);
            SqliteStore::bind_lease(renew, &now, renewal.lease).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn outcome_rollback(
        store: &SqliteStore,
        mut tx: Transaction<'static, Sqlite>,
        id: u64,
    ) -> Result<(), sqlx::Error> {
        (&mut *tx).execute(sqlx::raw_sql(SqlStr::from_static(ROLLBACK_HANDLER))).await?;
        Self::outcome_closing(store, &mut tx, id).await?;
        tx.commit().await
    }

    fn outcome_ended(store: &SqliteStore, id: u64, settled: bool) {
        store.session().holds.ended(id, settled);
    }

    async fn execute_in(
        tx: &mut Transaction<'static, Sqlite>,
        query: Query<'static, Sqlite, SqliteArguments>,
    ) -> Result<u64, sqlx::Error> {
        Ok(query.execute(&mut **tx).await?.rows_affected())
    }

    async fn committed(_store: &SqliteStore, _key: &RecordKey, _token: &ClaimToken) -> Result<bool, StoreError> {
        // A local commit that failed did not commit.
        Ok(false)
    }

    fn sweep_query(sql: &Statements, batch: i64) -> Query<'static, Sqlite, SqliteArguments> {
        let (wall, lease) = (sql.clock.wall_ms(), LeaseClock::read(&*sql.clock));
        let retention = abandoned_claim_retention_ms();
        sqlx::query(sql.sweep.clone())
            .bind(wall)
            .bind(batch)
            .bind(wall.saturating_sub(retention))
            .bind(lease.basis.to_owned())
            .bind(lease.now.saturating_sub(retention))
    }

    async fn execute(
        pool: &SqlitePool,
        _session: &Session,
        query: Query<'static, Sqlite, SqliteArguments>,
    ) -> Result<u64, sqlx::Error> {
        Ok(query.execute(pool).await?.rows_affected())
    }

    async fn begin_migration(
        pool: &SqlitePool,
        _config: &SqliteConfig,
        versions: &str,
    ) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        (&mut *tx)
            .execute(sqlx::raw_sql(rendered(format!(
                "CREATE TABLE IF NOT EXISTS {versions} (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            ))))
            .await?;
        Ok(tx)
    }

    async fn applied_version(conn: &mut SqliteConnection, versions: &str) -> Result<Option<i32>, sqlx::Error> {
        let current: Option<i64> =
            sqlx::query_scalar(rendered(format!("SELECT max(version) FROM {versions}"))).fetch_one(conn).await?;
        // A version beyond ours (none is) means there is nothing to apply.
        Ok(current.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
    }

    async fn apply_migration(
        conn: &mut SqliteConnection,
        versions: &str,
        version: i32,
        sql: SqlStr,
    ) -> Result<(), sqlx::Error> {
        (&mut *conn).execute(sqlx::raw_sql(sql)).await?;
        sqlx::query(rendered(format!("INSERT INTO {versions} (version, applied_at) VALUES (?1, ?2)")))
            .bind(i64::from(version))
            .bind(SystemClock.wall_ms())
            .execute(conn)
            .await?;
        Ok(())
    }
}

impl SqlStore<Sqlite> {
    /// Opens `spec` (`sqlite:PATH`, `sqlite://PATH` or `sqlite::memory:`) with the default
    /// [`SqliteConfig`], creating the file and the table if missing, and starts the sweeper.
    pub async fn connect(spec: &str) -> Result<Self, StoreError> {
        Self::connect_with(spec, SqliteConfig::default()).await
    }

    /// Opens `spec` with `config`.
    ///
    /// The file is opened in WAL mode with [`SqliteConfig::synchronous`] (default `FULL`) and
    /// [`SqliteConfig::busy_timeout`], on a pool of [`SqlConfig::max_connections`] for reads and
    /// one more connection for every write; an in-memory database is kept as long as the store
    /// (see the [module docs](self#in-memory)).
    pub async fn connect_with(spec: &str, config: SqliteConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let options = SqliteConnectOptions::from_str(spec)
            .map_err(|e| StoreError::Config(format!("invalid SQLite store `{}`: {e}", super::spec::redact(spec))))?
            .create_if_missing(config.settings.create_if_missing)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(config.settings.synchronous)
            .busy_timeout(config.settings.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.settings.busy_timeout)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(Sqlite::unavailable)?;
        // SQLite runs one writer at a time: writers that queue here take the write lock one
        // after another, where writers on several connections would poll the lock and sleep.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.settings.busy_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(Sqlite::unavailable)?;
        Self::start_with_writer(pool, writer, config, true).await
    }

    async fn read(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        token: &ClaimToken,
    ) -> Result<Option<Claim>, StoreError> {
        let row =
            Self::key_query(&self.sql().select, key).fetch_optional(self.pool()).await.map_err(Sqlite::unavailable)?;
        live(row, fingerprint, token, &Now::read(&*self.sql().clock))
    }

    /// Writes, in the claim's transaction `tx`, the renewals that holds of the writer answered
    /// and could not commit, before the claim judges any lease. They stay owed unless the
    /// answer's [`Owed::paid`] says `tx` committed.
    async fn pay_owed(&self, tx: &mut Transaction<'static, Sqlite>, now: &Now<'_>) -> Result<Owed<'_>, sqlx::Error> {
        let owed = Owed { holds: &self.session().holds, renewals: self.session().holds.take_owed(now.lease.now) };
        for renewal in &owed.renewals {
            let renew = Self::fenced_query(&self.sql().renew, &renewal.key, &renewal.token);
            Self::bind_lease(renew, now, renewal.lease).execute(&mut **tx).await?;
        }
        Ok(owed)
    }

    /// A claim judged and, when it acquires, written in `tx`, which holds the write lock: the
    /// record is read again and taken only if it is still absent or can be claimed.
    async fn claim_in(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
        now: &Now<'_>,
    ) -> Result<Result<Claim, StoreError>, sqlx::Error> {
        let row = Self::key_query(&self.sql().select, key).fetch_optional(&mut **tx).await?;
        match live(row, fingerprint, token, now) {
            Ok(Some(answer)) => return Ok(Ok(answer)),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        if let Some(max) = self.config().bound_for(&key.actor) {
            // Under the write lock, as the claim's own write: no claim of the actor can come
            // between this sum and the insert.
            let used = Self::key_query(&self.sql().quota, key).bind(now.wall).fetch_one(&mut **tx).await?;
            if let Err(refused) = admit_row(&used, key, quota::record_bytes(key, 0), max) {
                return Ok(Err(refused));
            }
        }
        let upsert = Self::key_query(&self.sql().upsert, key).bind(&fingerprint.0[..]).bind(&token.0);
        let upsert = upsert.bind(now.wall.saturating_add(millis(lease))).bind(now.wall);
        upsert
            .bind(now.lease.basis.to_owned())
            .bind(now.lease.now.saturating_add(millis(lease)))
            .bind(record_bytes(key, 0))
            .execute(&mut **tx)
            .await?;
        Ok(Ok(Claim::Acquired(token.clone())))
    }

    /// A statement fenced by `token` run in `tx`: the rows it changed.
    async fn fenced_in(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        key: &RecordKey,
        token: &ClaimToken,
        statement: &Fenced,
    ) -> Result<u64, sqlx::Error> {
        Ok(self.fenced_query_of(key, token, statement).execute(&mut **tx).await?.rows_affected())
    }

    /// The query of `statement`, fenced by `token`.
    fn fenced_query_of(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        statement: &Fenced,
    ) -> Query<'static, Sqlite, SqliteArguments> {
        let sql = self.sql();
        match statement {
            Fenced::Renew { expires_at, basis, until } => {
                Self::fenced_query(&sql.renew, key, token).bind(*expires_at).bind(basis.as_str()).bind(*until)
            }
            Fenced::Complete { response, expires_at, bytes } => {
                Self::fenced_query(&sql.complete, key, token).bind(&response[..]).bind(*expires_at).bind(*bytes)
            }
            Fenced::Release => Self::fenced_query(&sql.release, key, token),
        }
    }

    /// `query` with a lease of `lease` from `now` bound after its other parameters: the
    /// wall-clock estimate of its end, the clock it is counted on, and its deadline on that clock.
    fn bind_lease<'q>(
        query: Query<'q, Sqlite, SqliteArguments>,
        now: &Now<'_>,
        lease: Duration,
    ) -> Query<'q, Sqlite, SqliteArguments> {
        let lease = millis(lease);
        query
            .bind(now.wall.saturating_add(lease))
            .bind(now.lease.basis.to_owned())
            .bind(now.lease.now.saturating_add(lease))
    }
}

/// Owed renewals written in a claim's transaction: owed again when dropped, unless
/// [`paid`](Self::paid) (the transaction committed).
struct Owed<'a> {
    holds: &'a Holds,
    renewals: Vec<Renewal>,
}

impl Owed<'_> {
    fn paid(mut self) {
        self.renewals.clear();
    }
}

impl Drop for Owed<'_> {
    fn drop(&mut self) {
        if !self.renewals.is_empty() {
            self.holds.owe(std::mem::take(&mut self.renewals));
        }
    }
}

/// The store's clocks read once: the wall clock, and the clock leases are counted on.
struct Now<'a> {
    wall: i64,
    lease: LeaseClock<'a>,
}

impl<'a> Now<'a> {
    fn read(clock: &'a dyn SqliteClock) -> Self {
        Self { wall: clock.wall_ms(), lease: LeaseClock::read(clock) }
    }
}

/// How long a row has left, in milliseconds (zero or less: it has ended, that long ago).
///
/// A completed row lives until `expires_at`, on the wall clock. An in-progress row's lease runs
/// until `lease_until` on the clock `lease_boot` names: when that is the clock leases are counted
/// on here, it is read on it. A deadline of another boot of the host has ended (its process is
/// gone): when `expires_at` estimated, or now if that is later. A row written before leases had
/// a clock of their own, or a boot's deadline read by a process that has no boot id, is read on
/// the wall clock (`expires_at`).
fn lease_left(state: &str, expires_at: i64, boot: Option<&str>, until: Option<i64>, now: &Now<'_>) -> i64 {
    let wall_left = expires_at.saturating_sub(now.wall);
    match (boot, until) {
        _ if state != "in_progress" => wall_left,
        (Some(boot), Some(until)) if boot == now.lease.basis => until.saturating_sub(now.lease.now),
        (Some(boot), Some(_)) if now.lease.monotonic() && boot != clock::WALL => wall_left.min(0),
        _ => wall_left,
    }
}

/// A row's [`lease_left`], from its `expires_at`, `lease_boot` and `lease_until` columns.
fn row_left(row: &SqliteRow, state: &str, now: &Now<'_>) -> Result<i64, StoreError> {
    let expires_at: i64 = column(row, "expires_at")?;
    let boot: Option<String> = column(row, "lease_boot")?;
    let until: Option<i64> = column(row, "lease_until")?;
    Ok(lease_left(state, expires_at, boot.as_deref(), until, now))
}

/// The answer a live row gives to a claim with `token`, or `None` when the row is absent or can
/// be claimed: a completed record past its time to live, or an abandoned claim (its lease ended)
/// of the same request or past its retention. An abandoned claim of another request under the
/// key is a mismatch: its outcome is unknown, and a different request never takes it over. A live
/// claim of `token` itself (a claim sent again) is acquired as it is; once its lease ran out, it
/// can be claimed (taken anew, with a new lease).
fn live(
    row: Option<SqliteRow>,
    fingerprint: &Fingerprint,
    token: &ClaimToken,
    now: &Now<'_>,
) -> Result<Option<Claim>, StoreError> {
    let Some(row) = row else { return Ok(None) };
    let state: String = column(&row, "state")?;
    let left = row_left(&row, &state, now)?;
    let own = state == "in_progress" && column::<_, Option<String>>(&row, "token")?.as_deref() == Some(&token.0);
    if left > 0 && own {
        return Ok(Some(Claim::Acquired(token.clone())));
    }
    if left <= 0 {
        let stored: Vec<u8> = column(&row, "fingerprint")?;
        let retained = left > -abandoned_claim_retention_ms();
        if state == "in_progress" && !own && retained && stored != fingerprint.0 {
            return Ok(Some(Claim::Mismatch));
        }
        return Ok(None);
    }
    decide_row(&row, fingerprint, Duration::from_millis(left as u64)).map(Some)
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        // Fast path: a live record is answered without taking the write lock.
        if let Some(answer) = self.read(key, fingerprint, token).await? {
            return Ok(answer);
        }
        self.claim_batched(key, fingerprint, lease, token).await
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        if let Some(hold) = self.session().holds.current() {
            // A transactional route holds the writer: nothing can be written until its
            // transaction ends, which writes this renewal; meanwhile nothing can take the claim.
            // Whether the token holds it is read now, and stays true until then.
            let held = Self::fenced_query(&self.sql().held, key, token)
                .fetch_optional(self.pool())
                .await
                .map_err(Sqlite::unavailable)?;
            if held.is_none() {
                return Err(StoreError::Fenced);
            }
            let answered = LeaseClock::read(&*self.sql().clock).now;
            let renewal = Renewal { key: key.clone(), token: token.clone(), lease, answered };
            if self.session().holds.defer(hold, renewal) {
                return Ok(());
            }
            // The hold is ending: the writer is about to be free.
        }
        let now = Now::read(&*self.sql().clock);
        let lease = millis(lease);
        let renew = Fenced::Renew {
            expires_at: now.wall.saturating_add(lease),
            basis: now.lease.basis.to_owned(),
            until: now.lease.now.saturating_add(lease),
        };
        self.fenced_batched(key, token, renew).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let expires_at = self.sql().clock.wall_ms().saturating_add(millis(ttl));
        let response = response.encode();
        let bytes = record_bytes(key, response.len());
        let complete = Fenced::Complete { response, expires_at, bytes };
        match self.fenced_batched(key, token, complete).await {
            Err(StoreError::Fenced) => {
                // Sent again after it stored the outcome: the record carries the token.
                let ours = Self::fenced_query(&self.sql().common.completed_by, key, token)
                    .fetch_optional(self.pool())
                    .await
                    .map_err(Sqlite::unavailable)?;
                ours.map(drop).ok_or(StoreError::Fenced)
            }
            other => other,
        }
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        self.fenced_batched(key, token, Fenced::Release).await
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let row =
            Self::key_query(&self.sql().inspect, key).fetch_optional(self.pool()).await.map_err(Sqlite::unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let now = Now::read(&*self.sql().clock);
        let state: String = column(&row, "state")?;
        let left = row_left(&row, &state, &now)?;
        // Live records, and in-progress ones until `ABANDONED_CLAIM_RETENTION` after their lease,
        // as the sweeper keeps them.
        let shown = left > 0 || (state == "in_progress" && left > -abandoned_claim_retention_ms());
        if !shown {
            return Ok(None);
        }
        let mut info = record_info(&row)?;
        info.expires_at = epoch_millis(now.wall.saturating_add(left));
        Ok(Some(info))
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
        Sqlite::STORE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paid() -> StoredResponse {
        StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from_static(b"paid"))
    }

    /// `sqlite::memory:` is one shared-cache database for all the store's connections, where a
    /// writer's table lock is not covered by the busy timeout: concurrent claims must wait for it
    /// (SQLite's unlock notification, sqlx's `sqlite-unlock-notify`) rather than fail as
    /// unavailable. Here, in this crate's tests, no other crate's sqlx features are unified in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn in_memory_database_serves_concurrent_requests() {
        let s = SqliteStore::connect("sqlite::memory:").await.unwrap();
        let fp = Fingerprint([1; 32]);
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let k = RecordKey::new("s", "a", format!("k{}", i % 10));
                    match s.claim(&k, &fp, Duration::from_secs(30)).await? {
                        Claim::Acquired(t) => s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.map(|()| 1),
                        _ => Ok(0),
                    }
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            acquired += t.await.unwrap().unwrap();
        }
        assert_eq!(acquired, 10);
        for i in 0..10 {
            let k = RecordKey::new("s", "a", format!("k{i}"));
            assert_eq!(s.claim(&k, &fp, Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
        }
    }
}
