//! The lease renewals of the claims this process holds, and how long each lease is vouched for.
//!
//! Every runtime that acquires claims has, on each of its threads that does, one keeper: a task,
//! spawned on that runtime when the thread's first claim there is acquired, that renews each claim
//! registered with it on a fixed cadence (a sixth of the claim's lease) until the claim's outcome
//! is stored or released. A claim costs its request a map insert and a map removal under a lock
//! that only its thread and its keeper take, instead of a task of its own, a timer and a
//! cross-thread wake-up each: most requests finish long before their first renewal falls due, and
//! the keeper does not wake for them.
//!
//! The keeper is a task apart from the request's: on a multi-threaded runtime a handler that
//! blocks its thread does not hold the renewals up (another worker runs the keeper), and a
//! renewal that hangs holds up neither the handler nor the other claims' renewals (each renewal
//! runs on a task of its own, bounded by the store timeout). A keeper serves the runtime it was
//! spawned on only: a thread that drives several runtimes (one after the other, or a runtime
//! inside another's blocking section) has a keeper per runtime, found by the runtime's id, so a
//! claim is never registered with a keeper that nobody drives. A keeper whose task is gone (its
//! runtime shut down, even before the task first ran) hands the claims it still had to the next
//! keeper that any claim meets, on whatever runtime: they are renewed again from there.
//!
//! # How long a lease is vouched for
//! A claim's lease is known to run until `send + lease`, where `send` is when the claim (or the
//! last renewal that the store confirmed) was sent: the store set its deadline after receiving
//! it, so no earlier than that. The time of the answer would be wrong (a renewal answered late
//! would seem to extend the lease further than the store did). [`ClaimFence`] tells the handler
//! how much of that is left, less a margin for clocks that run at different rates
//! ([`safety_margin`]); once nothing is left, another request may take the key over at any
//! moment, and the handler should not start an effect it cannot take back.

use super::timing::{renewal_period, safety_margin};
use super::{bounded, Runtime};
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
    /// The request is over: nothing left to renew (a keeper that still has it forgets it).
    done: AtomicBool,
    /// Until when the store is known to hold the lease: the last confirmed send plus the lease.
    vouched: Mutex<Instant>,
    /// Woken when the claim is lost or its lease is vouched for longer.
    changed: Notify,
    /// The renewal running now, cancelled when the request ends.
    renewal: Mutex<Option<AbortHandle>>,
}

impl Held {
    fn vouched(&self) -> Instant {
        *self.vouched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Until when the handler may count on the lease: [`vouched`](Self::vouched) less the
    /// [`safety_margin`]; `None` once the claim is known lost.
    fn good_until(&self) -> Option<Instant> {
        (!self.lost.load(Ordering::Acquire)).then(|| self.vouched() - safety_margin(self.lease))
    }

    /// The store confirmed a renewal sent at `sent`.
    fn confirmed(&self, sent: Instant) {
        let mut vouched = self.vouched.lock().unwrap_or_else(PoisonError::into_inner);
        *vouched = (*vouched).max(sent + self.lease);
        drop(vouched);
        self.changed.notify_waiters();
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
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
    /// Registers the claim of `key` under `token`, whose claim was sent at `sent`, with this
    /// thread's keeper for the current runtime; its first renewal falls due a renewal period
    /// from now.
    pub(super) fn hold(runtime: &Runtime, policy: &Policy, key: RecordKey, token: ClaimToken, sent: Instant) -> Self {
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
            done: AtomicBool::new(false),
            vouched: Mutex::new(sent + policy.lease),
            changed: Notify::new(),
            renewal: Mutex::new(None),
        });
        telemetry::claims_in_flight(policy.scope, 1.0);
        let keeper = Keeper::for_this_runtime();
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

    /// What the handler is told of its claim.
    pub(super) fn fence(&self) -> ClaimFence {
        ClaimFence(self.held.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.done.store(true, Ordering::Release);
        self.keeper.remove(self.id);
        if let Some(renewal) = self.held.renewal.lock().unwrap_or_else(PoisonError::into_inner).take() {
            renewal.abort();
        }
        telemetry::claims_in_flight(self.held.scope, -1.0);
    }
}

/// Why a handler should not start an effect now: see [`ClaimFence::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    /// A renewal found the key taken over by another request: this one no longer holds it.
    #[error("the idempotency key was taken over by another request")]
    TakenOver,
    /// The store has not confirmed the lease for longer than it lasts (the store is unreachable,
    /// or this process was paused or starved): another request may take the key over at any
    /// moment.
    #[error("the idempotency lease can no longer be vouched for")]
    Expired,
}

/// What a protected handler knows of the claim it runs under: its fencing token and how long
/// its lease is still vouched for. Cheap to clone; usable from tasks the handler spawns.
///
/// Get it inside the handler with the adapters' `Fence` extractor
/// ([`Fence::claim`](crate::engine::Fence::claim)). Two uses:
/// - before an effect that cannot be taken back (a charge, a message sent), call
///   [`check`](Self::check): once the lease is no longer vouched for, another request may be
///   running the same operation; the handler answers a retryable error (503) instead of acting,
///   its claim is released, and the client's retry runs it once, cleanly;
/// - on writes to a downstream system that keeps the highest fence it has seen per resource,
///   send [`fence`](Self::fence): that system can refuse the writes of a holder that was taken
///   over (a fencing token in Kleppmann's sense; see [`ClaimToken`]).
#[derive(Clone)]
pub struct ClaimFence(Arc<Held>);

impl std::fmt::Debug for ClaimFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimFence").field("scope", &self.0.scope).field("remaining", &self.remaining()).finish()
    }
}

