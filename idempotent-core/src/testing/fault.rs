//! A [`Store`] wrapper that injects faults at chosen operations, for tests of the engine and of
//! applications: delays, errors (an unreachable store, a full one, a corrupt record, a claim taken
//! over), operations that never answer, and operations held until the test lets them go.
//!
//! ```
//! use idempotent_core::store::{MemoryStore, StoreError};
//! use idempotent_core::testing::fault::{Failure, Fault, FaultStore, Op};
//! use std::sync::Arc;
//!
//! let store = FaultStore::new(Arc::new(MemoryStore::new()));
//! // The next two completions fail as if the store were unreachable, then it recovers.
//! store.push(Op::Complete, Fault::Fail(Failure::Unavailable));
//! store.push(Op::Complete, Fault::Fail(Failure::Unavailable));
//! // Every renewal waits 50 ms before it reaches the store.
//! store.always(Op::Renew, Fault::Delay(std::time::Duration::from_millis(50)));
//! assert_eq!(store.calls(Op::Complete), 0);
//! ```

use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::{Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, Store, StoreError};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// A store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Store::claim`].
    Claim,
    /// [`Store::renew`].
    Renew,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
}

impl Op {
    const ALL: [Op; 4] = [Op::Claim, Op::Renew, Op::Complete, Op::Release];

    fn index(self) -> usize {
        self as usize
    }
}

/// An error a fault answers with, in place of the store's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// [`StoreError::Unavailable`]: the backend cannot be reached.
    Unavailable,
    /// [`StoreError::Full`]: no room for a new record (Redis `OOM`, a full memory store).
    Full,
    /// [`StoreError::Corrupt`]: the record cannot be decoded.
    Corrupt,
    /// [`StoreError::Fenced`]: the claim was taken over.
    Fenced,
}

impl Failure {
    fn error(self) -> StoreError {
        match self {
            Failure::Unavailable => StoreError::Unavailable("injected fault: connection refused".into()),
            Failure::Full => StoreError::Full,
            Failure::Corrupt => StoreError::Corrupt("injected fault: undecodable record".into()),
            Failure::Fenced => StoreError::Fenced,
        }
    }
}

/// What one call of an operation meets.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Reaches the store unchanged.
    Pass,
    /// Waits this long, then reaches the store.
    Delay(Duration),
    /// Answers this error without reaching the store.
    Fail(Failure),
    /// Reaches the store, which applies the operation, but the answer is lost: the caller gets
    /// [`StoreError::Unavailable`] (a response lost on the way back).
    LoseAnswer,
    /// Never answers (the caller's timeout, if any, ends it).
    Hang,
    /// Waits until the [`Notify`] is notified, then reaches the store.
    Hold(Arc<Notify>),
}

#[derive(Debug, Default)]
struct Plan {
    queued: HashMap<Op, VecDeque<Fault>>,
    always: HashMap<Op, Fault>,
}

/// A [`Store`] that injects [`Fault`]s into the calls of an inner store; see the module docs.
///
/// Each call of an operation takes the next fault queued for it with [`push`](Self::push), else
/// the one set with [`always`](Self::always), else [`Fault::Pass`].
pub struct FaultStore {
    inner: Arc<dyn Store>,
    plan: Mutex<Plan>,
    calls: [AtomicUsize; 4],
}

impl std::fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let calls: Vec<_> = Op::ALL.iter().map(|op| (op, self.calls(*op))).collect();
        f.debug_struct("FaultStore").field("inner", &self.inner.name()).field("calls", &calls).finish()
    }
}

impl FaultStore {
    /// Wraps `inner`; every call passes until faults are planned.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, plan: Mutex::new(Plan::default()), calls: Default::default() }
    }

    /// The next call of `op` not yet given a queued fault meets `fault`.
    pub fn push(&self, op: Op, fault: Fault) {
        self.lock().queued.entry(op).or_default().push_back(fault);
    }

    /// Every call of `op` without a queued fault meets `fault`, until [`clear`](Self::clear).
    pub fn always(&self, op: Op, fault: Fault) {
        self.lock().always.insert(op, fault);
    }

    /// Forgets the faults planned for `op`: its calls pass again.
    pub fn clear(&self, op: Op) {
        let mut plan = self.lock();
        plan.queued.remove(&op);
        plan.always.remove(&op);
    }

    /// How many times `op` was called (whatever it met).
    pub fn calls(&self, op: Op) -> usize {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn meet<T, F>(&self, op: Op, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        let fault = {
            let mut plan = self.lock();
            match plan.queued.get_mut(&op).and_then(VecDeque::pop_front) {
                Some(f) => f,
                None => plan.always.get(&op).cloned().unwrap_or(Fault::Pass),
            }
        };
        match fault {
            Fault::Pass => call.await,
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Fault::Fail(failure) => Err(failure.error()),
            Fault::LoseAnswer => {
                let _ = call.await;
                Err(StoreError::Unavailable("injected fault: the answer was lost".into()))
            }
            Fault::Hang => std::future::pending().await,
            Fault::Hold(gate) => {
                gate.notified().await;
                call.await
            }
        }
    }
}

#[async_trait]
impl Store for FaultStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.meet(Op::Claim, self.inner.claim_as(key, fingerprint, lease, token)).await
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.meet(Op::Renew, self.inner.renew(key, token, lease)).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.meet(Op::Complete, self.inner.complete(key, token, response, ttl)).await
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        self.meet(Op::Release, self.inner.release(key, token)).await
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.inner.invalidate(key, purge).await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
