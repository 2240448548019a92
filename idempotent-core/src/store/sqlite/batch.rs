//! Group commit: the store's writes that wait for the writer share one write transaction, and so
//! one sync of the disk (see "Group commit" in the [store's docs](super)).
//!
//! A write that finds no write running or waiting runs at once in its caller's task, in a
//! transaction of its own, as without group commit (a renewal, completion or release alone is
//! one statement in autocommit): a caller alone pays no hand-off. Otherwise it is queued
//! ([`Batches`](crate::store::batch::Batches), shared with the PostgreSQL store) with the channel
//! its answer goes back on; the writes queued while a caller runs its own, or while no task runs
//! them, start a task that takes every write waiting (up to the configured bound), runs them in
//! one `BEGIN IMMEDIATE` transaction, commits, answers each with its own result, and goes on
//! while writes are waiting. Nothing waits for a batch to fill; writes that arrive while a
//! transaction commits form the next.

use super::{Now, Sqlite, SqliteStore, StoreError};
use crate::fingerprint::Fingerprint;
use crate::store::sql::Backend;
use crate::store::{Claim, ClaimToken, RecordKey};
use sqlx::Connection;
use std::time::Duration;
use tokio::sync::oneshot;

/// One write waiting for the writer, with where its answer goes.
pub(super) struct Write {
    pub(super) key: RecordKey,
    pub(super) token: ClaimToken,
    pub(super) change: Change,
}

/// What a [`Write`] does to its record.
pub(super) enum Change {
    /// A claim that found no live record on its read: judged again, and written, under the lock.
    Claim { fingerprint: Fingerprint, lease: Duration, reply: oneshot::Sender<Result<Claim, StoreError>> },
    /// A statement fenced by the token (a renewal, a completion, a release); answered with the
    /// rows it changed.
    Fenced { statement: Fenced, reply: oneshot::Sender<Result<u64, StoreError>> },
}

/// A fenced statement's own parameters, fixed when it was asked for.
pub(super) enum Fenced {
    /// A renewal: the lease's wall-clock estimate of its end, its clock, and its deadline on it.
    Renew { expires_at: i64, basis: String, until: i64 },
    /// A completion: the encoded response, the end of its time to live, and what the record
    /// then counts towards its actor's bound.
    Complete { response: Vec<u8>, expires_at: i64, bytes: i64 },
    /// A release.
    Release,
}

/// What a write answers once its batch committed.
pub(super) enum Answer {
    Claim(Result<Claim, StoreError>),
    Rows(u64),
}

impl Write {
    /// Whether its caller stopped waiting (its request timed out or was dropped): it is then not
    /// run, and the caller's error stands for it.
    fn abandoned(&self) -> bool {
        match &self.change {
            Change::Claim { reply, .. } => reply.is_closed(),
            Change::Fenced { reply, .. } => reply.is_closed(),
        }
    }

    fn answer(self, answer: Answer) {
        // A caller that stopped waiting meanwhile no longer wants the answer.
        match (self.change, answer) {
            (Change::Claim { reply, .. }, Answer::Claim(claim)) => drop(reply.send(claim)),
            (Change::Fenced { reply, .. }, Answer::Rows(rows)) => drop(reply.send(Ok(rows))),
            (change, _) => change.fail(StoreError::Unavailable("SQLite store: a write got another's answer".into())),
        }
    }
}

impl Change {
    fn fail(self, error: StoreError) {
        match self {
            Change::Claim { reply, .. } => drop(reply.send(Err(error))),
            Change::Fenced { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

/// The task that runs the batches. Dropped before the queue was empty (its runtime shut down),
/// it lets the next write start another, and the writes it left are answered as unavailable.
struct Runner {
    store: SqliteStore,
    done: bool,
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for write in self.store.session().batches.stopped() {
            write.change.fail(stopped());
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("SQLite store: the writer stopped before this write ran".into())
}

/// The writer's turn taken by a caller that runs its write alone. When it ends (the write was
/// answered, or the caller stopped waiting), the writes queued meanwhile go to a writer task.
struct Turn<'a> {
    store: &'a SqliteStore,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.store.session().batches.hand_over() {
            self.store.start_runner();
        }
    }
}

impl SqliteStore {
    /// Runs `write`: at once in the caller's task when no write runs or waits (a transaction of
    /// its own, as without group commit), otherwise queued for the next batch, starting the task
    /// that runs them if none does. Its answer is on its reply channel either way.
    async fn submit(&self, write: Write) {
        let batches = &self.session().batches;
        if batches.run_alone() {
            let _turn = Turn { store: self };
            return self.run_batch(vec![write]).await;
        }
        // One writer: SQLite has one write lock.
        if batches.push(write, 1) {
            self.start_runner();
        }
    }

    /// Starts the task that runs the queued writes (counted as running already).
    fn start_runner(&self) {
        let runner = Runner { store: self.clone(), done: false };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(runner.run())),
            // No runtime to run it (a caller dropped as its runtime went away): dropped unrun, it
            // answers the queued writes as unavailable and lets the next write start another.
            Err(_) => drop(runner),
        }
    }

