//! Transactional mode: the handler's writes and the idempotency record commit together.
//!
//! Every non-transactional mode has one window: the handler's effect commits, the process dies
//! before the outcome is recorded, the lease lapses, and a retry does the work again. When the
//! effects live in the same SQL database as the store, a route declared
//! `#[idempotent(..., transactional = true)]` closes it:
//!
//! 1. the claim is its own short transaction, as always, so a concurrent duplicate sees the key in
//!    progress (409) at once;
//! 2. the engine then opens a transaction on the store's pool and runs the handler, which writes in
//!    it through [`Tx`] (the adapters' `Tx` extractor);
//! 3. a final outcome is written into the record in that same transaction, fenced by the claim's
//!    token, and the transaction commits: the effects and the record are committed together or
//!    not at all. A retryable outcome (a 5xx, a panic) rolls the writes back and releases the
//!    claim, so the retry runs cleanly.
//!
//! A crash anywhere before the commit rolls everything back (the database does); the claim's lease
//! lapses and the retry runs. A commit that finds the claim taken over (its lease lapsed while the
//! handler ran, and another request claimed the key) writes nothing: the handler's writes are
//! rolled back and the client gets 409. A commit whose answer is lost with its connection is
//! checked: the record carries the claim's token once it committed.
//!
//! The stores that can do it are the PostgreSQL, SQLite and MySQL stores ([`TransactionalStore`]). On
//! SQLite the handler's transaction holds the database's one write lock (`BEGIN IMMEDIATE`) until
//! it commits, so every other write (claims of other keys, completions) waits for it: keep such
//! handlers short. No other claim's lease lapses because of it: the store answers its own
//! renewals meanwhile and writes them with the commit, which also extends every other lease by
//! the time the writer was held (see "A transactional route holds the writer" in
//! `store::sqlite`). The SQLite store's group commit, which lets the writes of concurrent requests
//! share one transaction and one sync, leaves this transaction out: it commits alone, and the
//! writes that queued while it held the writer share the next one (see "Group commit" there). A runtime whose store cannot run transactions refuses to start when a route is
//! transactional, unless it was built to answer those routes 501 instead
//! ([`Builder::without_transactions`](crate::engine::Builder::without_transactions)).
//!
//! A replay never opens a transaction: the engine opens one only for a request that acquired its
//! claim.
//!
//! The transaction belongs to the handler's own run: a guard on it that the handler moves out of
//! itself (into a spawned task, or into a response body streamed after it returned) is refused.
//! The engine does not wait for it: the request fails with a 500 problem
//! (`urn:idempotent:problem:misconfigured`), nothing is stored, the claim is released, and the
//! transaction is rolled back when that guard is dropped. Until then the guard keeps its
//! connection (on SQLite, the database's one writer, so no other write can happen meanwhile).

use super::{ClaimToken, RecordKey, StoreError};
use crate::response::StoredResponse;
use async_trait::async_trait;
use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A store that can run a transactional route: the PostgreSQL, SQLite and MySQL stores.
#[async_trait]
pub trait TransactionalStore: Send + Sync {
    /// Opens the transaction a claimed request's handler writes in, on the store's own database.
    async fn begin(&self) -> Result<Arc<dyn OutcomeTransaction>, StoreError>;
}

