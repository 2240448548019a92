//! In-memory store: for tests and single-process services.
//!
//! All operations take one mutex for a few instructions and never await while holding it, so each
//! is atomic. Memory is bounded by a number of records and a number of bytes: expired records are
//! swept when a bound is reached (and every few thousand claims), and a claim that still finds no
//! room fails with [`StoreError::Full`] (503 to the client) rather than evicting a live record,
//! which could let a retry run twice.

use super::{Claim, ClaimToken, RecordInfo, RecordKey, RecordState, Store, StoreError, ABANDONED_CLAIM_RETENTION};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
// tokio's clock: the same as the system's monotonic clock, except in tests that pause it, where
// leases and lifetimes follow the test's virtual time.
use tokio::time::Instant;

/// Default bound on the number of records.
pub const DEFAULT_MAX_RECORDS: usize = 100_000;
/// Default bound on the bytes of stored responses.
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

const SWEEP_EVERY: u64 = 4096;

#[derive(Debug)]
enum State {
    InProgress { token: ClaimToken, lease_until: Instant },
    Completed { response: StoredResponse, expires_at: Instant },
}

#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    state: State,
    created: Instant,
}

impl Entry {
    /// Whether a claim may take the record over.
    fn expired(&self, now: Instant) -> bool {
        match &self.state {
            State::InProgress { lease_until, .. } => *lease_until <= now,
            State::Completed { expires_at, .. } => *expires_at <= now,
        }
    }
    /// Whether a sweep may forget the record: an abandoned claim is kept for
    /// [`ABANDONED_CLAIM_RETENTION`] so that its worker can still complete it late.
    fn forgotten(&self, now: Instant) -> bool {
        match &self.state {
            State::InProgress { lease_until, .. } => *lease_until + ABANDONED_CLAIM_RETENTION <= now,
            State::Completed { expires_at, .. } => *expires_at <= now,
        }
    }
    fn size(&self) -> usize {
        match &self.state {
            State::InProgress { .. } => 0,
            State::Completed { response, .. } => response.size(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Entry>,
    bytes: usize,
    claims: u64,
}

impl Inner {
    fn sweep(&mut self, now: Instant) {
        let (mut freed, before) = (0, self.records.len());
        self.records.retain(|_, e| {
            let keep = !e.forgotten(now);
            if !keep {
                freed += e.size();
            }
            keep
        });
        self.bytes -= freed;
        // Rare (every few thousand claims, or when full), so counted under the lock.
        crate::telemetry::records_swept("memory", (before - self.records.len()) as u64);
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.records.remove(key) {
            self.bytes -= e.size();
        }
    }
}

/// A bounded, expiring in-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_records: usize,
    max_bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default bounds.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_RECORDS, DEFAULT_MAX_BYTES)
    }