    /// A claim run under the write lock, in the next batch.
    pub(super) async fn claim_batched(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        let (reply, answer) = oneshot::channel();
        let change = Change::Claim { fingerprint: *fingerprint, lease, reply };
        self.submit(Write { key: key.clone(), token: token.clone(), change }).await;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// A fenced statement run in the next batch: [`StoreError::Fenced`] when it changed no row.
    pub(super) async fn fenced_batched(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        statement: Fenced,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Write { key: key.clone(), token: token.clone(), change: Change::Fenced { statement, reply } })
            .await;
        match answer.await.unwrap_or_else(|_| Err(stopped()))? {
            0 => Err(StoreError::Fenced),
            _ => Ok(()),
        }
    }

    /// Runs `writes` in one transaction. If it fails, each runs again in a transaction of its
    /// own, so that a write that cannot be written fails alone.
    async fn run_batch(&self, mut writes: Vec<Write>) {
        writes.retain(|w| !w.abandoned());
        if writes.is_empty() {
            return;
        }
        let e = match self.transaction(&writes).await {
            Ok(answers) => {
                for (write, answer) in writes.into_iter().zip(answers) {
                    write.answer(answer);
                }
                return;
            }
            // No transaction could be had (the writer stayed busy past the timeout): alone, each
            // write would wait for it again.
            Err(Failed::Begin(e)) => {
                let message = format!("{}: {e}", <Sqlite as sqlx::Database>::NAME);
                for write in writes {
                    write.change.fail(StoreError::Unavailable(message.clone()));
                }
                return;
            }
            Err(Failed::Within(e)) => e,
        };
        if writes.len() == 1 {
            let write = writes.pop().expect("one write");
            return write.change.fail(Sqlite::unavailable(e));
        }
        tracing::debug!(error = %e, writes = writes.len(), "SQLite store: a batch of writes failed; running each alone");
        for write in writes {
            match self.transaction(std::slice::from_ref(&write)).await {
                Ok(mut answers) => write.answer(answers.pop().expect("one answer per write")),
                Err(Failed::Begin(e) | Failed::Within(e)) => write.change.fail(Sqlite::unavailable(e)),
            }
        }
    }

    /// One write transaction holding `writes`, committed: each write's answer, in order.
    async fn transaction(&self, writes: &[Write]) -> Result<Vec<Answer>, Failed> {
        if let [Write { key, token, change: Change::Fenced { statement, .. } }] = writes {
            if let Some(rows) = self.fenced_alone(key, token, statement).await? {
                return Ok(vec![Answer::Rows(rows)]);
            }
        }
        let mut tx = self.begin_writes().await.map_err(Failed::Begin)?;
        let now = Now::read(&*self.sql().clock);
        let owed = self.pay_owed(&mut tx, &now).await.map_err(Failed::Within)?;
        let mut answers = Vec::with_capacity(writes.len());
        for write in writes {
            let answer = match &write.change {
                Change::Claim { fingerprint, lease, .. } => {
                    self.claim_in(&mut tx, &write.key, fingerprint, *lease, &write.token, &now).await.map(Answer::Claim)
                }
                Change::Fenced { statement, .. } => {
                    self.fenced_in(&mut tx, &write.key, &write.token, statement).await.map(Answer::Rows)
                }
            };
            answers.push(answer.map_err(Failed::Within)?);
        }
        tx.commit().await.map_err(Failed::Within)?;
        owed.paid();
        Ok(answers)
    }
}

impl SqliteStore {
    /// A fenced statement alone in its transaction: one statement in autocommit, which takes the
    /// write lock and commits (with `FULL`, synced) as `BEGIN IMMEDIATE` and `COMMIT` around it
    /// would, two round trips to the connection fewer. `None` when it must run in a transaction
    /// after all: renewals are owed (written first, in the same transaction), or the connection
    /// is left in a transaction SQLite ended ([`begin_writes`](Self::begin_writes) replaces it).
    async fn fenced_alone(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        statement: &Fenced,
    ) -> Result<Option<u64>, Failed> {
        if self.session().holds.owes() {
            return Ok(None);
        }
        let mut conn = self.writer().acquire().await.map_err(Failed::Begin)?;
        if conn.is_in_transaction() {
            return Ok(None);
        }
        let done = self.fenced_query_of(key, token, statement).execute(&mut *conn).await.map_err(Failed::Within)?;
        Ok(Some(done.rows_affected()))
    }

    /// Opens a write transaction on the writer. SQLite rolls a transaction back by itself when
    /// the disk is full or fails, and the driver may then still count it as open on its
    /// connection, refusing every later `BEGIN` there: such a connection is closed, and the pool
    /// opens another.
    async fn begin_writes(&self) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        let writer = self.writer();
        for _ in 0..writer.options().get_max_connections() {
            match writer.begin_with("BEGIN IMMEDIATE").await {
                Err(sqlx::Error::InvalidSavePointStatement) => {
                    let conn = writer.acquire().await?;
                    if conn.is_in_transaction() {
                        tracing::warn!("SQLite store: a connection kept a transaction SQLite had ended; closing it");
                        drop(conn.detach());
                    }
                }
                other => return other,
            }
        }
        writer.begin_with("BEGIN IMMEDIATE").await
    }
}

/// Why a batch's transaction failed.
enum Failed {
    /// It could not begin: nothing ran.
    Begin(sqlx::Error),
    /// A statement in it, or its commit, failed: nothing of it committed.
    Within(sqlx::Error),
}

impl Runner {
    async fn run(mut self) {
        let max = self.store.config().settings.batch.max(1);
        while let Some(batch) = self.store.session().batches.next(max) {
            self.store.run_batch(batch).await;
        }
        self.done = true;
    }
}