/// One open transaction of a transactional route: the handler writes in it, then the engine
/// commits the outcome with it or rolls it back.
#[async_trait]
pub trait OutcomeTransaction: Any + Send + Sync {
    /// Stores `response` as `key`'s outcome inside the transaction, fenced by `token`, and
    /// commits. [`StoreError::Fenced`] when the token no longer holds the claim: nothing is
    /// committed, the handler's writes included. Any other error: nothing was committed.
    async fn commit(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Rolls the transaction back: the handler's writes are discarded. Never waits for a guard
    /// held outside the handler (see [`escaped`](Self::escaped)): such a guard rolls the
    /// transaction back when it is dropped.
    async fn rollback(&self);

    /// Whether a guard on the transaction is held now. Asked once the handler has returned, when
    /// every guard the handler took should be gone: one still held was moved out of the handler
    /// (into a spawned task, a response stream), and the transaction cannot be committed under
    /// it. The engine then answers 500, rolls back and releases the claim instead of waiting for
    /// it. `false` by default.
    fn escaped(&self) -> bool {
        false
    }

    /// The transaction as `Any`, for [`Tx`] to find its database's type.
    fn as_any(&self) -> &dyn Any;
}

tokio::task_local! {
    static CURRENT: Arc<dyn OutcomeTransaction>;
}

/// Runs `handler` with `transaction` as the one its [`Tx`] hands out.
pub(crate) fn scope<F: Future>(
    transaction: Arc<dyn OutcomeTransaction>,
    handler: F,
) -> impl Future<Output = F::Output> {
    CURRENT.scope(transaction, handler)
}

/// Why a handler could not have its transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// Asked outside the handler of a transactional route (an ordinary route, a task the handler
    /// spawned, or after the handler returned).
    #[error("no idempotency transaction here: `Tx` works inside the handler of a route declared `transactional = true`, not in tasks it spawns")]
    NotTransactional,
    /// The handler asked for one database, the store runs on another.
    #[error("the idempotency store is not on {0}: the handler asked for a transaction of the wrong database")]
    OtherDatabase(&'static str),
    /// The transaction was already committed or rolled back.
    #[error("the idempotency transaction is already finished")]
    Finished,
}

/// The transaction of a transactional route's handler. The adapters' `Tx` extractor is this
/// type; inside the handler, [`postgres`](Self::postgres), [`sqlite`](Self::sqlite) or
/// [`mysql`](Self::mysql) (or [`get`](Self::get)) locks it for writing:
///
/// ```ignore
/// let mut tx = tx.postgres().await?;
/// sqlx::query("INSERT INTO deposits (account, amount) VALUES ($1, $2)").bind(&account).bind(amount).execute(&mut **tx).await?;
/// ```
///
/// The handler never commits: the engine does, with the outcome's record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tx {
    _private: (),
}

impl Tx {
    /// The handle; what it locks is found when it is used, inside the handler.
    pub const fn new() -> Self {
        Self { _private: () }
    }

    /// Locks the transaction of the store's database `D` (`sqlx::Postgres`, `sqlx::Sqlite` or
    /// `sqlx::MySql`): a guard that derefs to its `sqlx::Transaction`.
    pub async fn get<D: TxDatabase>(&self) -> Result<D::Guard, TxError> {
        let current = CURRENT.try_with(Arc::clone).map_err(|_| TxError::NotTransactional)?;
        D::lock(current.as_ref()).await
    }

    /// Locks the transaction on the PostgreSQL store's database (a `store::sql::TxGuard`).
    #[cfg(feature = "postgres")]
    pub async fn postgres(&self) -> Result<<sqlx::Postgres as TxDatabase>::Guard, TxError> {
        self.get::<sqlx::Postgres>().await
    }

    /// Locks the transaction on the SQLite store's database (a `store::sql::TxGuard`).
    #[cfg(feature = "sqlite")]
    pub async fn sqlite(&self) -> Result<<sqlx::Sqlite as TxDatabase>::Guard, TxError> {
        self.get::<sqlx::Sqlite>().await
    }

    /// Locks the transaction on the MySQL or MariaDB store's database (a `store::sql::TxGuard`).
    #[cfg(feature = "mysql")]
    pub async fn mysql(&self) -> Result<<sqlx::MySql as TxDatabase>::Guard, TxError> {
        self.get::<sqlx::MySql>().await
    }
}

/// A database whose open transactions a handler can lock: implemented by the SQL stores'
/// databases (`sqlx::Postgres`, `sqlx::Sqlite`, `sqlx::MySql`) in `store::sql`.
#[async_trait]
pub trait TxDatabase {
    /// The handler's hold on the transaction.
    type Guard: Send;

    /// Locks `transaction` if it is one of this database's; [`TxError::OtherDatabase`] if not.
    async fn lock(transaction: &dyn OutcomeTransaction) -> Result<Self::Guard, TxError>;
}
