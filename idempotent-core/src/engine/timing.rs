//! The lease arithmetic: every number the engine's timing of a claim is made of, in one place.
//!
//! The engine renews a claim's lease [`RENEWALS_PER_LEASE`] times per lease
//! ([`renewal_period`]), bounds every store operation by a store timeout that a lease must cover
//! [`RENEWALS_PER_LEASE`] times ([`lease_covers`]), vouches for a lease from the send time of the
//! claim or renewal the store confirmed, less a [`safety_margin`] of twice the [`clock_drift`]
//! it allows for, and retries storing an outcome after [`COMPLETION_FIRST_RETRY`], doubling up to
//! [`COMPLETION_MAX_RETRY`] ([`next_completion_retry`]), for the configured completion patience.
//!
//! These are the functions the engine itself calls; the protocol's model (`idempotent-model`)
//! derives its timing from them too, so that what is checked is what runs.

use std::time::Duration;

/// A lease is renewed this many times per lease.
pub const RENEWALS_PER_LEASE: u32 = 6;

/// How often a claim's lease is renewed: a sixth of the lease.
pub fn renewal_period(lease: Duration) -> Duration {
    (lease / RENEWALS_PER_LEASE).max(Duration::from_millis(1))
}

/// Whether `lease` keeps a live claim alive through one renewal that fails or times out with
/// `store_timeout`: `lease ≥ 3 × (renewal period + store timeout)`, which with the period a sixth
/// of the lease is `lease ≥ 6 × store timeout`. The runtime refuses to start a route whose lease
/// does not ([`StartupError::LeaseTooShort`](super::StartupError::LeaseTooShort)).
pub fn lease_covers(lease: Duration, store_timeout: Duration) -> bool {
    lease >= store_timeout * RENEWALS_PER_LEASE
}

/// The longest store timeout that `lease` covers ([`lease_covers`]): a sixth of it.
pub fn max_store_timeout(lease: Duration) -> Duration {
    lease / RENEWALS_PER_LEASE
}

/// How far apart, over one lease, the process's clock and the store's may measure it: a
/// hundredth of it (clocks whose rates differ by up to 1 %; quartz clocks of servers are off by
/// well under 0.01 %).
pub fn clock_drift(lease: Duration) -> Duration {
    lease / 100
}

/// The part of a lease that the handler is not told to count on
/// ([`ClaimFence`](super::ClaimFence)): twice the [`clock_drift`] (a fiftieth, 2 %, of the
/// lease), at least 10 ms. Twice, because the lease is measured twice: by the store from when it
/// received the claim or renewal, and by the process from when it sent it, each clock off by up to
/// the drift in its own direction.
pub fn safety_margin(lease: Duration) -> Duration {
    (clock_drift(lease) * 2).max(Duration::from_millis(10))
}

/// How many renewals in a row may fail (lost, or not answered within the store timeout) while a
/// live claim keeps its lease, whatever else happens: the fault budget of a claim whose lease is
/// `lease`, renewed every `period`, each store operation bounded by `store_timeout`, the clocks
/// of the process and the store measuring a lease up to `margin` apart.
///
/// The store starts the lease when it applies the claim; the claim's answer may arrive up to a
/// store timeout later, and the keeper counts its periods from then. After `k` failures the
/// `k + 1`-th renewal leaves `(k + 1) × period` after the answer and may take a store timeout to
/// reach the store, where it must arrive before the lease has run out, by the store's clock:
/// `store timeout + (k + 1) × period + store timeout + margin < lease`. The answer is the largest
/// such `k` (none fits: `0`, and even a first renewal that fails may lose the claim). Once a
/// renewal succeeded the next budget is the same or larger: its lease counts from when it was
/// applied, which is before its answer, not after. The model of the protocol
/// (`idempotent-model`) checks that a live handler never loses its claim within this budget and
/// does with one more failure.
pub fn renewal_failures_within(lease: Duration, period: Duration, store_timeout: Duration, margin: Duration) -> u32 {
    let Some(room) = lease.checked_sub(store_timeout * 2 + margin) else { return 0 };
    let period = period.max(Duration::from_nanos(1));
    // The number of whole periods that fit strictly inside `room`, less the renewal that must
    // succeed.
    let periods = room.as_nanos().div_ceil(period.as_nanos());
    u32::try_from(periods.saturating_sub(2)).unwrap_or(u32::MAX)
}

/// [`renewal_failures_within`] as the engine runs a claim of `lease` with `store_timeout`: renewed
/// every [`renewal_period`], the clocks apart by up to the [`safety_margin`]. With the shortest
/// lease that covers the store timeout ([`lease_covers`]: six of them) it is 2: a live claim keeps
/// its lease through two renewals in a row that fail, and may lose it on the third.
pub fn renewal_failures_tolerated(lease: Duration, store_timeout: Duration) -> u32 {
    renewal_failures_within(lease, renewal_period(lease), store_timeout, safety_margin(lease))
}

/// How long storing an outcome waits after its first failed attempt.
pub const COMPLETION_FIRST_RETRY: Duration = Duration::from_millis(50);

/// The longest wait between two attempts to store an outcome.
pub const COMPLETION_MAX_RETRY: Duration = Duration::from_secs(1);

/// The wait after the attempt that followed a wait of `delay`: twice it, at most
/// [`COMPLETION_MAX_RETRY`].
pub fn next_completion_retry(delay: Duration) -> Duration {
    (delay * 2).min(COMPLETION_MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_and_its_boundary() {
        let lease = Duration::from_secs(6);
        assert_eq!(renewal_period(lease), Duration::from_secs(1));
        assert_eq!(max_store_timeout(lease), Duration::from_secs(1));
        assert!(lease_covers(lease, max_store_timeout(lease)));
        assert!(!lease_covers(lease, max_store_timeout(lease) + Duration::from_millis(1)));
        assert_eq!(safety_margin(Duration::from_secs(10)), Duration::from_millis(200));
        assert_eq!(safety_margin(Duration::from_millis(100)), Duration::from_millis(10), "the floor");
        let mut delay = COMPLETION_FIRST_RETRY;
        let waits: Vec<u128> = (0..7)
            .map(|_| {
                let d = delay;
                delay = next_completion_retry(delay);
                d.as_millis()
            })
            .collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn the_fault_budget() {
        let s = Duration::from_secs;
        assert_eq!(renewal_failures_tolerated(s(6), s(1)), 2, "the tightest lease");
        assert_eq!(renewal_failures_tolerated(s(30), s(1)), 4, "periods of 5 s in 27.4 s of room");
        assert_eq!(renewal_failures_tolerated(s(60), Duration::from_millis(100)), 4);
        // (k + 1) periods must fit strictly inside the room: 4 s of room and 1 s periods is 2.
        assert_eq!(renewal_failures_within(s(6), s(1), s(1), Duration::ZERO), 2);
        assert_eq!(renewal_failures_within(s(6), s(1), s(1), Duration::from_nanos(1)), 2);
        assert_eq!(renewal_failures_within(s(6), s(1), s(1), s(2)), 0);
        assert_eq!(renewal_failures_within(s(6), s(1), s(3), Duration::ZERO), 0, "no room at all");
    }
}
