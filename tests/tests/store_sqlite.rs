//! The SQLite store: the store contract on a temporary database file, corrupt rows, a process
//! that dies between claim and completion, the store specification string, the sweeper (and the
//! retention of abandoned claims), an in-memory database that outlives the pool's connections,
//! and durable commits by default.

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::sqlite::{SqliteClock, SystemClock};
use idempotent_core::store::{
    self, Claim, ClaimToken, Invalidated, Purge, RecordKey, SqliteConfig, SqliteStore, Store, StoreError,
    ABANDONED_CLAIM_RETENTION,
};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteSynchronous};
use sqlx::AssertSqlSafe;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A database file in the temporary directory, removed (with its WAL files) on drop.
struct TempDb(PathBuf);

impl TempDb {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::env::temp_dir().join(format!("idempotent-test-{}.db", uuid::Uuid::new_v4().simple()))))
    }
    fn spec(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// A store that keeps its database file alive.
struct FileStore {
    store: SqliteStore,
    db: Arc<TempDb>,
}

impl FileStore {
    async fn open(db: Arc<TempDb>) -> Arc<Self> {
        let config = SqliteConfig::new().sweep_interval(Some(Duration::from_millis(500)));
        let store = SqliteStore::connect_with(&db.spec(), config).await.expect("open sqlite");
        Arc::new(Self { store, db })
    }
    async fn reopen(&self) -> Arc<Self> {
        Self::open(self.db.clone()).await
    }
}

#[async_trait::async_trait]
impl Store for FileStore {
    async fn claim_as(
        &self,
        k: &RecordKey,
        f: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        self.store.claim_as(k, f, lease, token).await
    }
    async fn renew(
        &self,
        k: &RecordKey,
        t: &idempotent_core::store::ClaimToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.store.renew(k, t, lease).await
    }
    async fn complete(
        &self,
        k: &RecordKey,
        t: &idempotent_core::store::ClaimToken,
        r: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.complete(k, t, r, ttl).await
    }
    async fn release(&self, k: &RecordKey, t: &idempotent_core::store::ClaimToken) -> Result<(), StoreError> {
        self.store.release(k, t).await
    }
    async fn inspect(&self, key: &RecordKey) -> Result<Option<idempotent_core::store::RecordInfo>, StoreError> {
        self.store.inspect(key).await
    }
    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        self.store.invalidate(key, purge).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.store.health().await
    }
    fn name(&self) -> &'static str {
        self.store.name()
    }
}

idempotent_tests::store_contract_tests!(
    sqlite,
    async { FileStore::open(TempDb::new()).await },
    reopen = |store: Arc<FileStore>| async move { store.reopen().await }
);

idempotent_tests::store_quota_tests!(sqlite_actor_bound, |max_bytes: usize| async move {
    let db = TempDb::new();
    let config = SqliteConfig::new().actor_max_bytes(Some(max_bytes));
    let store = SqliteStore::connect_with(&db.spec(), config).await.expect("open sqlite");
    Arc::new(FileStore { store, db })
});

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

#[tokio::test]
async fn spec_string_creates_the_file() {
    let db = TempDb::new();
    assert!(!db.0.exists());
    let s = store::connect(&db.spec()).await.unwrap();
    assert_eq!(s.name(), "sqlite");
    assert!(db.0.exists());
    let k = RecordKey::new("s", "a", "k");
    assert!(matches!(s.claim(&k, &fp(1), Duration::from_secs(5)).await.unwrap(), Claim::Acquired(_)));
    let bad = store::connect("sqlite:/nonexistent-dir/x/y.db").await;
    assert!(matches!(bad, Err(StoreError::Unavailable(_))), "{:?}", bad.err());
}

