//! The [`Store`] trait: where claims and completed responses live.
//!
//! A store implements the four operations of the execution state machine. Each is one atomic
//! operation of the backend (a lock held for a few instructions, one SQL statement, one Redis
//! script), never a check followed by a set.

use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use std::fmt;
use std::time::{Duration, SystemTime};

pub mod memory;
pub mod quota;
pub mod spec;
pub mod transaction;

pub use memory::MemoryStore;

#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod sql;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod batch;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresConfig, PostgresStore};

#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "sqlite")]
pub use self::sqlite::{SqliteConfig, SqliteStore};

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "mysql")]
pub use self::mysql::{MySqlConfig, MySqlStore};

/// Where a record lives: the route's scope, the caller's identity and the client's key.
///
/// Namespacing by actor means one caller can never replay another caller's response, even when
/// both pick the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    /// The route's scope.
    pub scope: String,
    /// The caller's identity (empty for anonymous callers).
    pub actor: String,
    /// The client's idempotency key.
    pub key: String,
}

impl RecordKey {
    /// A key from its three parts.
    pub fn new(scope: impl Into<String>, actor: impl Into<String>, key: impl Into<String>) -> Self {
        Self { scope: scope.into(), actor: actor.into(), key: key.into() }
    }

    /// The record of a request to `scope` by `actor` (`None`: anonymous) with `key`, as a
    /// runtime without a digest secret files it: stores only ever see a fixed-size digest of the
    /// actor ([`crate::actor::digest`]), never the credential it may come from. Operators' tools
    /// and status endpoints find a caller's record with the same rule ([`RecordKey::keyed`] when
    /// the runtime has a secret).
    pub fn of(scope: &str, actor: Option<&str>, key: &str) -> Self {
        Self::keyed(&crate::digest::DigestKey::default(), scope, actor, key)
    }

    /// The record of a request to `scope` by `actor` with `key` under `digests` (see
    /// [`crate::digest`]): what a runtime with that digest key files it under.
    pub fn keyed(digests: &crate::digest::DigestKey, scope: &str, actor: Option<&str>, key: &str) -> Self {
        Self::new(scope, actor.map(|a| digests.actor(a)).unwrap_or_default(), key)
    }

    /// One string that identifies the record unambiguously: each part is length-prefixed, so no
    /// choice of actor or key can forge another record's identity.
    pub fn storage_key(&self) -> String {
        // Built in one allocation and without the formatting machinery: this runs on every claim
        // and completion.
        let mut out = String::with_capacity(self.scope.len() + self.actor.len() + self.key.len() + 24);
        push_decimal(&mut out, self.scope.len());
        out.push(':');
        out.push_str(&self.scope);
        out.push('|');
        push_decimal(&mut out, self.actor.len());
        out.push(':');
        out.push_str(&self.actor);
        out.push('|');
        out.push_str(&self.key);
        out
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
}

/// The token of an acquired claim; completion, release and renewal must present it.
///
/// A generated token is 32 lowercase hex digits: the microseconds since the Unix epoch when it
/// was made (16 digits), then 64 random bits. Tokens of one key's successive claims are therefore
/// ordered by when they were made ([`fence`](Self::fence)): a claim can only take a key over once
/// the previous claim's lease has run out, so as long as the clocks of the processes sharing a
/// store are within a lease of each other (NTP keeps them within milliseconds, leases are
/// seconds), a later holder's fence is greater than every earlier holder's. A downstream system
/// that refuses writes carrying a fence lower than the highest it has seen (a fencing token, in
/// Kleppmann's sense) can then never apply a write of a holder that was taken over.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub String);

impl ClaimToken {
    /// A fresh token: its time (microseconds since the epoch) and 64 random bits.
    pub fn generate() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        let mut out = String::with_capacity(32);
        crate::push_hex(&mut out, &micros.to_be_bytes());
        crate::push_hex(&mut out, &random.to_be_bytes());
        Self(out)
    }

