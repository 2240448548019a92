//! Deposits: the demo's transactional route. A deposit row, the caller's balance and the
//! idempotency record commit in one transaction of the store's database, so their count is exact
//! whatever instant the process dies at. The tables live next to the store's, in the same
//! database (PostgreSQL, MySQL or MariaDB, or the SQLite file); on a store without SQL the routes
//! answer 501.

use crate::api::ApiError;
use idempotent_axum::core::sqlx::{self, MySqlPool, PgPool, SqlitePool};
use idempotent_axum::core::store::spec::Redacted;
use idempotent_axum::core::store::transaction::Tx;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /deposits` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateDeposit {
    /// Minor units, from 1 to [`MAX_AMOUNT`](crate::domain::MAX_AMOUNT).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "crate::domain::amount")]
    pub amount: i64,
}

/// An executed deposit.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deposit {
    /// `dep_...`.
    pub id: String,
    /// Minor units.
    pub amount: i64,
    /// The caller's balance after it.
    pub balance: i64,
    /// RFC 3339.
    pub created_at: String,
}

/// `GET /deposits`: the caller's deposits, read from the database.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Summary {
    /// How many deposits the caller made.
    pub count: i64,
    /// Their sum, the caller's balance.
    pub balance: i64,
}

/// The deposits' database: the store's own, through a pool of the demo's for reads and the
/// tables, or none on a store without SQL.
#[derive(Debug, Clone)]
pub enum Deposits {
    /// A PostgreSQL store.
    Postgres(PgPool),
    /// A SQLite store.
    Sqlite(SqlitePool),
    /// A MySQL or MariaDB store.
    MySql(MySqlPool),
    /// A store without SQL transactions: the routes answer 501.
    Unsupported,
}

const POSTGRES_TABLES: &str = "CREATE TABLE IF NOT EXISTS payments_deposits (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payments_balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL);";

const SQLITE_TABLES: &str = "CREATE TABLE IF NOT EXISTS payments_deposits (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payments_balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL);";

/// MySQL's: accounts compared byte for byte (its default collations ignore case), no
/// `RETURNING` (the new balance is read back in the transaction).
const MYSQL_TABLES: &str = "CREATE TABLE IF NOT EXISTS payments_deposits (
    id VARCHAR(64) PRIMARY KEY, account VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    amount BIGINT NOT NULL, created_at VARCHAR(64) NOT NULL) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS payments_balances (
    account VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY, balance BIGINT NOT NULL) ENGINE = InnoDB;";

impl Deposits {
    /// Opens the deposits' tables in the database of the store `spec` names (creating them if
    /// missing); [`Deposits::Unsupported`] for `memory` and Redis.
    pub async fn open(spec: &str) -> Result<Self, String> {
        let failed = |e: sqlx::Error| format!("deposits tables in `{}`: {e}", Redacted(spec));
        if spec.starts_with("postgres") {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(spec).await.map_err(failed)?;
            // Instances starting together would race on `CREATE TABLE IF NOT EXISTS` (PostgreSQL
            // can then fail one of them on its catalog's unique index): one at a time.
            let mut tx = pool.begin().await.map_err(failed)?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('payments-demo deposits tables'))")
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            sqlx::raw_sql(POSTGRES_TABLES).execute(&mut *tx).await.map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            Ok(Self::Postgres(pool))
        } else if spec.starts_with("mysql") || spec.starts_with("mariadb") {
            // MySQL serialises `CREATE TABLE IF NOT EXISTS` of one table by its metadata lock:
            // instances starting together need no lock of their own.
            let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(4).connect(spec).await.map_err(failed)?;
            sqlx::raw_sql(MYSQL_TABLES).execute(&pool).await.map_err(failed)?;
            Ok(Self::MySql(pool))
        } else if spec.starts_with("sqlite") {
            let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect(spec).await.map_err(failed)?;
            sqlx::raw_sql(SQLITE_TABLES).execute(&pool).await.map_err(failed)?;
            Ok(Self::Sqlite(pool))
        } else {
            Ok(Self::Unsupported)
        }
    }

    /// Makes a deposit of `req.amount` for `account` inside the route's transaction `tx`: the
    /// deposit row and the new balance, which the engine commits with the idempotency record.
    pub async fn create(&self, tx: &Tx, account: &str, req: &CreateDeposit) -> Result<Deposit, ApiError> {
        crate::domain::check_amount(req.amount)?;
        let id = format!("dep_{}", uuid::Uuid::new_v4().simple());
        let created_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let internal = |e: &dyn std::fmt::Display| ApiError::Internal(format!("deposit: {e}"));
        let balance: i64 = match self {
            Self::Postgres(_) => {
                let mut t = tx.postgres().await.map_err(|e| internal(&e))?;
                sqlx::query("INSERT INTO payments_deposits (id, account, amount, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&id)
                    .bind(account)
                    .bind(req.amount)
                    .bind(&created_at)
                    .execute(&mut **t)
                    .await
                    .map_err(|e| internal(&e))?;
                sqlx::query_scalar(
                    "INSERT INTO payments_balances (account, balance) VALUES ($1, $2) ON CONFLICT (account)
                     DO UPDATE SET balance = payments_balances.balance + EXCLUDED.balance RETURNING balance",
                )
                .bind(account)
                .bind(req.amount)
                .fetch_one(&mut **t)
                .await
                .map_err(|e| internal(&e))?
            }
            Self::Sqlite(_) => {
                let mut t = tx.sqlite().await.map_err(|e| internal(&e))?;
                sqlx::query("INSERT INTO payments_deposits (id, account, amount, created_at) VALUES (?1, ?2, ?3, ?4)")
                    .bind(&id)
                    .bind(account)
                    .bind(req.amount)
                    .bind(&created_at)
                    .execute(&mut **t)
                    .await
                    .map_err(|e| internal(&e))?;
                sqlx::query_scalar(
                    "INSERT INTO payments_balances (account, balance) VALUES (?1, ?2) ON CONFLICT (account)
                     DO UPDATE SET balance = balance + excluded.balance RETURNING balance",
                )
                .bind(account)
                .bind(req.amount)
                .fetch_one(&mut **t)
                .await
                .map_err(|e| internal(&e))?
            }
            Self::MySql(_) => {
                let mut t = tx.mysql().await.map_err(|e| internal(&e))?;
                sqlx::query("INSERT INTO payments_deposits (id, account, amount, created_at) VALUES (?, ?, ?, ?)")
                    .bind(&id)
                    .bind(account)
                    .bind(req.amount)
                    .bind(&created_at)
                    .execute(&mut **t)
                    .await
                    .map_err(|e| internal(&e))?;
                sqlx::query(
                    "INSERT INTO payments_balances (account, balance) VALUES (?, ?)
                     ON DUPLICATE KEY UPDATE balance = balance + ?",
                )
                .bind(account)
                .bind(req.amount)
                .bind(req.amount)
                .execute(&mut **t)
                .await
                .map_err(|e| internal(&e))?;
                // The transaction's own write, which it holds locked.
                sqlx::query_scalar("SELECT balance FROM payments_balances WHERE account = ? FOR UPDATE")
                    .bind(account)
                    .fetch_one(&mut **t)
                    .await
                    .map_err(|e| internal(&e))?
            }
            // The engine answers 501 before the handler runs; this is never reached.
            Self::Unsupported => return Err(ApiError::Internal("deposits need a SQL store".into())),
        };
        Ok(Deposit { id, amount: req.amount, balance, created_at })
    }

    /// The caller's deposit count and balance, read from the database; `None` on a store without
    /// SQL.
    pub async fn summary(&self, account: &str) -> Result<Option<Summary>, ApiError> {
        const SQL_PG: &str =
            "SELECT count(*)::int8, COALESCE(sum(amount), 0)::int8 FROM payments_deposits WHERE account = $1";
        const SQL_LITE: &str = "SELECT count(*), COALESCE(sum(amount), 0) FROM payments_deposits WHERE account = ?1";
        // MySQL's SUM of integers is a DECIMAL.
        const SQL_MY: &str =
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM payments_deposits WHERE account = ?";
        let internal = |e: sqlx::Error| ApiError::Internal(format!("deposits: {e}"));
        let (count, balance): (i64, i64) = match self {
            Self::Postgres(pool) => sqlx::query_as(SQL_PG).bind(account).fetch_one(pool).await.map_err(internal)?,
            Self::Sqlite(pool) => sqlx::query_as(SQL_LITE).bind(account).fetch_one(pool).await.map_err(internal)?,
            Self::MySql(pool) => sqlx::query_as(SQL_MY).bind(account).fetch_one(pool).await.map_err(internal)?,
            Self::Unsupported => return Ok(None),
        };
        Ok(Some(Summary { count, balance }))
    }
}
