//! Group commit: the claims and completions of concurrent requests sent as one statement over
//! arrays, each caller answered from its own row (see "Group commit" in the [store's docs](super)).
//!
//! A write that is not sent alone ([`PostgresStore::alone`]) is queued
//! ([`Batches`](crate::store::batch::Batches), shared with the SQLite store) with the channel its
//! answer goes back on. The first write queued while fewer than [`WRITERS`] tasks run starts one;
//! a task takes the writes waiting (at most the configured bound, no two of one kind on one key),
//! sends the claims as one statement and the completions as another, at the same time on two
//! connections, answers each caller from its row once its statement committed, and goes on while
//! writes are waiting. A batch of one write sends the store's single statement.

use super::{PgQuery, PgRow, PostgresStore};
use crate::fingerprint::Fingerprint;
use crate::store::sql::{column, millis};
use crate::store::{Claim, ClaimToken, RecordKey, StoreError};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// How many tasks may send batches at once. Two: while one batch waits for its commit, the writes
/// that came meanwhile go out in the next, and a batch held up by a row lock (a takeover waiting
/// for a concurrent completion of that row) does not hold every other write up.
pub(super) const WRITERS: usize = 2;

/// One write waiting for a writer task, with where its answer goes.
pub(super) enum Write {
    Claim(ClaimWrite),
    Complete(CompleteWrite),
}

/// A claim: answered with the claim's answer, or `None` when a concurrent change hid its row from
/// the statement's snapshot (the claim is then sent again, as a single statement's would be).
pub(super) struct ClaimWrite {
    pub(super) key: RecordKey,
    pub(super) fingerprint: Fingerprint,
    pub(super) lease: Duration,
    pub(super) token: ClaimToken,
    pub(super) reply: oneshot::Sender<Result<Option<Claim>, StoreError>>,
}

/// A fenced completion: answered whether it completed the record (`false`: the token no longer
/// holds it, or an earlier attempt already completed it).
pub(super) struct CompleteWrite {
    pub(super) key: RecordKey,
    pub(super) token: ClaimToken,
    pub(super) response: Vec<u8>,
    pub(super) ttl: Duration,
    pub(super) reply: oneshot::Sender<Result<bool, StoreError>>,
}

impl Write {
    /// Whether its caller stopped waiting (its request timed out or was dropped): it is then not
    /// sent, and the caller's error stands for it.
    fn abandoned(&self) -> bool {
        match self {
            Write::Claim(w) => w.reply.is_closed(),
            Write::Complete(w) => w.reply.is_closed(),
        }
    }

