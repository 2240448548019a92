//! The PostgreSQL store against a real server: the store contract (each test in its own schema),
//! then the faults: an unreachable server at start-up, corrupt and foreign rows, pooled
//! connections killed (as by a restart), answers lost after the statement ran, a server that stays
//! away, a process that dies between claim and completion, roles whose sessions default to
//! `SERIALIZABLE`; and the properties of the claim statement (replays write nothing), migrations
//! and the sweeper (abandoned claims kept for their retention).

use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{
    self, Claim, ClaimToken, PostgresConfig, PostgresStore, RecordKey, Store, StoreError, ABANDONED_CLAIM_RETENTION,
};
use idempotent_tests::postgres::{LossyProxy, PgTestStore, TestRole, TestSchema};
use sqlx::AssertSqlSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

idempotent_tests::store_contract_tests!(
    postgres,
    async {
        match TestSchema::new().await {
            Some(schema) => Some(schema.store().await),
            None => None,
        }
    },
    reopen = |store: Arc<PgTestStore>| async move { store.reopen().await }
);

idempotent_tests::store_quota_tests!(postgres_actor_bound, |max_bytes: usize| async move {
    let schema = TestSchema::new().await?;
    Some(schema.store_with(schema.config().actor_max_bytes(Some(max_bytes))).await)
});

// The same contract with group commit off (it is on by default): each claim and each completion
// is a statement of its own.
idempotent_tests::store_contract_tests!(
    postgres_one_statement_per_write,
    async {
        match TestSchema::new().await {
            Some(schema) => Some(schema.store_with(schema.config().group_commit(1)).await),
            None => None,
        }
    },
    reopen = |store: Arc<PgTestStore>| async move { store.reopen().await }
);

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn key(k: &str) -> RecordKey {
    RecordKey::new("payments.create", "acct_1", k)
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from_static(body))
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn unreachable_server_at_start_up_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let config = PostgresConfig::new().acquire_timeout(Duration::from_secs(2));
    let err = PostgresStore::connect_with(&url, config).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store::connect(&url).await.err().expect("closed port");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("unavailable"), "{err}");
    let err = store::connect("postgres://user@host:notaport/db").await.err().expect("bad url");
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn spec_string_connects() {
    let Some(url) = idempotent_tests::postgres::database_url().await else { return };
    let s = store::connect(&url).await.unwrap();
    assert_eq!(s.name(), "postgres");
    let k = RecordKey::new("spec", "a", uuid::Uuid::new_v4().to_string());
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    s.release(&k, &t).await.unwrap();
}

#[tokio::test]
async fn corrupt_and_foreign_rows_are_errors_not_panics() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store().await;
    let table = format!("\"{}\".idempotency_records", schema.name);
    let good_fp = format!("'\\x{}'", "07".repeat(32));
    let rows = [
        ("bad-state", good_fp.clone(), "'exploded'", "NULL"),
        ("short-fingerprint", "'\\x0707'".to_owned(), "'completed'", "NULL"),
        ("bad-response", good_fp.clone(), "'completed'", "'\\xdeadbeef'"),
        ("no-response", good_fp.clone(), "'completed'", "NULL"),
    ];
    for (k, f, state, resp) in &rows {
        schema
            .execute(&format!(
                "INSERT INTO {table} (scope, actor, idem_key, fingerprint, state, token, response, expires_at)
                 VALUES ('s', 'a', '{k}', {f}, {state}, 't', {resp}, now() + interval '1 hour')"
            ))
            .await
            .unwrap();
    }
    let f = Fingerprint([7; 32]);
    for (k, ..) in &rows {
        let got = s.claim(&RecordKey::new("s", "a", *k), &f, LEASE).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{k}: {got:?}");
    }
    // An expired foreign row is treated as absent and replaced.
    schema
        .execute(&format!(
            "INSERT INTO {table} (scope, actor, idem_key, fingerprint, state, expires_at)
             VALUES ('s', 'a', 'old', '\\x00', 'whatever', now() - interval '1 second')"
        ))
        .await
        .unwrap();
    assert!(matches!(s.claim(&RecordKey::new("s", "a", "old"), &f, LEASE).await, Ok(Claim::Acquired(_))));
}

