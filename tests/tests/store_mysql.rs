//! The MySQL store against a real MySQL or MariaDB server: the store contract (each test in its
//! own database), then what the dialect makes different: the key's digest (case, trailing spaces,
//! 255 characters), the interleavings the claim survives (held open with a lock of the test's
//! own), many concurrent claims of one key, deadlocks and lock wait timeouts run again, sessions
//! the store refuses; and the faults: an unreachable server, corrupt and foreign rows, pooled
//! connections killed, answers lost after the statement ran, a server that stays away; and the
//! sweeper, the migrations, an application's own pool, replays that write nothing.

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::transaction::TxDatabase;
use idempotent_core::store::{
    self, Claim, ClaimToken, MySqlConfig, MySqlStore, Purge, RecordKey, Store, StoreError, ABANDONED_CLAIM_RETENTION,
};
use idempotent_tests::mysql::{MyTestStore, TestDb};
use idempotent_tests::postgres::LossyProxy;
use sqlx::{AssertSqlSafe, Connection};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

idempotent_tests::store_contract_tests!(
    mysql,
    async {
        match TestDb::new().await {
            Some(db) => Some(db.store().await),
            None => None,
        }
    },
    reopen = |store: Arc<MyTestStore>| async move { store.reopen().await }
);

idempotent_tests::store_quota_tests!(mysql_actor_bound, |max_bytes: usize| async move {
    let db = TestDb::new().await?;
    Some(db.store_with(db.config().actor_max_bytes(Some(max_bytes))).await)
});

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn key(k: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_1", k)
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from_static(body))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record's primary key, as the store files it: `UNHEX(SHA2(<storage key>, 256))`.
fn key_hash_sql(k: &RecordKey) -> String {
    format!("UNHEX(SHA2(X'{}', 256))", hex(k.storage_key().as_bytes()))
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// Inserts a row written by the test (not by the store) for `k`.
async fn insert_row(
    db: &TestDb,
    k: &RecordKey,
    fingerprint: &str,
    state: &str,
    token: &str,
    response: &str,
    expires: &str,
) {
    db.execute(&format!(
        "INSERT INTO idempotency_records (key_hash, scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
         VALUES ({}, '{}', '{}', '{}', {fingerprint}, {state}, {token}, {response}, {expires}, UTC_TIMESTAMP(6))",
        key_hash_sql(k),
        k.scope,
        k.actor,
        k.key
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn unreachable_server_at_start_up_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    let config = MySqlConfig::new().acquire_timeout(Duration::from_secs(2));
    let err = MySqlStore::connect_with(&url, config).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store::connect(&url).await.err().expect("closed port");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("unavailable"), "{err}");
    let err = store::connect("mysql://user@host:notaport/db").await.err().expect("bad url");
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let err = store::connect("mariadb://user@127.0.0.1/db?ssl-mode=sometimes").await.err().expect("bad ssl-mode");
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

/// `mysql://` and `mariadb://` both open the store.
#[tokio::test]
async fn spec_strings_connect() {
    let Some(db) = TestDb::new().await else { return };
    for scheme in ["mysql", "mariadb"] {
        let url = db.url.replacen("mysql://", &format!("{scheme}://"), 1);
        let s = store::connect(&url).await.unwrap();
        assert_eq!(s.name(), "mysql");
        let k = RecordKey::new("spec", "a", uuid::Uuid::new_v4().to_string());
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("{scheme}") };
        s.release(&k, &t).await.unwrap();
    }
}

/// Names MySQL cannot take are refused before anything is created.
#[tokio::test]
async fn invalid_names_are_configuration_errors() {
    let Some(db) = TestDb::new().await else { return };
    for config in [db.config().table(""), db.config().table("t".repeat(54)), db.config().database("d".repeat(60))] {
        let err = MySqlStore::connect_with(&db.url, config).await.unwrap_err();
        assert!(matches!(&err, StoreError::Config(m) if m.contains("53 bytes")), "{err:?}");
    }
}

/// MySQL's default collations ignore case and trailing spaces, and an index of utf8mb4 text is
/// limited in bytes: keys differing only in case or a trailing space are different records, and
/// a 255-character key (in a long scope, under a non-ASCII actor) is stored and replayed.
#[tokio::test]
async fn keys_are_exact_and_long_keys_fit() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store().await;
    let long_scope = "scope.".repeat(50);
    let keys = [
        key("Order-1"),
        key("order-1"),
        key("order-1 "),
        RecordKey::new(long_scope.as_str(), "acteur_é_😀", "k".repeat(255)),
        RecordKey::new(long_scope.as_str(), "acteur_é_😀", format!("{}~", "k".repeat(254))),
    ];
    for (i, k) in keys.iter().enumerate() {
        let Claim::Acquired(t) = s.claim(k, &fp(i as u32), LEASE).await.unwrap() else { panic!("{k:?}") };
        let r = StoredResponse::new(200, Vec::<(&str, &str)>::new(), format!("{i}").into());
        s.complete(k, &t, &r, TTL).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        match s.claim(k, &fp(i as u32), LEASE).await.unwrap() {
            Claim::Completed(r) => assert_eq!(r.body, format!("{i}").into_bytes(), "{k:?}"),
            other => panic!("{k:?}: {other:?}"),
        }
    }
    // The raw parts are kept for operators, exactly.
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, idem_key FROM idempotency_records ORDER BY LENGTH(idem_key) DESC, idem_key")
            .fetch_all(s.store().pool())
            .await
            .unwrap();
    assert_eq!(stored.len(), keys.len());
    assert_eq!(stored[0].0, "acteur_é_😀");
    assert_eq!(stored[0].1.len(), 255);
}

#[tokio::test]
async fn corrupt_and_foreign_rows_are_errors_not_panics() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store().await;
    let good_fp = format!("X'{}'", "07".repeat(32));
    let rows = [
        ("bad-state", good_fp.clone(), "'exploded'", "NULL"),
        ("short-fingerprint", "X'0707'".to_owned(), "'completed'", "NULL"),
        ("bad-response", good_fp.clone(), "'completed'", "X'deadbeef'"),
        ("no-response", good_fp.clone(), "'completed'", "NULL"),
    ];
    for (k, f, state, resp) in &rows {
        let k = RecordKey::new("s", "a", *k);
        insert_row(&db, &k, f, state, "'t'", resp, "UTC_TIMESTAMP(6) + INTERVAL 1 HOUR").await;
    }
    let f = Fingerprint([7; 32]);
    for (k, ..) in &rows {
        let got = s.claim(&RecordKey::new("s", "a", *k), &f, LEASE).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{k}: {got:?}");
    }
    // An expired foreign row is treated as absent and replaced.
    let old = RecordKey::new("s", "a", "old");
    insert_row(&db, &old, "X'00'", "'whatever'", "NULL", "NULL", "UTC_TIMESTAMP(6) - INTERVAL 1 SECOND").await;
    assert!(matches!(s.claim(&old, &f, LEASE).await, Ok(Claim::Acquired(_))));
}

