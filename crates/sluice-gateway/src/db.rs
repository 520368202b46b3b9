//! Durable state: policies, agent keys (hashed), the append-only usage
//! ledger, daily spend roll-ups and idempotency records. In SQLite (WAL, a
//! file in the data directory; the default) or PostgreSQL (`[database] url`,
//! shared by replicas), through the same queries: one schema, versioned
//! migrations applied in order at start (PostgreSQL's under an advisory lock,
//! so replicas starting together migrate once). On PostgreSQL every change
//! to policies or keys is announced with `NOTIFY sluice_changes`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sluice_core::{Amounts, Metric};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::config::LedgerSync;

mod migrations;
mod rows;

use self::migrations::*;
pub use self::migrations::{CHANGES_CHANNEL, SCHEMA_VERSION};
pub use self::rows::*;

/// A database failure.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct DbError(#[from] sqlx::Error);

/// `INSERT` of one audit record inside a transaction `$tx`.
macro_rules! audit_insert {
    ($tx:expr, $ts:expr, $a:expr) => {
        sqlx::query(
            "INSERT INTO audit (ts_ns, kind, subject, actor, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(to_i64($ts))
        .bind($a.kind)
        .bind(&$a.subject)
        .bind(&$a.actor)
        .bind(&$a.detail)
        .execute(&mut *$tx)
        .await?
    };
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The five amount columns of a ledger or spend row.
fn amounts_of<R>(r: &R) -> Result<Amounts, sqlx::Error>
where
    R: Row,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let mut amounts = Amounts::ZERO;
    for (m, col) in [
        (Metric::Requests, "requests"),
        (Metric::Tokens, "tokens"),
        (Metric::InputTokens, "input_tokens"),
        (Metric::OutputTokens, "output_tokens"),
        (Metric::CostUsd, "cost_micros"),
    ] {
        amounts.set(m, to_u64(r.try_get(col)?));
    }
    Ok(amounts)
}

/// `"r,t,ti,to,c"`.
pub fn amounts_text(a: &Amounts) -> String {
    Metric::ALL
        .iter()
        .map(|m| a.get(*m).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parse `"r,t,ti,to,c"`.
pub fn parse_amounts_text(s: &str) -> Option<Amounts> {
    let mut out = Amounts::ZERO;
    let mut parts = s.split(',');
    for m in Metric::ALL {
        out.set(m, parts.next()?.parse().ok()?);
    }
    Some(out)
}

/// The UTC day (`2026-11-22`) of an instant.
pub fn utc_day(ts_ns: u64) -> String {
    let secs = i64::try_from(ts_ns / 1_000_000_000).unwrap_or(i64::MAX);
    jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%d").to_string())
        .unwrap_or_else(|_| "1970-01-01".to_owned())
}

/// The connection pool of either database.
#[derive(Debug, Clone)]
pub enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Opening a transaction that will write.
///
/// On SQLite a plain `BEGIN` is deferred: a transaction that reads, then
/// writes fails at once with `SQLITE_BUSY` (the busy timeout does not apply)
/// when another connection, such as the ledger writer, wrote in between. Write
/// transactions therefore take the write lock up front (`BEGIN IMMEDIATE`,
/// which waits out the busy timeout instead).
trait BeginWrite {
    type Database: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error>,
    > + Send {
        self.begin_with("BEGIN IMMEDIATE")
    }
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error>,
    > + Send {
        self.begin()
    }
}

/// Runs the same query code on whichever pool the database has.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

/// The database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    /// The database file in a data directory.
    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("sluice.db")
    }

    /// Open (creating) `DIR/sluice.db` and apply migrations.
    pub async fn open(dir: &Path, sync: LedgerSync) -> Result<Db, DbError> {
        let path = Db::path(dir);
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                LedgerSync::Batch => SqliteSynchronous::Normal,
                LedgerSync::Always => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // 16 MiB of page cache per connection: the ledger's B-tree pages stay warm.
            .pragma("cache_size", "-16384")
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let db = Db {
            pool: Pool::Sqlite(pool),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Connect to PostgreSQL at `url` and apply migrations.
    pub async fn open_postgres(url: &str) -> Result<Db, DbError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await?;
        let db = Db {
            pool: Pool::Postgres(pool),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), DbError> {
        const TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)";
        match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query(TABLE).execute(pool).await?;
                for (version, sql) in MIGRATIONS {
                    let mut tx = pool.begin_write().await?;
                    let done: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM schema_migrations WHERE version = $1",
                    )
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if done.is_some() {
                        continue;
                    }
                    sqlx::raw_sql(sql).execute(&mut *tx).await?;
                    sqlx::query(
                        "INSERT INTO schema_migrations (version, applied_ns) VALUES ($1, 0)",
                    )
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                }
            }
            Pool::Postgres(pool) => {
                // One transaction under an advisory lock: replicas starting
                // together wait for each other and migrate once.
                let mut tx = pool.begin_write().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(TABLE).execute(&mut *tx).await?;
                for (version, sql) in MIGRATIONS {
                    let done: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM schema_migrations WHERE version = $1",
                    )
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if done.is_some() {
                        continue;
                    }
                    sqlx::raw_sql(&postgres_sql(sql)).execute(&mut *tx).await?;
                    sqlx::query(
                        "INSERT INTO schema_migrations (version, applied_ns) VALUES ($1, 0)",
                    )
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Tell other replicas that policies or keys changed (PostgreSQL; a no-op on SQLite).
    async fn announce(&self) -> Result<(), DbError> {
        if let Pool::Postgres(pool) = &self.pool {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(CHANGES_CHANNEL)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// The schema version in force.
    pub async fn schema_version(&self) -> Result<i64, DbError> {
        on_pool!(self, pool => {
            Ok(
                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    /// Close the pool (after the ledger is flushed).
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}

// After the macros above: the queries, by what they touch.
mod approvals;
mod audit;
mod spend;
mod state;
