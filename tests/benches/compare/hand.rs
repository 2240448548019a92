//! The hand-written ceilings: an axum handler that claims the key, runs, stores the response and
//! replays it, with the round trips and guarantees of our store on the same database (a claim
//! with a fencing token and a lease that a replay answers in the same round trip, a completion
//! fenced by the token, a different request under the same key refused), and nothing else: no
//! framework, no canonical fingerprint of the whole request, no lease renewal, no problem bodies.
//!
//! - Redis: one `EVALSHA` claims or answers the stored response, one more completes (two round
//!   trips per first execution, one per replay), on one multiplexed connection built with the
//!   store's connection settings.
//! - PostgreSQL: the store's claim statement (a live row read without a lock, an expired one taken
//!   over, an absent one inserted, in one statement), one `UPDATE` fenced by the token completes
//!   (two statements per first execution, one per replay), on a pool of the store's size with its
//!   settings (`READ COMMITTED`).
//! - MySQL (MariaDB): the store's claim (a read of the record by the SHA-256 of its key, without a
//!   lock, answers a live one; an absent one is inserted, an expired one taken over by an `UPDATE`
//!   conditional on its expiry), one `UPDATE` fenced by the token completes (three statements per
//!   first execution, one per replay), on a pool of the store's size.
//! - SQLite: a read answers a live record; otherwise one upsert `… WHERE expired RETURNING` claims
//!   and one fenced `UPDATE` completes (two commits per first execution, as the store's, one read
//!   per replay), on a pool of the store's size with its WAL, `synchronous = FULL` and busy
//!   timeout.

use crate::variants::{receipt, Charge};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use idempotent_axum::core::store::RedisStore;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Executor, Row, SqlSafeStr, SqlStr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The scope the records are filed under (the primary key is scope, actor, key, as the store's).
const SCOPE: &str = "compare.charge";
/// The lease of a claim, and the time a completed record is kept: our defaults.
const LEASE_MS: i64 = 10_000;
const TTL_MS: i64 = 86_400_000;
/// How long an abandoned claim is kept after its lease (Redis key expiry), as the store's.
const RETENTION_MS: i64 = 600_000;
/// How often a claim is tried again when a concurrent writer hid the row from it.
const CLAIM_ATTEMPTS: usize = 16;

/// The connections of our PostgreSQL store in this comparison (the test schema's setting).
pub const PG_CONNECTIONS: u32 = 8;
/// The connections of our MySQL store in this comparison (the test database's setting).
pub const MY_CONNECTIONS: u32 = 8;
/// The connections of our SQLite store (its default).
pub const SQLITE_CONNECTIONS: u32 = 4;

/// A claim's answer.
enum Claimed {
    Acquired(String),
    Completed(Vec<u8>),
    Mismatch,
    InProgress,
}

/// The handler's database.
#[derive(Clone)]
pub enum Hand {
    Redis(Arc<RedisHand>),
    Postgres(Arc<PgHand>),
    MySql(Arc<MyHand>),
    Sqlite(Arc<SqliteHand>),
}

pub struct RedisHand {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    claim: redis::Script,
    complete: redis::Script,
}

pub struct PgHand {
    pool: sqlx::PgPool,
    claim: SqlStr,
    complete: SqlStr,
}

pub struct MyHand {
    pool: sqlx::MySqlPool,
    select: SqlStr,
    insert: SqlStr,
    takeover: SqlStr,
    complete: SqlStr,
}

pub struct SqliteHand {
    pool: sqlx::SqlitePool,
    select: SqlStr,
    claim: SqlStr,
    complete: SqlStr,
}

/// Claims the key when absent or its lease has passed; else answers the record: the stored
/// response, a mismatch, or in progress. KEYS[1] record, ARGV: fingerprint, token, lease (ms),
/// retention of an abandoned claim (ms).
const REDIS_CLAIM: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 's', 'f', 'l', 'r')
if not v[1] or (v[1] == 'p' and tonumber(v[3]) <= now) then
  local lease = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 't', ARGV[2], 'l', string.format('%d', now + lease))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', lease + tonumber(ARGV[4])))
  return {'a'}