impl ClaimFence {
    /// The claim's token.
    pub fn token(&self) -> &ClaimToken {
        &self.0.token
    }

    /// The claim's fencing value: greater than that of every earlier claim of the key (see
    /// [`ClaimToken`]).
    pub fn fence(&self) -> u128 {
        self.0.token.fence().unwrap_or_default()
    }

    /// How long the lease is still vouched for, less the [`safety_margin`]; zero once it is not
    /// (or the claim was taken over).
    pub fn remaining(&self) -> Duration {
        self.0.good_until().map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }

    /// `Ok` while the lease is vouched for: no other request can hold the key. Call it right
    /// before an effect that cannot be taken back.
    pub fn check(&self) -> Result<(), LeaseLost> {
        match self.0.good_until() {
            None => Err(LeaseLost::TakenOver),
            Some(until) if Instant::now() >= until => Err(LeaseLost::Expired),
            Some(_) => Ok(()),
        }
    }

    /// Resolves when the lease can no longer be vouched for, with why: for a handler that races
    /// its work against losing the claim (`tokio::select!`).
    pub async fn lost(&self) -> LeaseLost {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.check() {
                Err(why) => return why,
                Ok(()) => {
                    let until = self.0.good_until().unwrap_or_else(Instant::now);
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// The claims of one keeper, and when each is renewed next.
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
}

struct Keeper {
    schedule: Mutex<Schedule>,
    wake: Notify,
    /// False once the keeper's task is gone (its runtime shut down): the next claim on this thread
    /// starts another, and adopts the claims this one still had.
    alive: AtomicBool,
}

thread_local! {
    /// This thread's keepers, one per runtime that claimed here (usually one).
    static KEEPERS: RefCell<Vec<(tokio::runtime::Id, Arc<Keeper>)>> = const { RefCell::new(Vec::new()) };
}

/// Claims whose keeper's task is gone, waiting for a keeper to adopt them.
static ORPHANS: Mutex<Vec<Arc<Held>>> = Mutex::new(Vec::new());
/// Whether [`ORPHANS`] may hold any: checked without the lock on every claim.
static HAS_ORPHANS: AtomicBool = AtomicBool::new(false);

impl Keeper {
    /// This thread's keeper for the current runtime, started if it has none (or its task is
    /// gone); it adopts any orphaned claims.
    fn for_this_runtime() -> Arc<Keeper> {
        let runtime = tokio::runtime::Handle::current().id();
        let current = |slot: &RefCell<Vec<(tokio::runtime::Id, Arc<Keeper>)>>| {
            let mut keepers = slot.borrow_mut();
            keepers.retain(|(_, k)| k.alive.load(Ordering::Acquire));
            match keepers.iter().find(|(id, _)| *id == runtime) {
                Some((_, keeper)) => keeper.clone(),
                None => {
                    let keeper = Keeper::start();
                    keepers.push((runtime, keeper.clone()));
                    keeper
                }
            }
        };
        // A thread being torn down has no thread-locals left: its claim gets a keeper of its own.
        let keeper = KEEPERS.try_with(current).unwrap_or_else(|_| Keeper::start());
        if HAS_ORPHANS.load(Ordering::Acquire) {
            keeper.adopt_orphans();
        }
        keeper
    }

    fn start() -> Arc<Keeper> {
        let keeper = Arc::new(Keeper { schedule: Mutex::default(), wake: Notify::new(), alive: AtomicBool::new(true) });
        // Made before the task is spawned, and owned by its future: a task dropped before it ever
        // ran (spawned while its runtime shuts down) still marks the keeper gone.
        let gone = Gone(keeper.clone());
        tokio::spawn(async move {
            let gone = gone;
            gone.0.clone().run().await
        });
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
        schedule.claims.insert(id, Entry { due, held });
        let wake = schedule.wake_at.is_none_or(|at| due < at);
        if wake {
            schedule.wake_at = Some(due);
            self.wake.notify_one();
        }
        (id, wake)
    }

    /// Takes the claims of keepers that are gone, due at once.
    fn adopt_orphans(&self) {
        let orphans = std::mem::take(&mut *ORPHANS.lock().unwrap_or_else(PoisonError::into_inner));
        HAS_ORPHANS.store(false, Ordering::Release);
        for held in orphans.into_iter().filter(|h| !h.done.load(Ordering::Acquire)) {
            tracing::debug!(scope = held.scope, "adopting a claim whose lease keeper's runtime ended");
            self.add(held, Instant::now());
        }
    }

    /// Forgets a claim. The keeper may still wake at the claim's due time, find nothing due and
    /// sleep on.
    fn remove(&self, id: u64) {
        self.schedule().claims.remove(&id);
    }

    async fn run(self: Arc<Self>) {
        loop {
            match self.renew_due(Instant::now()) {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, self.wake.notified()).await;
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Starts the renewal of every claim due by `now` and moves its due time on by whole periods
    /// (a fixed cadence: a slow renewal does not push the next one back); answers when the next
    /// claim falls due.
    fn renew_due(&self, now: Instant) -> Option<Instant> {
        let mut schedule = self.schedule();
        let mut next: Option<Instant> = None;
        schedule.claims.retain(|_, e| !e.held.done.load(Ordering::Acquire));
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
                let renewal = tokio::spawn(renew(held.clone()).instrument(span)).abort_handle();
                *held.renewal.lock().unwrap_or_else(PoisonError::into_inner) = Some(renewal);
                if held.done.load(Ordering::Acquire) {
                    // Ended meanwhile, after its request took no renewal to cancel.
                    if let Some(renewal) = held.renewal.lock().unwrap_or_else(PoisonError::into_inner).take() {
                        renewal.abort();
                    }
                }
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

/// Marks its keeper gone when the keeper's task is dropped (with its runtime, or before it ever
/// ran), and hands the claims it still had to the next keeper.
struct Gone(Arc<Keeper>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
        let claims: Vec<Arc<Held>> = self.0.schedule().claims.drain().map(|(_, e)| e.held).collect();
        let left: Vec<Arc<Held>> = claims.into_iter().filter(|h| !h.done.load(Ordering::Acquire)).collect();
        if !left.is_empty() {
            ORPHANS.lock().unwrap_or_else(PoisonError::into_inner).extend(left);
            HAS_ORPHANS.store(true, Ordering::Release);
        }
    }
}

/// One renewal of `held`'s lease, bounded by the store timeout.
async fn renew(held: Arc<Held>) {
    let store = &held.store;
    let sent = Instant::now();
    match bounded(store.name(), StoreOperation::Renew, held.timeout, store.renew(&held.key, &held.token, held.lease))
        .await
    {
        Ok(()) => {
            held.confirmed(sent);
            telemetry::lease_renewal(held.scope, "ok")
        }
        Err(StoreError::Fenced) => {
            // Once the outcome is being stored this is also the answer to a renewal that crossed
            // the completion: only the completion can tell which.
            if !held.settling.load(Ordering::Acquire) {
                telemetry::lease_renewal(held.scope, "lost");
                tracing::warn!(scope = held.scope, "lease lost: another request took the key over");
            }
            held.mark_lost();
        }
        Err(e) => {
            telemetry::lease_renewal(held.scope, "failed");
            tracing::warn!(scope = held.scope, error = %e, "lease renewal failed; the next one follows")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Config;
    use crate::store::{Claim, MemoryStore};

    fn held(store: Arc<dyn Store>, lease: Duration) -> Arc<Held> {
        Arc::new(Held {
            key: RecordKey::new("t.lease", "", "k"),
            token: ClaimToken::generate(),
            store,
            timeout: Duration::from_secs(1),
            lease,
            scope: "t.lease",
            span: tracing::Span::none(),
            lost: AtomicBool::new(false),
            settling: AtomicBool::new(false),
            done: AtomicBool::new(false),
            vouched: Mutex::new(Instant::now() + lease),
            changed: Notify::new(),
            renewal: Mutex::new(None),
        })
    }

    /// A keeper whose task is dropped before it ever ran (spawned while its runtime shuts
    /// down) is known to be gone: the thread's next claim gets a live keeper, and the claims the
    /// dead one had are renewed from there.
    #[test]
    fn a_keeper_dropped_before_its_first_poll_is_replaced_and_its_claims_adopted() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let first = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let (keeper, orphan) = first.block_on(async {
            let keeper = Keeper::for_this_runtime();
            let orphan = held(store.clone(), Duration::from_millis(600));
            keeper.add(orphan.clone(), Instant::now() + Duration::from_millis(100));
            (keeper, orphan)
        });
        // The keeper's task never ran: the runtime that would have run it is gone.
        drop(first);
        assert!(!keeper.alive.load(Ordering::Acquire), "marked gone without ever running");

        let second = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        second.block_on(async {
            let key = orphan.key.clone();
            let Claim::Acquired(_) = store
                .claim_as(&key, &crate::fingerprint::Fingerprint([1; 32]), Duration::from_millis(600), &orphan.token)
                .await
                .unwrap()
            else {
                panic!()
            };
            let adopter = Keeper::for_this_runtime();
            assert!(!Arc::ptr_eq(&adopter, &keeper), "a new keeper on the runtime that runs now");
            let before = orphan.vouched();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(orphan.vouched() > before, "the adopted claim was renewed");
            let taken =
                store.claim(&key, &crate::fingerprint::Fingerprint([1; 32]), Duration::from_secs(1)).await.unwrap();
            assert!(matches!(taken, Claim::InProgress { .. }), "{taken:?}");
            orphan.done.store(true, Ordering::Release);
        });
    }

    /// A thread that drives two runtimes has a keeper for each: a claim made under the second is
    /// never left with the first's keeper, which nobody drives meanwhile.
    #[test]
    fn each_runtime_on_a_thread_has_its_own_keeper() {
        let a = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let b = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let ka = a.block_on(async { Keeper::for_this_runtime() });
        let kb = b.block_on(async { Keeper::for_this_runtime() });
        assert!(!Arc::ptr_eq(&ka, &kb));
        assert!(Arc::ptr_eq(&ka, &a.block_on(async { Keeper::for_this_runtime() })));
    }

    /// The lease is vouched for from the time a renewal was sent, not answered: a renewal whose
    /// answer comes late does not extend it further than the store did.
    #[tokio::test(start_paused = true)]
    async fn a_lease_is_vouched_for_from_the_send_time_with_a_margin() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let lease = Duration::from_secs(10);
        let h = held(store, lease);
        let fence = ClaimFence(h.clone());
        assert_eq!(fence.remaining(), lease - safety_margin(lease));
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await; // a slow answer
        h.confirmed(sent);
        assert_eq!(fence.remaining(), lease - Duration::from_secs(3) - safety_margin(lease));
        tokio::time::advance(lease).await;
        assert_eq!(fence.check(), Err(LeaseLost::Expired));
        assert_eq!(fence.remaining(), Duration::ZERO);
        let fresh = ClaimFence(held(Arc::new(MemoryStore::new()), lease));
        let lost = tokio::spawn({
            let fresh = fresh.clone();
            async move { fresh.lost().await }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        fresh.0.mark_lost();
        assert_eq!(lost.await.unwrap(), LeaseLost::TakenOver);
        let expiring = ClaimFence(held(Arc::new(MemoryStore::new()), lease));
        let started = Instant::now();
        assert_eq!(expiring.lost().await, LeaseLost::Expired);
        assert_eq!(started.elapsed(), lease - safety_margin(lease), "resolves when the margin begins");
        let _ = Config::default();
    }
}
