//! In-memory store: for tests and single-process services.
//!
//! All operations take one mutex for well under a microsecond and never await while holding it,
//! so each is atomic. (Splitting the lock by key measured no faster on two cores: the work
//! around a store call, not the lock, is what a request waits for.) The records themselves are
//! spread over 1024 hash tables under that lock, so that no operation waits for a whole table
//! to grow: a table grows by moving every record it holds into new memory in one step, during
//! which every request waits. Keys spread evenly, so all the tables grow at about the same
//! time: with 64 tables, a store filling up to 300,000 records stalled single requests for up
//! to 2.3 and 2.5 ms, and over loopback HTTP at 16 clients the 99th percentile of first
//! executions was 1.18 and 1.34 ms (3.5 to 3.7 times the bare handler's). With 1024 tables the
//! slowest request took 0.49 and 0.55 ms and the 99th percentile over HTTP was 0.63 and 0.65 ms
//! (1.6 to 2.3 times the bare handler's). The figures come from `cargo bench -p
//! idempotent-tests --bench instructions -- first 300000 --latency` and the comparison bench's
//! `--only "bare axum,ours axum memory"`, alternated, two runs each on a shared 2-core machine.
//! Other runs did not all agree, on the percentile or on the rate: `BENCHMARKS.md`, "1024
//! tables", has them all.
//!
//! # Bounds
//! Memory is bounded by a byte budget, [`DEFAULT_MAX_BYTES`] (256 MiB) unless set with
//! [`MemoryStore::with_limits`], that counts each record's whole footprint
//! ([`MemoryStore::bytes`]); optionally by a number of records ([`MemoryStore::with_limits`]).
//!
//! One caller cannot fill the store for everyone: each actor (the caller's identity the records
//! are namespaced by) may hold at most an eighth of the byte budget by default
//! ([`default_actor_max_bytes`]; set with [`MemoryStore::with_actor_max_bytes`], or
//! `memory?actor_max_bytes=..` in [`connect`](super::connect)), and optionally a number of
//! records ([`MemoryStore::with_actor_quota`]). A claim for a new key by an actor at its bound is
//! refused with [`StoreError::QuotaExceeded`] (429 with `Retry-After` to that caller) while every
//! other caller's claims still get in. The anonymous namespace (every request of a service whose
//! actor source is `Anonymous`) is no caller to tell apart from others: only the store's own
//! budget bounds it. The byte bound's admission, its `Retry-After` and who is exempt are
//! [`quota`]'s rule, which the shared stores' bound follows too; what this store
//! counts is each record's footprint in memory, and a record counts until it is forgotten.
//!
//! A claim for a new key that would cross the store's bounds first forgets records due to be
//! forgotten; when none is, it fails with [`StoreError::Full`] (503 to every client) rather than
//! evicting a live record, which could let a retry run twice. Completions are never refused (their
//! claim was admitted), so the responses of the claims in flight may take the store, or an actor,
//! past its budget.
//!
//! # Expiry
//! Records are indexed by the time the store forgets them: a completed record when its time to
//! live ends, an in-progress one [`ABANDONED_CLAIM_RETENTION`] after its lease (renewals,
//! completions and takeovers move it in the index). Each claim forgets at most two records that
//! are due, more than the one it may add, and a claim that finds the store full forgets as many
//! as it needs to make room: no operation scans the store, each costs O(log n) at any fill level,
//! and a full store with nothing due refuses after one look at its earliest deadline. A record is
//! gone for every operation from the time it is due, before it is removed: its token no longer
//! holds it, [`Store::inspect`] does not report it.

use super::{
    quota, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, RecordState, Store, StoreError,
    ABANDONED_CLAIM_RETENTION,
};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
// tokio's clock: the same as the system's monotonic clock, except in tests that pause it, where
// leases and lifetimes follow the test's virtual time.
use tokio::time::Instant;

/// Default bound on the bytes the store holds, every record's whole footprint counted
/// ([`MemoryStore::bytes`]): 256 MiB, about 350,000 records of small JSON answers.
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

/// How many records due to be forgotten a claim removes on its way, at most, when the store has
/// room: more than the one record a claim adds, so that they never pile up while claims come in,
/// and few enough that no claim pays for a crowd of records that expired together.
const FORGET_PER_CLAIM: usize = 2;

/// What a record costs besides its key's characters and what its state owns (a claim's token, a
/// response's headers and body), on top of which [`MemoryStore::bytes`] counts those:
/// - its slot in the hash table (a pointer to the key, the entry) and the slot's control byte,
///   counted half again, for the room a table keeps free (it is 7/8 full at most, and half of that
///   right after it grows);
/// - its place in the index by deadline (the deadline, a sequence number, a pointer to the key),
///   counted twice: B-tree nodes are half full when deadlines arrive in order, as they mostly do.
///
/// About 310 bytes on a 64-bit target. With a key of about 120 characters (a digest actor and a
/// UUID key), a claim costs about 500 bytes, and a completed record with a small JSON answer
/// (one header, 150 bytes of body) about 730: what the process's resident memory grows by, per
/// record, with a million of them.
pub const RECORD_OVERHEAD: usize =
    (size_of::<(Arc<str>, Entry)>() + 1) * 3 / 2 + 2 * size_of::<((Instant, u64), Arc<str>)>();

/// What an actor's counter costs when a quota is set: its slot in the table of counters, counted
/// half again as the records' slots are. Its characters are counted as an allocation.
const ACTOR_OVERHEAD: usize = (size_of::<(Box<str>, Usage)>() + 1) * 3 / 2;

/// The bytes one actor may hold by default in a store of `max_bytes`: an eighth of it.
pub const fn default_actor_max_bytes(max_bytes: usize) -> usize {
    max_bytes / 8
}

/// How many records of the index a claim refused by its actor's bound looks through to tell the
/// caller when its earliest record will be forgotten (its `Retry-After`).
const RETRY_AFTER_SCAN: usize = 1024;

/// The length of a [`ClaimToken::generate`]d token: 128 bits in hex.
const TOKEN_LEN: usize = 32;

/// Bytes an allocation of `n` bytes takes from a typical allocator: a word of header, rounded up to
/// 16 bytes. Nothing for an empty one.
const fn allocation(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + size_of::<usize>()).next_multiple_of(16)
    }
}

/// `now + d`, at most a century away, so that no lease or time to live overflows the clock.
fn later(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(d.min(CENTURY)).unwrap_or(now)
}