    /// The token's fencing value: ordered by when the token was made (see the type's docs);
    /// `None` for a token this library did not generate.
    pub fn fence(&self) -> Option<u128> {
        (self.0.len() == 32).then(|| u128::from_str_radix(&self.0, 16).ok()).flatten()
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimToken({})", self.0)
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key: run the handler, then complete or release with this token.
    Acquired(ClaimToken),
    /// The key completed earlier with the same fingerprint: replay this response.
    Completed(StoredResponse),
    /// Another request holds a live claim on the key with the same fingerprint.
    InProgress {
        /// Time left on that claim's lease.
        retry_after: Duration,
    },
    /// The key was used with a different fingerprint (in progress or completed).
    Mismatch,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or answered with an error; the request fails closed (503)
    /// unless its route fails open.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    /// The claim's token no longer owns the record: its lease expired and another request took it
    /// over, or the record is gone. The caller must not write.
    #[error("claim no longer held: the lease expired and another request took the key over")]
    Fenced,
    /// A record under our namespace cannot be decoded.
    #[error("corrupt idempotency record: {0}")]
    Corrupt(String),
    /// A bounded store has no room left.
    #[error("idempotency store is full")]
    Full,
    /// The caller holds as many records (or bytes of records) as the store allows one caller;
    /// others still get in. The request fails with 429 (even on a `fail_open` route).
    #[error("the caller's share of the idempotency store is used up; retry after {retry_after:?}")]
    QuotaExceeded {
        /// When one of the caller's records will be forgotten, as far as the store can tell.
        retry_after: Duration,
    },
    /// The store specification or settings are invalid (unknown scheme, feature not enabled).
    #[error("invalid idempotency store configuration: {0}")]
    Config(String),
}

/// The state of a record, as [`Store::inspect`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Claimed: a handler is running, or ran and its worker vanished before it stored an outcome
    /// (then [`RecordInfo::expires_at`] is past, and the next request with the key takes it over).
    InProgress,
    /// The outcome is stored and replayed to every retry until [`RecordInfo::expires_at`].
    Completed,
}

impl RecordState {
    /// `in_progress` or `completed`, as status endpoints and reports spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordState::InProgress => "in_progress",
            RecordState::Completed => "completed",
        }
    }
}

/// What a store holds for one key: the answer of [`Store::inspect`], for operators and status
/// endpoints. It never carries the stored body, the fingerprint or the claim's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// In progress or completed.
    pub state: RecordState,
    /// The stored response's status code (completed records only).
    pub status: Option<u16>,
    /// When the record was claimed, by the store's clock; `None` when the store did not record
    /// it (a Redis record written by an earlier version).
    pub created_at: Option<SystemTime>,
    /// In progress: when the claim's lease runs out (a retry after it takes the key over);
    /// completed: when the stored outcome is forgotten.
    pub expires_at: SystemTime,
}

/// What [`Store::invalidate`] may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// A completed record only. A claim in progress is left alone ([`Invalidated::InProgress`]):
    /// deleting it would let a retry run the handler while the first run may still be going.
    Completed,
    /// The record whatever its state. Deleting a claim in progress lets the next request with
    /// the key run the handler again while the first run may still be going (its worker is then
    /// fenced and stores nothing): for a claim known to be dead, never on a hunch.
    Any,
}

/// What [`Store::invalidate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// The record was deleted: the next request with the key runs the handler.
    Deleted,
    /// The record is a claim in progress and [`Purge::Completed`] left it alone.
    InProgress,
    /// There was no record.
    Absent,
}

/// Wall-clock time `ms` milliseconds after the Unix epoch (before it when negative).
#[cfg(any(feature = "redis", feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) fn epoch_millis(ms: i64) -> SystemTime {
    let offset = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + offset
    } else {
        SystemTime::UNIX_EPOCH - offset
    }
}

/// How long a store keeps an in-progress record whose lease expired and that no other claim took
/// over: 10 minutes.
///
/// Until another claim takes such a record over (or this retention ends and the store forgets
/// it), the token that claimed it still holds it: a worker that was slowed past its lease (a
/// store outage, a long pause) can still renew it and store its outcome, so a retry that comes
/// after that replays instead of running the handler again. Once another claim took the record,
/// the late worker is [`StoreError::Fenced`] on every store.
pub const ABANDONED_CLAIM_RETENTION: Duration = Duration::from_secs(600);