/// Opens `n` connections in the store's pool at once and gives them back: all idle.
async fn warm(pool: &sqlx::MySqlPool, n: u32) {
    let conns = futures_util::future::join_all((0..n).map(|_| pool.acquire())).await;
    drop(conns.into_iter().collect::<Result<Vec<_>, _>>().expect("warm-up connections"));
    for _ in 0..100 {
        if pool.num_idle() == n as usize {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool kept {} idle connections of {n}", pool.num_idle());
}

/// A server restart (here: every connection of the store's pool killed) leaves the pool full of
/// dead idle connections; each operation still succeeds on its first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connections_cost_no_failed_call() {
    let Some(db) = TestDb::new().await else { return };
    const N: u32 = 4;
    let s = db.store_with(db.config().max_connections(N).sweep_interval(None)).await;
    let pool = s.store().pool();
    let restart = || async {
        warm(pool, N).await;
        assert_eq!(db.kill_connections().await, N as usize, "every pooled connection killed");
    };
    let k = key("restarted");
    restart().await;
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.expect("claim after a restart") else {
        panic!("first claim")
    };
    restart().await;
    s.renew(&k, &t, LEASE).await.expect("renew after a restart");
    restart().await;
    s.complete(&k, &t, &response(b"done"), TTL).await.expect("complete after a restart");
    let k2 = key("restarted-release");
    let Claim::Acquired(t2) = s.claim(&k2, &fp(1), LEASE).await.unwrap() else { panic!("second claim") };
    restart().await;
    s.release(&k2, &t2).await.expect("release after a restart");
    restart().await;
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.expect("replay after a restart"), Claim::Completed(response(b"done")));
    restart().await;
    assert!(s.invalidate(&k2, Purge::Any).await.is_ok(), "invalidate after a restart");
    restart().await;
    s.health().await.expect("health after a restart");
}

/// The server's `host:port` in `url`.
fn upstream(url: &str) -> String {
    let options = sqlx::mysql::MySqlConnectOptions::from_str(url).unwrap();
    format!("{}:{}", options.get_host(), options.get_port())
}

