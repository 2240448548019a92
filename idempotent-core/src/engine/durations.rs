//! How long each scope's handlers typically run: what a `409` tells a client to wait.
//!
//! A request that finds its key held by a request still running is answered 409 with
//! `Retry-After`. The time left on the holder's lease is an upper bound (the holder either
//! finishes or loses its claim by then), but a poor answer: with the default 10 s lease, a client
//! of a 300 ms handler that honours it waits thirty times longer than needed. So the runtime keeps,
//! per scope, a moving average of how long its handlers took (each new run weighs an eighth), and
//! answers that, at least one second (the header's unit) and never more than the lease's time
//! left. Before a scope has run once it answers the time left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A moving average of handler run times per scope, in microseconds; lock-free once built.
#[derive(Debug, Default)]
pub(super) struct Durations(HashMap<&'static str, AtomicU64>);

impl Durations {
    /// One (empty) average for each of `scopes`.
    pub(super) fn for_scopes(scopes: impl IntoIterator<Item = &'static str>) -> Self {
        Self(scopes.into_iter().map(|scope| (scope, AtomicU64::new(0))).collect())
    }

    /// A handler of `scope` ran for `took`.
    pub(super) fn record(&self, scope: &str, took: Duration) {
        let Some(average) = self.0.get(scope) else { return };
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = average.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample } else { old - old / 8 + sample / 8 })
        });
    }

    /// What a 409 of `scope` says to wait, when the holder's lease has `left`.
    pub(super) fn retry_after(&self, scope: &str, left: Duration) -> Duration {
        let typical = self.0.get(scope).map(|a| a.load(Ordering::Relaxed)).filter(|&us| us > 0);
        match typical {
            Some(us) => Duration::from_micros(us).max(Duration::from_secs(1)).min(left.max(Duration::from_secs(1))),
            None => left,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_handlers_say_a_second_long_ones_their_time_never_past_the_lease() {
        let d = Durations::for_scopes(["fast", "slow"]);
        let left = Duration::from_secs(9);
        assert_eq!(d.retry_after("fast", left), left, "nothing known yet: the lease's time left");
        for _ in 0..5 {
            d.record("fast", Duration::from_millis(300));
            d.record("slow", Duration::from_secs(4));
        }
        assert_eq!(d.retry_after("fast", left), Duration::from_secs(1));
        assert_eq!(d.retry_after("slow", left), Duration::from_secs(4));
        assert_eq!(d.retry_after("slow", Duration::from_secs(2)), Duration::from_secs(2), "never past the lease");
        assert_eq!(d.retry_after("other", left), left, "a scope it does not know");
        // One long run moves the average by an eighth of the difference.
        d.record("slow", Duration::from_secs(12));
        assert_eq!(d.retry_after("slow", left), Duration::from_secs(5));
    }
}