/// The actor of a [`RecordKey::storage_key`]: `{len}:{scope}|{len}:{actor}|{key}`.
fn actor_of(storage_key: &str) -> &str {
    // A length-prefixed part, and what follows its separator.
    fn part(s: &str) -> Option<(&str, &str)> {
        let (len, rest) = s.split_once(':')?;
        let len: usize = len.parse().ok()?;
        Some((rest.get(..len)?, rest.get(len + 1..)?))
    }
    part(storage_key).and_then(|(_scope, rest)| part(rest)).map_or("", |(actor, _key)| actor)
}

#[derive(Debug)]
enum State {
    InProgress {
        token: ClaimToken,
        lease_until: Instant,
    },
    /// `by`: the token that completed it, so that a completion sent again finds its work done.
    Completed {
        response: StoredResponse,
        expires_at: Instant,
        by: ClaimToken,
    },
}

#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    state: State,
    created: Instant,
    /// Its place in the index: `(forget_at(), seq)`, unique whatever the deadline.
    seq: u64,
}

impl Entry {
    /// Whether a claim may take the record over.
    fn expired(&self, now: Instant) -> bool {
        match &self.state {
            State::InProgress { lease_until, .. } => *lease_until <= now,
            State::Completed { expires_at, .. } => *expires_at <= now,
        }
    }

    /// When the store forgets the record: an abandoned claim is kept for
    /// [`ABANDONED_CLAIM_RETENTION`] so that its worker can still complete it late.
    fn forget_at(&self) -> Instant {
        match &self.state {
            State::InProgress { lease_until, .. } => later(*lease_until, ABANDONED_CLAIM_RETENTION),
            State::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// Whether the store has forgotten the record: every operation treats it as absent.
    fn forgotten(&self, now: Instant) -> bool {
        self.forget_at() <= now
    }

    /// Whether `token` holds the record at `now` (see the rules of [`Store`]).
    fn held_by(&self, token: &ClaimToken, now: Instant) -> bool {
        matches!(&self.state, State::InProgress { token: held, .. } if held == token) && !self.forgotten(now)
    }

    /// The record's key in the index.
    fn slot(&self) -> (Instant, u64) {
        (self.forget_at(), self.seq)
    }

    /// Bytes the state owns outside the entry: the token's characters, or the response's
    /// headers and body.
    fn owned_bytes(&self) -> usize {
        match &self.state {
            State::InProgress { token, .. } => allocation(token.0.len()),
            State::Completed { response, by, .. } => {
                allocation(by.0.len())
                    + allocation(response.headers.len() * size_of::<(String, Vec<u8>)>())
                    + response.headers.iter().map(|(n, v)| allocation(n.len()) + allocation(v.len())).sum::<usize>()
                    + allocation(response.body.len())
            }
        }
    }
}

/// What a record with a key of `key_len` bytes costs, apart from what its state owns.
const fn record_bytes(key_len: usize) -> usize {
    // The key is shared by the table and the index: its characters and two reference counts.
    RECORD_OVERHEAD + allocation(2 * size_of::<usize>() + key_len)
}

/// How many tables the records are spread over (see [`Records`]).
const SHARDS: usize = 1024;

/// The records by key, spread over [`SHARDS`] hash tables that each grow on their own.
///
/// A hash table grows by moving every entry into one twice its size, in one step: with a million
/// records in one table, that step takes tens of milliseconds under the store's lock, and every
/// request waits for it. Spread over many tables, each step moves a 1024th of the records (see
/// the module docs for the figures).
/// A key's table is chosen by a cheap hash of its characters (FNV-1a); keys chosen to land in one
/// table make that table grow as one table would, nothing worse.
#[derive(Debug)]
struct Records {
    shards: Box<[HashMap<Arc<str>, Entry>]>,
    len: usize,
}

impl Default for Records {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| HashMap::new()).collect(), len: 0 }
    }
}

impl Records {
    fn shard(key: &str) -> usize {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (hash ^ (hash >> 32)) as usize % SHARDS
    }

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, key: &str) -> Option<&Entry> {
        self.shards[Self::shard(key)].get(key)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.shards[Self::shard(key)].get_mut(key)
    }

    fn insert(&mut self, key: Arc<str>, entry: Entry) {
        if self.shards[Self::shard(&key)].insert(key, entry).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        self.remove_entry(key).map(|(_, e)| e)
    }

    fn remove_entry(&mut self, key: &str) -> Option<(Arc<str>, Entry)> {
        let removed = self.shards[Self::shard(key)].remove_entry(key);
        self.len -= usize::from(removed.is_some());
        removed
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Entry)> {
        self.shards.iter().flatten()
    }
}

#[derive(Debug, Default)]
struct Inner {
    records: Records,
    /// Every record once, by the time it may be forgotten; kept exact (a renewal or a completion
    /// moves its record), so that the first entry is always the next record to forget.
    deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    /// Records and bytes per actor, kept only with a per-actor bound.
    actors: HashMap<Box<str>, Usage>,
    bytes: usize,
    next_seq: u64,
    /// Records forgotten since the operation's caller last reported them.
    swept: u64,
}

impl Inner {
    /// Forgets the earliest record if it is due; whether there was one.
    fn forget_one(&mut self, now: Instant, quota: bool) -> bool {
        let Some(first) = self.deadlines.first_entry() else { return false };
        if first.key().0 > now {
            return false;
        }
        let key = first.remove();
        if let Some(e) = self.records.remove(&key) {
            self.released(&key, &e, quota);
            self.swept += 1;
        }
        true
    }

    /// Forgets up to `limit` records that are due.
    fn forget(&mut self, now: Instant, limit: usize, quota: bool) {
        for _ in 0..limit {
            if !self.forget_one(now, quota) {
                break;
            }
        }
    }

    /// How long until `actor`'s earliest record is forgotten, as far as the first
    /// [`RETRY_AFTER_SCAN`] records of the index tell (beyond them, at least until the last one
    /// looked at); at least a second.
    fn earliest_of(&self, actor: &str, now: Instant) -> Duration {
        let mut at = now;
        for (&(deadline, _), key) in self.deadlines.iter().take(RETRY_AFTER_SCAN) {
            at = deadline;
            if actor_of(key) == actor {
                break;
            }
        }
        quota::retry_after(at.saturating_duration_since(now))
    }