/// A statement that ran and committed but whose answer was lost with its connection is run again
/// and answers what the first run would have: the claim is acquired (its own record, found by
/// its token), the completion and the release succeed (their work is found done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_recognised_when_run_again() {
    let Some(db) = TestDb::new().await else { return };
    let proxy = LossyProxy::start_at(upstream(&db.url)).await;
    let config = db.config().max_connections(1).sweep_interval(None);
    let s = MySqlStore::connect_with(&proxy.url(&db.url), config).await.unwrap();
    // Before each lost answer: run every statement on the pool's one connection (a lost one is
    // replaced by a new one), so that the next answer is the operation's own.
    let round = std::sync::atomic::AtomicU32::new(0);
    let (s, proxy, round) = (&s, &proxy, &round);
    // Loses the answer after `pass` answers.
    let lose = |pass: usize| async move {
        let n = round.fetch_add(1, Ordering::SeqCst);
        let (warm, done) = (key(&format!("warm-{n}")), key(&format!("warm-done-{n}")));
        let Claim::Acquired(w) = s.claim(&warm, &fp(1), LEASE).await.unwrap() else { panic!() };
        s.renew(&warm, &w, LEASE).await.unwrap();
        s.release(&warm, &w).await.unwrap();
        let Claim::Acquired(w) = s.claim(&done, &fp(1), LEASE).await.unwrap() else { panic!() };
        s.complete(&done, &w, &response(b"w"), TTL).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.lose_answer_after(pass);
    };

    // The claim's read loses its answer.
    let k = key("lost-claim");
    lose(0).await;
    let got = s.claim(&k, &fp(1), LEASE).await;
    assert!(!proxy.losing(), "the answer was lost");
    let Ok(Claim::Acquired(t)) = got else { panic!("a claim whose answer was lost: {got:?}") };
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));

    // The claim's insert (its second statement) loses its answer: it committed.
    let inserted = key("lost-insert");
    lose(1).await;
    let got = s.claim(&inserted, &fp(1), LEASE).await;
    assert!(!proxy.losing(), "the answer was lost");
    let Ok(Claim::Acquired(_)) = got else { panic!("a claim whose insert lost its answer: {got:?}") };
    assert!(matches!(s.claim(&inserted, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));

    // The takeover of an expired claim loses its answer: it committed.
    let expired = key("lost-takeover");
    let Claim::Acquired(_) = s.claim(&expired, &fp(1), Duration::from_millis(100)).await.unwrap() else { panic!() };
    tokio::time::sleep(Duration::from_millis(150)).await;
    lose(1).await;
    let got = s.claim(&expired, &fp(1), LEASE).await;
    assert!(!proxy.losing(), "the answer was lost");
    let Ok(Claim::Acquired(_)) = got else { panic!("a takeover that lost its answer: {got:?}") };
    assert!(matches!(s.claim(&expired, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));

    lose(0).await;
    s.complete(&k, &t, &response(b"once"), TTL).await.expect("a completion whose answer was lost");
    assert!(!proxy.losing(), "the answer was lost");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"once")));
    // Completing again (a call sent again by the caller itself) finds its own work done too.
    s.complete(&k, &t, &response(b"once"), TTL).await.expect("a completion sent again");

    let k2 = key("lost-release");
    let Claim::Acquired(t2) = s.claim(&k2, &fp(1), LEASE).await.unwrap() else { panic!() };
    lose(0).await;
    s.release(&k2, &t2).await.expect("a release whose answer was lost");
    assert!(!proxy.losing(), "the answer was lost");
    assert!(matches!(s.claim(&k2, &fp(2), LEASE).await.unwrap(), Claim::Acquired(_)), "released");
}

/// A lost connection is retried once only: a server that stays away is unavailable (503, fail
/// closed), and the store serves again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_away_is_unavailable_then_recovers() {
    let Some(db) = TestDb::new().await else { return };
    let proxy = LossyProxy::start_at(upstream(&db.url)).await;
    let config = db.config().max_connections(1).sweep_interval(None).acquire_timeout(Duration::from_millis(500));
    let s = MySqlStore::connect_with(&proxy.url(&db.url), config).await.unwrap();
    let k = key("lost");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.refuse(true);
    assert_eq!(db.kill_connections().await, 1);
    let first = s.claim(&k, &fp(1), LEASE).await;
    assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
    proxy.refuse(false);
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    s.complete(&k, &t, &response(b"after"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"after")));
}

/// `n` concurrent claims of `k` on `s`: (acquired, in progress); a failed claim panics.
async fn claim_together(s: &Arc<impl Store>, k: &RecordKey, n: usize) -> (usize, usize) {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (s, k, start) = (s.clone(), k.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                s.claim(&k, &fp(1), LEASE).await
            })
        })
        .collect();
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.unwrap().unwrap_or_else(|e| panic!("a claim failed: {e:?}")));
    }
    let acquired = claims.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
    let waiting = claims.iter().filter(|c| matches!(c, Claim::InProgress { .. })).count();
    (acquired, waiting)
}

/// 32 concurrent claims of one key on a pool of 16 connections, 40 times over with a fresh key
/// and 10 times with a key whose lease just expired: exactly one acquires each time, every other
/// answers in progress, none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_one_key_have_exactly_one_winner() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store_with(db.config().max_connections(16).sweep_interval(None)).await;
    for round in 0..40 {
        let k = key(&format!("hot-{round}"));
        assert_eq!(claim_together(&s, &k, 32).await, (1, 31), "fresh key, round {round}");
    }
    for round in 0..10 {
        let k = key(&format!("expired-{round}"));
        let Claim::Acquired(_) = s.claim(&k, &fp(1), Duration::from_millis(200)).await.unwrap() else { panic!() };
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(claim_together(&s, &k, 32).await, (1, 31), "expired lease, round {round}");
    }
}

/// Counts, on the thread that installs it, the store's log events whose message starts with a
/// prefix (the statements it ran again).
#[derive(Clone)]
struct Events {
    prefix: &'static str,
    seen: Arc<AtomicUsize>,
}

impl Events {
    /// Counts the deadlocks and lock wait timeouts the store ran again; the guard uninstalls.
    fn conflicts() -> (Self, tracing::subscriber::DefaultGuard) {
        let events =
            Self { prefix: "idempotency store: deadlock or lock wait timeout", seen: Arc::new(AtomicUsize::new(0)) };
        let guard = tracing::subscriber::set_default(events.clone());
        (events, guard)
    }

    fn take(&self) -> usize {
        self.seen.swap(0, Ordering::SeqCst)
    }
}