    fn fail(self, error: StoreError) {
        match self {
            Write::Claim(w) => drop(w.reply.send(Err(error))),
            Write::Complete(w) => drop(w.reply.send(Err(error))),
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("PostgreSQL store: the writer stopped before this write was sent".into())
}

/// A writer task. Dropped before the queue was empty (its runtime shut down), it lets the next
/// write start another, and the writes no other task will send are answered as unavailable.
struct Runner {
    store: PostgresStore,
    done: bool,
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for write in self.store.session().batches.stopped() {
            write.fail(stopped());
        }
    }
}

impl Runner {
    async fn run(mut self) {
        let max = self.store.config().settings.max_batch();
        let hasher = RandomState::new();
        // The kind of write and its key: within one statement every key is distinct. Two keys
        // whose hashes collide merely go in different batches.
        let slot = |write: &Write| match write {
            Write::Claim(w) => (true, hasher.hash_one(&w.key)),
            Write::Complete(w) => (false, hasher.hash_one(&w.key)),
        };
        loop {
            // Let the callers just answered run first: their next writes join this batch rather
            // than wait for the one after it.
            tokio::task::yield_now().await;
            let Some(batch) = self.store.session().batches.next_distinct(max, slot) else { break };
            self.store.send_batch(batch).await;
        }
        self.done = true;
    }
}

/// A claim or completion sent on its own ([`PostgresStore::alone`]), counted until it is answered.
pub(super) struct Alone<'a>(&'a AtomicUsize);

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PostgresStore {
    /// `Some` when a claim or completion is to be sent on its own, as without group commit: always
    /// when group commit is off or a per-caller bound is set (a bounded claim takes a transaction
    /// of its own, and batched statements write no byte counts), and otherwise while fewer than the pool's connections but
    /// `2 ×` [`WRITERS`] (left for the writers' statements, a claims' and a completions' each) are
    /// taken by writes sent alone. `None`: it goes in the next batch.
    pub(super) fn alone(&self) -> Option<Alone<'_>> {
        let count = &self.session().alone;
        if self.config().settings.max_batch() <= 1 || self.config().bounded() {
            count.fetch_add(1, Ordering::AcqRel);
            return Some(Alone(count));
        }
        let pool = self.pool().options().get_max_connections() as usize;
        let limit = pool.saturating_sub(2 * WRITERS).max(1);
        if count.fetch_add(1, Ordering::AcqRel) < limit {
            return Some(Alone(count));
        }
        count.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Queues `write` for the next batch, starting a writer task if fewer than [`WRITERS`] run.
    fn submit(&self, write: Write) {
        if self.session().batches.push(write, WRITERS) {
            tokio::spawn(Runner { store: self.clone(), done: false }.run());
        }
    }

    /// A claim sent in the next batch; `None` when it must be sent again.
    pub(super) async fn claim_batched(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Option<Claim>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let write = ClaimWrite { key: key.clone(), fingerprint: *fingerprint, lease, token: token.clone(), reply };
        self.submit(Write::Claim(write));
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// A fenced completion sent in the next batch: whether it completed the record.
    pub(super) async fn complete_batched(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        let write = CompleteWrite { key: key.clone(), token: token.clone(), response, ttl, reply };
        self.submit(Write::Complete(write));
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Sends a batch: its claims as one statement and its completions as another, at once.
    async fn send_batch(&self, writes: Vec<Write>) {
        let (mut claims, mut completions) = (Vec::new(), Vec::new());
        for write in writes.into_iter().filter(|w| !w.abandoned()) {
            match write {
                Write::Claim(w) => claims.push(w),
                Write::Complete(w) => completions.push(w),
            }
        }
        futures_util::join!(self.send_claims(claims), self.send_completions(completions));
    }

    async fn send_claims(&self, mut claims: Vec<ClaimWrite>) {
        if claims.len() <= 1 {
            if let Some(w) = claims.pop() {
                let answer = self.claim_once(&w.key, &w.fingerprint, w.lease, &w.token).await;
                drop(w.reply.send(answer));
            }
            return;
        }
        // In the order of their keys, as every batch: two batches that meet on the same keys lock
        // their rows in the same order, and so never wait for each other in a cycle.
        claims.sort_unstable_by(|a, b| order(&a.key).cmp(&order(&b.key)));
        let sql = &self.sql().claim_batch;
        let columns = ClaimColumns::of(&claims);
        let rows = self.run_rows(|| columns.bind(sql)).await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Every claim runs alone, so that one that cannot be written fails alone.
                tracing::debug!(error = %e, claims = claims.len(), "PostgreSQL store: a batch of claims failed; sending each alone");
                return alone(claims, |w| async move {
                    let answer = self.claim_once(&w.key, &w.fingerprint, w.lease, &w.token).await;
                    drop(w.reply.send(answer));
                })
                .await;
            }
        };
        // Rows come ordered by input, and for one input in the order of the single statement's
        // branches: its first row is the answer the single statement would give.
        let mut first: HashMap<i64, PgRow> = HashMap::with_capacity(rows.len());
        for row in rows {
            match column::<_, i64>(&row, "n") {
                Ok(n) => drop(first.entry(n).or_insert(row)),
                Err(e) => return answer_all(claims.into_iter().map(|w| w.reply), &e),
            }
        }
        for (n, w) in (1..).zip(claims) {
            let answer = first.get(&n).map(|row| super::claim_answer(row, &w.fingerprint, &w.token)).transpose();
            drop(w.reply.send(answer));
        }
    }

    async fn send_completions(&self, mut completions: Vec<CompleteWrite>) {
        if completions.len() <= 1 {
            if let Some(w) = completions.pop() {
                let answer = self.complete_once(&w.key, &w.token, w.response, w.ttl).await;
                drop(w.reply.send(answer));
            }
            return;
        }
        completions.sort_unstable_by(|a, b| order(&a.key).cmp(&order(&b.key)));
        let sql = &self.sql().complete_batch;
        let columns = CompleteColumns::of(&completions);
        let rows = match self.run_rows(|| columns.bind(sql)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, completions = completions.len(), "PostgreSQL store: a batch of completions failed; sending each alone");
                return alone(completions, |w| async move {
                    let answer = self.complete_once(&w.key, &w.token, w.response, w.ttl).await;
                    drop(w.reply.send(answer));
                })
                .await;
            }
        };
        let mut stored = vec![false; completions.len()];
        for row in &rows {
            match column::<_, i64>(row, "n") {
                Ok(n) => {
                    if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| stored.get_mut(i)) {
                        *slot = true;
                    }
                }
                Err(e) => return answer_all(completions.into_iter().map(|w| w.reply), &e),
            }
        }
        for (w, stored) in completions.into_iter().zip(stored) {
            drop(w.reply.send(Ok(stored)));
        }
    }
}

