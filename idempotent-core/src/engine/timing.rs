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
}