impl tracing::Subscriber for Events {
    fn register_callsite(&self, _: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && metadata.target().starts_with("idempotent_core")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.starts_with(self.prefix) {
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Waits until `n` statements of the store on the test's database have been running for more
/// than 200 ms: each touches one row by its primary key, so one that takes that long waits for
/// the test's lock. (InnoDB's `INNODB_TRX` would say so directly, but it is a cache that stays
/// stale while other tests keep reading it.) MariaDB's `PROCESSLIST` gives milliseconds, MySQL's
/// seconds.
async fn lock_waits(db: &TestDb, n: i64) {
    let mut c = db.connection().await;
    let waiting = |unit: &'static str| {
        format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST
             WHERE db = ? AND id <> CONNECTION_ID() AND command IN ('Query', 'Execute') AND info LIKE '%idempotency_records%' AND {unit}"
        )
    };
    let (mariadb, mysql) = (waiting("time_ms > 200"), waiting("time >= 1"));
    for _ in 0..200 {
        let count =
            match sqlx::query_scalar::<_, i64>(AssertSqlSafe(mariadb.clone())).bind(&db.name).fetch_one(&mut c).await {
                Ok(count) => count,
                Err(_) => {
                    sqlx::query_scalar(AssertSqlSafe(mysql.clone())).bind(&db.name).fetch_one(&mut c).await.unwrap()
                }
            };
        if count >= n {
            let _ = c.close().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT state, info FROM information_schema.PROCESSLIST WHERE db = ? AND id <> CONNECTION_ID()")
            .bind(&db.name)
            .fetch_all(&mut c)
            .await
            .unwrap();
    panic!("{n} statements never waited for the test's lock: {seen:?}");
}

/// A claim that read no row inserts, and meets another claim's insert of the key that has not
/// committed yet: it waits for it. Committed: the claim's insert fails on the duplicate key and
/// the claim reads the winner's row, in progress. Rolled back: the claim's insert goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleavings_an_insert_meets_an_uncommitted_insert() {
    let Some(db) = TestDb::new().await else { return };
    // No sweeper: its range delete would wait on the test's lock too.
    let s = Arc::new(db.store_with(db.config().sweep_interval(None)).await);
    for commit in [true, false] {
        let k = key(&format!("insert-race-{commit}"));
        let mut other = db.connection().await;
        sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
        let sql = format!(
            "INSERT INTO idempotency_records (key_hash, scope, actor, idem_key, fingerprint, state, token, expires_at, created_at)
             VALUES ({}, 's', 'a', 'k', X'{}', 'in_progress', 'other', UTC_TIMESTAMP(6) + INTERVAL 30 SECOND, UTC_TIMESTAMP(6))",
            key_hash_sql(&k),
            hex(&fp(1).0)
        );
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut other).await.unwrap();
        let claim = tokio::spawn({
            let (s, k) = (s.clone(), k.clone());
            async move { s.claim(&k, &fp(1), LEASE).await }
        });
        lock_waits(&db, 1).await;
        sqlx::raw_sql(if commit { "COMMIT" } else { "ROLLBACK" }).execute(&mut other).await.unwrap();
        let got = claim.await.unwrap().unwrap();
        if commit {
            assert!(matches!(got, Claim::InProgress { .. }), "the other insert committed: {got:?}");
        } else {
            assert!(matches!(got, Claim::Acquired(_)), "the other insert rolled back: {got:?}");
        }
    }
}

/// Two claims wait on an uncommitted insert of their key, which then rolls back: both take the
/// shared lock of their duplicate check and both want the row, a deadlock InnoDB breaks by
/// cancelling one (error 1213). The store runs it again: one claim acquires, the other reads it
/// in progress, neither fails.
///
/// On one thread (the runtime's), so that [`Events`] sees every event.
#[tokio::test]
async fn interleavings_a_deadlock_between_two_claims_is_run_again() {
    let Some(db) = TestDb::new().await else { return };
    // No sweeper: its range delete would wait on the test's lock too.
    let s = Arc::new(db.store_with(db.config().sweep_interval(None)).await);
    let (conflicts, _guard) = Events::conflicts();
    let mut deadlocks = 0;
    for round in 0..5 {
        let k = key(&format!("deadlock-{round}"));
        let mut other = db.connection().await;
        sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
        let sql = format!(
            "INSERT INTO idempotency_records (key_hash, scope, actor, idem_key, fingerprint, state, token, expires_at, created_at)
             VALUES ({}, 's', 'a', 'k', X'{}', 'in_progress', 'other', UTC_TIMESTAMP(6) + INTERVAL 30 SECOND, UTC_TIMESTAMP(6))",
            key_hash_sql(&k),
            hex(&fp(1).0)
        );
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut other).await.unwrap();
        let claims: Vec<_> = (0..2)
            .map(|_| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move { s.claim(&k, &fp(1), LEASE).await })
            })
            .collect();
        lock_waits(&db, 2).await;
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
        let mut answers = Vec::new();
        for c in claims {
            answers.push(c.await.unwrap().expect("a claim after a deadlock"));
        }
        let acquired = answers.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
        let waiting = answers.iter().filter(|c| matches!(c, Claim::InProgress { .. })).count();
        assert_eq!((acquired, waiting), (1, 1), "round {round}: {answers:?}");
        deadlocks += conflicts.take();
    }
    assert!(deadlocks > 0, "no deadlock happened in 5 rounds: the test proved nothing");
}