/// Opens `n` connections in the store's pool at once and gives them back: all idle, as in a
/// pool that served a burst of requests.
async fn warm(pool: &sqlx::PgPool, n: u32) {
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

/// A server restart (here: every backend of the store's pool terminated) leaves the pool full of
/// dead idle connections; each operation still succeeds on its first call, without a ping per
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connections_cost_no_failed_call() {
    let Some(schema) = TestSchema::new().await else { return };
    const N: u32 = 4;
    let s = schema.store_with(schema.config().max_connections(N).sweep_interval(None)).await;
    let pool = s.store().pool();
    let restart = || async {
        warm(pool, N).await;
        assert_eq!(schema.kill_backends(&schema.name).await, N as usize, "every pooled connection killed");
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
    assert!(matches!(s.claim(&k2, &fp(1), LEASE).await.unwrap(), Claim::Acquired(_)), "released");
}

/// A statement that ran and committed but whose answer was lost with its connection is run again
/// and answers what the first run would have: the claim is acquired (its own record, found by
/// its token), the completion and the release succeed (their work is found done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_recognised_when_run_again() {
    let Some(schema) = TestSchema::new().await else { return };
    let proxy = LossyProxy::start(&schema.url).await;
    let config = schema.config().max_connections(1).sweep_interval(None);
    let s = PostgresStore::connect_with(&proxy.url(&schema.url), config).await.unwrap();
    // Before each lost answer: prepare every statement on the pool's one connection (a
    // connection that was lost is replaced by a new one), then let sqlx's background check of the
    // connection (after each use) finish, so that the next answer is the operation's own.
    let round = std::sync::atomic::AtomicU32::new(0);
    let lose = || async {
        let n = round.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (warm, done) = (key(&format!("warm-{n}")), key(&format!("warm-done-{n}")));
        let Claim::Acquired(w) = s.claim(&warm, &fp(1), LEASE).await.unwrap() else { panic!() };
        s.renew(&warm, &w, LEASE).await.unwrap();
        s.release(&warm, &w).await.unwrap();
        let Claim::Acquired(w) = s.claim(&done, &fp(1), LEASE).await.unwrap() else { panic!() };
        s.complete(&done, &w, &response(b"w"), TTL).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.lose_next_answer();
    };

    let k = key("lost-claim");
    lose().await;
    let got = s.claim(&k, &fp(1), LEASE).await;
    assert!(!proxy.losing(), "the answer was lost");
    let Ok(Claim::Acquired(t)) = got else { panic!("a claim whose answer was lost: {got:?}") };
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));

    lose().await;
    s.complete(&k, &t, &response(b"once"), TTL).await.expect("a completion whose answer was lost");
    assert!(!proxy.losing(), "the answer was lost");
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"once")));
    // Completing again (a call sent again by the caller itself) finds its own work done too.
    s.complete(&k, &t, &response(b"once"), TTL).await.expect("a completion sent again");

    let k2 = key("lost-release");
    let Claim::Acquired(t2) = s.claim(&k2, &fp(1), LEASE).await.unwrap() else { panic!() };
    lose().await;
    s.release(&k2, &t2).await.expect("a release whose answer was lost");
    assert!(!proxy.losing(), "the answer was lost");
    assert!(matches!(s.claim(&k2, &fp(2), LEASE).await.unwrap(), Claim::Acquired(_)), "released");
}

/// A lost connection is retried once only: a server that stays away is unavailable (503, fail
/// closed), and the store serves again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_away_is_unavailable_then_recovers() {
    let Some(schema) = TestSchema::new().await else { return };
    let proxy = LossyProxy::start(&schema.url).await;
    let config = schema.config().max_connections(1).sweep_interval(None).acquire_timeout(Duration::from_millis(500));
    let s = PostgresStore::connect_with(&proxy.url(&schema.url), config).await.unwrap();
    let k = key("lost");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.refuse(true);
    assert_eq!(schema.kill_backends(&schema.name).await, 1);
    let first = s.claim(&k, &fp(1), LEASE).await;
    assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
    proxy.refuse(false);
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    s.complete(&k, &t, &response(b"after"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"after")));
}

/// 100 concurrent claims of one fresh key, then of one key whose lease expired: exactly one
/// acquires, every other answers in progress, none fails.
async fn contend(s: &Arc<impl Store>, label: &str) {
    let claim_all = |k: RecordKey| async move {
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move { s.claim(&k, &fp(1), LEASE).await })
            })
            .collect();
        let mut claims = Vec::new();
        for t in tasks {
            claims.push(t.await.unwrap().unwrap_or_else(|e| panic!("{label}: a claim failed: {e:?}")));
        }
        let acquired = claims.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
        let waiting = claims.iter().filter(|c| matches!(c, Claim::InProgress { .. })).count();
        assert_eq!((acquired, waiting), (1, 99), "{label}: {claims:?}");
    };
    claim_all(key(&format!("{label}-fresh"))).await;
    let k = key(&format!("{label}-expired"));
    let Claim::Acquired(_crashed) = s.claim(&k, &fp(1), Duration::from_millis(300)).await.unwrap() else { panic!() };
    tokio::time::sleep(Duration::from_millis(450)).await;
    claim_all(k).await;
}

/// Counts, on the thread that installs it, the store's events whose message starts with a prefix.
#[derive(Clone)]
struct Events {
    prefix: &'static str,
    seen: Arc<std::sync::atomic::AtomicUsize>,
}