/// `?actor_max_bytes=` in the specification bounds each caller (and never reaches sqlx, which
/// would refuse it); a malformed size is a configuration error that names the parameter.
#[tokio::test]
async fn spec_string_sets_a_per_caller_bound() {
    let db = TempDb::new();
    let k = |actor: &str, k: &str| RecordKey::new("s", actor, k);
    let claim = store::quota::record_bytes(&k("a", "k1"), 0);
    let s = store::connect(&format!("{}?actor_max_bytes={claim}", db.spec())).await.unwrap();
    assert!(matches!(s.claim(&k("a", "k1"), &fp(1), Duration::from_secs(5)).await.unwrap(), Claim::Acquired(_)));
    let over = s.claim(&k("a", "k2"), &fp(1), Duration::from_secs(5)).await;
    assert!(matches!(over, Err(StoreError::QuotaExceeded { .. })), "{over:?}");
    assert!(matches!(s.claim(&k("b", "k2"), &fp(1), Duration::from_secs(5)).await.unwrap(), Claim::Acquired(_)));
    for bad in ["lots", "", "12XB"] {
        let Err(StoreError::Config(message)) = store::connect(&format!("{}?actor_max_bytes={bad}", db.spec())).await
        else {
            panic!("{bad} accepted")
        };
        assert!(message.contains("actor_max_bytes") && message.contains("not a size"), "{message}");
    }
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let db = TempDb::new();
    let s = FileStore::open(db.clone()).await;
    let far = 4_000_000_000_000i64;
    let rows = [
        ("bad-state", "X'".to_owned() + &"07".repeat(32) + "'", "'exploded'", "NULL"),
        ("short-fingerprint", "X'0707'".to_owned(), "'completed'", "NULL"),
        ("bad-response", "X'".to_owned() + &"07".repeat(32) + "'", "'completed'", "X'deadbeef'"),
        ("no-response", "X'".to_owned() + &"07".repeat(32) + "'", "'completed'", "NULL"),
        ("text-fingerprint", "'not bytes'".to_owned(), "'in_progress'", "NULL"),
    ];
    for (k, fpr, state, resp) in &rows {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO idempotency_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
             VALUES ('s', 'a', '{k}', {fpr}, {state}, 't', {resp}, {far}, 0)"
        )))
        .execute(s.store.pool())
        .await
        .unwrap();
    }
    let f = Fingerprint([7; 32]);
    for (k, ..) in &rows {
        let got = s.claim(&RecordKey::new("s", "a", *k), &f, Duration::from_secs(5)).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{k}: {got:?}");
    }
    // A garbage expiry is corrupt too; an expired garbage row is simply replaced.
    sqlx::query("INSERT INTO idempotency_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
             VALUES ('s', 'a', 'bad-expiry', X'00', 'x', NULL, NULL, 'soon', 0)")
        .execute(s.store.pool())
        .await
        .unwrap();
    let got = s.claim(&RecordKey::new("s", "a", "bad-expiry"), &f, Duration::from_secs(5)).await;
    assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
    sqlx::query("INSERT INTO idempotency_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
             VALUES ('s', 'a', 'old-garbage', X'00', 'x', NULL, X'00', 1, 0)")
        .execute(s.store.pool())
        .await
        .unwrap();
    let got = s.claim(&RecordKey::new("s", "a", "old-garbage"), &f, Duration::from_secs(5)).await;
    assert!(matches!(got, Ok(Claim::Acquired(_))), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_claim_and_completion_runs_again_once() {
    let db = TempDb::new();
    let k = RecordKey::new("payments.create", "acct_1", "crash");
    {
        let s = FileStore::open(db.clone()).await;
        let Claim::Acquired(_token) = s.claim(&k, &fp(1), Duration::from_millis(500)).await.unwrap() else {
            panic!("first claim")
        };
        // The process dies here: the store and the token are dropped without completing.
    }
    let s = FileStore::open(db.clone()).await;
    assert!(matches!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::InProgress { .. }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move { s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap() })
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Claim::Acquired(_)) {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);
}

#[tokio::test]
async fn sweeper_deletes_expired_records_and_custom_table_works() {
    let db = TempDb::new();
    let config = SqliteConfig::new().table("my_keys").sweep_interval(None);
    let s = SqliteStore::connect_with(&db.spec(), config.clone()).await.unwrap();
    assert!(SqliteStore::migration_sql(&config).contains("CREATE TABLE IF NOT EXISTS \"my_keys\""));
    for i in 0..1200 {
        let k = RecordKey::new("s", "a", format!("k{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(5)).await.unwrap() else { panic!() };
        let r = StoredResponse::new(200, Vec::<(&str, &str)>::new(), bytes::Bytes::from_static(b"x"));
        let ttl = if i < 1100 { Duration::from_millis(1) } else { Duration::from_secs(60) };
        s.complete(&k, &t, &r, ttl).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.sweep_expired().await.unwrap(), 1100);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM my_keys").fetch_one(s.pool()).await.unwrap();
    assert_eq!(left, 100);
}

fn paid() -> StoredResponse {
    StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from_static(b"paid"))
}

/// An application's own sqlx 0.9 pool, built with its own settings, is handed to the store as it
/// is (no conversion: `idempotent_core::sqlx` is the application's sqlx) and keeps serving the
/// application's own queries beside the store's.
#[tokio::test]
async fn store_on_the_applications_own_pool() {
    let db = TempDb::new();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.0)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    let pool: sqlx::SqlitePool =
        sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect_with(options).await.unwrap();
    let _same_type: &idempotent_core::sqlx::SqlitePool = &pool;
    let s = SqliteStore::from_pool(pool.clone(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    // The store runs on the application's pool and settings, not on a pool of its own.
    assert_eq!(s.pool().options().get_max_connections(), 2);

    let k = RecordKey::new("payments.create", "acct_1", "own-pool");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap() else { panic!("first claim") };
    s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));

    // The application's own work on the same pool: a transaction, then a query over its table and
    // the store's.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders (id, amount) VALUES (?1, ?2)")
        .bind(1_i64)
        .bind(100_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (state, amount): (String, i64) = sqlx::query_as(
        "SELECT r.state, o.amount FROM idempotency_records r, orders o WHERE r.idem_key = ?1 AND o.id = ?2",
    )
    .bind("own-pool")
    .bind(1_i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), amount), ("completed", 100));
    assert_eq!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
}

/// The sweeper deletes a completed record at the end of its time to live, and an in-progress
/// record only `ABANDONED_CLAIM_RETENTION` after its lease: until then its token can still
/// complete it.
#[tokio::test]
async fn sweeper_keeps_abandoned_claims_for_their_retention() {
    let db = TempDb::new();
    let s = SqliteStore::connect_with(&db.spec(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let retention = ABANDONED_CLAIM_RETENTION.as_millis() as i64;
    let rows = [
        ("slow", "in_progress", Some("t-slow"), now - retention + 60_000),
        ("abandoned", "in_progress", Some("t-gone"), now - retention - 60_000),
        ("done", "completed", None, now - 1_000),
        ("live", "completed", None, now + 3_600_000),
    ];
    for (k, state, token, expires_at) in rows {
        let response = (state == "completed").then(|| paid().encode());
        sqlx::query(
            "INSERT INTO idempotency_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
             VALUES ('payments.create', 'acct_1', ?1, ?2, ?3, ?4, ?5, ?6, 0)",
        )
        .bind(k)
        .bind(&fp(1).0[..])
        .bind(state)
        .bind(token)
        .bind(response)
        .bind(expires_at)
        .execute(s.pool())
        .await
        .unwrap();
    }
    assert_eq!(s.sweep_expired().await.unwrap(), 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT idem_key FROM idempotency_records ORDER BY idem_key")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(left, ["live", "slow"]);
    let k = |k: &str| RecordKey::new("payments.create", "acct_1", k);
    s.complete(&k("slow"), &ClaimToken("t-slow".into()), &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.claim(&k("slow"), &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
    let gone = s.renew(&k("abandoned"), &ClaimToken("t-gone".into()), Duration::from_secs(30)).await;
    assert!(matches!(gone, Err(StoreError::Fenced)), "{gone:?}");
}

/// An in-memory database lives as long as one connection to it: the store keeps its records
/// (and its table) while the pool closes every idle connection it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_database_outlives_the_pools_connections() {
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .idle_timeout(Duration::from_millis(100))
        .max_lifetime(Duration::from_millis(300))
        .connect_with(SqliteConnectOptions::from_str("sqlite::memory:").unwrap())
        .await
        .unwrap();
    let s = SqliteStore::from_pool(pool.clone(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let k = RecordKey::new("payments.create", "acct_1", "in-memory");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap() else { panic!() };
    s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
    for _ in 0..50 {
        if pool.size() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pool.size(), 0, "the pool closed all its connections");
    assert_eq!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
    let k2 = RecordKey::new("payments.create", "acct_1", "in-memory-2");
    assert!(matches!(s.claim(&k2, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Acquired(_)));
}

/// `PRAGMA synchronous` of a connection of the store's pool.
async fn synchronous_of(s: &SqliteStore) -> i64 {
    sqlx::query_scalar("PRAGMA synchronous").fetch_one(s.pool()).await.unwrap()
}

/// By default every commit waits for the disk (`synchronous = FULL`, 2): a completed record is
/// not lost to a power cut.
#[tokio::test]
async fn commits_are_durable_by_default() {
    let db = TempDb::new();
    let s = SqliteStore::connect(&db.spec()).await.unwrap();
    assert_eq!(synchronous_of(&s).await, 2, "synchronous = FULL");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(s.pool()).await.unwrap();
    assert_eq!(journal, "wal");
}

/// `SqliteConfig::synchronous` chooses speed over durability (`NORMAL`, 1) for those who want it.
#[tokio::test]
async fn synchronous_normal_on_request() {
    let db = TempDb::new();
    let config = SqliteConfig::new().synchronous(SqliteSynchronous::Normal);
    let s = SqliteStore::connect_with(&db.spec(), config).await.unwrap();
    assert_eq!(synchronous_of(&s).await, 1, "synchronous = NORMAL");
    let k = RecordKey::new("payments.create", "acct_1", "fast");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap() else { panic!() };
    s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
}

/// The system's clocks, with a wall clock the test steps and the boot the test names.
#[derive(Debug)]
struct TestClock {
    step_ms: AtomicI64,
    boot: String,
}

impl TestClock {
    fn new(boot: &str) -> Arc<Self> {
        Arc::new(Self { step_ms: AtomicI64::new(0), boot: boot.to_owned() })
    }

    fn step(&self, by: Duration) {
        self.step_ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl SqliteClock for TestClock {
    fn wall_ms(&self) -> i64 {
        SystemClock.wall_ms() + self.step_ms.load(Ordering::SeqCst)
    }
    fn boot_id(&self) -> Option<&str> {
        Some(&self.boot)
    }
    fn monotonic_ms(&self) -> i64 {
        SystemClock.monotonic_ms()
    }
}

async fn store_with_clock(db: &TempDb, clock: Arc<TestClock>) -> SqliteStore {
    let config = SqliteConfig::new().clock(clock).sweep_interval(None);
    SqliteStore::connect_with(&db.spec(), config).await.unwrap()
}

/// The wall clock steps an hour forward while a claim's lease (two seconds) is renewed on
/// schedule: retries racing it, before and after its next renewal, and the sweeper, never take
/// it over. Completed records keep their time to live on the wall clock, which the step shortens
/// by an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wall_clock_step_never_lets_a_retry_take_a_live_claim() {
    let db = TempDb::new();
    let clock = TestClock::new("boot-a");
    let s = store_with_clock(&db, clock.clone()).await;
    let lease = Duration::from_secs(2);
    let k = RecordKey::new("payments.create", "acct_1", "stepped");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), lease).await.unwrap() else { panic!("first claim") };
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (s, k, t, stop) = (s.clone(), k.clone(), t.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                s.renew(&k, &t, lease).await.expect("the live claim's renewal");
                tokio::time::sleep(lease / 6).await;
            }
        })
    };
    let (short, long) = (RecordKey::new("s", "a", "ttl-30min"), RecordKey::new("s", "a", "ttl-2h"));
    for (k, ttl) in [(&short, 1800), (&long, 7200)] {
        let Claim::Acquired(t) = s.claim(k, &fp(1), lease).await.unwrap() else { panic!() };
        s.complete(k, &t, &paid(), Duration::from_secs(ttl)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    clock.step(Duration::from_secs(3600));
    let until = std::time::Instant::now() + lease + lease / 4;
    let retries: Vec<_> = (0..4)
        .map(|i| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                while std::time::Instant::now() < until {
                    let claim = s.claim(&k, &fp(1), lease).await.unwrap();
                    assert!(matches!(claim, Claim::InProgress { .. }), "a retry after the step got {claim:?}");
                    answered += 1;
                    if i == 0 {
                        s.sweep_expired().await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answered
            })
        })
        .collect();
    let mut answered = 0;
    for r in retries {
        answered += r.await.unwrap();
    }
    assert!(answered > 20, "{answered} retries");
    stop.store(true, Ordering::SeqCst);
    renewer.await.unwrap();
    s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
    assert!(matches!(s.claim(&short, &fp(1), lease).await.unwrap(), Claim::Acquired(_)), "an hour off its 30 min");
    assert_eq!(s.claim(&long, &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
}

/// A lease written under another boot of the host has ended, however far its deadline is: the
/// process that held it is gone. The same request takes it over, another request under the key is
/// still a mismatch, and a lease of this boot is untouched.
#[tokio::test]
async fn a_lease_from_another_boot_has_ended() {
    let db = TempDb::new();
    let before = store_with_clock(&db, TestClock::new("boot-a")).await;
    let lease = Duration::from_secs(60);
    let k = RecordKey::new("payments.create", "acct_1", "rebooted");
    let Claim::Acquired(old) = before.claim(&k, &fp(1), lease).await.unwrap() else { panic!("first claim") };
    drop(before);
    let after = store_with_clock(&db, TestClock::new("boot-b")).await;
    assert_eq!(after.claim(&k, &fp(2), lease).await.unwrap(), Claim::Mismatch);
    let Claim::Acquired(new) = after.claim(&k, &fp(1), lease).await.unwrap() else { panic!("taken over") };
    assert!(matches!(after.renew(&k, &old, lease).await, Err(StoreError::Fenced)));
    assert!(matches!(after.claim(&k, &fp(1), lease).await.unwrap(), Claim::InProgress { .. }));
    after.complete(&k, &new, &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(after.claim(&k, &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
}

/// A database made before leases had a clock of their own (migration 1 only) is migrated in
/// place: its records are kept, and its claims in progress, which carry no lease clock, are judged
/// on the wall clock as they were written.
#[tokio::test]
async fn a_database_of_the_first_version_keeps_working() {
    let db = TempDb::new();
    let config = SqliteConfig::new().sweep_interval(None);
    {
        let options = SqliteConnectOptions::from_str(&db.spec()).unwrap().create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let (version, first) = SqliteStore::migrations(&config).remove(0);
        assert_eq!(version, 1);
        sqlx::raw_sql(AssertSqlSafe(first)).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE idempotency_records_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
             INSERT INTO idempotency_records_migrations VALUES (1, 0);",
        )
        .execute(&pool)
        .await
        .unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let rows = [
            ("live", "in_progress", Some("t-live"), None, now + 60_000),
            ("lapsed", "in_progress", Some("t-lapsed"), None, now - 1_000),
            ("done", "completed", Some("t-done"), Some(paid().encode()), now + 3_600_000),
        ];
        for (k, state, token, response, expires_at) in rows {
            sqlx::query(
                "INSERT INTO idempotency_records VALUES ('payments.create', 'acct_1', ?1, ?2, ?3, ?4, ?5, ?6, 0)",
            )
            .bind(k)
            .bind(&fp(1).0[..])
            .bind(state)
            .bind(token)
            .bind(response)
            .bind(expires_at)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }
    let s = SqliteStore::connect_with(&db.spec(), config).await.unwrap();
    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM idempotency_records_migrations")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(version, 3);
    let k = |k: &str| RecordKey::new("payments.create", "acct_1", k);
    let lease = Duration::from_secs(30);
    // Its rows count nothing towards their actor's bound; the records written now do.
    let bytes = |key: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT bytes FROM idempotency_records WHERE idem_key = ?1")
            .bind(key)
            .fetch_one(s.pool())
    };
    assert_eq!(bytes("done").await.unwrap(), 0);
    assert!(matches!(s.claim(&k("live"), &fp(1), lease).await.unwrap(), Claim::InProgress { .. }));
    assert!(matches!(s.claim(&k("lapsed"), &fp(1), lease).await.unwrap(), Claim::Acquired(_)));
    assert_eq!(s.claim(&k("done"), &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
    s.renew(&k("live"), &ClaimToken("t-live".into()), lease).await.unwrap();
    s.complete(&k("live"), &ClaimToken("t-live".into()), &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.claim(&k("live"), &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
    assert_eq!(bytes("live").await.unwrap() as usize, store::quota::record_bytes(&k("live"), paid().encode().len()));
    assert_eq!(bytes("lapsed").await.unwrap() as usize, store::quota::record_bytes(&k("lapsed"), 0));
    // A bound on the migrated database: the old completed row counts nothing, the live claims
    // their bytes.
    drop(s);
    let claim = store::quota::record_bytes(&k("x"), 0);
    let used =
        store::quota::record_bytes(&k("live"), paid().encode().len()) + store::quota::record_bytes(&k("lapsed"), 0);
    let bounded = SqliteConfig::new().sweep_interval(None).actor_max_bytes(Some(used + claim));
    let s = SqliteStore::connect_with(&db.spec(), bounded).await.unwrap();
    assert!(matches!(s.claim(&k("x"), &fp(1), lease).await.unwrap(), Claim::Acquired(_)));
    assert!(matches!(s.claim(&k("y"), &fp(1), lease).await, Err(StoreError::QuotaExceeded { .. })));
}

/// A transactional route's transaction holds SQLite's one writer: a claim of another process
/// (here another store on the file, whose renewals cannot wait that long) cannot renew its lease
/// meanwhile. When the transaction ends, committed or rolled back, it moves every lease that was
/// running when it took the writer on by the time it held it: a retry right after finds the claim
/// still in progress, with the lease it had, never lapsed.
async fn a_held_writer_moves_the_leases_it_held_up(commit: bool) {
    let db = TempDb::new();
    let holder = SqliteStore::connect_with(&db.spec(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let other = SqliteStore::connect_with(&db.spec(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let lease = Duration::from_millis(1000);
    let k = RecordKey::new("payments.create", "acct_1", "held-up");
    let Claim::Acquired(t) = other.claim(&k, &fp(1), lease).await.unwrap() else { panic!("first claim") };
    let own = RecordKey::new("deposits.create", "acct_1", "holder");
    let Claim::Acquired(own_token) = holder.claim(&own, &fp(1), Duration::from_secs(30)).await.unwrap() else {
        panic!()
    };
    let transaction = holder.transactions().expect("SQLite runs transactions").begin().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if commit {
        transaction.commit(&own, &own_token, &paid(), Duration::from_secs(3600)).await.unwrap();
    } else {
        transaction.rollback().await;
    }
    let Claim::InProgress { retry_after } = holder.claim(&k, &fp(1), lease).await.unwrap() else {
        panic!("the held-up claim lapsed")
    };
    assert!(retry_after > Duration::from_millis(500), "{retry_after:?} of its lease left");
    other.renew(&k, &t, lease).await.unwrap();
    other.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(holder.claim(&k, &fp(1), lease).await.unwrap(), Claim::Completed(paid()));
}

#[tokio::test]
async fn a_committed_transaction_moves_the_leases_it_held_up() {
    a_held_writer_moves_the_leases_it_held_up(true).await;
}

#[tokio::test]
async fn a_rolled_back_transaction_moves_the_leases_it_held_up() {
    a_held_writer_moves_the_leases_it_held_up(false).await;
}

/// A database that is full (here, capped by `max_page_count`) refuses the writes that need room,
/// each answered as unavailable, concurrent writes sharing a transaction included; once room is
/// made, the store writes again on the same pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_refuses_writes_then_recovers() {
    let db = TempDb::new();
    let options = SqliteConnectOptions::new()
        .filename(&db.0)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .pragma("max_page_count", "40");
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    let s = SqliteStore::from_pool(pool, SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let big = StoredResponse::new(201, [("content-type", "text/plain")], bytes::Bytes::from(vec![b'x'; 3000]));
    let (mut stored, mut refused) = (Vec::new(), 0);
    for round in 0..40 {
        let writes: Vec<_> = (0..8)
            .map(|i| {
                let (s, big) = (s.clone(), big.clone());
                tokio::spawn(async move {
                    let k = RecordKey::new("s", "a", format!("full-{round}-{i}"));
                    let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(30)).await? else {
                        panic!("a fresh key")
                    };
                    s.complete(&k, &t, &big, Duration::from_secs(3600)).await.map(|()| k)
                })
            })
            .collect();
        for w in writes {
            match w.await.unwrap() {
                Ok(k) => stored.push(k),
                Err(StoreError::Unavailable(_)) => refused += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "the database never filled");
    assert!(!stored.is_empty(), "nothing fitted");
    for k in &stored {
        assert_eq!(s.invalidate(k, Purge::Any).await.unwrap(), Invalidated::Deleted);
    }
    for i in 0..4 {
        let k = RecordKey::new("s", "a", format!("after-{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap() else {
            panic!("a fresh key")
        };
        s.complete(&k, &t, &paid(), Duration::from_secs(3600)).await.unwrap();
        assert_eq!(s.claim(&k, &fp(1), Duration::from_secs(30)).await.unwrap(), Claim::Completed(paid()));
    }
}

/// Completions that wait for the writer while another connection holds SQLite's write lock, then
/// go in batches, one of them by a token that never held its claim: that one is fenced, alone;
/// every other stores its own response. A write that finds the writer idle runs in its caller and
/// hands the writes queued meanwhile to the writer's task: each is answered either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_completion_in_a_batch_fails_alone() {
    let db = TempDb::new();
    let s = SqliteStore::connect_with(&db.spec(), SqliteConfig::new().sweep_interval(None)).await.unwrap();
    let key = |k: &str| RecordKey::new("s", "a", k);
    let mut holders = Vec::new();
    for i in 0..32 {
        let k = format!("c{i}");
        let Claim::Acquired(t) = s.claim(&key(&k), &fp(1), Duration::from_secs(30)).await.unwrap() else {
            panic!("a fresh key")
        };
        holders.push((k, t, true));
    }
    holders.insert(16, ("c16".into(), ClaimToken::generate(), false));

    let options = SqliteConnectOptions::new().filename(&db.0);
    let lock = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    let held = lock.begin_with("BEGIN IMMEDIATE").await.unwrap();
    let completions: Vec<_> = holders
        .into_iter()
        .map(|(k, t, holds)| {
            let s = s.clone();
            tokio::spawn(async move {
                let r = StoredResponse::new(201, [("content-type", "text/plain")], bytes::Bytes::from(k.clone()));
                (k.clone(), holds, r.clone(), s.complete(&key(&k), &t, &r, Duration::from_secs(3600)).await)
            })
        })
        .collect();
    // Let the completions queue behind the lock (however many did, each must get its own answer).
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.commit().await.unwrap();

    let (mut stored, mut fenced) = (0, 0);
    for task in completions {
        let (k, holds, r, answer) = task.await.unwrap();
        match (holds, answer) {
            (true, Ok(())) => {
                stored += 1;
                let Claim::Completed(got) = s.claim(&key(&k), &fp(1), Duration::from_secs(30)).await.unwrap() else {
                    panic!("{k} was not completed")
                };
                // `c16` was stored by its real holder; the fenced completion carried another body.
                assert_eq!(got, r, "{k}");
            }
            (false, Err(StoreError::Fenced)) => fenced += 1,
            other => panic!("{k}: unexpected {:?}", other.1),
        }
    }
    assert_eq!((stored, fenced), (32, 1));
}