/// A takeover of an expired claim and the late worker's completion of it meet on the row's lock
/// (held by the test until both wait): whichever gets it second sees the first's result. Either
/// the takeover wins (acquired; the worker is fenced and the new claim is untouched) or the
/// completion does (stored; the claim answers the stored response). Run with the takeover
/// waiting first, then with the completion waiting first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleavings_a_takeover_and_a_late_completion_are_serialised() {
    let Some(db) = TestDb::new().await else { return };
    // No sweeper: its range delete would wait on the test's lock too.
    let s = Arc::new(db.store_with(db.config().sweep_interval(None)).await);
    let mut outcomes = Vec::new();
    for takeover_first in [true, false] {
        let k = key(&format!("takeover-{takeover_first}"));
        let Claim::Acquired(late) = s.claim(&k, &fp(1), Duration::from_millis(200)).await.unwrap() else { panic!() };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut holder = db.connection().await;
        sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
        let lock = format!("SELECT 1 FROM idempotency_records WHERE key_hash = {} FOR UPDATE", key_hash_sql(&k));
        sqlx::raw_sql(AssertSqlSafe(lock)).execute(&mut holder).await.unwrap();
        let takeover = {
            let (s, k) = (s.clone(), k.clone());
            async move { s.claim(&k, &fp(1), LEASE).await }
        };
        let completion = {
            let (s, k, late) = (s.clone(), k.clone(), late.clone());
            async move { s.complete(&k, &late, &response(b"late"), TTL).await }
        };
        let (claim, complete) = if takeover_first {
            let claim = tokio::spawn(takeover);
            lock_waits(&db, 1).await;
            let complete = tokio::spawn(completion);
            lock_waits(&db, 2).await;
            (claim, complete)
        } else {
            let complete = tokio::spawn(completion);
            lock_waits(&db, 1).await;
            let claim = tokio::spawn(takeover);
            lock_waits(&db, 2).await;
            (claim, complete)
        };
        sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
        let (claim, complete) = (claim.await.unwrap().unwrap(), complete.await.unwrap());
        match (&claim, &complete) {
            (Claim::Acquired(new), Err(StoreError::Fenced)) => {
                assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
                s.complete(&k, new, &response(b"new"), TTL).await.expect("the new claim is untouched");
                outcomes.push("takeover");
            }
            (Claim::Completed(r), Ok(())) => {
                assert_eq!(r, &response(b"late"));
                outcomes.push("completion");
            }
            other => panic!("takeover first {takeover_first}: inconsistent answers {other:?}"),
        }
    }
    println!("winners (takeover waiting first, then completion waiting first): {outcomes:?}");
}

/// A claim that read an expired row takes it over with a conditional update; the row is deleted
/// (an operator's `invalidate`, the sweeper) under it before the update runs: the update finds no
/// row, the claim reads again and inserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleavings_a_row_deleted_under_a_takeover() {
    let Some(db) = TestDb::new().await else { return };
    // No sweeper: its range delete would wait on the test's lock too.
    let s = Arc::new(db.store_with(db.config().sweep_interval(None)).await);
    let k = key("deleted-under");
    let Claim::Acquired(_) = s.claim(&k, &fp(1), Duration::from_millis(200)).await.unwrap() else { panic!() };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = db.connection().await;
    sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
    let delete = format!("DELETE FROM idempotency_records WHERE key_hash = {}", key_hash_sql(&k));
    assert_eq!(sqlx::raw_sql(AssertSqlSafe(delete)).execute(&mut other).await.unwrap().rows_affected(), 1);
    let claim = tokio::spawn({
        let (s, k) = (s.clone(), k.clone());
        async move { s.claim(&k, &fp(1), LEASE).await }
    });
    lock_waits(&db, 1).await;
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let Claim::Acquired(t) = claim.await.unwrap().unwrap() else { panic!("the claim after the delete") };
    s.complete(&k, &t, &response(b"after delete"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"after delete")));
}

/// An application pool whose sessions wait at most a second for a row lock: a renewal that
/// meets a row the test keeps locked times out (error 1205) and is run again; once the lock is
/// let go it succeeds. Held for good, the renewal fails closed after its five attempts,
/// unavailable, and nothing was written.
///
/// On one thread (the runtime's), so that [`Events`] sees every event.
#[tokio::test]
async fn lock_wait_timeouts_are_run_again_then_fail_closed() {
    let Some(db) = TestDb::new().await else { return };
    let app = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(
                async move { sqlx::raw_sql("SET SESSION innodb_lock_wait_timeout = 1").execute(conn).await.map(drop) },
            )
        })
        .connect(&db.url)
        .await
        .unwrap();
    let s = MySqlStore::from_pool(app, db.config().sweep_interval(None)).await.unwrap();
    let (conflicts, _guard) = Events::conflicts();
    let k = key("locked");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let lock = format!("SELECT 1 FROM idempotency_records WHERE key_hash = {} FOR UPDATE", key_hash_sql(&k));

    let mut holder = db.connection().await;
    sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(lock.clone())).execute(&mut holder).await.unwrap();
    let (renewed, ()) = tokio::join!(s.renew(&k, &t, LEASE), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    });
    renewed.expect("the renewal once the lock was let go");
    assert!(conflicts.take() >= 1, "the renewal never timed out waiting: the test proved nothing");

    sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(lock)).execute(&mut holder).await.unwrap();
    let started = std::time::Instant::now();
    let completed = s.complete(&k, &t, &response(b"blocked"), TTL).await;
    let waited = started.elapsed();
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    match &completed {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("1205"), "{msg}"),
        other => panic!("a completion that waited for good: {other:?}"),
    }
    assert_eq!(conflicts.take(), 4, "five attempts, four of them run again");
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }), "nothing was written");
    s.complete(&k, &t, &response(b"later"), TTL).await.expect("the token still holds the claim");
}