end
if v[2] ~= ARGV[1] then return {'m'} end
if v[1] == 'c' then return {'c', v[4]} end
return {'p'}
"#;

/// Stores the response if the token still holds the claim. ARGV: token, response, ttl (ms).
const REDIS_COMPLETE: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 't')
if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])
redis.call('HDEL', KEYS[1], 't', 'l')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// The Redis ceiling: records under `prefix`, on a connection with the store's settings.
pub async fn redis(url: &str, prefix: &str) -> Result<Hand, String> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(|e| e.to_string())?.set_tcp_settings(RedisStore::tcp_settings());
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let conn = redis::aio::ConnectionManager::new_with_config(client, RedisStore::connection_manager_config())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Hand::Redis(Arc::new(RedisHand {
        conn,
        prefix: format!("{prefix}hand:"),
        claim: redis::Script::new(REDIS_CLAIM),
        complete: redis::Script::new(REDIS_COMPLETE),
    })))
}

fn sql(text: String) -> SqlStr {
    AssertSqlSafe(text).into_sql_str()
}

/// The PostgreSQL ceiling: a table of its own in `schema`, on a pool like the store's.
pub async fn postgres(url: &str, schema: &str) -> Result<Hand, String> {
    use sqlx::postgres::PgPoolOptions;
    let pool = PgPoolOptions::new()
        .max_connections(PG_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(sqlx::raw_sql("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"))
                    .await
                    .map(|_| ())
            })
        })
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let t = format!("\"{schema}\".hand_records");
    sqlx::raw_sql(sql(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
CREATE TABLE IF NOT EXISTS {t} (
    scope TEXT NOT NULL, actor TEXT NOT NULL, idem_key TEXT NOT NULL, fingerprint BYTEA NOT NULL,
    state TEXT NOT NULL, token TEXT, response BYTEA, expires_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (scope, actor, idem_key));
CREATE INDEX IF NOT EXISTS hand_records_expires_at_idx ON {t} (expires_at);"
    )))
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    let key = "scope = $1 AND actor = $2 AND idem_key = $3";
    // The store's claim statement: a live row is read without a lock (a replay writes nothing);
    // an expired one is taken over and an absent one inserted, in the same statement.
    let claim = sql(format!(
        "WITH existing AS (
    SELECT fingerprint, state, response, expires_at FROM {t} WHERE {key}
), takeover AS (
    UPDATE {t} SET fingerprint = $4, state = 'in_progress', token = $5, response = NULL,
        expires_at = now() + $6::int8 * interval '1 millisecond', created_at = now()
    WHERE {key} AND expires_at <= now()
    RETURNING 1
), inserted AS (
    INSERT INTO {t} (scope, actor, idem_key, fingerprint, state, token, expires_at)
    SELECT $1, $2, $3, $4, 'in_progress', $5, now() + $6::int8 * interval '1 millisecond'
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (scope, actor, idem_key) DO NOTHING
    RETURNING 1
)
SELECT TRUE AS acquired, NULL::bytea AS fingerprint, NULL::text AS state, NULL::bytea AS response FROM takeover
UNION ALL
SELECT TRUE, NULL, NULL, NULL FROM inserted
UNION ALL
SELECT FALSE, fingerprint, state, response FROM existing WHERE expires_at > now()"
    ));
    let complete = sql(format!(
        "UPDATE {t} SET state = 'completed', response = $5, expires_at = now() + $6::int8 * interval '1 millisecond'
WHERE {key} AND token = $4 AND state = 'in_progress'"
    ));
    Ok(Hand::Postgres(Arc::new(PgHand { pool, claim, complete })))
}