/// Backend of the execution state machine.
///
/// Implementations must make each method one atomic operation and must be safe to call from many
/// tasks and processes at once.
///
/// # Who holds a record
/// A token holds a record from the claim that created it until the record is completed or
/// released, another claim takes it over (only possible once its lease has expired), or the
/// store forgets it ([`ABANDONED_CLAIM_RETENTION`] after its lease expired). While the token holds
/// the record, [`renew`](Store::renew), [`complete`](Store::complete) and
/// [`release`](Store::release) succeed whether or not the lease is still running; once it does
/// not, they are [`StoreError::Fenced`] and write nothing. Every store follows this one rule, and
/// the contract suite ([`crate::testing`]) checks it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Claims `key` for `token` (which the caller made with [`ClaimToken::generate`]),
    /// atomically:
    /// - an in-progress record held by `token` itself (this claim, sent again after its answer
    ///   was lost): [`Claim::Acquired`]; while its lease runs nothing changes, and once the lease
    ///   has run out (no other claim took the record over) it is taken anew, leased for `lease`
    ///   from now, like a takeover. A caller vouches for the lease from when it sent the claim,
    ///   so an answer [`Claim::Acquired`] always comes with a lease that runs at least that
    ///   long; a record that stayed expired would let another claim take it over while the
    ///   caller counts on it;
    /// - no record, a completed record past its time to live, or an in-progress record with the
    ///   same fingerprint whose lease has expired: take it (`token`, lease `lease`) and answer
    ///   [`Claim::Acquired`];
    /// - a record with another fingerprint, live or an in-progress one whose lease expired but
    ///   which the store still keeps ([`ABANDONED_CLAIM_RETENTION`]): [`Claim::Mismatch`]. A
    ///   request whose outcome is unknown (its worker may have done the work before it vanished)
    ///   is never taken over by a different request under the same key;
    /// - a completed record: [`Claim::Completed`];
    /// - a live in-progress record: [`Claim::InProgress`] with its remaining lease.
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError>;

    /// [`claim_as`](Store::claim_as) with a fresh token.
    async fn claim(&self, key: &RecordKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
        self.claim_as(key, fingerprint, lease, &ClaimToken::generate()).await
    }

    /// Extends the lease of the claim held with `token` to `lease` from now, even when the lease
    /// had expired, as long as no other claim took the record over.
    /// [`StoreError::Fenced`] when the token no longer holds it.
    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError>;

    /// Stores `response` as the key's outcome, kept for `ttl`, if `token` still holds the claim
    /// (a late completion, after the lease expired, is accepted while no other claim took the
    /// record over); otherwise [`StoreError::Fenced`] and nothing is written.
    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Deletes the claim held with `token` so a retry runs again; [`StoreError::Fenced`] (and
    /// nothing deleted) when the token no longer holds it.
    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError>;

    /// What the store holds for `key`, without changing it: `None` when it holds nothing, or
    /// only a completed record past its time to live. An in-progress record whose lease ran out is
    /// reported (with `expires_at` in the past) until another claim takes it over or the store
    /// forgets it. For operators and status endpoints; the protocol never calls it.
    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError>;

    /// Deletes `key`'s record, atomically, if `purge` allows it for the record's state, so that
    /// the next request with the key runs the handler. A worker still running under a deleted
    /// claim is [`StoreError::Fenced`] when it renews or completes, and stores nothing. For
    /// operators: invalidating a completed record lets a retry run its effects again; with
    /// [`Purge::Completed`] a claim in progress is never deleted.
    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError>;

    /// Whether the backend answers: one cheap round trip (`SELECT 1`, `PING`), an error when it
    /// fails. For health checks and readiness probes.
    async fn health(&self) -> Result<(), StoreError>;

    /// The store's transactions for transactional routes ([`crate::store::transaction`]), if it can run
    /// them: the PostgreSQL, SQLite and MySQL stores can; by default a store cannot. A wrapper forwards
    /// its inner store's.
    fn transactions(&self) -> Option<&dyn crate::store::transaction::TransactionalStore> {
        None
    }

    /// Short name for logs and reports.
    fn name(&self) -> &'static str;
}

/// `detail`, the text of a failed connection attempt, followed by what it means when it is a TLS
/// failure (rustls's words): `trust` names where a private CA is given, `identify` how a client
/// certificate is presented.
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
pub(crate) fn explain_tls(detail: String, trust: &str, identify: &str) -> String {
    if detail.contains("invalid peer certificate") {
        format!(
            "{detail} (TLS: the server's certificate does not verify: it must be signed by a CA of the platform's roots or {trust}, and name the host the URL connects to)"
        )
    } else if detail.contains("received fatal alert") {
        format!(
            "{detail} (TLS: the server refused the handshake; `CertificateRequired` means it requires a client certificate: {identify})"
        )
    } else {
        detail
    }
}

/// What a store is opened for, by [`open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    /// Serving requests: the SQL stores apply their migrations and sweep expired records, and a
    /// SQLite file is created when missing.
    #[default]
    Serve,
    /// An operator's tool (inspecting or purging a record of a running application): nothing is
    /// created or migrated and nothing swept, so a mistyped path or the wrong database is an
    /// error rather than a new empty store; a `memory` store, which lives only inside the process
    /// that serves it, is refused.
    Operate,
}