/// Sessions with autocommit off, or at READ UNCOMMITTED, are refused at start-up, each with a
/// message that says why; a pool whose sessions run SERIALIZABLE serves contention as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_the_store_cannot_work_with_are_refused() {
    let Some(db) = TestDb::new().await else { return };
    let pool = |setting: &'static str| {
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(16)
            .after_connect(move |conn, _| Box::pin(async move { sqlx::raw_sql(setting).execute(conn).await.map(drop) }))
            .connect(&db.url)
    };
    let refused = [
        ("SET SESSION autocommit = 0", "autocommit"),
        ("SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", "READ UNCOMMITTED"),
    ];
    for (setting, reason) in refused {
        let err = MySqlStore::from_pool(pool(setting).await.unwrap(), db.config()).await.unwrap_err();
        assert!(matches!(&err, StoreError::Config(m) if m.contains(reason)), "{setting}: {err:?}");
    }
    let serializable = pool("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE").await.unwrap();
    let s = Arc::new(MySqlStore::from_pool(serializable, db.config()).await.unwrap());
    for round in 0..5 {
        assert_eq!(claim_together(&s, &key(&format!("serializable-{round}")), 32).await, (1, 31));
    }
}

/// The sweeper deletes a completed record at the end of its time to live, and an in-progress
/// record only `ABANDONED_CLAIM_RETENTION` after its lease: until then its token can still
/// complete it.
#[tokio::test]
async fn sweeper_keeps_abandoned_claims_for_their_retention() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store_with(db.config().sweep_interval(None)).await;
    let f = format!("X'{}'", hex(&fp(1).0));
    let retention = ABANDONED_CLAIM_RETENTION.as_secs();
    let stored = format!("X'{}'", hex(&response(b"x").encode()));
    let rows = [
        (
            "slow",
            "'in_progress'",
            "'t-slow'",
            "NULL".to_owned(),
            format!("UTC_TIMESTAMP(6) - INTERVAL {} SECOND", retention - 60),
        ),
        (
            "abandoned",
            "'in_progress'",
            "'t-gone'",
            "NULL".to_owned(),
            format!("UTC_TIMESTAMP(6) - INTERVAL {} SECOND", retention + 60),
        ),
        ("done", "'completed'", "NULL", stored.clone(), "UTC_TIMESTAMP(6) - INTERVAL 1 SECOND".to_owned()),
        ("live", "'completed'", "NULL", stored, "UTC_TIMESTAMP(6) + INTERVAL 1 HOUR".to_owned()),
    ];
    for (k, state, token, resp, expires) in &rows {
        insert_row(&db, &key(k), &f, state, token, resp, expires).await;
    }
    assert_eq!(s.store().sweep_expired().await.unwrap(), 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT idem_key FROM idempotency_records ORDER BY idem_key")
        .fetch_all(s.store().pool())
        .await
        .unwrap();
    assert_eq!(left, ["live", "slow"]);
    s.complete(&key("slow"), &ClaimToken("t-slow".into()), &response(b"late"), TTL).await.unwrap();
    assert_eq!(s.claim(&key("slow"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"late")));
    let gone = s.renew(&key("abandoned"), &ClaimToken("t-gone".into()), LEASE).await;
    assert!(matches!(gone, Err(StoreError::Fenced)), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_deletes_expired_records_in_the_background() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store_with(db.config().sweep_batch(7)).await;
    for i in 0..30 {
        let k = key(&format!("k{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
        let ttl = if i < 25 { Duration::from_millis(1) } else { TTL };
        s.complete(&k, &t, &response(b"x"), ttl).await.unwrap();
    }
    let mut left = 30;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM idempotency_records")
            .fetch_one(s.store().pool())
            .await
            .unwrap();
        if left == 5 {
            break;
        }
    }
    assert_eq!(left, 5);
    assert_eq!(s.store().sweep_expired().await.unwrap(), 0);
}

/// A table made by the first version is migrated in place: its rows are kept and count nothing
/// towards their actor's bound, the rows written now count their bytes, and a bound applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_the_first_version_is_migrated() {
    let Some(db) = TestDb::new().await else { return };
    let config = db.config();
    let (version, first) = MySqlStore::migrations(&config).remove(0);
    assert_eq!(version, 1);
    db.execute(&first).await.unwrap();
    db.execute(
        "CREATE TABLE idempotency_records_migrations (version INT PRIMARY KEY, applied_at DATETIME(6) NOT NULL);
         INSERT INTO idempotency_records_migrations VALUES (1, UTC_TIMESTAMP(6))",
    )
    .await
    .unwrap();
    let old = key("old");
    let stored = format!("X'{}'", hex(&response(b"old").encode()));
    let expires = "UTC_TIMESTAMP(6) + INTERVAL 1 HOUR";
    insert_row(&db, &old, &format!("X'{}'", hex(&fp(1).0)), "'completed'", "'t-old'", &stored, expires).await;
    let claim = store::quota::record_bytes(&key("a"), 0);
    let s = db.store_with(config.actor_max_bytes(Some(2 * claim))).await;
    let pool = s.store().pool();
    let version: i32 =
        sqlx::query_scalar("SELECT MAX(version) FROM idempotency_records_migrations").fetch_one(pool).await.unwrap();
    assert_eq!(version, 2);
    assert_eq!(s.claim(&old, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"old")));
    let bytes = |k: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT bytes FROM idempotency_records WHERE idem_key = ?").bind(k).fetch_one(pool)
    };
    assert_eq!(bytes("old").await.unwrap(), 0);
    let Claim::Acquired(t) = s.claim(&key("a"), &fp(1), LEASE).await.unwrap() else { panic!() };
    assert_eq!(bytes("a").await.unwrap() as usize, claim);
    s.complete(&key("a"), &t, &response(b"a"), TTL).await.unwrap();
    assert_eq!(
        bytes("a").await.unwrap() as usize,
        store::quota::record_bytes(&key("a"), response(b"a").encode().len())
    );
    // The completed record now holds more than a claim: one more claim would cross the bound.
    assert!(matches!(s.claim(&key("b"), &fp(1), LEASE).await, Err(StoreError::QuotaExceeded { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_concurrent_safe_and_available_as_sql() {
    let Some(db) = TestDb::new().await else { return };
    let (a, b, c) = tokio::join!(db.store(), db.store(), db.store());
    let k = key("m");
    let Claim::Acquired(t) = a.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    assert!(matches!(b.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    c.release(&k, &t).await.unwrap();
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_records_migrations")
        .fetch_one(a.store().pool())
        .await
        .unwrap();
    assert_eq!(versions as usize, MySqlStore::migrations(&db.config()).len());
    // No migration left its named lock on a connection.
    let held: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK('idempotent-core migrations')")
        .fetch_one(a.store().pool())
        .await
        .unwrap();
    assert_eq!(held, None, "the migrations' lock is free");

    // In another database, created by the migration.
    let other = format!("{}_x", db.name);
    let s = db.store_with(db.config().database(&other)).await;
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("in {other}") };
    s.release(&k, &t).await.unwrap();
    db.execute(&format!("DROP DATABASE `{other}`")).await.unwrap();

    // Managed by hand: the SQL creates what the store needs; the store then creates nothing.
    let config = db.config().table("by_hand").migrate(false);
    let sql = MySqlStore::migration_sql(&config);
    assert!(sql.contains(&format!("`{}`.`by_hand`", db.name)), "{sql}");
    db.execute(&sql).await.unwrap();
    // Version 1 is idempotent; later versions (columns added) run once.
    db.execute(&MySqlStore::migrations(&config)[0].1).await.unwrap();
    let s = db.store_with(config).await;
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    s.complete(&k, &t, &response(b"hand"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"hand")));
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE table_schema = ? AND table_name LIKE 'by_hand%'",
    )
    .bind(&db.name)
    .fetch_one(s.store().pool())
    .await
    .unwrap();
    assert_eq!(tables, 1, "no migrations table for a store that does not migrate");
}

/// An application's own sqlx 0.9 pool, built with its own settings, is handed to the store as it
/// is (no conversion: `idempotent_core::sqlx` is the application's sqlx) and keeps serving the
/// application's own queries beside the store's.
#[tokio::test]
async fn store_on_the_applications_own_pool() {
    let Some(db) = TestDb::new().await else { return };
    let pool: sqlx::MySqlPool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.url)
        .await
        .unwrap();
    let _same_type: &idempotent_core::sqlx::MySqlPool = &pool;
    // Unqualified: the table goes in the connection's database.
    let s = MySqlStore::from_pool(pool.clone(), MySqlConfig::new()).await.unwrap();
    assert_eq!(s.pool().options().get_max_connections(), 3);

    let k = key("own-pool");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("first claim") };
    s.complete(&k, &t, &response(b"paid"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"paid")));

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)").execute(&mut *tx).await.unwrap();
    sqlx::query("INSERT INTO orders (id, amount) VALUES (?, ?)")
        .bind(1_i64)
        .bind(100_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (state, amount): (String, i64) = sqlx::query_as(
        "SELECT r.state, o.amount FROM idempotency_records r, orders o WHERE r.idem_key = ? AND o.id = ?",
    )
    .bind("own-pool")
    .bind(1_i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), amount), ("completed", 100));
}