/// The MySQL ceiling: a table of its own in the database of `url`, on a pool like the store's.
pub async fn mysql(url: &str) -> Result<Hand, String> {
    use sqlx::mysql::MySqlPoolOptions;
    let pool = MySqlPoolOptions::new()
        .max_connections(MY_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS hand_records (
    key_hash BINARY(32) NOT NULL PRIMARY KEY,
    scope TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    actor TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    idem_key TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    fingerprint VARBINARY(64) NOT NULL, state VARCHAR(16) NOT NULL, token VARCHAR(64), response LONGBLOB,
    expires_at DATETIME(6) NOT NULL, created_at DATETIME(6) NOT NULL, KEY expires_at_idx (expires_at)
) ENGINE = InnoDB",
    )
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    let now = "UTC_TIMESTAMP(6)";
    Ok(Hand::MySql(Arc::new(MyHand {
        pool,
        select: sql(format!(
            "SELECT fingerprint, state, response, TIMESTAMPDIFF(MICROSECOND, {now}, expires_at) AS remaining_us
FROM hand_records WHERE key_hash = ?"
        )),
        insert: sql(format!(
            "INSERT INTO hand_records (key_hash, scope, actor, idem_key, fingerprint, state, token, expires_at, created_at)
VALUES (?, ?, ?, ?, ?, 'in_progress', ?, {now} + INTERVAL ? MICROSECOND, {now})"
        )),
        takeover: sql(format!(
            "UPDATE hand_records SET fingerprint = ?, state = 'in_progress', token = ?, response = NULL,
    created_at = {now}, expires_at = {now} + INTERVAL ? MICROSECOND
WHERE key_hash = ? AND expires_at <= {now}"
        )),
        complete: sql(format!(
            "UPDATE hand_records SET state = 'completed', response = ?, expires_at = {now} + INTERVAL ? MICROSECOND
WHERE key_hash = ? AND token = ? AND state = 'in_progress'"
        )),
    })))
}

/// The SQLite ceiling: a database file of its own at `path`, opened as the store opens its own.
pub async fn sqlite(path: &Path) -> Result<Hand, String> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
    let busy = Duration::from_secs(10);
    let options = SqliteConnectOptions::from_str(&format!("sqlite:{}", path.display()))
        .map_err(|e| e.to_string())?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(busy);
    let pool = SqlitePoolOptions::new()
        .max_connections(SQLITE_CONNECTIONS)
        .acquire_timeout(busy)
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS hand_records (
    scope TEXT NOT NULL, actor TEXT NOT NULL, idem_key TEXT NOT NULL, fingerprint BLOB NOT NULL,
    state TEXT NOT NULL, token TEXT, response BLOB, expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, actor, idem_key));