impl Events {
    /// Counts the serialization failures and deadlocks the store ran again; the guard uninstalls.
    fn conflicts() -> (Self, tracing::subscriber::DefaultGuard) {
        let events = Self {
            prefix: "idempotency store: serialization failure",
            seen: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let guard = tracing::subscriber::set_default(events.clone());
        (events, guard)
    }

    fn take(&self) -> usize {
        self.seen.swap(0, std::sync::atomic::Ordering::SeqCst)
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
            self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A role whose sessions default to SERIALIZABLE (as a server or database default would): the
/// store's own pool runs READ COMMITTED anyway, and on an application's pool of that role each
/// statement runs in a READ COMMITTED transaction of its own; contention is never an error, nor
/// even a serialization failure to run again.
///
/// On one thread (the runtime's), so that [`Events`] sees every event; the server still runs
/// the pool's connections concurrently.
#[tokio::test]
async fn serializable_by_default_is_no_error_under_contention() {
    let Some(schema) = TestSchema::new().await else { return };
    let role = TestRole::new(&schema).await;
    role.set_default_isolation("serializable").await;
    let (conflicts, _guard) = Events::conflicts();
    let isolation = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>("SHOW transaction_isolation").fetch_one(&pool).await.unwrap()
    };
    {
        let app: sqlx::PgPool =
            sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&role.url).await.unwrap();
        assert_eq!(isolation(app).await, "serializable", "the role's sessions default to SERIALIZABLE");
    }

    let own = PostgresStore::connect_with(&role.url, schema.config()).await.unwrap();
    assert_eq!(isolation(own.pool().clone()).await, "read committed", "the store's own sessions");
    contend(&Arc::new(own), "own-pool").await;
    assert_eq!(conflicts.take(), 0, "serialization failures on the store's own pool");

    let app: sqlx::PgPool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&role.url)
        .await
        .unwrap();
    let on_app = PostgresStore::from_pool(app.clone(), schema.config()).await.unwrap();
    contend(&Arc::new(on_app), "application-pool").await;
    assert_eq!(conflicts.take(), 0, "serialization failures on the application's pool");
    assert_eq!(isolation(app).await, "serializable", "the application's sessions are left as they are");
}

/// Sessions whose default becomes SERIALIZABLE after the store started (a role altered later):
/// the store, which found READ COMMITTED, runs statements as they are; the serialization failures
/// that contention then causes are run again, and no claim fails.
#[tokio::test]
async fn serialization_failures_are_retried() {
    let Some(schema) = TestSchema::new().await else { return };
    let role = TestRole::new(&schema).await;
    let (conflicts, _guard) = Events::conflicts();
    let app: sqlx::PgPool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&role.url)
        .await
        .unwrap();
    let s = Arc::new(PostgresStore::from_pool(app.clone(), schema.config()).await.unwrap());
    role.set_default_isolation("serializable").await;
    // Replace the pool's READ COMMITTED connection with new ones, which are SERIALIZABLE.
    let conns = futures_util::future::join_all((0..10).map(|_| app.acquire())).await;
    for conn in conns {
        let mut conn = conn.unwrap();
        let level: String = sqlx::query_scalar("SHOW transaction_isolation").fetch_one(&mut *conn).await.unwrap();
        if level != "serializable" {
            drop(conn.detach());
        }
    }
    // Whether the statements overlap is the scheduler's doing: on a busy machine three rounds
    // can pass without a conflict, so more rounds run until one has happened.
    let mut seen = 0;
    for round in 0..12 {
        contend(&s, &format!("altered-role-{round}")).await;
        seen += conflicts.take();
        if round >= 2 && seen > 0 {
            break;
        }
    }
    assert!(seen > 0, "no serialization failure happened in 12 rounds: the test proved nothing");
}

/// The sweeper deletes a completed record at the end of its time to live, and an in-progress
/// record only `ABANDONED_CLAIM_RETENTION` after its lease: until then its token can still
/// complete it.
#[tokio::test]
async fn sweeper_keeps_abandoned_claims_for_their_retention() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store_with(schema.config().sweep_interval(None)).await;
    let table = format!("\"{}\".idempotency_records", schema.name);
    let f = format!("'\\x{}'", hex(&fp(1).0));
    let retention = ABANDONED_CLAIM_RETENTION.as_secs();
    let rows = [
        ("slow", "'in_progress'", "'t-slow'", format!("now() - interval '{} seconds'", retention - 60)),
        ("abandoned", "'in_progress'", "'t-gone'", format!("now() - interval '{} seconds'", retention + 60)),
        ("done", "'completed'", "NULL", "now() - interval '1 second'".to_owned()),
        ("live", "'completed'", "NULL", "now() + interval '1 hour'".to_owned()),
    ];
    for (k, state, token, expires) in &rows {
        let resp =
            if *state == "'completed'" { format!("'\\x{}'", hex(&response(b"x").encode())) } else { "NULL".into() };
        schema
            .execute(&format!(
                "INSERT INTO {table} (scope, actor, idem_key, fingerprint, state, token, response, expires_at)
                 VALUES ('payments.create', 'acct_1', '{k}', {f}, {state}, {token}, {resp}, {expires})"
            ))
            .await
            .unwrap();
    }
    assert_eq!(s.store().sweep_expired().await.unwrap(), 2);
    let left: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT idem_key FROM {table} ORDER BY idem_key")))
            .fetch_all(s.store().pool())
            .await
            .unwrap();
    assert_eq!(left, ["live", "slow"]);
    s.complete(&key("slow"), &ClaimToken("t-slow".into()), &response(b"late"), TTL).await.unwrap();
    assert_eq!(s.claim(&key("slow"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"late")));
    let gone = s.renew(&key("abandoned"), &ClaimToken("t-gone".into()), LEASE).await;
    assert!(matches!(gone, Err(StoreError::Fenced)), "{gone:?}");
}