/// Replays, mismatches and in-progress answers are a read: no row written, none inserted (a
/// trigger on the table counts every write).
#[tokio::test]
async fn answers_from_a_live_row_write_nothing() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store_with(db.config().sweep_interval(None)).await;
    db.execute(
        "CREATE TABLE writes (n INT NOT NULL);
         CREATE TRIGGER count_updates AFTER UPDATE ON idempotency_records FOR EACH ROW INSERT INTO writes VALUES (1);
         CREATE TRIGGER count_inserts BEFORE INSERT ON idempotency_records FOR EACH ROW INSERT INTO writes VALUES (1);",
    )
    .await
    .unwrap();
    let writes = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM writes").fetch_one(s.store().pool()).await.unwrap()
    };
    let k = key("quiet");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let before = writes().await;
    assert_eq!(before, 1, "the claim's insert is counted");
    for _ in 0..5 {
        assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
        assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    }
    assert_eq!(writes().await, before);
    s.complete(&k, &t, &response(b"done"), TTL).await.unwrap();
    let before = writes().await;
    assert_eq!(before, 2, "the completion's update is counted");
    for _ in 0..5 {
        assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"done")));
    }
    assert_eq!(writes().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_claim_and_completion_runs_again_once() {
    let Some(db) = TestDb::new().await else { return };
    let k = key("crash");
    {
        let s = db.store().await;
        let Claim::Acquired(_token) = s.claim(&k, &fp(1), Duration::from_millis(500)).await.unwrap() else {
            panic!("first claim")
        };
        // The process dies here: store and token dropped without completing or releasing.
    }
    let s = db.store().await;
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(claim_together(&s, &k, 20).await, (1, 19));
}

/// `UTC_TIMESTAMP(6)`, the store's clock, is the time of the statement that reads it, not of its
/// transaction's start: what a transactional completion relies on to count its time to live from
/// the commit.
#[tokio::test]
async fn the_server_clock_is_the_statement_s_not_the_transaction_s() {
    let Some(db) = TestDb::new().await else { return };
    let mut c = db.connection().await;
    let mut tx = c.begin().await.unwrap();
    let first: i64 = sqlx::query_scalar("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6))")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second: i64 = sqlx::query_scalar("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6))")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(second - first >= 250_000, "UTC_TIMESTAMP(6) moved {} µs in 300 ms of one transaction", second - first);
}

/// A transactional route's completion counts its time to live from the completion, not from the
/// start of the transaction: a handler that ran 1.5 s, with a time to live of 1 s, is replayed
/// right after it commits (counted from the transaction's start, the record would be dead on
/// arrival and the next claim would run the handler again).
#[tokio::test]
async fn a_transactional_completion_counts_its_ttl_from_the_commit() {
    let Some(db) = TestDb::new().await else { return };
    let s = db.store_with(db.config().sweep_interval(None)).await;
    let k = key("tx-clock");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let tx = s.store().transactions().expect("a transactional store").begin().await.unwrap();
    {
        let mut guard = <sqlx::MySql as TxDatabase>::lock(tx.as_ref()).await.unwrap();
        let _: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_records").fetch_one(&mut **guard).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.commit(&k, &t, &response(b"slow handler"), Duration::from_secs(1)).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"slow handler")));
    let info = s.inspect(&k).await.unwrap().expect("the completed record");
    assert!(info.expires_at > std::time::SystemTime::now() + Duration::from_millis(300), "{info:?}");
}

/// MariaDB's `innodb_snapshot_isolation` (on by default from 11.6) refuses a locking write of a
/// row changed after the transaction's snapshot, and a renewal changes the record's row while the
/// handler runs: the transactional completion is exempt and commits. Shown first on a transaction
/// of the test's own: a plain update of the renewed row fails (error 1020). Not applicable to a
/// server without the variable (MySQL, MariaDB before 10.6.18), which says so.
#[tokio::test]
async fn a_transactional_completion_after_a_renewal_commits_under_snapshot_isolation() {
    let Some(db) = TestDb::new().await else { return };
    let mut probe = db.connection().await;
    if sqlx::raw_sql("SET SESSION innodb_snapshot_isolation = ON").execute(&mut probe).await.is_err() {
        eprintln!("not applicable: the server has no innodb_snapshot_isolation");
        return;
    }
    let app = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql("SET SESSION innodb_snapshot_isolation = ON").execute(conn).await.map(drop)
            })
        })
        .connect(&db.url)
        .await
        .unwrap();
    let s = MySqlStore::from_pool(app, db.config().sweep_interval(None)).await.unwrap();
    let snapshot = "SELECT COUNT(*) FROM idempotency_records";

    // The setting bites: a transaction that read, then meets the renewed row, is refused.
    let k = key("snapshot-proof");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let mut proof = probe.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar(snapshot).fetch_one(&mut *proof).await.unwrap();
    s.renew(&k, &t, LEASE).await.unwrap();
    let refused = sqlx::raw_sql(AssertSqlSafe(format!(
        "UPDATE idempotency_records SET state = state WHERE key_hash = {}",
        key_hash_sql(&k)
    )))
    .execute(&mut *proof)
    .await
    .expect_err("a locking write of a row changed after the snapshot");
    assert!(refused.to_string().contains("1020"), "{refused}");
    drop(proof);

    // The route's transaction: read, a renewal meanwhile, then the completion commits.
    let k = key("snapshot-route");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let tx = s.transactions().expect("a transactional store").begin().await.unwrap();
    {
        let mut guard = <sqlx::MySql as TxDatabase>::lock(tx.as_ref()).await.unwrap();
        let _: i64 = sqlx::query_scalar(snapshot).fetch_one(&mut **guard).await.unwrap();
    }
    s.renew(&k, &t, LEASE).await.unwrap();
    tx.commit(&k, &t, &response(b"committed"), TTL).await.expect("the completion after a renewal");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"committed")));
}
