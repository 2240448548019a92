//! The lease renewals of the claims this process holds.
//!
//! Every thread that acquires claims has one keeper: a task, spawned on that thread's runtime
//! when its first claim is acquired, that renews each claim registered with it on a fixed
//! cadence (a sixth of the claim's lease) until the claim's outcome is stored or released. A claim
//! costs its request a map insert and a map removal under a lock that only its thread and its
//! keeper take, instead of a task of its own, a timer and a cross-thread wake-up each: most
//! requests finish long before their first renewal falls due, and the keeper does not wake for
//! them.
//!
//! The keeper is a task apart from the request's: on a multi-threaded runtime a handler that
//! blocks its thread does not hold the renewals up (another worker runs the keeper), and a
//! renewal that hangs holds up neither the handler nor the other claims' renewals (each renewal
//! runs on a task of its own, bounded by the store timeout). A thread's keeper serves its own
//! runtime only: on actix-web, each worker's claims are renewed on that worker.
//!
//! A thread keeps its keeper until the keeper's runtime shuts down; the thread's next claim then
//! starts another on the runtime it runs on. A thread that drives one runtime, leaves it alive
//! but idle, and claims from another would have its claims renewed by the idle one, that is not
//! at all: drive one runtime per thread at a time (as servers and `#[tokio::test]` do).

use super::{bounded, renewal_period, Runtime};
use crate::policy::Policy;
use crate::store::{ClaimToken, RecordKey, Store, StoreError};
use crate::telemetry::{self, StoreOperation};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// One claim held by this process: what its renewals need, and what they tell its request.
struct Held {
    key: RecordKey,
    token: ClaimToken,
    store: Arc<dyn Store>,
    timeout: Duration,
    lease: Duration,
    scope: &'static str,
    /// The request's span, current when the claim was acquired: a renewal's events belong to it.
    span: tracing::Span,
    /// A renewal found the claim taken over (or crossing the completion, once `settling`).
    lost: AtomicBool,
    /// The request has begun storing or releasing its outcome.
    settling: AtomicBool,
}

/// A claim's lease, renewed from its acquisition until this is dropped (once the outcome is stored
/// or released, or when the request's task is cancelled); a renewal still running then is
/// cancelled. It holds one unit of [`telemetry::CLAIMS_IN_FLIGHT`] meanwhile.
pub(super) struct Lease {
    held: Arc<Held>,
    keeper: Arc<Keeper>,
    id: u64,
    woke_keeper: bool,
}

impl Lease {
    /// Registers the claim of `key` under `token` with this thread's keeper; its first renewal
    /// falls due a renewal period from now.
    pub(super) fn hold(runtime: &Runtime, policy: &Policy, key: RecordKey, token: ClaimToken) -> Self {
        let held = Arc::new(Held {
            key,
            token,
            store: runtime.store.clone(),
            timeout: runtime.config.store_timeout,
            lease: policy.lease,
            scope: policy.scope,
            span: tracing::Span::current(),
            lost: AtomicBool::new(false),
            settling: AtomicBool::new(false),
        });
        telemetry::claims_in_flight(policy.scope, 1.0);
        let keeper = Keeper::of_this_thread();
        let (id, woke_keeper) = keeper.add(held.clone(), Instant::now() + renewal_period(policy.lease));
        Self { held, keeper, id, woke_keeper }
    }

    /// Lets the keeper run first if this claim woke it: woken from this thread, it waits in the
    /// thread's own queue, and a handler that blocks the thread would otherwise keep it from
    /// arming its timer.
    pub(super) async fn let_keeper_arm(&self) {
        if self.woke_keeper {
            tokio::task::yield_now().await;
        }
    }

    /// The claim's record key.
    pub(super) fn key(&self) -> &RecordKey {
        &self.held.key
    }

    /// The claim's fencing token.
    pub(super) fn token(&self) -> &ClaimToken {
        &self.held.token
    }

    /// Whether a renewal found the claim taken over.
    pub(super) fn lost(&self) -> bool {
        self.held.lost.load(Ordering::Acquire)
    }

    /// The request begins storing or releasing its outcome.
    pub(super) fn settling(&self) {
        self.held.settling.store(true, Ordering::Release);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.remove(self.id);
        telemetry::claims_in_flight(self.held.scope, -1.0);
    }
}

/// The claims of one thread, and when each is renewed next.
#[derive(Default)]
struct Schedule {
    next_id: u64,
    claims: HashMap<u64, Entry>,
    /// When the keeper wakes next (`None`: when a claim is added). No claim falls due before it:
    /// a claim that would wakes the keeper when it is added.
    wake_at: Option<Instant>,
    /// The shortest renewal period of the claims added so far: how far ahead the keeper looks
    /// again when it finds no claim, so that claims added meanwhile need not wake it.
    shortest_period: Option<Duration>,
    /// A claim was added since the keeper last looked.
    added: bool,
    /// How many times in a row the keeper found no claim and none added.
    idle_turns: u32,
}

/// After this many looks in a row without a claim, the keeper sleeps until a claim wakes it.
const IDLE_TURNS: u32 = 8;

struct Entry {
    due: Instant,
    held: Arc<Held>,
    /// The renewal running now, cancelled if the claim is dropped meanwhile.
    renewal: Option<AbortHandle>,
}