/// Opens a store from a specification string, as applications take it from configuration:
/// `memory` (bounds: [`spec::MemorySpec`]), `sqlite:PATH` (feature `sqlite`), `postgres://...`
/// (feature `postgres`), `mysql://...` or `mariadb://...` (feature `mysql`), `redis://...` or
/// `redis+cluster://host1:port1,host2:port2` (feature `redis`), and over TLS (features `redis`
/// and `tls`) `rediss://...` or `rediss+cluster://...`. A PostgreSQL URL asks for TLS with
/// `sslmode=verify-full`, a MySQL URL with `ssl-mode=VERIFY_IDENTITY` (feature `tls`; see the
/// `store::postgres` and `store::mysql` docs). The same as [`open`] for [`Purpose::Serve`].
///
/// A shared store's specification may end with `?actor_max_bytes=32MiB` (or `&actor_max_bytes=..`
/// among the driver's parameters): one caller's byte bound ([`quota`], [`spec::SharedSpec`]), off
/// by default; it is taken out of the URL before the driver sees it.
///
/// An unknown scheme, a scheme whose feature is not enabled, or a backend that cannot be reached
/// is an error that says which; no message shows a password of the specification
/// ([`spec::redact`]).
pub async fn connect(spec: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    open(spec, Purpose::Serve).await
}

/// Opens the store `spec` names (see [`connect`]) for `purpose`.
pub async fn open(spec: &str, purpose: Purpose) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    use spec::Scheme;
    let scheme = Scheme::of(spec)?;
    let store: std::sync::Arc<dyn Store> = match scheme {
        Scheme::Memory if purpose == Purpose::Operate => {
            return Err(StoreError::Config(
                "a `memory` store lives inside the process that serves it; an operator's tool cannot open it".into(),
            ))
        }
        Scheme::Memory => std::sync::Arc::new(MemoryStore::from_spec(&spec::MemorySpec::parse(spec)?)),
        #[cfg(feature = "sqlite")]
        Scheme::Sqlite => {
            let shared = spec::SharedSpec::parse(spec)?;
            let config = match purpose {
                Purpose::Serve => SqliteConfig::default(),
                Purpose::Operate => {
                    SqliteConfig::default().migrate(false).sweep_interval(None).create_if_missing(false)
                }
            };
            let config = config.actor_max_bytes(shared.actor_max_bytes);
            std::sync::Arc::new(SqliteStore::connect_with(&shared.url, config).await?)
        }
        #[cfg(feature = "postgres")]
        Scheme::Postgres => {
            let shared = spec::SharedSpec::parse(spec)?;
            let config = match purpose {
                Purpose::Serve => PostgresConfig::default(),
                Purpose::Operate => PostgresConfig::default().migrate(false).sweep_interval(None),
            };
            let config = config.actor_max_bytes(shared.actor_max_bytes);
            std::sync::Arc::new(PostgresStore::connect_with(&shared.url, config).await?)
        }
        #[cfg(feature = "mysql")]
        Scheme::Mysql => {
            let shared = spec::SharedSpec::parse(spec)?;
            let config = match purpose {
                Purpose::Serve => MySqlConfig::default(),
                Purpose::Operate => MySqlConfig::default().migrate(false).sweep_interval(None),
            };
            let config = config.actor_max_bytes(shared.actor_max_bytes);
            std::sync::Arc::new(MySqlStore::connect_with(&shared.url, config).await?)
        }
        #[cfg(feature = "redis")]
        Scheme::Redis | Scheme::RedisCluster | Scheme::RedisTls | Scheme::RedisClusterTls => {
            let shared = spec::SharedSpec::parse(spec)?;
            std::sync::Arc::new(RedisStore::builder(&shared.url).actor_max_bytes(shared.actor_max_bytes).build().await?)
        }
        #[allow(unreachable_patterns)]
        other => {
            let feature = other.feature().unwrap_or_default();
            let tls = if matches!(other, Scheme::RedisTls | Scheme::RedisClusterTls) { " and `tls`" } else { "" };
            return Err(StoreError::Config(format!(
                "store `{}` needs the `{feature}`{tls} cargo feature (of idempotent-axum, idempotent-actix or idempotent-core)",
                spec::redact(spec)
            )));
        }
    };
    if purpose == Purpose::Operate {
        // Without migrations, a database that holds no records table is told at once, by the
        // backend's own error, rather than at the first record looked up.
        store.inspect(&RecordKey::new("", "", "")).await?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::RecordKey;

    #[test]
    fn the_storage_key_is_length_prefixed_and_stable() {
        // Stores keep records under this string: its layout must never change.
        assert_eq!(RecordKey::new("payments.create", "", "k-1").storage_key(), "15:payments.create|0:|k-1");
        assert_eq!(RecordKey::new("s", "a".repeat(123), "k").storage_key(), format!("1:s|123:{}|k", "a".repeat(123)));
        assert_eq!(RecordKey::new("", "", "").storage_key(), "0:|0:|");
        assert_ne!(RecordKey::new("a:b", "", "k").storage_key(), RecordKey::new("a", "b", "k").storage_key());
    }
}