    /// A store holding at most `max_records` records and `max_bytes` bytes of responses.
    pub fn with_limits(max_records: usize, max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), max_records: max_records.max(1), max_bytes }
    }

    /// Number of records held, expired ones included until the next sweep.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every mutation is a single
        // insert or remove), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, key: &RecordKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let sk = key.storage_key();
        let mut inner = self.lock();
        inner.claims += 1;
        if inner.claims.is_multiple_of(SWEEP_EVERY) {
            inner.sweep(now);
        }
        if let Some(e) = inner.records.get(&sk) {
            if !e.expired(now) {
                if e.fingerprint != *fingerprint {
                    return Ok(Claim::Mismatch);
                }
                return Ok(match &e.state {
                    State::Completed { response, .. } => Claim::Completed(response.clone()),
                    State::InProgress { lease_until, .. } => Claim::InProgress { retry_after: *lease_until - now },
                });
            }
            inner.remove(&sk);
        }
        if inner.records.len() >= self.max_records || inner.bytes >= self.max_bytes {
            inner.sweep(now);
            if inner.records.len() >= self.max_records || inner.bytes >= self.max_bytes {
                return Err(StoreError::Full);
            }
        }
        let token = ClaimToken::generate();
        inner.records.insert(
            sk,
            Entry {
                fingerprint: *fingerprint,
                state: State::InProgress { token: token.clone(), lease_until: now + lease },
                created: now,
            },
        );
        Ok(Claim::Acquired(token))
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.records.get_mut(&key.storage_key()) {
            Some(Entry { state: State::InProgress { token: held, lease_until }, .. }) if held == token => {
                // Still held even if the lease ran out: a claimer that found it expired would
                // have taken it over (under this same lock) and replaced the token.
                *lease_until = now + lease;
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let size = response.size();
        let mut inner = self.lock();
        let inner = &mut *inner;
        match inner.records.get_mut(&key.storage_key()) {
            Some(e) => match &e.state {
                State::InProgress { token: held, .. } if held == token => {
                    e.state = State::Completed { response: response.clone(), expires_at: now + ttl };
                    inner.bytes += size;
                    Ok(())
                }
                _ => Err(StoreError::Fenced),
            },
            None => Err(StoreError::Fenced),
        }
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        let sk = key.storage_key();
        let mut inner = self.lock();
        match inner.records.get(&sk) {
            Some(Entry { state: State::InProgress { token: held, .. }, .. }) if held == token => {
                inner.remove(&sk);
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        // The store's clock is monotonic; wall-clock times are read off it at this instant.
        let at = |t: Instant| if t >= now { wall + (t - now) } else { wall - (now - t) };
        let inner = self.lock();
        let Some(e) = inner.records.get(&key.storage_key()) else { return Ok(None) };
        if e.forgotten(now) {
            return Ok(None);
        }
        let (state, status, expires) = match &e.state {
            State::InProgress { lease_until, .. } => (RecordState::InProgress, None, *lease_until),
            State::Completed { response, expires_at } => (RecordState::Completed, Some(response.status), *expires_at),
        };
        Ok(Some(RecordInfo { state, status, created_at: Some(at(e.created)), expires_at: at(expires) }))
    }

    async fn invalidate(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let sk = key.storage_key();
        let mut inner = self.lock();
        let present = inner.records.get(&sk).is_some_and(|e| !e.forgotten(Instant::now()));
        inner.remove(&sk);
        Ok(present)
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::FingerprintBuilder;
    use bytes::Bytes;

    fn fp(n: i32) -> Fingerprint {
        FingerprintBuilder::new("t").field("n", &n).unwrap().finish()
    }

    #[tokio::test]
    async fn full_store_refuses_rather_than_evicting_live_records() {
        let store = MemoryStore::with_limits(2, usize::MAX);
        let lease = Duration::from_secs(60);
        assert!(matches!(store.claim(&RecordKey::new("s", "a", "1"), &fp(1), lease).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(&RecordKey::new("s", "a", "2"), &fp(1), lease).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(&RecordKey::new("s", "a", "3"), &fp(1), lease).await, Err(StoreError::Full)));
    }

    #[tokio::test]
    async fn expired_records_make_room() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        let k1 = RecordKey::new("s", "a", "1");
        let Claim::Acquired(t) = store.claim(&k1, &fp(1), Duration::from_secs(60)).await.unwrap() else { panic!() };
        let resp = StoredResponse::new(200, [("a", "b")], Bytes::from_static(b"x"));
        store.complete(&k1, &t, &resp, Duration::from_millis(20)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(matches!(
            store.claim(&RecordKey::new("s", "a", "2"), &fp(1), Duration::from_secs(1)).await,
            Ok(Claim::Acquired(_))
        ));
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn byte_bound_counts_completed_responses() {
        let store = MemoryStore::with_limits(100, 64);
        let k1 = RecordKey::new("s", "a", "1");
        let Claim::Acquired(t) = store.claim(&k1, &fp(1), Duration::from_secs(60)).await.unwrap() else { panic!() };
        let resp = StoredResponse::new(200, Vec::<(&str, &str)>::new(), Bytes::from(vec![0u8; 100]));
        store.complete(&k1, &t, &resp, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            store.claim(&RecordKey::new("s", "a", "2"), &fp(1), Duration::from_secs(1)).await,
            Err(StoreError::Full)
        ));
    }
}