CREATE INDEX IF NOT EXISTS hand_records_expires_at_idx ON hand_records (expires_at);",
    )
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    let key = "scope = ?1 AND actor = ?2 AND idem_key = ?3";
    Ok(Hand::Sqlite(Arc::new(SqliteHand {
        pool,
        select: sql(format!("SELECT fingerprint, state, response, expires_at FROM hand_records WHERE {key}")),
        claim: sql(
            "INSERT INTO hand_records (scope, actor, idem_key, fingerprint, state, token, response, expires_at, created_at)
VALUES (?1, ?2, ?3, ?4, 'in_progress', ?5, NULL, ?6, ?7)
ON CONFLICT (scope, actor, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint, state = 'in_progress',
    token = excluded.token, response = NULL, expires_at = excluded.expires_at, created_at = excluded.created_at
WHERE hand_records.expires_at <= ?7
RETURNING 1"
                .to_owned(),
        ),
        complete: sql(format!(
            "UPDATE hand_records SET state = 'completed', token = NULL, response = ?5, expires_at = ?6
WHERE {key} AND token = ?4 AND state = 'in_progress'"
        )),
    })))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The answer a stored row gives.
fn answer(fingerprint: &[u8], stored: &[u8], state: &str, response: Option<Vec<u8>>) -> Claimed {
    if stored != fingerprint {
        return Claimed::Mismatch;
    }
    match (state, response) {
        ("completed", Some(body)) => Claimed::Completed(body),
        _ => Claimed::InProgress,
    }
}

impl Hand {
    async fn claim(&self, key: &str, fingerprint: &[u8]) -> Result<Claimed, String> {
        match self {
            Hand::Redis(h) => {
                let token = token();
                let reply: Vec<Vec<u8>> = h
                    .claim
                    .key(format!("{}{key}", h.prefix))
                    .arg(fingerprint)
                    .arg(&token)
                    .arg(LEASE_MS)
                    .arg(RETENTION_MS)
                    .invoke_async(&mut h.conn.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(match reply.first().map(Vec::as_slice) {
                    Some(b"a") => Claimed::Acquired(token),
                    Some(b"c") => Claimed::Completed(reply.into_iter().nth(1).unwrap_or_default()),
                    Some(b"m") => Claimed::Mismatch,
                    _ => Claimed::InProgress,
                })
            }
            Hand::Postgres(h) => {
                let token = token();
                for _ in 0..CLAIM_ATTEMPTS {
                    let row = sqlx::query(h.claim.clone())
                        .bind(SCOPE)
                        .bind("")
                        .bind(key)
                        .bind(fingerprint)
                        .bind(&token)
                        .bind(LEASE_MS)
                        .fetch_optional(&h.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    let Some(row) = row else { continue };
                    if row.try_get::<bool, _>("acquired").map_err(|e| e.to_string())? {
                        return Ok(Claimed::Acquired(token));
                    }
                    let stored: Vec<u8> = row.try_get("fingerprint").map_err(|e| e.to_string())?;
                    let state: String = row.try_get("state").map_err(|e| e.to_string())?;
                    let response: Option<Vec<u8>> = row.try_get("response").map_err(|e| e.to_string())?;
                    return Ok(answer(fingerprint, &stored, &state, response));
                }
                Err("the claim kept losing races".into())
            }
            Hand::MySql(h) => {
                let token = token();
                let hash = Sha256::digest(key.as_bytes()).to_vec();
                for _ in 0..CLAIM_ATTEMPTS {
                    let row = sqlx::query(h.select.clone())
                        .bind(&hash)
                        .fetch_optional(&h.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    let Some(row) = row else {
                        let inserted = sqlx::query(h.insert.clone())
                            .bind(&hash)
                            .bind(SCOPE)
                            .bind("")
                            .bind(key)
                            .bind(fingerprint)
                            .bind(&token)
                            .bind(LEASE_MS * 1000)
                            .execute(&h.pool)
                            .await;
                        match inserted {
                            Ok(_) => return Ok(Claimed::Acquired(token)),
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
                            Err(e) => return Err(e.to_string()),
                        }
                    };
                    let remaining: i64 = row.try_get("remaining_us").map_err(|e| e.to_string())?;
                    if remaining > 0 {
                        let stored: Vec<u8> = row.try_get("fingerprint").map_err(|e| e.to_string())?;
                        let state: String = row.try_get("state").map_err(|e| e.to_string())?;
                        let response: Option<Vec<u8>> = row.try_get("response").map_err(|e| e.to_string())?;
                        return Ok(answer(fingerprint, &stored, &state, response));
                    }
                    let taken = sqlx::query(h.takeover.clone())
                        .bind(fingerprint)
                        .bind(&token)
                        .bind(LEASE_MS * 1000)
                        .bind(&hash)
                        .execute(&h.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    if taken.rows_affected() == 1 {
                        return Ok(Claimed::Acquired(token));
                    }
                }
                Err("the claim kept losing races".into())
            }
            Hand::Sqlite(h) => {
                let token = token();
                for _ in 0..CLAIM_ATTEMPTS {
                    let now = now_ms();
                    let row = sqlx::query(h.select.clone())
                        .bind(SCOPE)
                        .bind("")
                        .bind(key)
                        .fetch_optional(&h.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(row) = row {
                        let expires_at: i64 = row.try_get("expires_at").map_err(|e| e.to_string())?;
                        if expires_at > now {
                            let stored: Vec<u8> = row.try_get("fingerprint").map_err(|e| e.to_string())?;
                            let state: String = row.try_get("state").map_err(|e| e.to_string())?;
                            let response: Option<Vec<u8>> = row.try_get("response").map_err(|e| e.to_string())?;
                            return Ok(answer(fingerprint, &stored, &state, response));
                        }
                    }
                    // Every row fetched: the statement runs to its end, which commits it (a
                    // statement left unfinished would hold the write lock on its connection).
                    let claimed = sqlx::query(h.claim.clone())
                        .bind(SCOPE)
                        .bind("")
                        .bind(key)
                        .bind(fingerprint)
                        .bind(&token)
                        .bind(now + LEASE_MS)
                        .bind(now)
                        .fetch_all(&h.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    if !claimed.is_empty() {
                        return Ok(Claimed::Acquired(token));
                    }
                }
                Err("the claim kept losing races".into())
            }
        }
    }

    /// Stores `body` as the key's response; `false` when the token no longer holds the claim.
    async fn complete(&self, key: &str, token: &str, body: &[u8]) -> Result<bool, String> {
        match self {
            Hand::Redis(h) => {
                let done: i64 = h
                    .complete
                    .key(format!("{}{key}", h.prefix))
                    .arg(token)
                    .arg(body)
                    .arg(TTL_MS)
                    .invoke_async(&mut h.conn.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(done == 1)
            }
            Hand::Postgres(h) => {
                let done = sqlx::query(h.complete.clone())
                    .bind(SCOPE)
                    .bind("")
                    .bind(key)
                    .bind(token)
                    .bind(body)
                    .bind(TTL_MS)
                    .execute(&h.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(done.rows_affected() == 1)
            }
            Hand::MySql(h) => {
                let done = sqlx::query(h.complete.clone())
                    .bind(body)
                    .bind(TTL_MS * 1000)
                    .bind(Sha256::digest(key.as_bytes()).to_vec())
                    .bind(token)
                    .execute(&h.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(done.rows_affected() == 1)
            }
            Hand::Sqlite(h) => {
                let done = sqlx::query(h.complete.clone())
                    .bind(SCOPE)
                    .bind("")
                    .bind(key)
                    .bind(token)
                    .bind(body)
                    .bind(now_ms() + TTL_MS)
                    .execute(&h.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(done.rows_affected() == 1)
            }
        }
    }
}

/// SHA-256 of the fields the request is identified by.
fn fingerprint(c: &Charge) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(SCOPE.as_bytes());
    hash.update([0]);
    hash.update(c.amount.to_be_bytes());
    hash.update(c.currency.as_bytes());
    hash.finalize().into()
}

fn json(status: StatusCode, body: Vec<u8>, replayed: bool) -> Response {
    let mut response = (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// `POST /charge`, idempotent by hand.
pub async fn handler(State(hand): State<Hand>, headers: HeaderMap, Json(c): Json<Charge>) -> Response {
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let key = key.to_owned();
    match hand.claim(&key, &fingerprint(&c)).await {
        Ok(Claimed::Acquired(token)) => {
            let body = serde_json::to_vec(&receipt(c)).expect("a receipt serialises");
            match hand.complete(&key, &token, &body).await {
                Ok(true) => json(StatusCode::CREATED, body, false),
                Ok(false) => StatusCode::CONFLICT.into_response(),
                Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
        Ok(Claimed::Completed(body)) => json(StatusCode::CREATED, body, true),
        Ok(Claimed::Mismatch) => StatusCode::UNPROCESSABLE_ENTITY.into_response(),
        Ok(Claimed::InProgress) => StatusCode::CONFLICT.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