/// Prints what a READ COMMITTED transaction per statement costs (the store on an application's
/// pool whose sessions default to a stricter isolation) beside plain statements: first
/// executions (claim, then completion) per second, one caller, then 16 concurrent callers.
///
/// `cargo test -p idempotent-tests --test store_postgres -- --ignored --nocapture cost_of_read_committed`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures, asserts nothing"]
async fn cost_of_read_committed_transactions() {
    let Some(schema) = TestSchema::new().await else { return };
    let role = TestRole::new(&schema).await;
    role.set_default_isolation("serializable").await;
    let plain = PostgresStore::connect_with(&schema.url, schema.config().sweep_interval(None)).await.unwrap();
    let app = sqlx::postgres::PgPoolOptions::new().max_connections(10).connect(&role.url).await.unwrap();
    let wrapped = PostgresStore::from_pool(app, schema.config().sweep_interval(None)).await.unwrap();
    const N: usize = 1000;
    let run = |s: PostgresStore, label: &'static str, callers: usize| async move {
        let first = move || {
            let s = s.clone();
            async move {
                let k = key(&format!("{label}-{callers}-{}", uuid::Uuid::new_v4().simple()));
                let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
                s.complete(&k, &t, &response(b"x"), TTL).await.unwrap();
            }
        };
        for _ in 0..50 {
            first().await;
        }
        let start = std::time::Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (next, first) = (next.clone(), first.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                        first().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        N as f64 / start.elapsed().as_secs_f64()
    };
    println!("first executions per second (claim + completion), {N} each, best of 3 alternating runs:");
    for callers in [1, 16] {
        let (mut a, mut b) = (0f64, 0f64);
        for _ in 0..3 {
            a = a.max(run(plain.clone(), "plain", callers).await);
            b = b.max(run(wrapped.clone(), "wrapped", callers).await);
        }
        println!(
            "  {callers:>2} caller(s): plain statements {a:>7.0}/s, READ COMMITTED transaction each {b:>7.0}/s ({:.2}x the time)",
            a / b
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_claim_and_completion_runs_again_once() {
    let Some(schema) = TestSchema::new().await else { return };
    let k = key("crash");
    {
        let s = schema.store().await;
        let Claim::Acquired(_token) = s.claim(&k, &fp(1), Duration::from_millis(500)).await.unwrap() else {
            panic!("first claim")
        };
        // The process dies here: store and token dropped without completing or releasing.
    }
    let s = schema.store().await;
    assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move { s.claim(&k, &fp(1), LEASE).await.unwrap() })
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

/// Replays, mismatches and in-progress answers leave the row untouched: no new tuple version, no
/// row lock.
#[tokio::test]
async fn answers_from_a_live_row_write_nothing() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store().await;
    let pool = s.store().pool();
    let q = format!(
        "SELECT ctid::text || '/' || xmin::text || '/' || xmax::text FROM \"{}\".idempotency_records WHERE idem_key = $1",
        schema.name
    );
    let version = |k: &'static str| {
        let q = q.clone();
        async move { sqlx::query_scalar::<_, String>(AssertSqlSafe(q)).bind(k).fetch_one(pool).await.unwrap() }
    };
    let k = key("quiet");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    let before = version("quiet").await;
    for _ in 0..5 {
        assert!(matches!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
        assert_eq!(s.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
    }
    assert_eq!(version("quiet").await, before);
    s.complete(&k, &t, &response(b"done"), TTL).await.unwrap();
    let before = version("quiet").await;
    for _ in 0..5 {
        assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"done")));
    }
    assert_eq!(version("quiet").await, before);
}