    fn insert(&mut self, key: Arc<str>, mut entry: Entry, quota: bool) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let footprint = record_bytes(key.len()) + entry.owned_bytes();
        self.bytes += footprint;
        if quota {
            count(&mut self.actors, &mut self.bytes, actor_of(&key), footprint);
        }
        self.deadlines.insert(entry.slot(), key.clone());
        self.records.insert(key, entry);
    }

    fn remove(&mut self, key: &str, quota: bool) {
        if let Some((key, e)) = self.records.remove_entry(key) {
            self.deadlines.remove(&e.slot());
            self.released(&key, &e, quota);
        }
    }

    /// Accounts for a record gone from the table (and from the index).
    fn released(&mut self, key: &str, e: &Entry, quota: bool) {
        let footprint = record_bytes(key.len()) + e.owned_bytes();
        self.bytes -= footprint;
        if quota {
            let actor = actor_of(key);
            if let Some(usage) = self.actors.get_mut(actor) {
                usage.records -= 1;
                usage.bytes -= footprint;
                if usage.records == 0 {
                    self.actors.remove(actor);
                    self.bytes -= ACTOR_OVERHEAD + allocation(actor.len());
                }
            }
        }
    }

    /// Changes the state of `key`'s record with `change`, moving it in the index and counting the
    /// bytes its new state owns.
    fn update(&mut self, key: &str, change: impl FnOnce(&mut Entry)) {
        let Some(e) = self.records.get_mut(key) else { return };
        let (slot, owned) = (e.slot(), e.owned_bytes());
        change(e);
        let now_owned = e.owned_bytes();
        self.bytes = self.bytes - owned + now_owned;
        if let Some(usage) = self.actors.get_mut(actor_of(key)) {
            usage.bytes = usage.bytes - owned + now_owned;
        }
        if e.slot() != slot {
            if let Some(key) = self.deadlines.remove(&slot) {
                self.deadlines.insert(e.slot(), key);
            }
        }
    }
}

/// What a claim finds under its key, looked up once.
enum Found {
    /// No record.
    Absent,
    /// A record the store has forgotten (treated as absent, removed first).
    Forgotten,
    /// A record that answers the claim as it stands.
    Answer(Claim),
    /// An expired record the claim takes over in place.
    TakenOver,
}

/// What one actor holds: records, and their bytes (each record's whole footprint).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    records: usize,
    bytes: usize,
}

/// Counts one more record of `actor`, of `footprint` bytes, and the bytes of its counter when it
/// is its first.
fn count(actors: &mut HashMap<Box<str>, Usage>, bytes: &mut usize, actor: &str, footprint: usize) {
    let usage = match actors.get_mut(actor) {
        Some(usage) => usage,
        None => {
            *bytes += ACTOR_OVERHEAD + allocation(actor.len());
            actors.entry(actor.into()).or_default()
        }
    };
    usage.records += 1;
    usage.bytes += footprint;
}

/// Bounds on what one actor may hold (see [the module docs](self#bounds)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ActorBounds {
    records: Option<usize>,
    bytes: Option<usize>,
}

impl ActorBounds {
    fn any(self) -> bool {
        self.records.is_some() || self.bytes.is_some()
    }

    /// Whether an actor holding `usage` may add a record of `need` bytes (the byte bound by
    /// [`quota::fits`], the rule every store's per-caller bound follows).
    fn admit(self, usage: Usage, need: usize) -> bool {
        self.records.is_none_or(|max| usage.records < max)
            && self.bytes.is_none_or(|max| quota::fits(usage.bytes, need, max))
    }
}

