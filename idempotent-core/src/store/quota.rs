//! What one caller may hold in a store: the admission rule of every per-caller byte bound.
//!
//! A store with a per-caller (per-actor) bound refuses a claim for a new key, or for an expired
//! record being taken over, when the caller already holds what the bound allows; every other
//! answer (a replay, an in-progress answer, a mismatch, the claim's own record sent again) and
//! every renewal, completion and release of a claim already admitted is never refused. The rule is
//! written here once, and the memory store and the shared stores (SQLite, PostgreSQL, MySQL,
//! Redis) all apply it through [`admit`]:
//!
//! - **Who is bounded**: every actor but the anonymous one (the empty actor, every request of a
//!   service whose actor source is `Anonymous`), which is no caller to tell apart from others
//!   ([`exempt`]).
//! - **Admission**: a claim that needs `need` bytes is admitted while `used + need <= max`, where
//!   `used` is what the actor holds now.
//! - **`Retry-After`**: a refused claim is [`StoreError::QuotaExceeded`] with the time until the
//!   actor's earliest counted record stops counting, at least a second ([`retry_after`]).
//!
//! What `used` counts is each store's own: the memory store counts each record's whole
//! footprint in its memory (see `store::memory`); the shared stores count
//! [`record_bytes`] for each of the actor's live records (a claim in progress until its lease
//! ends, a completed record until its time to live ends).

use super::{RecordKey, StoreError};
use std::time::Duration;

/// What a record costs in a shared store besides its key's characters and its stored response:
/// 256 bytes, about what a row or a Redis hash of a record takes with its indexes and fields.
/// Counting it makes a flood of tiny records count as well as a few large ones.
pub const RECORD_OVERHEAD: usize = 256;

/// The bytes a shared store counts for a record of `key` holding a response of `response_len`
/// encoded bytes (0 for a claim in progress): [`RECORD_OVERHEAD`], plus the scope's, actor's and
/// client key's lengths, plus the response as stored (status, headers and body,
/// [`StoredResponse::encode`](crate::response::StoredResponse::encode)).
pub fn record_bytes(key: &RecordKey, response_len: usize) -> usize {
    RECORD_OVERHEAD + key.scope.len() + key.actor.len() + key.key.len() + response_len
}

/// Whether `actor` is outside every per-caller bound: the anonymous namespace.
pub fn exempt(actor: &str) -> bool {
    actor.is_empty()
}

/// The `Retry-After` of a refused claim, from the time until the actor's earliest counted record
/// stops counting: at least a second.
pub fn retry_after(until_earliest: Duration) -> Duration {
    until_earliest.max(Duration::from_secs(1))
}

/// Whether an actor holding `used` bytes may add a record of `need` bytes under a bound of
/// `max` bytes: while `used + need <= max`.
pub fn fits(used: usize, need: usize, max: usize) -> bool {
    allowance(need, max).is_some_and(|allowed| used <= allowed)
}

/// The most an actor may hold and still add a record of `need` bytes under a bound of `max`
/// bytes (`None`: not even with nothing held): the threshold [`fits`] compares against, for a
/// store that must compare inside its backend (the Redis store's scripts).
pub fn allowance(need: usize, max: usize) -> Option<usize> {
    max.checked_sub(need)
}

/// The admission rule: `Ok` when `actor`, holding `used` bytes, may claim a new record of `need`
/// bytes under `max` (`None`: no bound), else [`StoreError::QuotaExceeded`] with the
/// [`retry_after`] of `until_earliest` (the time until the actor's earliest counted record stops
/// counting; asked only on refusal).
pub fn admit(
    actor: &str,
    used: usize,
    need: usize,
    max: Option<usize>,
    until_earliest: impl FnOnce() -> Duration,
) -> Result<(), StoreError> {
    match max {
        Some(max) if !exempt(actor) && !fits(used, need, max) => {
            Err(StoreError::QuotaExceeded { retry_after: retry_after(until_earliest()) })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let none = || Duration::ZERO;
        assert!(admit("a", 0, 100, Some(100), none).is_ok(), "exactly at the bound fits");
        assert!(admit("a", 1, 100, Some(100), none).is_err());
        assert!(admit("a", usize::MAX, 1, Some(100), none).is_err(), "no overflow");
        assert!(admit("", 1000, 100, Some(100), none).is_ok(), "anonymous callers are not bounded");
        assert!(admit("a", 1000, 100, None, none).is_ok(), "no bound");
        let Err(StoreError::QuotaExceeded { retry_after }) = admit("a", 100, 1, Some(100), || Duration::from_millis(5))
        else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_secs(1), "at least a second");
        let Err(StoreError::QuotaExceeded { retry_after }) = admit("a", 100, 1, Some(100), || Duration::from_secs(42))
        else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_secs(42));
        assert_eq!(allowance(30, 100), Some(70));
        assert_eq!(allowance(101, 100), None);
        assert!(!fits(0, 101, 100), "a record larger than the bound never fits");
    }

    #[test]
    fn record_bytes_counts_the_key_and_the_response() {
        let key = RecordKey::new("scope", "actor", "key");
        assert_eq!(record_bytes(&key, 0), RECORD_OVERHEAD + 13);
        assert_eq!(record_bytes(&key, 100), RECORD_OVERHEAD + 113);
    }
}