/// A table made by the first version is migrated in place: its rows are kept and count nothing
/// towards their actor's bound, the rows written now count their bytes, and a bound applies.
#[tokio::test]
async fn a_table_of_the_first_version_is_migrated() {
    let Some(schema) = TestSchema::new().await else { return };
    let config = schema.config();
    let (version, first) = PostgresStore::migrations(&config).remove(0);
    assert_eq!(version, 1);
    let table = format!("\"{}\".idempotency_records", schema.name);
    schema.execute(&first).await.unwrap();
    schema
        .execute(&format!(
            "CREATE TABLE \"{0}\".idempotency_records_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO \"{0}\".idempotency_records_migrations (version) VALUES (1);
             INSERT INTO {table} (scope, actor, idem_key, fingerprint, state, token, response, expires_at)
             VALUES ('payments.create', 'acct_1', 'old', '\\x{1}', 'completed', 't-old', '\\x{2}', now() + interval '1 hour')",
            schema.name,
            hex(&fp(1).0),
            hex(&response(b"old").encode()),
        ))
        .await
        .unwrap();
    let claim = store::quota::record_bytes(&key("a"), 0);
    let s = schema.store_with(config.actor_max_bytes(Some(2 * claim))).await;
    let versions = format!("SELECT max(version)::int8 FROM \"{}\".idempotency_records_migrations", schema.name);
    assert_eq!(schema.query_scalar(&versions).await.unwrap(), 3);
    assert_eq!(s.claim(&key("old"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"old")));
    let bytes = |k: &str| {
        let sql = format!("SELECT bytes FROM {table} WHERE idem_key = '{k}'");
        let schema = schema.clone();
        async move { schema.query_scalar(&sql).await }
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

#[tokio::test]
async fn migrations_are_concurrent_safe_and_available_as_sql() {
    let Some(schema) = TestSchema::new().await else { return };
    let (a, b, c) = tokio::join!(schema.store(), schema.store(), schema.store());
    let k = key("m");
    let Claim::Acquired(t) = a.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    assert!(matches!(b.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::InProgress { .. }));
    c.release(&k, &t).await.unwrap();
    let versions: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".idempotency_records_migrations",
        schema.name
    )))
    .fetch_one(a.store().pool())
    .await
    .unwrap();
    assert_eq!(versions as usize, PostgresStore::migrations(&schema.config()).len());

    // Managed by hand: the SQL creates what the store needs; the store then creates nothing.
    let config = schema.config().table("by_hand").migrate(false);
    let sql = PostgresStore::migration_sql(&config);
    assert!(sql.contains(&format!("\"{}\".\"by_hand\"", schema.name)));
    schema.execute(&sql).await.unwrap();
    schema.execute(&sql).await.unwrap();
    let s = schema.store_with(config).await;
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
    s.complete(&k, &t, &response(b"hand"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"hand")));
}

/// On a new table, before PostgreSQL has any statistics of it (when its connections prepare the
/// store's statements and may keep their plans), claims, replays and completions find a key by
/// the primary key only: never through the bound's index or the expiry index, which would read
/// every record of the actor (all of them for anonymous callers) or every expired one.
#[tokio::test]
async fn keys_are_found_by_the_primary_key_on_a_new_table() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store_with(schema.config().sweep_interval(None).max_connections(1)).await;
    for i in 0..40 {
        let k = RecordKey::of("payments.create", None, &format!("k{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
        s.complete(&k, &t, &response(b"ok"), TTL).await.unwrap();
        assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"ok")));
    }
    let scans = format!(
        "SELECT COALESCE(SUM(idx_scan), 0)::int8 FROM pg_stat_user_indexes
         WHERE schemaname = '{}' AND indexrelname IN ('idempotency_records_actor_idx', 'idempotency_records_expires_at_idx')",
        schema.name
    );
    let pkey = format!(
        "SELECT COALESCE(SUM(idx_scan), 0)::int8 FROM pg_stat_user_indexes WHERE schemaname = '{}' AND indexrelname = 'idempotency_records_pkey'",
        schema.name
    );
    assert!(statistic_reaches(&schema, &pkey, 120).await, "the primary key's scans");
    assert_eq!(schema.query_scalar(&scans).await.unwrap(), 0);
}