struct Keeper {
    schedule: Mutex<Schedule>,
    wake: Notify,
    /// False once the keeper's task is gone (its runtime shut down): the next claim on this thread
    /// starts another.
    alive: AtomicBool,
}

thread_local! {
    static KEEPER: RefCell<Option<Arc<Keeper>>> = const { RefCell::new(None) };
}

impl Keeper {
    /// This thread's keeper, started on the current runtime if it has none (or its runtime is
    /// gone).
    fn of_this_thread() -> Arc<Keeper> {
        let current = |slot: &RefCell<Option<Arc<Keeper>>>| {
            let mut slot = slot.borrow_mut();
            match slot.as_ref().filter(|k| k.alive.load(Ordering::Acquire)) {
                Some(keeper) => keeper.clone(),
                None => slot.insert(Keeper::start()).clone(),
            }
        };
        // A thread being torn down has no thread-locals left: its claim gets a keeper of its own.
        KEEPER.try_with(current).unwrap_or_else(|_| Keeper::start())
    }

    fn start() -> Arc<Keeper> {
        let keeper = Arc::new(Keeper { schedule: Mutex::default(), wake: Notify::new(), alive: AtomicBool::new(true) });
        tokio::spawn(keeper.clone().run());
        keeper
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        // The schedule is consistent after every statement: a panic elsewhere leaves it usable.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a claim first due at `due`; answers its id and whether the keeper was woken
    /// (only when it would otherwise sleep past `due`).
    fn add(&self, held: Arc<Held>, due: Instant) -> (u64, bool) {
        let mut schedule = self.schedule();
        let id = schedule.next_id;
        schedule.next_id += 1;
        let period = renewal_period(held.lease);
        schedule.shortest_period = Some(schedule.shortest_period.map_or(period, |p| p.min(period)));
        schedule.added = true;
        schedule.claims.insert(id, Entry { due, held, renewal: None });
        let wake = schedule.wake_at.is_none_or(|at| due < at);
        if wake {
            schedule.wake_at = Some(due);
            self.wake.notify_one();
        }
        (id, wake)
    }

    /// Forgets a claim, cancelling its running renewal if any. The keeper may still wake at the
    /// claim's due time, find nothing due and sleep on.
    fn remove(&self, id: u64) {
        let entry = self.schedule().claims.remove(&id);
        if let Some(renewal) = entry.and_then(|e| e.renewal) {
            renewal.abort();
        }
    }

    async fn run(self: Arc<Self>) {
        /// Marks the keeper gone when its task is dropped, with its runtime.
        struct Gone(Arc<Keeper>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.alive.store(false, Ordering::Release);
            }
        }
        let keeper = Gone(self);
        loop {
            match keeper.0.renew_due(Instant::now()) {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, keeper.0.wake.notified()).await;
                }
                None => keeper.0.wake.notified().await,
            }
        }
    }

    /// Starts the renewal of every claim due by `now` and moves its due time on by whole periods
    /// (a fixed cadence: a slow renewal does not push the next one back); answers when the next
    /// claim falls due.
    fn renew_due(&self, now: Instant) -> Option<Instant> {
        let mut schedule = self.schedule();
        let mut next: Option<Instant> = None;
        for entry in schedule.claims.values_mut() {
            if entry.held.lost.load(Ordering::Acquire) {
                // Taken over: nothing left to renew.
                continue;
            }
            if entry.due <= now {
                let period = renewal_period(entry.held.lease);
                while entry.due <= now {
                    entry.due += period;
                }
                let held = entry.held.clone();
                let span = held.span.clone();
                entry.renewal = Some(tokio::spawn(renew(held).instrument(span)).abort_handle());
            }
            next = Some(next.map_or(entry.due, |n| n.min(entry.due)));
        }
        // Most claims end long before they fall due, so the keeper usually finds none left. It
        // then looks again a shortest period on: every claim added meanwhile falls due later, and
        // need not wake it (a wake-up per claim would cost each request a yield). Once nothing has
        // been claimed for a while, it sleeps until a claim wakes it.
        let added = std::mem::take(&mut schedule.added);
        schedule.idle_turns = if next.is_some() || added { 0 } else { schedule.idle_turns.saturating_add(1) };
        if next.is_none() && schedule.idle_turns < IDLE_TURNS {
            next = schedule.shortest_period.map(|period| now + period);
        }
        schedule.wake_at = next;
        next
    }
}

/// One renewal of `held`'s lease, bounded by the store timeout.
async fn renew(held: Arc<Held>) {
    let store = &held.store;
    match bounded(store.name(), StoreOperation::Renew, held.timeout, store.renew(&held.key, &held.token, held.lease))
        .await
    {
        Ok(()) => telemetry::lease_renewal(held.scope, "ok"),
        Err(StoreError::Fenced) => {
            // Once the outcome is being stored this is also the answer to a renewal that crossed
            // the completion: only the completion can tell which.
            if !held.settling.load(Ordering::Acquire) {
                telemetry::lease_renewal(held.scope, "lost");
                tracing::warn!(scope = held.scope, "lease lost: another request took the key over");
            }
            held.lost.store(true, Ordering::Release);
        }
        Err(e) => {
            telemetry::lease_renewal(held.scope, "failed");
            tracing::warn!(scope = held.scope, error = %e, "lease renewal failed; the next one follows")
        }
    }
}
