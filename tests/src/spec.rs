//! The real stores driven by the operations of the model's store step
//! ([`idempotent_model::store`]): one key, tokens and fingerprints numbered as the model numbers
//! them, answers turned into the model's [`Answer`]s so that the two can be compared.
//!
//! [`store`] opens each store this machine has by name: memory, SQLite (a temporary file), PostgreSQL,
//! MySQL/MariaDB, Redis (single node and cluster), each skipped loudly (a failure under `CI=true`)
//! by its harness when its server cannot be had.

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{
    Claim, ClaimToken, Invalidated, MemoryStore, Purge, RecordKey, RecordState, RedisStore, SqliteConfig, SqliteStore,
    Store, StoreError,
};
use idempotent_model::store::{Answer, Op, Purge as ModelPurge, Token};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One key of a store, with the real tokens behind the model's numbers.
pub struct Driver {
    store: Arc<dyn Store>,
    key: RecordKey,
    tokens: Vec<ClaimToken>,
    lease: Duration,
}

/// The fingerprint the model numbers `n`.
pub fn fingerprint(n: u8) -> Fingerprint {
    FingerprintBuilder::new("model.step").field("n", &n).expect("a number").finish()
}

/// The response the completion of token `t` stores: its number is its body.
pub fn response(t: Token) -> StoredResponse {
    StoredResponse::new(200, [("content-type", "text/plain")], bytes::Bytes::from(t.to_string()))
}

impl Driver {
    /// `key` of `store`, with `tokens` fresh tokens and claims and renewals leasing for `lease`.
    pub fn new(store: Arc<dyn Store>, key: &str, tokens: usize, lease: Duration) -> Self {
        let key = RecordKey::new("model.step", "actor", format!("{key}-{}", uuid::Uuid::new_v4().simple()));
        Self { store, key, tokens: (0..tokens).map(|_| ClaimToken::generate()).collect(), lease }
    }

    /// Runs `op` on the store; the answer as the model spells it, or the store's error.
    pub async fn run(&self, op: Op) -> Result<Answer, StoreError> {
        let (s, k) = (&self.store, &self.key);
        let token = |t: Token| &self.tokens[usize::from(t)];
        let done = |r: Result<(), StoreError>| match r {
            Ok(()) => Ok(Answer::Done),
            Err(StoreError::Fenced) => Ok(Answer::Fenced),
            Err(e) => Err(e),
        };
        match op {
            Op::Claim { token: t, fingerprint: f } => {
                Ok(match s.claim_as(k, &fingerprint(f), self.lease, token(t)).await? {
                    Claim::Acquired(got) => {
                        assert_eq!(&got, token(t), "a claim acquires with its own token");
                        Answer::Acquired
                    }
                    Claim::Completed(r) => {
                        let by = std::str::from_utf8(&r.body).ok().and_then(|b| b.parse().ok());
                        let by = by.unwrap_or_else(|| panic!("a response no completion stored: {r:?}"));
                        assert_eq!(r, response(by), "replayed byte for byte");
                        Answer::Completed { by }
                    }
                    Claim::InProgress { .. } => Answer::InProgress,
                    Claim::Mismatch => Answer::Mismatch,
                })
            }
            Op::Renew { token: t } => done(s.renew(k, token(t), self.lease).await),
            Op::Complete { token: t } => done(s.complete(k, token(t), &response(t), Duration::from_secs(3600)).await),
            Op::Release { token: t } => done(s.release(k, token(t)).await),
            Op::Inspect => Ok(match s.inspect(k).await? {
                None => Answer::Absent,
                Some(info) if info.state == RecordState::Completed => Answer::InspectedCompleted,
                Some(info) => Answer::InspectedInProgress { live: info.expires_at > SystemTime::now() },
            }),
            Op::Invalidate(purge) => {
                let purge = match purge {
                    ModelPurge::Completed => Purge::Completed,
                    ModelPurge::Any => Purge::Any,
                };
                Ok(match s.invalidate(k, purge).await? {
                    Invalidated::Deleted => Answer::Deleted,
                    Invalidated::InProgress => Answer::LeftInProgress,
                    Invalidated::Absent => Answer::NothingToDelete,
                })
            }
        }
    }
}

/// A SQLite store on a temporary file, removed when the store is dropped.
struct TempSqlite {
    store: SqliteStore,
    path: std::path::PathBuf,
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

#[async_trait::async_trait]
impl Store for TempSqlite {
    async fn claim_as(
        &self,
        k: &RecordKey,
        f: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.store.claim_as(k, f, lease, token).await
    }
    async fn renew(&self, k: &RecordKey, t: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.store.renew(k, t, lease).await
    }
    async fn complete(
        &self,
        k: &RecordKey,
        t: &ClaimToken,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.complete(k, t, r, ttl).await
    }
    async fn release(&self, k: &RecordKey, t: &ClaimToken) -> Result<(), StoreError> {
        self.store.release(k, t).await
    }
    async fn inspect(&self, k: &RecordKey) -> Result<Option<idempotent_core::store::RecordInfo>, StoreError> {
        self.store.inspect(k).await
    }
    async fn invalidate(&self, k: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.store.invalidate(k, purge).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.store.health().await
    }
    fn name(&self) -> &'static str {
        self.store.name()
    }
}

/// Opens the store named `name`: `memory`, `sqlite`, `postgres`, `mysql`, `redis` or
/// `redis-cluster`; `None` (after the harness's loud skip) when its server cannot be had.
pub async fn store(name: &str) -> Option<Arc<dyn Store>> {
    Some(match name {
        "memory" => Arc::new(MemoryStore::new()),
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("idempotent-spec-{}.db", uuid::Uuid::new_v4().simple()));
            let store = SqliteStore::connect_with(&format!("sqlite:{}", path.display()), SqliteConfig::new())
                .await
                .expect("open sqlite");
            Arc::new(TempSqlite { store, path })
        }
        "postgres" => crate::postgres::TestSchema::new().await?.store().await,
        "mysql" => crate::mysql::TestDb::new().await?.store().await,
        "redis" => {
            let url = crate::redis_server::redis_url().await?;
            let store = RedisStore::builder(&url).prefix(crate::redis_server::test_prefix()).build().await;
            Arc::new(store.expect("connect to redis"))
        }
        "redis-cluster" => {
            let nodes = crate::redis_server::redis_cluster().await?;
            let store = RedisStore::cluster(nodes).prefix(crate::redis_server::test_prefix()).build().await;
            Arc::new(store.expect("connect to the redis cluster"))
        }
        other => panic!("no store named {other}"),
    })
}
