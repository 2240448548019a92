//! The leases of other claims while a transactional route holds SQLite's one writer (see "A
//! transactional route holds the writer" in the [store's docs](super)): the hold that is open,
//! the renewals it owes, and those a hold that ended without committing left owed.

use crate::store::{ClaimToken, RecordKey};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A renewal answered while a hold kept it from being written: written when the hold ends, in
/// its transaction.
#[derive(Debug, Clone)]
pub(super) struct Renewal {
    pub(super) key: RecordKey,
    pub(super) token: ClaimToken,
    pub(super) lease: Duration,
    /// When it was answered, on the lease's clock: the engine counts on the lease from then.
    pub(super) answered: i64,
}

impl Renewal {
    /// Whether the engine still counts on it at `now` (on the lease's clock).
    fn counted_on(&self, now: i64) -> bool {
        now < self.answered.saturating_add(super::millis(self.lease))
    }
}

/// What a hold owes when it ends: its start on the lease's clock and the renewals it answered.
#[derive(Debug)]
pub(super) struct Dues {
    /// The clock the hold's start is read on (a boot id, or `wall`).
    pub(super) basis: String,
    pub(super) began: i64,
    pub(super) renewals: Vec<Renewal>,
}

#[derive(Debug)]
struct Hold {
    id: u64,
    basis: String,
    began: i64,
    /// Its dues are being written: renewals from now on wait for the writer like any write.
    closing: bool,
    renewals: Vec<Renewal>,
}

#[derive(Debug, Default)]
struct State {
    last_id: u64,
    open: Option<Hold>,
    /// Renewals answered during holds that ended without committing them.
    owed: Vec<Renewal>,
}

/// The store's holds of the writer by transactional routes, at most one at a time (only one
/// transaction can hold SQLite's write lock).
#[derive(Debug, Default)]
pub(super) struct Holds {
    state: Mutex<State>,
}

impl Holds {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every method leaves the state consistent: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A transactional route's transaction holds the writer since `began` (on the clock
    /// `basis`); answers its id. A hold still recorded as open can only be one whose transaction
    /// ended without telling (SQLite rolled it back by itself): what it owes is owed.
    pub(super) fn open(&self, basis: &str, began: i64) -> u64 {
        let mut state = self.state();
        state.last_id += 1;
        let id = state.last_id;
        let hold = Hold { id, basis: basis.to_owned(), began, closing: false, renewals: Vec::new() };
        if let Some(stale) = state.open.replace(hold) {
            state.owed.extend(stale.renewals);
        }
        id
    }

    /// The hold open now, unless it is closing.
    pub(super) fn current(&self) -> Option<u64> {
        self.state().open.as_ref().filter(|h| !h.closing).map(|h| h.id)
    }

    /// Adds `renewal` to what hold `id` owes, if it is still open and not closing; `false`
    /// otherwise (the renewal is then written as usual).
    pub(super) fn defer(&self, id: u64, renewal: Renewal) -> bool {
        let mut state = self.state();
        match state.open.as_mut().filter(|h| h.id == id && !h.closing) {
            Some(hold) => {
                hold.renewals.push(renewal);
                true
            }
            None => false,
        }
    }

    /// Closes hold `id` to new renewals and answers what it owes (again, when asked again).
    pub(super) fn close(&self, id: u64) -> Option<Dues> {
        let mut state = self.state();
        let hold = state.open.as_mut().filter(|h| h.id == id)?;
        hold.closing = true;
        Some(Dues { basis: hold.basis.clone(), began: hold.began, renewals: hold.renewals.clone() })
    }

    /// Hold `id` ended; `settled` when its dues were committed. If not, its renewals are owed:
    /// the next claim that takes the writer writes them first.
    pub(super) fn ended(&self, id: u64, settled: bool) {
        let mut state = self.state();
        if state.open.as_ref().is_some_and(|h| h.id == id) {
            let hold = state.open.take().expect("just checked");
            if !settled {
                state.owed.extend(hold.renewals);
            }
        }
    }

    /// The owed renewals the engine still counts on at `now` (on the lease's clock), taken; the
    /// others are forgotten.
    pub(super) fn take_owed(&self, now: i64) -> Vec<Renewal> {
        let mut state = self.state();
        if state.owed.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut state.owed).into_iter().filter(|r| r.counted_on(now)).collect()
    }

    /// Whether renewals are owed (the next claim writes them).
    pub(super) fn owes(&self) -> bool {
        !self.state().owed.is_empty()
    }

    /// Puts back renewals that could not be written.
    pub(super) fn owe(&self, renewals: Vec<Renewal>) {
        self.state().owed.extend(renewals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renewal(answered: i64) -> Renewal {
        Renewal {
            key: RecordKey::new("s", "a", "k"),
            token: ClaimToken::generate(),
            lease: Duration::from_millis(1000),
            answered,
        }
    }

    #[test]
    fn a_hold_owes_its_renewals_until_they_are_committed() {
        let holds = Holds::default();
        let id = holds.open("boot", 100);
        assert_eq!(holds.current(), Some(id));
        assert!(holds.defer(id, renewal(150)));
        let dues = holds.close(id).unwrap();
        assert_eq!((dues.basis.as_str(), dues.began, dues.renewals.len()), ("boot", 100, 1));
        assert_eq!(holds.current(), None, "closing: renewals are written as usual");
        assert!(!holds.defer(id, renewal(160)));
        assert_eq!(holds.close(id).unwrap().renewals.len(), 1, "asked again, the same dues");
        holds.ended(id, true);
        assert!(holds.take_owed(200).is_empty(), "committed: nothing owed");

        let id = holds.open("boot", 300);
        assert!(holds.defer(id, renewal(300)));
        holds.close(id);
        holds.ended(id, false);
        assert!(holds.take_owed(5000).is_empty(), "owed, but no longer counted on");
        let id = holds.open("boot", 6000);
        assert!(holds.defer(id, renewal(6000)));
        holds.ended(id, false);
        let owed = holds.take_owed(6500);
        assert_eq!(owed.len(), 1, "a hold dropped before it closed owes its renewals");
        holds.owe(owed);
        assert_eq!(holds.take_owed(6600).len(), 1);
        assert!(holds.take_owed(6600).is_empty());
    }

    #[test]
    fn a_hold_that_ended_untold_is_replaced_and_owes_its_renewals() {
        let holds = Holds::default();
        let stale = holds.open("boot", 0);
        assert!(holds.defer(stale, renewal(10)));
        let fresh = holds.open("boot", 20);
        assert_ne!(stale, fresh);
        assert!(!holds.defer(stale, renewal(30)));
        holds.ended(stale, false);
        assert_eq!(holds.current(), Some(fresh), "the stale hold's end does not end the fresh one");
        assert_eq!(holds.take_owed(40).len(), 1);
    }
}