/// Whether the server's statistic that `sql` selects reaches `at_least` within 10 s. A backend
/// reports its counts (scans, rows changed) when its transaction ends, at most once a second or
/// so, so a count just caused shows a little later.
async fn statistic_reaches(schema: &TestSchema, sql: &str, at_least: i64) -> bool {
    for _ in 0..100 {
        if schema.query_scalar(sql).await.unwrap() >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Group commit is on by default on a pool the store opens, whose connections then plan each
/// statement once; with it turned off they keep the server's own plan setting.
#[tokio::test]
async fn group_commit_and_its_plans_are_the_default_on_the_stores_own_pool() {
    let Some(schema) = TestSchema::new().await else { return };
    let plans = "SELECT current_setting('plan_cache_mode')";
    let default = schema.store_with(schema.config().sweep_interval(None)).await;
    let mode: String = sqlx::query_scalar(plans).fetch_one(default.store().pool()).await.unwrap();
    assert_eq!(mode, "force_generic_plan");
    let off = schema.store_with(schema.config().sweep_interval(None).group_commit(1)).await;
    let mode: String = sqlx::query_scalar(plans).fetch_one(off.store().pool()).await.unwrap();
    assert_eq!(mode, "auto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_deletes_expired_records_in_the_background() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store_with(schema.config().sweep_batch(7)).await;
    for i in 0..30 {
        let k = key(&format!("k{i}"));
        let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!() };
        let ttl = if i < 25 { Duration::from_millis(1) } else { TTL };
        s.complete(&k, &t, &response(b"x"), ttl).await.unwrap();
    }
    let count = format!("SELECT count(*) FROM \"{}\".idempotency_records", schema.name);
    let mut left = 30;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = sqlx::query_scalar::<_, i64>(AssertSqlSafe(count.as_str())).fetch_one(s.store().pool()).await.unwrap();
        if left == 5 {
            break;
        }
    }
    assert_eq!(left, 5);
    assert_eq!(s.store().sweep_expired().await.unwrap(), 0);
}

/// An application's own sqlx 0.9 pool, built with its own settings, is handed to the store as it
/// is (no conversion: `idempotent_core::sqlx` is the application's sqlx) and keeps serving the
/// application's own queries beside the store's.
#[tokio::test]
async fn store_on_the_applications_own_pool() {
    let Some(schema) = TestSchema::new().await else { return };
    // The application's pool, from its own `sqlx` dependency. Its `search_path` puts unqualified
    // names in the test's schema.
    let options = sqlx::postgres::PgConnectOptions::from_str(&schema.url)
        .unwrap()
        .application_name(&schema.name)
        .options([("search_path", schema.name.as_str())]);
    let pool: sqlx::PgPool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .unwrap();
    let _same_type: &idempotent_core::sqlx::PgPool = &pool;
    let s = PostgresStore::from_pool(pool.clone(), schema.config()).await.unwrap();
    // The store runs on the application's pool and settings, not on a pool of its own.
    assert_eq!(s.pool().options().get_max_connections(), 3);

    let k = key("own-pool");
    let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("first claim") };
    s.complete(&k, &t, &response(b"paid"), TTL).await.unwrap();
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"paid")));

    // The application's own work on the same pool: a transaction, then a query over its table and
    // the store's.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)").execute(&mut *tx).await.unwrap();
    sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
        .bind(1_i64)
        .bind(100_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (state, amount): (String, i64) = sqlx::query_as(
        "SELECT r.state, o.amount FROM idempotency_records r, orders o WHERE r.idem_key = $1 AND o.id = $2",
    )
    .bind("own-pool")
    .bind(1_i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), amount), ("completed", 100));
    assert_eq!(s.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"paid")));
}

/// With group commit on, how many writes of the store are sent alone when every write is held up:
/// the pool's 8 connections but 4 kept for the writers' statements.
const ALONE: i64 = 4;
/// The store's writer tasks: each holds one statement (a batch of claims, or of completions) while
/// every write is held up; a writer that found the queue empty has stopped. Without group commit,
/// all 8 connections of the pool would hold a statement.
const WRITERS: i64 = 2;

/// A transaction that holds the store's table in `SHARE` mode: every statement that writes it
/// waits, so that the writes sent meanwhile queue up and go out in batches once it ends.
struct TableHeld {
    conn: sqlx::PgConnection,
}

impl TableHeld {
    async fn new(schema: &TestSchema) -> Self {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&schema.url).await.unwrap();
        let lock = format!("BEGIN; LOCK TABLE \"{}\".idempotency_records IN SHARE MODE", schema.name);
        sqlx::raw_sql(AssertSqlSafe(lock)).execute(&mut conn).await.unwrap();
        Self { conn }
    }

    /// Waits until the writes sent alone and one or two writers' statements (and no more) wait for
    /// the table, then lets them go: the other writes wait in the store's queue, and go out in
    /// batches.
    async fn release_once_writers_wait(mut self, schema: &TestSchema) {
        let waiting = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}' AND wait_event_type = 'Lock'",
            schema.name
        );
        for _ in 0..500 {
            if schema.query_scalar(&waiting).await.unwrap() > ALONE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Every write has been sent for by now; still only those statements wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = schema.query_scalar(&waiting).await.unwrap();
        assert!((ALONE + 1..=ALONE + WRITERS).contains(&seen), "{seen} statements waiting for the table");
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.unwrap();
    }
}