/// A bounded, expiring in-memory [`Store`]: see the [module](self) for its bounds and how it
/// forgets records.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_records: usize,
    max_bytes: usize,
    /// What one actor may hold.
    actor: ActorBounds,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store bounded by [`DEFAULT_MAX_BYTES`], of which one actor may hold an eighth.
    pub fn new() -> Self {
        Self::with_limits(usize::MAX, DEFAULT_MAX_BYTES)
    }

    /// A store holding at most `max_records` records and `max_bytes` bytes, each record's whole
    /// footprint counted ([`bytes`](Self::bytes)): a claim whose record would cross either bound
    /// is refused when no record is due to be forgotten. One actor may hold an eighth of
    /// `max_bytes` ([`default_actor_max_bytes`]); change it with
    /// [`with_actor_max_bytes`](Self::with_actor_max_bytes).
    pub fn with_limits(max_records: usize, max_bytes: usize) -> Self {
        let store = Self {
            inner: Mutex::new(Inner::default()),
            max_records: max_records.max(1),
            max_bytes,
            actor: ActorBounds::default(),
        };
        store.with_actor_max_bytes(Some(default_actor_max_bytes(max_bytes)))
    }

    /// The store a `memory` specification describes (see [`MemorySpec`](super::spec::MemorySpec)).
    pub fn from_spec(spec: &super::spec::MemorySpec) -> Self {
        let store = Self::with_limits(spec.max_records, spec.max_bytes).with_actor_max_bytes(spec.actor_max_bytes);
        match spec.actor_max_records {
            Some(records) => store.with_actor_quota(records),
            None => store,
        }
    }

    /// The same store, holding at most `quota` (at least 1) records per actor: a claim for a
    /// new key by an actor at its quota is refused with [`StoreError::QuotaExceeded`] when none of
    /// that actor's records is due to be forgotten, while other actors' claims still get in.
    ///
    /// A record counts until it is released or invalidated, or the store forgets it: a completed
    /// record at the end of its time to live, an abandoned claim at the end of its retention. The
    /// quota is therefore the number of distinct keys an actor may use within a time to live. A
    /// claim that takes over one of the actor's own records adds nothing. The anonymous namespace
    /// has no quota.
    pub fn with_actor_quota(mut self, quota: usize) -> Self {
        self.count_actors();
        self.actor.records = Some(quota.max(1));
        self
    }

    /// The same store, where one actor may hold at most `max_bytes` bytes of records (each
    /// record's whole footprint, as [`bytes`](Self::bytes) counts it); `None`: no per-actor bound
    /// on bytes. Refusals as for [`with_actor_quota`](Self::with_actor_quota).
    pub fn with_actor_max_bytes(mut self, max_bytes: Option<usize>) -> Self {
        if max_bytes.is_some() {
            self.count_actors();
        }
        self.actor.bytes = max_bytes;
        if !self.actor.any() {
            let Inner { actors, bytes, .. } = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
            for (actor, _) in actors.drain() {
                *bytes -= ACTOR_OVERHEAD + allocation(actor.len());
            }
        }
        self
    }

    /// Starts counting what each actor holds, from what an owned store already holds.
    fn count_actors(&mut self) {
        if self.actor.any() {
            return;
        }
        let Inner { records, actors, bytes, .. } = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for (key, e) in records.iter() {
            count(actors, bytes, actor_of(key), record_bytes(key.len()) + e.owned_bytes());
        }
    }

    /// Number of records held, those due to be forgotten included until they are removed.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the store holds by its own count, which its byte bound applies to: for each record,
    /// [`RECORD_OVERHEAD`], the key's characters, and what its state owns (a claim's token, or a
    /// response's headers and body), each allocation rounded as an allocator rounds it; with an
    /// per-actor bound, each actor's counter. Back to 0 once every record is gone.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing that can panic runs between the changes one operation makes (its times and
        // clones are computed first), so a poisoned lock leaves the table, the index and the
        // counts in agreement and is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Store::claim`] once the store is locked and a few records that are due forgotten: a
    /// claim of `key` (stored under `storage_key`) at `now` whose lease would last until
    /// `lease_until`.
    fn claim_locked(
        &self,
        inner: &mut Inner,
        (key, storage_key): (&RecordKey, String),
        fingerprint: &Fingerprint,
        (now, lease_until): (Instant, Instant),
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        let quota = self.actor.any();
        // One lookup decides what the record makes of the claim.
        let found = match inner.records.get(storage_key.as_str()) {
            None => Found::Absent,
            Some(e) if e.forgotten(now) => Found::Forgotten,
            Some(e) => {
                let own = matches!(&e.state, State::InProgress { token: held, .. } if held == token);
                // Its own claim whose lease ran out is taken anew, with a new lease, like an
                // abandoned claim of the same request.
                let abandoned = matches!(e.state, State::InProgress { .. }) && !own;
                if own && !e.expired(now) {
                    // This very claim, sent again: it holds the record already.
                    Found::Answer(Claim::Acquired(token.clone()))
                } else if !e.expired(now) || (abandoned && e.fingerprint != *fingerprint) {
                    Found::Answer(if e.fingerprint != *fingerprint {
                        Claim::Mismatch
                    } else {
                        match &e.state {
                            State::Completed { response, .. } => Claim::Completed(response.clone()),
                            State::InProgress { lease_until, .. } => {
                                Claim::InProgress { retry_after: *lease_until - now }
                            }
                        }
                    })
                } else {
                    Found::TakenOver
                }
            }
        };
        match found {
            Found::Absent => {}
            Found::Forgotten => {
                // Gone already: a new record is claimed in its place, under the bounds.
                inner.remove(&storage_key, quota);
                inner.swept += 1;
            }
            Found::Answer(answer) => return Ok(answer),
            Found::TakenOver => {
                // Taken over in place: the store holds as many records as before, for the same
                // actor.
                let held = token.clone();
                inner.update(&storage_key, |e| {
                    *e = Entry {
                        fingerprint: *fingerprint,
                        state: State::InProgress { token: held, lease_until },
                        created: now,
                        seq: e.seq,
                    }
                });
                return Ok(Claim::Acquired(token.clone()));
            }
        }
        let mut need = record_bytes(storage_key.len()) + allocation(TOKEN_LEN);
        let usage = |inner: &Inner| inner.actors.get(key.actor.as_str()).copied().unwrap_or_default();
        if quota && !quota::exempt(&key.actor) && !self.actor.admit(usage(inner), need) {
            // The actor's records due to be forgotten may be anywhere in the index: forget
            // every record that is due. Each is forgotten once, so this costs no more than
            // forgetting them one claim at a time would.
            inner.forget(now, usize::MAX, true);
            if !self.actor.admit(usage(inner), need) {
                return Err(StoreError::QuotaExceeded { retry_after: inner.earliest_of(&key.actor, now) });
            }
        }
        if quota && usage(inner).records == 0 {
            need += ACTOR_OVERHEAD + allocation(key.actor.len());
        }
        while inner.records.len() >= self.max_records || inner.bytes.saturating_add(need) > self.max_bytes {
            if !inner.forget_one(now, quota) {
                return Err(StoreError::Full);
            }
        }
        let entry = Entry {
            fingerprint: *fingerprint,
            state: State::InProgress { token: token.clone(), lease_until },
            created: now,
            seq: 0,
        };
        inner.insert(Arc::from(storage_key), entry, quota);
        Ok(Claim::Acquired(token.clone()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let lease_until = later(now, lease);
        let storage_key = key.storage_key();
        let (answer, swept) = {
            let mut inner = self.lock();
            inner.forget(now, FORGET_PER_CLAIM, self.actor.any());
            let answer = self.claim_locked(&mut inner, (key, storage_key), fingerprint, (now, lease_until), token);
            (answer, std::mem::take(&mut inner.swept))
        };
        crate::telemetry::records_swept("memory", swept);
        answer
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let until = later(now, lease);
        let storage_key = key.storage_key();
        let mut inner = self.lock();
        // Held even if the lease ran out: a claimer that found it expired would have taken it
        // over (under this same lock) and replaced the token.
        if !inner.records.get(storage_key.as_str()).is_some_and(|e| e.held_by(token, now)) {
            return Err(StoreError::Fenced);
        }
        inner.update(&storage_key, |e| {
            if let State::InProgress { lease_until, .. } = &mut e.state {
                *lease_until = until;
            }
        });
        Ok(())
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let state = State::Completed { response: response.clone(), expires_at: later(now, ttl), by: token.clone() };
        let storage_key = key.storage_key();
        let mut inner = self.lock();
        match inner.records.get(storage_key.as_str()) {
            Some(e) if e.held_by(token, now) => {}
            // Sent again after it stored the outcome: nothing to do.
            Some(e @ Entry { state: State::Completed { by, .. }, .. }) if by == token && !e.forgotten(now) => {
                return Ok(())
            }
            _ => return Err(StoreError::Fenced),
        }
        inner.update(&storage_key, |e| e.state = state);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        let now = Instant::now();
        let storage_key = key.storage_key();
        let mut inner = self.lock();
        if !inner.records.get(storage_key.as_str()).is_some_and(|e| e.held_by(token, now)) {
            return Err(StoreError::Fenced);
        }
        inner.remove(&storage_key, self.actor.any());
        Ok(())
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        // The store's clock is monotonic; wall-clock times are read off it at this instant.
        let at = |t: Instant| if t >= now { wall + (t - now) } else { wall - (now - t) };
        let storage_key = key.storage_key();
        let inner = self.lock();
        let Some(e) = inner.records.get(storage_key.as_str()) else { return Ok(None) };
        if e.forgotten(now) {
            return Ok(None);
        }
        let (state, status, expires) = match &e.state {
            State::InProgress { lease_until, .. } => (RecordState::InProgress, None, *lease_until),
            State::Completed { response, expires_at, .. } => {
                (RecordState::Completed, Some(response.status), *expires_at)
            }
        };
        Ok(Some(RecordInfo { state, status, created_at: Some(at(e.created)), expires_at: at(expires) }))
    }

    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        let now = Instant::now();
        let storage_key = key.storage_key();
        let mut inner = self.lock();
        let answer = match inner.records.get(storage_key.as_str()) {
            None => return Ok(Invalidated::Absent),
            Some(e) if e.forgotten(now) => Invalidated::Absent,
            Some(Entry { state: State::InProgress { .. }, .. }) if purge == Purge::Completed => {
                return Ok(Invalidated::InProgress)
            }
            Some(_) => Invalidated::Deleted,
        };
        inner.remove(&storage_key, self.actor.any());
        Ok(answer)
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
impl MemoryStore {
    /// Counts again, from the records, everything the store keeps up to date as it goes (the
    /// index, the bytes, the actors' counters), and panics where the two differ.
    fn audit(&self) {
        let inner = self.lock();
        assert_eq!(inner.deadlines.len(), inner.records.len(), "one index entry per record");
        let mut bytes = 0;
        let mut actors = HashMap::<&str, Usage>::new();
        for (key, e) in inner.records.iter() {
            assert_eq!(inner.deadlines.get(&e.slot()).map(|k| &**k), Some(&**key), "indexed at its deadline");
            bytes += record_bytes(key.len()) + e.owned_bytes();
            let usage: &mut Usage = actors.entry(actor_of(key)).or_default();
            usage.records += 1;
            usage.bytes += record_bytes(key.len()) + e.owned_bytes();
        }
        if self.actor.any() {
            assert_eq!(inner.actors.len(), actors.len(), "one counter per actor with records");
            for (actor, usage) in actors {
                assert_eq!(inner.actors.get(actor), Some(&usage), "records and bytes of {actor:?}");
                bytes += ACTOR_OVERHEAD + allocation(actor.len());
            }
        } else {
            assert!(inner.actors.is_empty());
        }
        assert_eq!(inner.bytes, bytes, "bytes counted as records come and go");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::FingerprintBuilder;
    use bytes::Bytes;
    use proptest::prelude::*;
    use tokio::time::advance;

    const LEASE: Duration = Duration::from_secs(60);

    fn fp(n: i32) -> Fingerprint {
        FingerprintBuilder::new("t").field("n", &n).unwrap().finish()
    }

    fn key(actor: &str, k: impl std::fmt::Display) -> RecordKey {
        RecordKey::new("s", actor, k.to_string())
    }

    fn response(status: u16, body: usize) -> StoredResponse {
        StoredResponse::new(status, [("content-type", "text/plain"), ("x-id", "42")], Bytes::from(vec![b'x'; body]))
    }

    async fn acquire(store: &MemoryStore, key: &RecordKey, lease: Duration) -> ClaimToken {
        match store.claim(key, &fp(1), lease).await {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("{key:?} not acquired: {other:?}"),
        }
    }

    async fn completed(store: &MemoryStore, key: &RecordKey, ttl: Duration) {
        let token = acquire(store, key, LEASE).await;
        store.complete(key, &token, &response(201, 10), ttl).await.unwrap();
    }

    async fn refused(store: &MemoryStore, key: &RecordKey) -> bool {
        matches!(store.claim(key, &fp(1), LEASE).await, Err(StoreError::Full))
    }

    /// Refused by the actor's bound, with a `Retry-After` of at least a second.
    async fn over_quota(store: &MemoryStore, key: &RecordKey) -> bool {
        matches!(
            store.claim(key, &fp(1), LEASE).await,
            Err(StoreError::QuotaExceeded { retry_after }) if retry_after >= Duration::from_secs(1)
        )
    }

    /// Claims and releases fresh keys until every record that is due is gone (each claim
    /// forgets a few on its way).
    async fn forget_everything_due(store: &MemoryStore) {
        let probe = key("probe", "probe");
        for _ in 0..=store.len() {
            if store.is_empty() {
                break;
            }
            let token = acquire(store, &probe, LEASE).await;
            store.release(&probe, &token).await.unwrap();
        }
        assert!(store.is_empty(), "{} records left", store.len());
    }

    #[tokio::test]
    async fn full_store_refuses_rather_than_evicting_live_records() {
        let store = MemoryStore::with_limits(2, usize::MAX);
        acquire(&store, &key("a", 1), LEASE).await;
        acquire(&store, &key("a", 2), LEASE).await;
        assert!(refused(&store, &key("a", 3)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_make_room() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        completed(&store, &key("a", 1), Duration::from_millis(20)).await;
        advance(Duration::from_millis(40)).await;
        acquire(&store, &key("a", 2), Duration::from_secs(1)).await;
        assert_eq!(store.len(), 1);
        store.audit();
    }

    #[tokio::test]
    async fn the_byte_bound_counts_whole_records() {
        let k1 = key("a", 1);
        // Room for one claim, not two.
        let store =
            MemoryStore::with_limits(100, 3 * (record_bytes(k1.storage_key().len()) + allocation(TOKEN_LEN)) / 2)
                .with_actor_max_bytes(None);
        let token = acquire(&store, &k1, LEASE).await;
        assert!(refused(&store, &key("a", 2)).await);
        // A completion is never refused, even past the budget: its claim was admitted.
        store.complete(&k1, &token, &response(200, 4096), LEASE).await.unwrap();
        assert!(store.bytes() > 4096);
        assert!(refused(&store, &key("a", 2)).await);
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_forgets_a_few_records_per_claim_not_all_that_are_due() {
        let store = MemoryStore::with_limits(10, usize::MAX);
        for i in 0..10 {
            completed(&store, &key("a", i), Duration::from_secs(10)).await;
        }
        advance(Duration::from_secs(11)).await;
        // Ten records are due: the claim forgets two of them on its way, not the whole store.
        acquire(&store, &key("b", 0), LEASE).await;
        assert_eq!(store.len(), 10 - FORGET_PER_CLAIM + 1);
        store.audit();
        // The rest go as claims come, and the store fills with live records up to its bound...
        for i in 1..10 {
            acquire(&store, &key("b", i), LEASE).await;
        }
        assert_eq!(store.len(), 10);
        // ...where nothing is due any more: refused.
        assert!(refused(&store, &key("b", 10)).await);
        assert!(refused(&store, &key("c", 0)).await);
        assert_eq!(store.len(), 10);
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_forgets_as_many_records_as_a_claim_needs_and_no_more() {
        let small = |i: usize| key("a", i);
        let one = record_bytes(small(0).storage_key().len()) + allocation(TOKEN_LEN);
        let store = MemoryStore::with_limits(usize::MAX, 20 * one).with_actor_max_bytes(None);
        for i in 0..20 {
            acquire(&store, &small(i), Duration::from_secs(1)).await;
        }
        assert_eq!(store.bytes(), 20 * one);
        // The claims are abandoned, and forgotten once their retention ends.
        advance(Duration::from_secs(1) + ABANDONED_CLAIM_RETENTION).await;
        // A key worth about six small records: the claim forgets what it needs to fit in.
        let big = key("a", "k".repeat(5 * one));
        acquire(&store, &big, LEASE).await;
        let forgotten = 20 + 1 - store.len();
        assert!(forgotten > FORGET_PER_CLAIM && forgotten < 10, "{forgotten} records forgotten");
        assert!(store.bytes() <= 20 * one);
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_claims_keep_their_room_until_their_retention_ends() {
        let store = MemoryStore::with_limits(2, usize::MAX);
        let (k1, k2) = (key("a", 1), key("a", 2));
        let t1 = acquire(&store, &k1, Duration::from_secs(1)).await;
        acquire(&store, &k2, Duration::from_secs(1)).await;
        advance(Duration::from_secs(2)).await;
        // Both leases ran out, but their tokens still hold them: they are not forgotten.
        assert!(refused(&store, &key("a", 3)).await);
        store.complete(&k1, &t1, &response(200, 1), Duration::from_secs(3600)).await.unwrap();
        advance(ABANDONED_CLAIM_RETENTION).await;
        // Now the one never completed is forgotten, and its room taken.
        acquire(&store, &key("a", 3), LEASE).await;
        assert!(refused(&store, &key("a", 4)).await);
        assert!(matches!(store.claim(&k1, &fp(1), LEASE).await, Ok(Claim::Completed(_))));
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_claim_is_not_forgotten_at_its_first_deadline() {
        let store = MemoryStore::with_limits(2, usize::MAX);
        let k = key("a", "renewed");
        let token = acquire(&store, &k, Duration::from_secs(1)).await;
        store.renew(&k, &token, Duration::from_secs(7200)).await.unwrap();
        acquire(&store, &key("a", "filler"), Duration::from_secs(7200)).await;
        // Past the first lease and its retention, when the record would be due had the renewal
        // not moved it: the full store finds nothing to forget.
        advance(Duration::from_secs(2) + ABANDONED_CLAIM_RETENTION).await;
        for i in 0..5 {
            assert!(refused(&store, &key("b", i)).await);
        }
        store.audit();
        assert!(matches!(store.claim(&k, &fp(1), LEASE).await, Ok(Claim::InProgress { .. })));
        // The completion moves it again: forgotten at the end of its time to live, not before.
        store.complete(&k, &token, &response(201, 10), Duration::from_secs(30)).await.unwrap();
        store.audit();
        advance(Duration::from_secs(29)).await;
        assert!(refused(&store, &key("b", 0)).await);
        assert!(matches!(store.claim(&k, &fp(1), LEASE).await, Ok(Claim::Completed(_))));
        advance(Duration::from_secs(1)).await;
        acquire(&store, &key("b", 0), LEASE).await;
        assert!(store.inspect(&k).await.unwrap().is_none());
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_claim_is_fenced_even_before_it_is_removed() {
        let store = MemoryStore::new();
        let k = key("a", 1);
        let token = acquire(&store, &k, Duration::from_secs(1)).await;
        advance(Duration::from_secs(1) + ABANDONED_CLAIM_RETENTION).await;
        // No claim ran since: the record is still in the table, but it is due.
        assert_eq!(store.len(), 1);
        assert!(matches!(store.renew(&k, &token, LEASE).await, Err(StoreError::Fenced)));
        assert!(matches!(store.complete(&k, &token, &response(200, 1), LEASE).await, Err(StoreError::Fenced)));
        assert!(matches!(store.release(&k, &token).await, Err(StoreError::Fenced)));
        assert!(store.inspect(&k).await.unwrap().is_none());
        assert_eq!(store.invalidate(&k, Purge::Any).await.unwrap(), Invalidated::Absent);
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_actor_quota_refuses_only_the_greedy_actor() {
        let store = MemoryStore::new().with_actor_quota(3);
        let greedy = |i: i32| key("greedy", i);
        completed(&store, &greedy(0), Duration::from_secs(10)).await;
        completed(&store, &greedy(1), Duration::from_secs(10)).await;
        let t2 = acquire(&store, &greedy(2), Duration::from_secs(1)).await;
        assert!(over_quota(&store, &greedy(3)).await);
        // Everyone else still gets in, the anonymous callers included.
        for actor in ["other", "another", ""] {
            for i in 0..3 {
                acquire(&store, &key(actor, i), LEASE).await;
            }
        }
        // The greedy actor's own records still answer.
        assert!(matches!(store.claim(&greedy(0), &fp(1), LEASE).await, Ok(Claim::Completed(_))));
        assert!(matches!(store.claim(&greedy(2), &fp(1), LEASE).await, Ok(Claim::InProgress { .. })));
        store.audit();

        // A released claim gives its place back.
        store.release(&greedy(2), &t2).await.unwrap();
        let t3 = acquire(&store, &greedy(3), Duration::from_secs(1)).await;
        assert!(over_quota(&store, &greedy(4)).await);
        // So does an invalidated record.
        assert_eq!(store.invalidate(&greedy(0), Purge::Completed).await.unwrap(), Invalidated::Deleted);
        acquire(&store, &greedy(4), Duration::from_secs(1)).await;
        assert!(over_quota(&store, &greedy(5)).await);
        store.audit();

        // Taking over its own abandoned claim adds nothing to the actor's count.
        advance(Duration::from_secs(2)).await;
        let t3b = acquire(&store, &greedy(3), LEASE).await;
        assert_ne!(t3, t3b);
        assert!(over_quota(&store, &greedy(5)).await);
        // A completed record whose time to live ends gives its place back, wherever it is in
        // the index.
        advance(Duration::from_secs(10)).await;
        acquire(&store, &greedy(5), LEASE).await;
        assert!(over_quota(&store, &greedy(6)).await);
        store.audit();
    }

    /// One caller sending large requests whose answers are stored fills its own share, not the
    /// store: it is refused (429 to it, with the time until its earliest record goes), while
    /// everyone else still gets in. The default share is an eighth of the budget.
    #[tokio::test(start_paused = true)]
    async fn one_caller_fills_its_byte_share_not_the_store() {
        let store = MemoryStore::with_limits(usize::MAX, 8 << 20);
        let mut admitted = 0;
        let refusal = loop {
            let k = key("greedy", admitted);
            match store.claim(&k, &fp(1), LEASE).await {
                Ok(Claim::Acquired(token)) => {
                    let ttl = Duration::from_secs(3600 + admitted as u64);
                    store.complete(&k, &token, &response(404, 60_000), ttl).await.unwrap();
                    admitted += 1;
                }
                other => break other,
            }
            assert!(admitted < 1000, "never refused");
        };
        let Err(StoreError::QuotaExceeded { retry_after }) = refusal else { panic!("{refusal:?}") };
        assert_eq!(retry_after, Duration::from_secs(3600), "until its earliest record is forgotten");
        // 60 kB answers against a share of 1 MiB: the store holds an eighth of its budget.
        assert_eq!(admitted, (1 << 20) / 60_000 + 1, "the completion that crossed the share was not refused");
        assert!(store.bytes() < (8 << 20) / 8 + 2 * 61_000);
        for actor in ["another", "and-another", ""] {
            for i in 0..3 {
                acquire(&store, &key(actor, i), LEASE).await;
            }
        }
        // Its records keep answering.
        assert!(matches!(store.claim(&key("greedy", 0), &fp(1), LEASE).await, Ok(Claim::Completed(_))));
        store.audit();
        // Once its earliest record is forgotten, it gets in again.
        advance(Duration::from_secs(3600)).await;
        acquire(&store, &key("greedy", "later"), LEASE).await;
        store.audit();
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_counted_exactly_and_all_given_back() {
        for store in [MemoryStore::new().with_actor_max_bytes(None), MemoryStore::new().with_actor_quota(1000)] {
            let quota = store.actor.any();
            let actor = |a: &str| if quota { ACTOR_OVERHEAD + allocation(a.len()) } else { 0 };
            assert_eq!(store.bytes(), 0);
            let k = key("a", 1);
            let token = acquire(&store, &k, LEASE).await;
            let claimed = record_bytes(k.storage_key().len()) + allocation(TOKEN_LEN) + actor("a");
            assert_eq!(store.bytes(), claimed);
            store.complete(&k, &token, &response(201, 100), Duration::from_secs(60)).await.unwrap();
            let headers = allocation(2 * size_of::<(String, Vec<u8>)>())
                + allocation("content-type".len())
                + allocation("text/plain".len())
                + allocation("x-id".len())
                + allocation("42".len());
            assert_eq!(store.bytes(), claimed + headers + allocation(100), "the token stays with the outcome");

            // Records in every state, coming and going.
            for i in 0..200 {
                let k = key(["a", "b", ""][i % 3], i);
                let token = acquire(&store, &k, Duration::from_secs(1 + i as u64 % 7)).await;
                match i % 5 {
                    0 => store.complete(&k, &token, &response(200, i), Duration::from_secs(i as u64)).await.unwrap(),
                    1 => store.renew(&k, &token, Duration::from_secs(30)).await.unwrap(),
                    2 => store.release(&k, &token).await.unwrap(),
                    3 => assert_eq!(store.invalidate(&k, Purge::Any).await.unwrap(), Invalidated::Deleted),
                    _ => {}
                }
                if i % 17 == 0 {
                    advance(Duration::from_secs(3)).await;
                }
            }
            store.audit();
            assert!(store.bytes() > 0);
            advance(Duration::from_secs(86_400)).await;
            forget_everything_due(&store).await;
            assert_eq!(store.bytes(), 0);
            store.audit();
        }
    }

    proptest! {
        #[test]
        fn actor_of_reads_the_actor_back_from_any_storage_key(scope in ".*", actor in ".*", k in ".*") {
            let record = RecordKey::new(scope, actor, k);
            let storage_key = record.storage_key();
            prop_assert_eq!(actor_of(&storage_key), record.actor.as_str());
        }
    }

    /// The model test's operations.
    #[derive(Debug, Clone)]
    enum Op {
        Claim {
            key: usize,
            fp: i32,
            lease_ms: u64,
        },
        /// Renews with the `token`-th last token handed out (modulo their number).
        Renew {
            token: usize,
            lease_ms: u64,
        },
        Complete {
            token: usize,
            ttl_ms: u64,
        },
        Release {
            token: usize,
        },
        Invalidate {
            key: usize,
            force: bool,
        },
        Inspect {
            key: usize,
        },
        Advance {
            ms: u64,
        },
    }

    /// Keys 0 to 3 are the greedy actor's, 4 and 5 another's, 6 and 7 anonymous (which has no
    /// quota): the greedy actor meets its quota, all of them the store's bound.
    const KEYS: usize = 8;
    const MODEL_MAX_RECORDS: usize = 4;
    const MODEL_QUOTA: usize = 2;

    fn model_key(i: usize) -> RecordKey {
        key(["greedy", "greedy", "greedy", "greedy", "other", "other", "", ""][i], i)
    }

    fn op() -> impl Strategy<Value = Op> {
        let retention = ABANDONED_CLAIM_RETENTION.as_millis() as u64;
        prop_oneof![
            5 => (0..KEYS, 0..2i32, 100..3000u64).prop_map(|(key, fp, lease_ms)| Op::Claim { key, fp, lease_ms }),
            2 => (0..6usize, 100..3000u64).prop_map(|(token, lease_ms)| Op::Renew { token, lease_ms }),
            3 => (0..6usize, 100..5000u64).prop_map(|(token, ttl_ms)| Op::Complete { token, ttl_ms }),
            1 => (0..6usize).prop_map(|token| Op::Release { token }),
            1 => (0..KEYS, any::<bool>()).prop_map(|(key, force)| Op::Invalidate { key, force }),
            1 => (0..KEYS).prop_map(|key| Op::Inspect { key }),
            3 => prop_oneof![1..2000u64, retention - 2000..retention + 4000].prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// A record of the model: a fingerprint, the token while in progress, the lease's end or the
    /// time to live's, the status once completed.
    struct Modelled {
        fp: i32,
        token: Option<ClaimToken>,
        until: Instant,
        created: Instant,
        status: Option<u16>,
        /// The token that completed it.
        by: Option<ClaimToken>,
    }

    impl Modelled {
        fn forgotten(&self, now: Instant) -> bool {
            match self.token {
                Some(_) => self.until + ABANDONED_CLAIM_RETENTION <= now,
                None => self.until <= now,
            }
        }
    }

    /// Runs `ops` on a store and on a plain map that forgets by scanning every record, and
    /// checks that they answer alike and that the store's counts are right after each.
    async fn against_the_model(ops: Vec<Op>) {
        let store = MemoryStore::with_limits(MODEL_MAX_RECORDS, usize::MAX).with_actor_quota(MODEL_QUOTA);
        let mut model: HashMap<usize, Modelled> = HashMap::new();
        let mut tokens: Vec<(usize, ClaimToken)> = Vec::new();
        for op in ops {
            let now = Instant::now();
            model.retain(|_, r| !r.forgotten(now));
            let holds = |model: &HashMap<usize, Modelled>, k: usize, t: &ClaimToken| {
                model.get(&k).is_some_and(|r| r.token.as_ref() == Some(t))
            };
            match op {
                Op::Claim { key: k, fp: f, lease_ms } => {
                    let lease = Duration::from_millis(lease_ms);
                    let answer = store.claim(&model_key(k), &fp(f), lease).await;
                    let live = |actor: &str| model.keys().filter(|&&i| model_key(i).actor == actor).count();
                    let actor = model_key(k).actor;
                    let within_quota = actor.is_empty() || live(&actor) < MODEL_QUOTA;
                    match model.get(&k) {
                        // Live, or an abandoned claim of another request: answered, never taken.
                        Some(r) if r.until > now || (r.token.is_some() && r.fp != f) => {
                            let expected = if r.fp != f {
                                Claim::Mismatch
                            } else if let Some(status) = r.status {
                                Claim::Completed(response(status, k))
                            } else {
                                Claim::InProgress { retry_after: r.until - now }
                            };
                            assert_eq!(answer.unwrap(), expected);
                        }
                        r if r.is_some() || (model.len() < MODEL_MAX_RECORDS && within_quota) => {
                            let Ok(Claim::Acquired(token)) = answer else { panic!("{k} not acquired: {answer:?}") };
                            tokens.push((k, token.clone()));
                            let record = Modelled {
                                fp: f,
                                token: Some(token),
                                until: now + lease,
                                created: now,
                                status: None,
                                by: None,
                            };
                            model.insert(k, record);
                        }
                        _ if !within_quota => {
                            assert!(matches!(answer, Err(StoreError::QuotaExceeded { .. })), "{k}: {answer:?}")
                        }
                        _ => assert!(matches!(answer, Err(StoreError::Full)), "{k}: {answer:?}"),
                    }
                }
                Op::Renew { token, lease_ms } if !tokens.is_empty() => {
                    let (k, t) = tokens[tokens.len() - 1 - token % tokens.len()].clone();
                    let lease = Duration::from_millis(lease_ms);
                    let answer = store.renew(&model_key(k), &t, lease).await;
                    if holds(&model, k, &t) {
                        answer.unwrap();
                        model.get_mut(&k).unwrap().until = now + lease;
                    } else {
                        assert!(matches!(answer, Err(StoreError::Fenced)), "{answer:?}");
                    }
                }
                Op::Complete { token, ttl_ms } if !tokens.is_empty() => {
                    let (k, t) = tokens[tokens.len() - 1 - token % tokens.len()].clone();
                    let status = 200 + k as u16;
                    let ttl = Duration::from_millis(ttl_ms);
                    let answer = store.complete(&model_key(k), &t, &response(status, k), ttl).await;
                    if holds(&model, k, &t) {
                        answer.unwrap();
                        let r = model.get_mut(&k).unwrap();
                        (r.token, r.until, r.status, r.by) = (None, now + ttl, Some(status), Some(t));
                    } else if model.get(&k).is_some_and(|r| r.by.as_ref() == Some(&t)) {
                        answer.expect("a completion sent again finds its work done");
                    } else {
                        assert!(matches!(answer, Err(StoreError::Fenced)), "{answer:?}");
                    }
                }
                Op::Release { token } if !tokens.is_empty() => {
                    let (k, t) = tokens[tokens.len() - 1 - token % tokens.len()].clone();
                    let answer = store.release(&model_key(k), &t).await;
                    if holds(&model, k, &t) {
                        answer.unwrap();
                        model.remove(&k);
                    } else {
                        assert!(matches!(answer, Err(StoreError::Fenced)), "{answer:?}");
                    }
                }
                Op::Invalidate { key: k, force } => {
                    let answer = store
                        .invalidate(&model_key(k), if force { Purge::Any } else { Purge::Completed })
                        .await
                        .unwrap();
                    let expected = match model.get(&k) {
                        None => Invalidated::Absent,
                        Some(r) if r.status.is_none() && !force => Invalidated::InProgress,
                        Some(_) => Invalidated::Deleted,
                    };
                    if expected == Invalidated::Deleted {
                        model.remove(&k);
                    }
                    assert_eq!(answer, expected);
                }
                Op::Inspect { key: k } => {
                    let info = store.inspect(&model_key(k)).await.unwrap();
                    let seen =
                        info.map(|i| (i.state, i.status, i.expires_at.duration_since(i.created_at.unwrap()).ok()));
                    let expected = model.get(&k).map(|r| {
                        let state = if r.status.is_some() { RecordState::Completed } else { RecordState::InProgress };
                        (state, r.status, Some(r.until - r.created))
                    });
                    assert_eq!(seen, expected);
                }
                Op::Advance { ms } => advance(Duration::from_millis(ms)).await,
                Op::Renew { .. } | Op::Complete { .. } | Op::Release { .. } => {}
            }
            store.audit();
            assert!(store.len() >= model.len());
        }
        // Once every record is due and they are all forgotten, nothing is counted.
        advance(Duration::from_secs(86_400)).await;
        forget_everything_due(&store).await;
        assert_eq!(store.bytes(), 0);
        store.audit();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn the_store_answers_as_a_map_scanned_in_full_would(ops in proptest::collection::vec(op(), 1..80)) {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            runtime.block_on(against_the_model(ops));
        }
    }
}