/// The order of the keys of a batch.
fn order(key: &RecordKey) -> (&str, &str, &str) {
    (&key.scope, &key.actor, &key.key)
}

/// Answers every write of a batch whose rows could not be read with what `e` says.
fn answer_all<T>(replies: impl Iterator<Item = oneshot::Sender<Result<T, StoreError>>>, e: &StoreError) {
    for reply in replies {
        drop(reply.send(Err(StoreError::Corrupt(e.to_string()))));
    }
}

/// Runs `send` for each write of a batch that failed, all at once, as single statements.
async fn alone<W, F: std::future::Future<Output = ()>>(writes: Vec<W>, send: impl Fn(W) -> F) {
    futures_util::future::join_all(writes.into_iter().map(send)).await;
}

/// A batch of claims as the arrays its statement takes, one element per claim, in order.
struct ClaimColumns {
    scopes: Vec<String>,
    actors: Vec<String>,
    keys: Vec<String>,
    fingerprints: Vec<Vec<u8>>,
    tokens: Vec<String>,
    leases: Vec<i64>,
}

impl ClaimColumns {
    fn of(claims: &[ClaimWrite]) -> Self {
        Self {
            scopes: claims.iter().map(|w| w.key.scope.clone()).collect(),
            actors: claims.iter().map(|w| w.key.actor.clone()).collect(),
            keys: claims.iter().map(|w| w.key.key.clone()).collect(),
            fingerprints: claims.iter().map(|w| w.fingerprint.0.to_vec()).collect(),
            tokens: claims.iter().map(|w| w.token.0.clone()).collect(),
            leases: claims.iter().map(|w| millis(w.lease)).collect(),
        }
    }

    fn bind(&self, sql: &sqlx::SqlStr) -> PgQuery {
        sqlx::query(sql.clone())
            .bind(self.scopes.clone())
            .bind(self.actors.clone())
            .bind(self.keys.clone())
            .bind(self.fingerprints.clone())
            .bind(self.tokens.clone())
            .bind(self.leases.clone())
            .bind(crate::store::sql::abandoned_claim_retention_ms())
    }
}

/// A batch of completions as the arrays its statement takes, one element per completion, in order.
struct CompleteColumns {
    scopes: Vec<String>,
    actors: Vec<String>,
    keys: Vec<String>,
    tokens: Vec<String>,
    responses: Vec<Vec<u8>>,
    ttls: Vec<i64>,
}

impl CompleteColumns {
    fn of(completions: &[CompleteWrite]) -> Self {
        Self {
            scopes: completions.iter().map(|w| w.key.scope.clone()).collect(),
            actors: completions.iter().map(|w| w.key.actor.clone()).collect(),
            keys: completions.iter().map(|w| w.key.key.clone()).collect(),
            tokens: completions.iter().map(|w| w.token.0.clone()).collect(),
            responses: completions.iter().map(|w| w.response.clone()).collect(),
            ttls: completions.iter().map(|w| millis(w.ttl)).collect(),
        }
    }