/// Claims held back behind a lock, then sent in batches: on one fresh key 64 race and exactly one
/// acquires; 64 distinct fresh keys each acquire with their own token; on a completed key each
/// claim gets the stored response, or a mismatch for another request; on a key in progress, in
/// progress or a mismatch. Then the acquired claims complete, in batches too, each storing its own
/// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_claims_answer_each_caller_from_its_own_row() {
    let Some(schema) = TestSchema::new().await else { return };
    // Group commit's default bound, 64.
    let s = schema.store_with(schema.config().sweep_interval(None)).await;
    let Claim::Acquired(t) = s.claim(&key("done"), &fp(1), LEASE).await.unwrap() else { panic!() };
    s.complete(&key("done"), &t, &response(b"done"), TTL).await.unwrap();
    let Claim::Acquired(_) = s.claim(&key("busy"), &fp(1), LEASE).await.unwrap() else { panic!() };

    let held = TableHeld::new(&schema).await;
    let claim = |k: String, f: u32| {
        let s = s.clone();
        tokio::spawn(async move { (k.clone(), f, s.claim(&key(&k), &fp(f), LEASE).await.unwrap()) })
    };
    let mut tasks = Vec::new();
    for i in 0..64 {
        tasks.push(claim("one".into(), 1));
        tasks.push(claim(format!("distinct-{i}"), 1));
        if i < 8 {
            tasks.push(claim("done".into(), 1 + i % 2));
            tasks.push(claim("busy".into(), 1 + i % 2));
        }
    }
    held.release_once_writers_wait(&schema).await;

    let mut acquired = Vec::new();
    let (mut one, mut distinct) = (0, 0);
    for task in tasks {
        let (k, f, answer) = task.await.unwrap();
        match (k.as_str(), f, answer) {
            ("one", _, Claim::Acquired(t)) => {
                one += 1;
                acquired.push((k, t));
            }
            ("one", _, Claim::InProgress { .. }) => {}
            (d, _, Claim::Acquired(t)) if d.starts_with("distinct-") => {
                distinct += 1;
                acquired.push((k, t));
            }
            ("done", 1, Claim::Completed(r)) => assert_eq!(r, response(b"done")),
            ("done", 2, Claim::Mismatch) | ("busy", 2, Claim::Mismatch) => {}
            ("busy", 1, Claim::InProgress { retry_after }) => assert!(retry_after > Duration::ZERO),
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    assert_eq!((one, distinct), (1, 64));
    let tokens: std::collections::HashSet<_> = acquired.iter().map(|(_, t)| t.0.clone()).collect();
    assert_eq!(tokens.len(), 65, "each acquired claim has its own token");

    let held = TableHeld::new(&schema).await;
    let completions: Vec<_> = acquired
        .into_iter()
        .map(|(k, t)| {
            let s = s.clone();
            tokio::spawn(async move {
                let body = bytes::Bytes::from(k.clone());
                let r = StoredResponse::new(201, [("content-type", "text/plain")], body);
                s.complete(&key(&k), &t, &r, TTL).await.map(|()| (k, r))
            })
        })
        .collect();
    held.release_once_writers_wait(&schema).await;
    for task in completions {
        let (k, r) = task.await.unwrap().unwrap();
        assert_eq!(s.claim(&key(&k), &fp(1), LEASE).await.unwrap(), Claim::Completed(r), "{k}");
    }
}

/// Completions held back behind a lock, then sent in batches, one of them by a token whose claim
/// was taken over: that one is fenced, alone; every other stores its own response, the new holder
/// of the taken-over key included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_completion_in_a_batch_fails_alone() {
    let Some(schema) = TestSchema::new().await else { return };
    let s = schema.store_with(schema.config().sweep_interval(None).group_commit(64)).await;
    let mut holders = Vec::new();
    for i in 0..32 {
        let k = format!("c{i}");
        let Claim::Acquired(t) = s.claim(&key(&k), &fp(1), LEASE).await.unwrap() else { panic!() };
        holders.push((k, t, true));
    }
    let Claim::Acquired(old) = s.claim(&key("taken"), &fp(1), Duration::from_millis(300)).await.unwrap() else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(450)).await;
    let Claim::Acquired(new) = s.claim(&key("taken"), &fp(1), LEASE).await.unwrap() else { panic!() };
    assert_ne!(old, new);
    holders.insert(16, ("taken".into(), old, false));
    holders.push(("taken".into(), new, true));

    let held = TableHeld::new(&schema).await;
    let completions: Vec<_> = holders
        .into_iter()
        .map(|(k, t, holds)| {
            let s = s.clone();
            tokio::spawn(async move {
                let body = bytes::Bytes::from(format!("{k}-{}", t.0));
                let r = StoredResponse::new(201, [("content-type", "text/plain")], body);
                (k.clone(), holds, r.clone(), s.complete(&key(&k), &t, &r, TTL).await)
            })
        })
        .collect();
    held.release_once_writers_wait(&schema).await;
    let mut stored = 0;
    for task in completions {
        match task.await.unwrap() {
            (k, true, r, Ok(())) => {
                stored += 1;
                assert_eq!(s.claim(&key(&k), &fp(1), LEASE).await.unwrap(), Claim::Completed(r), "{k}");
            }
            (_, false, _, Err(StoreError::Fenced)) => {}
            (k, holds, _, answer) => panic!("{k} (holds: {holds}): {answer:?}"),
        }
    }
    assert_eq!(stored, 33);
}

/// The plan the store's one connection keeps for the completion over arrays, as `EXPLAIN
/// EXECUTE` shows it (the statement was prepared there by the store's batches).
async fn completion_batch_plan(s: &PgTestStore) -> String {
    let mut conn = s.store().pool().acquire().await.unwrap();
    let find = "SELECT name FROM pg_prepared_statements
        WHERE statement LIKE 'UPDATE %' AND statement LIKE '%unnest(%' AND statement LIKE '%ttl_ms%'";
    let name: String =
        sqlx::query_scalar(find).fetch_one(&mut *conn).await.expect("the batched completion was prepared");
    let explain = format!(
        "EXPLAIN EXECUTE {name}(ARRAY['s'], ARRAY['a'], ARRAY['k'], ARRAY['t'], ARRAY['\\x00'::bytea], ARRAY[1::int8])"
    );
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(explain)).fetch_all(&mut *conn).await.unwrap();
    lines.join("\n")
}

