//! The model's timing, in ticks, taken from the engine's lease arithmetic
//! ([`idempotent_core::engine::timing`]).
//!
//! The model runs the tightest configuration the engine starts with: the default store timeout
//! and the shortest lease that covers it (`lease = RENEWALS_PER_LEASE × store timeout`), so a
//! renewal period equals the store timeout. A tick is a fraction of the renewal period
//! ([`Timing::TICKS_PER_PERIOD`] of them, so that an answer can come later than its request was
//! applied and still within the timeout); every other duration is rounded up to whole ticks.
//!
//! Clock drift is exaggerated to whole ticks: each worker's clock may run up to `drift` ticks
//! ahead of or behind the store's over a lease (1 tick of a 6-tick lease is 17 %, not the 1 % the
//! engine allows for). The safety margin is scaled with it in the engine's own proportion
//! ([`safety_margin`] over [`clock_drift`], twice), so the model checks the rule that matters at
//! any scale: the margin must cover the drift of both clocks.

use idempotent_core::engine::timing::{
    clock_drift, max_store_timeout, next_completion_retry, renewal_failures_within, renewal_period, safety_margin,
    COMPLETION_FIRST_RETRY, RENEWALS_PER_LEASE,
};
use idempotent_core::engine::{DEFAULT_COMPLETION_PATIENCE, DEFAULT_STORE_TIMEOUT};
use std::time::Duration;

use crate::store::Tick;

/// Every duration of the protocol, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timing {
    /// A claim's lease.
    pub lease: Tick,
    /// The keeper's renewal period.
    pub period: Tick,
    /// The bound on one store operation: an answer after it is not waited for.
    pub store_timeout: Tick,
    /// How far each worker's clock may be off the store's (either way).
    pub drift: Tick,
    /// The part of the lease a worker does not count on.
    pub margin: Tick,
    /// The waits between attempts to store an outcome, in order (the last one repeats).
    pub completion_retries: [Tick; 3],
    /// How long storing an outcome is retried.
    pub completion_patience: Tick,
}

impl Timing {
    /// Ticks per renewal period: one (an answer may arrive up to a store timeout after its
    /// request was sent, a tick later than it was applied).
    pub const TICKS_PER_PERIOD: u32 = 1;

    /// The engine's timing with each worker's clock up to `drift` ticks off the store's.
    pub fn engine(drift: Tick) -> Timing {
        let store_timeout = DEFAULT_STORE_TIMEOUT;
        let lease = store_timeout * RENEWALS_PER_LEASE;
        assert_eq!(max_store_timeout(lease), store_timeout, "the tightest lease the engine starts with");
        let tick = renewal_period(lease) / Self::TICKS_PER_PERIOD;
        let ticks =
            |d: Duration| -> Tick { Tick::try_from(d.as_nanos().div_ceil(tick.as_nanos())).unwrap_or(Tick::MAX) };
        // The margin in the engine's proportion to the drift, measured where its floor does not
        // apply.
        let reference = Duration::from_secs(3600);
        let per_drift = safety_margin(reference).as_nanos() / clock_drift(reference).as_nanos();
        let mut retries = [0; 3];
        let mut delay = COMPLETION_FIRST_RETRY;
        for r in &mut retries {
            *r = ticks(delay);
            delay = next_completion_retry(delay);
        }
        Timing {
            lease: ticks(lease),
            period: ticks(renewal_period(lease)),
            store_timeout: ticks(store_timeout),
            drift,
            margin: drift * Tick::try_from(per_drift).expect("a small proportion"),
            completion_retries: retries,
            completion_patience: ticks(DEFAULT_COMPLETION_PATIENCE),
        }
    }

    /// The fault budget in these ticks: how many renewals in a row may fail while a live claim
    /// keeps its lease, by the engine's rule
    /// ([`renewal_failures_within`]),
    /// with the model's margin for the clocks.
    pub fn renewal_failures_tolerated(&self) -> u8 {
        let d = |t: Tick| Duration::from_secs(u64::try_from(t).expect("a duration"));
        let k = renewal_failures_within(d(self.lease), d(self.period), d(self.store_timeout), d(self.margin));
        u8::try_from(k).expect("a small budget")
    }

    /// From which attempt on every wait is the same: attempts counted further are not told apart.
    pub fn completion_attempts_apart(&self) -> u8 {
        let last = self.completion_retries.len() as u8;
        (1..=last).find(|&a| (a..=last).all(|b| self.completion_retry(b) == self.completion_retry(a))).unwrap_or(last)
    }

    /// The wait before the attempt after `attempt` (1-based) failed.
    pub fn completion_retry(&self, attempt: u8) -> Tick {
        let i = usize::from(attempt.max(1) - 1).min(self.completion_retries.len() - 1);
        self.completion_retries[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_in_ticks() {
        let t = Timing::engine(1);
        assert_eq!((t.lease, t.period, t.store_timeout), (6, 1, 1));
        assert_eq!((t.drift, t.margin), (1, 2), "a margin of twice the drift");
        assert_eq!(t.completion_retries, [1, 1, 1], "50, 100, 200 ms: each under a tick of 1 s");
        assert_eq!(t.completion_patience, 30);
        assert_eq!(t.completion_retry(9), 1);
        assert_eq!(Timing::engine(0).renewal_failures_tolerated(), 2);
        assert_eq!(t.renewal_failures_tolerated(), 0, "a margin of 2 ticks leaves room for one renewal");
    }
}