    fn bind(&self, sql: &sqlx::SqlStr) -> PgQuery {
        sqlx::query(sql.clone())
            .bind(self.scopes.clone())
            .bind(self.actors.clone())
            .bind(self.keys.clone())
            .bind(self.tokens.clone())
            .bind(self.responses.clone())
            .bind(self.ttls.clone())
    }
}

/// The batched statements, rendered for the table `t`. As in the single claim, `takeover`'s
/// expiry test is spelled `(r.expires_at <= now()) IS TRUE`, which no index answers, so each row
/// is found by the primary key and never through the `expires_at` or `actor` index.
pub(super) fn statements(t: &str) -> (String, String) {
    // The single claim statement over arrays (see "The claim" in the store's docs): `input` holds
    // one row per claim, numbered `n`; each branch is joined back to its input. `branch` orders an
    // input's rows as the single statement's `UNION ALL` does.
    let claim = format!(
        "WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int8[])
        WITH ORDINALITY AS i(scope, actor, idem_key, fingerprint, token, lease_ms, n)
), existing AS (
    SELECT i.n, r.fingerprint, r.state, r.token, r.response, r.expires_at
    FROM input i JOIN {t} r ON r.scope = i.scope AND r.actor = i.actor AND r.idem_key = i.idem_key
), takeover AS (
    UPDATE {t} r SET fingerprint = i.fingerprint, state = 'in_progress', token = i.token, response = NULL,
        expires_at = now() + i.lease_ms * interval '1 millisecond', created_at = now()
    FROM input i
    WHERE r.scope = i.scope AND r.actor = i.actor AND r.idem_key = i.idem_key AND (r.expires_at <= now()) IS TRUE
        AND (r.state <> 'in_progress' OR r.fingerprint = i.fingerprint
            OR r.expires_at <= now() - $7::int8 * interval '1 millisecond')
    RETURNING i.n
), inserted AS (
    INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, expires_at)
    SELECT i.scope, i.actor, i.idem_key, i.fingerprint, 'in_progress', i.token,
        now() + i.lease_ms * interval '1 millisecond'
    FROM input i WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.n = i.n)
    ON CONFLICT (scope, actor, idem_key) DO NOTHING
    RETURNING scope, actor, idem_key
)
SELECT n, 0 AS branch, TRUE AS acquired, NULL::bytea AS fingerprint, NULL::text AS state,
    NULL::bytea AS response, NULL::int8 AS remaining_ms FROM takeover
UNION ALL
SELECT i.n, 1, TRUE, NULL, NULL, NULL, NULL
FROM inserted d JOIN input i ON i.scope = d.scope AND i.actor = d.actor AND i.idem_key = d.idem_key
UNION ALL
SELECT e.n, 2, COALESCE(e.state = 'in_progress' AND e.token = i.token, FALSE), e.fingerprint, e.state, e.response,
    GREATEST(0, CEIL(EXTRACT(EPOCH FROM (e.expires_at - now())) * 1000))::int8
FROM existing e JOIN input i ON i.n = e.n
WHERE e.expires_at > now() OR (e.state = 'in_progress' AND (e.token = i.token
    OR (e.fingerprint <> i.fingerprint AND e.expires_at > now() - $7::int8 * interval '1 millisecond')))
ORDER BY 1, 2"
    );
    // The single completion over arrays: a row, numbered as its input, for each record completed.
    let complete = format!(
        "UPDATE {t} r SET state = 'completed', response = i.response,
    expires_at = clock_timestamp() + i.ttl_ms * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::int8[])
    WITH ORDINALITY AS i(scope, actor, idem_key, token, response, ttl_ms, n)
WHERE r.scope = i.scope AND r.actor = i.actor AND r.idem_key = i.idem_key
    AND r.token = i.token AND r.state = 'in_progress'
RETURNING i.n"
    );
    (claim, complete)
}