/// 32 claims and then their 32 completions at once, on keys `{tag}-{i}`: with one connection they
/// queue, and go out in batches.
async fn claim_and_complete_at_once(s: &Arc<PgTestStore>, tag: &str) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (s, k) = (s.clone(), key(&format!("{tag}-{i}")));
            tokio::spawn(async move {
                let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("a fresh key") };
                (k, t)
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.push(task.await.unwrap());
    }
    let tasks: Vec<_> = claimed
        .into_iter()
        .map(|(k, t)| {
            let s = s.clone();
            tokio::spawn(async move { s.complete(&k, &t, &response(b"ok"), TTL).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A connection plans the statements over arrays once, on the table as it is then: on a new
/// table, a sequential scan, kept as the table grows until the table is analyzed again. With
/// autovacuum off for the table, nothing else analyzes it: the sweep does, once enough rows have
/// changed (the server's count of changes since the last analysis starts again), and the plan
/// finds the rows by the primary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_analyzes_a_grown_table_so_that_batches_use_the_primary_key() {
    let Some(schema) = TestSchema::new().await else { return };
    // One connection: the batched statements are prepared, and their plans kept, on it.
    let s = schema.store_with(schema.config().sweep_interval(None).max_connections(1)).await;
    // Whatever the server's setting, autovacuum leaves this table alone.
    let off = format!("ALTER TABLE \"{}\".idempotency_records SET (autovacuum_enabled = false)", schema.name);
    schema.execute(&off).await.unwrap();
    claim_and_complete_at_once(&s, "new").await;
    let plan = completion_batch_plan(&s).await;
    assert!(plan.contains("Seq Scan on idempotency_records"), "the plan made on the new table:\n{plan}");

    // The table grows by 20,000 completed records (and changes that many rows).
    schema
        .execute(&format!(
            "INSERT INTO \"{}\".idempotency_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at)
             SELECT 'bulk', '', g::text, '\\x00', 'completed', 't', NULL, now() + interval '1 day'
             FROM generate_series(1, 20000) g",
            schema.name
        ))
        .await
        .unwrap();
    let changed = format!(
        "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE schemaname = '{}' AND relname = 'idempotency_records'",
        schema.name
    );
    assert!(statistic_reaches(&schema, &changed, 20_000).await, "the rows changed");
    // Here the connection still holds the sequential scan, unless something else made every
    // plan again meanwhile: any session's DDL on a schema does (the other tests make theirs), so
    // the test does not look. The analysis is what it checks.

    assert_eq!(s.store().sweep_expired().await.unwrap(), 0);
    let plan = completion_batch_plan(&s).await;
    assert!(plan.contains("Index Scan using idempotency_records_pkey"), "made again after the analysis:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(schema.query_scalar(&changed).await.unwrap() < 100, "the sweep analyzed the table");
    // The store works on, in batches.
    claim_and_complete_at_once(&s, "grown").await;
    assert_eq!(s.claim(&key("grown-7"), &fp(1), LEASE).await.unwrap(), Claim::Completed(response(b"ok")));
}

/// A store whose role does not own its table (made by another role; the store does not migrate):
/// the server skips the analysis with a warning, and the sweep still deletes and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_by_a_role_that_does_not_own_the_table_still_sweeps() {
    let Some(schema) = TestSchema::new().await else { return };
    // The table, made by the test database's own role.
    drop(schema.store_with(schema.config().sweep_interval(None)).await);
    let role = format!("idem_plain_{}", uuid::Uuid::new_v4().simple());
    let (name, table) = (&schema.name, format!("\"{}\".idempotency_records", schema.name));
    schema
        .execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}';
             GRANT USAGE ON SCHEMA \"{name}\" TO \"{role}\";
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{name}\" TO \"{role}\";
             ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .await
        .unwrap();
    let url = idempotent_tests::postgres::url_with(&schema.url, Some((&role, &role)), None);
    let config = schema.config().sweep_interval(None).migrate(false);
    let s = Arc::new(PostgresStore::connect_with(&url, config).await.unwrap());
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (s, k) = (s.clone(), key(&format!("short-{i}")));
            tokio::spawn(async move {
                let Claim::Acquired(t) = s.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("a fresh key") };
                s.complete(&k, &t, &response(b"x"), Duration::from_millis(1)).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = |column: &str| {
        format!(
            "SELECT {column} FROM pg_stat_user_tables WHERE schemaname = '{name}' AND relname = 'idempotency_records'"
        )
    };
    assert!(statistic_reaches(&schema, &stats("n_mod_since_analyze"), 200).await, "due for an analysis");
    assert_eq!(s.sweep_expired().await.unwrap(), 100, "every expired record deleted");
    assert_eq!(
        schema.query_scalar(&stats("(last_analyze IS NULL)::int::int8")).await.unwrap(),
        1,
        "the server skipped it"
    );
    drop(s);
    schema
        .execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';
             DROP OWNED BY \"{role}\" CASCADE; DROP ROLE \"{role}\""
        ))
        .await
        .unwrap();
}
