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

/// A database failure.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct DbError(#[from] sqlx::Error);

/// Migrations, in order; each runs once, in a transaction, and is recorded.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE policies (
        subject TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        updated_ns BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        subject TEXT NOT NULL,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        revoked_ns BIGINT
    );
    CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        reservation TEXT,
        subjects TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        held TEXT,
        reserved_ns BIGINT,
        caller TEXT NOT NULL,
        request_id TEXT,
        detail TEXT
    );
    CREATE INDEX ledger_ts ON ledger (ts_ns);
    CREATE TABLE spend_daily (
        subject TEXT NOT NULL,
        day TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        PRIMARY KEY (subject, day)
    );
    CREATE TABLE idempotency (
        scope TEXT PRIMARY KEY,
        created_ns BIGINT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX idempotency_created ON idempotency (created_ns);",
    ),
    // The time index cost ~15% of each ledger insert; rows are appended in
    // time order, so replay finds its start by binary search on `seq` instead.
    (2, "DROP INDEX IF EXISTS ledger_ts;"),
    // PostgreSQL's ledger writer marks each batch it writes, in the batch's
    // transaction, so a retry after a commit whose answer was lost writes
    // nothing twice.
    (
        3,
        "CREATE TABLE ledger_batches (id TEXT PRIMARY KEY, ts_ns BIGINT NOT NULL);",
    ),
    // The kill switch: which agents an operator stopped, and the mesh's
    // event log (kills and resumes; append-only).
    (
        4,
        "CREATE TABLE agent_status (
        subject TEXT PRIMARY KEY,
        killed BIGINT NOT NULL,
        changed_ns BIGINT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT
    );
    CREATE TABLE mesh_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT
    );",
    ),
    // The audit trail: append-only; the API never updates or deletes a row.
    (
        5,
        "CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_subject ON audit (subject, seq);",
    ),
    // Early warnings: one row per (subject, limit, threshold, window), so
    // replicas that see the same crossing raise it once; with its delivery.
    (
        6,
        "CREATE TABLE alerts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        subject TEXT NOT NULL,
        metric TEXT NOT NULL,
        win TEXT NOT NULL,
        threshold_bp BIGINT NOT NULL,
        window_key BIGINT NOT NULL,
        used BIGINT NOT NULL,
        lim BIGINT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        last_error TEXT,
        delivered_ns BIGINT,
        UNIQUE (subject, metric, win, threshold_bp, window_key)
    );",
    ),
    // Human approval: one open (pending) approval per (subject, limit), so
    // every replica's parked requests wait on the same one; its decision and
    // the override it grants.
    (
        7,
        "CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        created_ns BIGINT NOT NULL,
        subject TEXT NOT NULL,
        metric TEXT NOT NULL,
        win TEXT NOT NULL,
        lim BIGINT NOT NULL,
        used BIGINT NOT NULL,
        requested TEXT NOT NULL,
        model TEXT,
        caller TEXT NOT NULL,
        resets_ns BIGINT NOT NULL,
        status TEXT NOT NULL,
        decided_ns BIGINT,
        decided_by TEXT,
        reason TEXT,
        extra TEXT,
        until_ns BIGINT
    );
    CREATE UNIQUE INDEX approvals_open ON approvals (subject, metric, win) WHERE status = 'pending';
    CREATE INDEX approvals_created ON approvals (created_ns);",
    ),
    // An alert may announce an approval waiting for a human.
    (8, "ALTER TABLE alerts ADD COLUMN approval_id TEXT;"),
    // The mesh event log reads breaches from the audit trail by kind and time.
    (9, "CREATE INDEX audit_kind ON audit (kind, ts_ns);"),
];

/// The schema version a migrated database is at.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// A migration's text for PostgreSQL: the same schema in its types.
fn postgres_sql(sql: &str) -> String {
    sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("status INTEGER", "status BIGINT")
        .replace(" BLOB ", " BYTEA ")
}

/// The channel replicas listen on for policy and key changes (PostgreSQL).
pub const CHANGES_CHANNEL: &str = "sluice_changes";

/// Arbitrary key of the advisory lock migrations run under (PostgreSQL).
const MIGRATION_LOCK: i64 = 0x0051_C3D8;

/// How far out of time order ledger rows may be (each row is stamped at its
/// decision and queued at once; only queueing separates them). Replay starts
/// this much earlier than it needs and filters by time.
const ORDER_SLACK_NS: u64 = 300 * 1_000_000_000;

/// What a ledger row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// `POST /v1/check`: taken at once.
    Check,
    /// `POST /v1/intents`: one intent and its cost.
    Intent,
    /// `POST /v1/reserve`: held (amounts are the held amounts).
    Reserve,
    /// A reservation committed (amounts are the actual amounts).
    Commit,
    /// A reservation released (amounts are zero).
    Release,
    /// A lease ran out (amounts are the held amounts, now spent).
    Expire,
    /// Found unsettled at start after a crash, settled at its held amounts.
    Restart,
}

impl RowKind {
    /// Its name in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Check => "check",
            RowKind::Intent => "intent",
            RowKind::Reserve => "reserve",
            RowKind::Commit => "commit",
            RowKind::Release => "release",
            RowKind::Expire => "expire",
            RowKind::Restart => "restart",
        }
    }

    fn parse(s: &str) -> Option<RowKind> {
        Some(match s {
            "check" => RowKind::Check,
            "intent" => RowKind::Intent,
            "reserve" => RowKind::Reserve,
            "commit" => RowKind::Commit,
            "release" => RowKind::Release,
            "expire" => RowKind::Expire,
            "restart" => RowKind::Restart,
            _ => return None,
        })
    }

    /// Whether the row's amounts are spend (rather than a hold or nothing).
    pub fn is_spend(self) -> bool {
        !matches!(self, RowKind::Reserve | RowKind::Release)
    }
}

/// One ledger row.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    /// When, ns since the epoch.
    pub ts_ns: u64,
    /// What happened.
    pub kind: RowKind,
    /// The reservation it belongs to.
    pub reservation: Option<String>,
    /// Every subject charged.
    pub subjects: Vec<String>,
    /// Amounts (see [`RowKind`]).
    pub amounts: Amounts,
    /// For settle rows: what the reservation held.
    pub held: Option<Amounts>,
    /// For settle rows: when the reservation was made.
    pub reserved_ns: Option<u64>,
    /// `admin` or the agent key id.
    pub caller: String,
    /// Request id (the intent id, the caller's trace id, ...).
    pub request_id: Option<String>,
    /// JSON details (intent type, overshoot, ...).
    pub detail: Option<String>,
}

/// A stored idempotent answer.
#[derive(Debug, Clone)]
pub struct IdemRow {
    /// caller + method + path + key.
    pub scope: String,
    /// When it was first answered.
    pub created_ns: u64,
    /// Hash of the request body.
    pub fingerprint: String,
    /// Status code.
    pub status: u16,
    /// Headers to replay, JSON `[[name, value], ...]`.
    pub headers: String,
    /// Body.
    pub body: Vec<u8>,
}

/// A stored agent key (its hash, never the key).
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// `key_...`.
    pub id: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The subject it acts for.
    pub subject: String,
    /// A label.
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    /// Created, ns.
    pub created_ns: u64,
}

/// An agent an operator stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Killed {
    /// The agent's address.
    pub subject: String,
    /// When, ns.
    pub since_ns: u64,
    /// Who: `admin` or a key id.
    pub actor: String,
    /// Why, if said.
    pub reason: Option<String>,
}

/// One entry of the mesh's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEvent {
    /// Order of its log.
    pub seq: i64,
    /// Its log: `mesh_events` (kills, resumes) or `audit` (breaches).
    pub source: String,
    /// When, ns.
    pub ts_ns: u64,
    /// `kill`, `resume` or `breach`.
    pub kind: String,
    /// The agent.
    pub subject: String,
    /// Who.
    pub actor: String,
    /// JSON details.
    pub detail: Option<String>,
}

/// An audit record to write: what happened to which subject, and who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// `policy.created`, `policy.changed`, `policy.deleted`, `key.created`,
    /// `key.revoked`, `agent.killed`, `agent.resumed`, `breach`.
    pub kind: &'static str,
    /// The subject it concerns.
    pub subject: String,
    /// `admin`, a key id, or `sluice` (the gateway itself).
    pub actor: String,
    /// JSON details (old and new policy, key id, limit, ...).
    pub detail: Option<String>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Order of the trail.
    pub seq: i64,
    /// When, ns.
    pub ts_ns: u64,
    /// What.
    pub kind: String,
    /// Which subject.
    pub subject: String,
    /// Who.
    pub actor: String,
    /// JSON details.
    pub detail: Option<String>,
}

/// Which audit records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this subject.
    pub subject: Option<String>,
    /// Only this kind (`policy` matches every `policy.*`).
    pub kind: Option<String>,
    /// At or after, ns.
    pub since_ns: Option<u64>,
    /// Before, ns.
    pub until_ns: Option<u64>,
    /// After this record (paging).
    pub after: i64,
    /// At most this many.
    pub limit: u32,
}

/// A request for a human's approval, and its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// `apr_...`.
    pub id: String,
    /// When it was asked for, ns.
    pub created_ns: u64,
    /// The subject whose limit refused.
    pub subject: String,
    /// The limit's metric name.
    pub metric: String,
    /// The limit's window (`1h`, `day`).
    pub window: String,
    /// The limit.
    pub limit: u64,
    /// Its usage when asked.
    pub used: u64,
    /// What the parked request asked for (its worst case on the proxy).
    pub requested: Amounts,
    /// The proxied request's model.
    pub model: Option<String>,
    /// Who asked (key id or `admin`).
    pub caller: String,
    /// When the limit would have let the request through by itself, ns.
    pub resets_ns: u64,
    /// `pending`, `approved`, `denied`, `expired`.
    pub status: String,
    /// When decided, ns.
    pub decided_ns: Option<u64>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why (denials).
    pub reason: Option<String>,
    /// The override granted: extra amounts on the subject's limits.
    pub extra: Option<Amounts>,
    /// Until when the override stands, ns.
    pub until_ns: Option<u64>,
}

/// An early warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    /// Its id (0 before it is stored).
    pub seq: i64,
    /// When the threshold was crossed, ns.
    pub ts_ns: u64,
    /// Whose limit.
    pub subject: String,
    /// Which metric.
    pub metric: String,
    /// Which window (`1h`, `day`).
    pub window: String,
    /// The threshold, in basis points of the limit (8000 = 80%).
    pub threshold_bp: u32,
    /// The window instance (fixed: its end, ns; rolling: now / W).
    pub window_key: u64,
    /// Used when crossed.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// `pending`, `delivered`, `failed`, or `recorded` (no webhooks).
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// When delivered, ns.
    pub delivered_ns: Option<u64>,
    /// The approval it announces (`require_approval`), if any.
    pub approval_id: Option<String>,
}

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

/// Spend of a subject over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    /// Sum of amounts.
    pub amounts: Amounts,
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

    /// Every policy: (subject, body JSON, updated ns).
    pub async fn policies(&self) -> Result<Vec<(String, String, u64)>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT subject, body, updated_ns FROM policies ORDER BY subject")
                .fetch_all(pool)
                .await?;
            rows.into_iter()
                .map(|r| {
                    Ok((
                        r.try_get("subject")?,
                        r.try_get("body")?,
                        to_u64(r.try_get("updated_ns")?),
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError)
        })
    }

    /// Insert or replace a policy.
    pub async fn put_policy(
        &self,
        subject: &str,
        body: &str,
        ts_ns: u64,
        audit: &Audit,
    ) -> Result<(), DbError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO policies (subject, body, updated_ns) VALUES ($1, $2, $3)
                 ON CONFLICT (subject) DO UPDATE SET body = excluded.body, updated_ns = excluded.updated_ns",
            )
            .bind(subject)
            .bind(body)
            .bind(to_i64(ts_ns))
            .execute(&mut *tx)
            .await?;
            audit_insert!(tx, ts_ns, audit);
            tx.commit().await?;
            Ok::<_, DbError>(())
        })?;
        self.announce().await?;
        Ok(())
    }

    /// Delete a policy; whether it existed.
    pub async fn delete_policy(
        &self,
        subject: &str,
        ts_ns: u64,
        audit: &Audit,
    ) -> Result<bool, DbError> {
        let out = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let r = sqlx::query("DELETE FROM policies WHERE subject = $1")
                .bind(subject)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() > 0 {
                audit_insert!(tx, ts_ns, audit);
            }
            tx.commit().await?;
            Ok::<_, DbError>(r.rows_affected() > 0)
        })?;
        self.announce().await?;
        Ok(out)
    }

    /// Stop (`killed`) or resume an agent, with an event in the mesh log, in
    /// one transaction; whether its status changed (killing a killed agent
    /// changes nothing and logs nothing).
    pub async fn set_killed(
        &self,
        subject: &str,
        killed: bool,
        ts_ns: u64,
        actor: &str,
        reason: Option<&str>,
        audit: &Audit,
    ) -> Result<bool, DbError> {
        let changed = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let was: Option<i64> =
                sqlx::query_scalar("SELECT killed FROM agent_status WHERE subject = $1")
                    .bind(subject)
                    .fetch_optional(&mut *tx)
                    .await?;
            if (was.unwrap_or(0) != 0) == killed {
                tx.rollback().await?;
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO agent_status (subject, killed, changed_ns, actor, reason) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (subject) DO UPDATE SET killed = excluded.killed, changed_ns = excluded.changed_ns,
                 actor = excluded.actor, reason = excluded.reason",
            )
            .bind(subject)
            .bind(i64::from(killed))
            .bind(to_i64(ts_ns))
            .bind(actor)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            let detail = reason.map(|r| serde_json::json!({ "reason": r }).to_string());
            sqlx::query(
                "INSERT INTO mesh_events (ts_ns, kind, subject, actor, detail) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(to_i64(ts_ns))
            .bind(if killed { "kill" } else { "resume" })
            .bind(subject)
            .bind(actor)
            .bind(detail)
            .execute(&mut *tx)
            .await?;
            audit_insert!(tx, ts_ns, audit);
            tx.commit().await?;
            Ok::<_, DbError>(true)
        })?;
        if changed {
            self.announce().await?;
        }
        Ok(changed)
    }

    /// Append audit records (breaches, gathered off the request path).
    pub async fn audit_many(&self, records: &[(u64, Audit)]) -> Result<(), DbError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for (ts_ns, audit) in records {
                audit_insert!(tx, *ts_ns, audit);
            }
            tx.commit().await?;
            Ok::<_, DbError>(())
        })
    }

    /// Audit records matching `q`, oldest first.
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, DbError> {
        let kind = match &q.kind {
            None => "%".to_owned(),
            Some(k) if k.contains('.') => k.clone(),
            Some(k) => format!("{k}.%"),
        };
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT seq, ts_ns, kind, subject, actor, detail FROM audit
                 WHERE seq > $1 AND subject = COALESCE($2, subject) AND (kind LIKE $3 OR kind = $4)
                 AND ts_ns >= $5 AND ts_ns < $6 ORDER BY seq LIMIT $7",
            )
            .bind(q.after)
            .bind(q.subject.as_deref())
            .bind(&kind)
            .bind(q.kind.as_deref().unwrap_or(""))
            .bind(to_i64(q.since_ns.unwrap_or(0)))
            .bind(to_i64(q.until_ns.unwrap_or(i64::MAX as u64)))
            .bind(i64::from(q.limit))
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(AuditRecord {
                        seq: r.try_get("seq")?,
                        ts_ns: to_u64(r.try_get("ts_ns")?),
                        kind: r.try_get("kind")?,
                        subject: r.try_get("subject")?,
                        actor: r.try_get("actor")?,
                        detail: r.try_get("detail")?,
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
        })
    }

    /// Store a crossing unless a replica already did (same subject, limit,
    /// threshold and window); its id if this call stored it.
    pub async fn insert_alert(&self, a: &AlertRow) -> Result<Option<i64>, DbError> {
        on_pool!(self, pool => {
            let seq: Option<i64> = sqlx::query_scalar(
                "INSERT INTO alerts (ts_ns, subject, metric, win, threshold_bp, window_key, used, lim, status, attempts,
                 approval_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10)
                 ON CONFLICT (subject, metric, win, threshold_bp, window_key) DO NOTHING RETURNING seq",
            )
            .bind(to_i64(a.ts_ns))
            .bind(&a.subject)
            .bind(&a.metric)
            .bind(&a.window)
            .bind(i64::from(a.threshold_bp))
            .bind(to_i64(a.window_key))
            .bind(to_i64(a.used))
            .bind(to_i64(a.limit))
            .bind(&a.status)
            .bind(&a.approval_id)
            .fetch_optional(pool)
            .await?;
            Ok::<_, DbError>(seq)
        })
    }

    /// Record a delivery outcome.
    pub async fn update_alert(
        &self,
        seq: i64,
        status: &str,
        attempts: u32,
        last_error: Option<&str>,
        delivered_ns: Option<u64>,
    ) -> Result<(), DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE alerts SET status = $1, attempts = $2, last_error = $3, delivered_ns = $4 WHERE seq = $5",
            )
            .bind(status)
            .bind(i64::from(attempts))
            .bind(last_error)
            .bind(delivered_ns.map(to_i64))
            .bind(seq)
            .execute(pool)
            .await?;
            Ok::<_, DbError>(())
        })
    }

    /// The newest `limit` alerts (with `status`, if given), newest first.
    pub async fn alerts(&self, status: Option<&str>, limit: u32) -> Result<Vec<AlertRow>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT seq, ts_ns, subject, metric, win, threshold_bp, window_key, used, lim, status, attempts,
                 last_error, delivered_ns, approval_id FROM alerts WHERE status = COALESCE($1, status)
                 ORDER BY seq DESC LIMIT $2",
            )
            .bind(status)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(AlertRow {
                        seq: r.try_get("seq")?,
                        ts_ns: to_u64(r.try_get("ts_ns")?),
                        subject: r.try_get("subject")?,
                        metric: r.try_get("metric")?,
                        window: r.try_get("win")?,
                        threshold_bp: u32::try_from(r.try_get::<i64, _>("threshold_bp")?).unwrap_or(0),
                        window_key: to_u64(r.try_get("window_key")?),
                        used: to_u64(r.try_get("used")?),
                        limit: to_u64(r.try_get("lim")?),
                        status: r.try_get("status")?,
                        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(0),
                        last_error: r.try_get("last_error")?,
                        delivered_ns: r.try_get::<Option<i64>, _>("delivered_ns")?.map(to_u64),
                        approval_id: r.try_get("approval_id")?,
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
        })
    }

    /// Open an approval: `row` as asked, or the one already pending for the
    /// same subject and limit (asked by another request or replica), which
    /// is answered instead (and nothing is written).
    pub async fn open_approval(
        &self,
        row: &ApprovalRow,
        audit: &Audit,
    ) -> Result<ApprovalRow, DbError> {
        let opened = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let r = sqlx::query(
                "INSERT INTO approvals (id, created_ns, subject, metric, win, lim, used, requested, model, caller,
                 resets_ns, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'pending')
                 ON CONFLICT DO NOTHING",
            )
            .bind(&row.id)
            .bind(to_i64(row.created_ns))
            .bind(&row.subject)
            .bind(&row.metric)
            .bind(&row.window)
            .bind(to_i64(row.limit))
            .bind(to_i64(row.used))
            .bind(amounts_text(&row.requested))
            .bind(&row.model)
            .bind(&row.caller)
            .bind(to_i64(row.resets_ns))
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() > 0 {
                audit_insert!(tx, row.created_ns, audit);
            }
            let id: Option<String> = sqlx::query_scalar(
                "SELECT id FROM approvals WHERE subject = $1 AND metric = $2 AND win = $3 AND status = 'pending'",
            )
            .bind(&row.subject)
            .bind(&row.metric)
            .bind(&row.window)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, DbError>(id)
        })?;
        match opened {
            Some(id) if id != row.id => self
                .approval(&id)
                .await?
                .ok_or(DbError(sqlx::Error::RowNotFound)),
            _ => Ok(ApprovalRow {
                status: "pending".into(),
                ..row.clone()
            }),
        }
    }

    /// Decide a pending approval (`approved` with its override, or
    /// `denied`), with its audit record; `None` if it is not pending.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide_approval(
        &self,
        id: &str,
        status: &str,
        decided_ns: u64,
        by: &str,
        reason: Option<&str>,
        extra: Option<&Amounts>,
        until_ns: Option<u64>,
        audit: &Audit,
    ) -> Result<Option<ApprovalRow>, DbError> {
        let changed = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let r = sqlx::query(
                "UPDATE approvals SET status = $1, decided_ns = $2, decided_by = $3, reason = $4, extra = $5,
                 until_ns = $6 WHERE id = $7 AND status = 'pending'",
            )
            .bind(status)
            .bind(to_i64(decided_ns))
            .bind(by)
            .bind(reason)
            .bind(extra.map(amounts_text))
            .bind(until_ns.map(to_i64))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            audit_insert!(tx, decided_ns, audit);
            tx.commit().await?;
            Ok::<_, DbError>(Some(()))
        })?;
        if changed.is_none() {
            return Ok(None);
        }
        self.announce().await?;
        self.approval(id).await
    }

    /// Mark pending approvals whose limit has since let requests through by
    /// itself `expired`; how many.
    pub async fn expire_approvals(&self, now_ns: u64) -> Result<u64, DbError> {
        let n = on_pool!(self, pool => {
            let r = sqlx::query(
                "UPDATE approvals SET status = 'expired', decided_ns = $1 WHERE status = 'pending' AND resets_ns <= $1",
            )
            .bind(to_i64(now_ns))
            .execute(pool)
            .await?;
            Ok::<_, DbError>(r.rows_affected())
        })?;
        if n > 0 {
            self.announce().await?;
        }
        Ok(n)
    }

    /// One approval.
    pub async fn approval(&self, id: &str) -> Result<Option<ApprovalRow>, DbError> {
        Ok(self.approvals_where("id = $1", &[Some(id)], 1).await?.pop())
    }

    /// Approvals, newest first (`status`, `subject` filter).
    pub async fn approvals(
        &self,
        status: Option<&str>,
        subject: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ApprovalRow>, DbError> {
        self.approvals_where(
            "status = COALESCE($1, status) AND subject = COALESCE($2, subject)",
            &[status, subject],
            limit,
        )
        .await
    }

    /// What a replica acts on now: pending approvals, overrides still
    /// standing, denials whose limit has not yet reset.
    pub async fn live_approvals(&self, now_ns: u64) -> Result<Vec<ApprovalRow>, DbError> {
        let now = now_ns.to_string();
        self.approvals_where(
            "status = 'pending' OR (status = 'approved' AND until_ns > CAST($1 AS BIGINT))
             OR (status = 'denied' AND resets_ns > CAST($1 AS BIGINT))",
            &[Some(&now)],
            10_000,
        )
        .await
    }

    /// Approvals matching `filter`, whose `$1`, `$2`, ... are `binds`.
    async fn approvals_where(
        &self,
        filter: &str,
        binds: &[Option<&str>],
        limit: u32,
    ) -> Result<Vec<ApprovalRow>, DbError> {
        let sql = format!(
            "SELECT id, created_ns, subject, metric, win, lim, used, requested, model, caller, resets_ns, status,
             decided_ns, decided_by, reason, extra, until_ns FROM approvals WHERE {filter}
             ORDER BY created_ns DESC, id DESC LIMIT {limit}"
        );
        on_pool!(self, pool => {
            let mut q = sqlx::query(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(pool).await?;
            rows.into_iter()
                .map(|r| {
                    let amounts = |t: Option<String>| t.as_deref().and_then(parse_amounts_text);
                    Ok(ApprovalRow {
                        id: r.try_get("id")?,
                        created_ns: to_u64(r.try_get("created_ns")?),
                        subject: r.try_get("subject")?,
                        metric: r.try_get("metric")?,
                        window: r.try_get("win")?,
                        limit: to_u64(r.try_get("lim")?),
                        used: to_u64(r.try_get("used")?),
                        requested: amounts(r.try_get("requested")?).unwrap_or(Amounts::ZERO),
                        model: r.try_get("model")?,
                        caller: r.try_get("caller")?,
                        resets_ns: to_u64(r.try_get("resets_ns")?),
                        status: r.try_get("status")?,
                        decided_ns: r.try_get::<Option<i64>, _>("decided_ns")?.map(to_u64),
                        decided_by: r.try_get("decided_by")?,
                        reason: r.try_get("reason")?,
                        extra: amounts(r.try_get("extra")?),
                        until_ns: r.try_get::<Option<i64>, _>("until_ns")?.map(to_u64),
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
        })
    }

    /// The agents stopped now.
    pub async fn killed(&self) -> Result<Vec<Killed>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT subject, changed_ns, actor, reason FROM agent_status WHERE killed <> 0 ORDER BY subject",
            )
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(Killed {
                        subject: r.try_get("subject")?,
                        since_ns: to_u64(r.try_get("changed_ns")?),
                        actor: r.try_get("actor")?,
                        reason: r.try_get("reason")?,
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
        })
    }

    /// The newest `limit` mesh events (of `kind`, if given), newest first.
    pub async fn mesh_events(
        &self,
        limit: u32,
        kind: Option<&str>,
    ) -> Result<Vec<MeshEvent>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT 'mesh_events' AS source, seq, ts_ns, kind, subject, actor, detail FROM mesh_events
                 WHERE kind = COALESCE($1, kind)
                 UNION ALL
                 SELECT 'audit' AS source, seq, ts_ns, kind, subject, actor, detail FROM audit
                 WHERE kind = 'breach' AND COALESCE($1, 'breach') = 'breach'
                 ORDER BY ts_ns DESC, seq DESC LIMIT $2",
            )
            .bind(kind)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(MeshEvent {
                        seq: r.try_get("seq")?,
                        source: r.try_get("source")?,
                        ts_ns: to_u64(r.try_get("ts_ns")?),
                        kind: r.try_get("kind")?,
                        subject: r.try_get("subject")?,
                        actor: r.try_get("actor")?,
                        detail: r.try_get("detail")?,
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
        })
    }

    /// Keys not revoked.
    pub async fn keys(&self) -> Result<Vec<KeyRow>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, hash, subject, name, prefix, created_ns FROM api_keys
                 WHERE revoked_ns IS NULL ORDER BY created_ns, id",
            )
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(KeyRow {
                        id: r.try_get("id")?,
                        hash: r.try_get("hash")?,
                        subject: r.try_get("subject")?,
                        name: r.try_get("name")?,
                        prefix: r.try_get("prefix")?,
                        created_ns: to_u64(r.try_get("created_ns")?),
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError)
        })
    }

    /// Store a new key.
    pub async fn insert_key(&self, key: &KeyRow, audit: &Audit) -> Result<(), DbError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO api_keys (id, hash, subject, name, prefix, created_ns) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&key.id)
            .bind(&key.hash)
            .bind(&key.subject)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(to_i64(key.created_ns))
            .execute(&mut *tx)
            .await?;
            audit_insert!(tx, key.created_ns, audit);
            tx.commit().await?;
            Ok::<_, DbError>(())
        })?;
        self.announce().await?;
        Ok(())
    }

    /// Revoke a key; whether it was live.
    pub async fn revoke_key(&self, id: &str, ts_ns: u64, audit: &Audit) -> Result<bool, DbError> {
        let out = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let r =
                sqlx::query("UPDATE api_keys SET revoked_ns = $1 WHERE id = $2 AND revoked_ns IS NULL")
                    .bind(to_i64(ts_ns))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            if r.rows_affected() > 0 {
                audit_insert!(tx, ts_ns, audit);
            }
            tx.commit().await?;
            Ok::<_, DbError>(r.rows_affected() > 0)
        })?;
        self.announce().await?;
        Ok(out)
    }

    /// Ledger rows at or after `since_ns`, in the order written.
    pub async fn ledger_since(&self, since_ns: u64) -> Result<Vec<LedgerRow>, DbError> {
        on_pool!(self, pool => {
            // Binary search on seq (the rowid) for the first row stamped at or
            // after `since - slack`; rows are appended in time order up to the slack.
            let target = to_i64(since_ns.saturating_sub(ORDER_SLACK_NS));
            let bounds: (Option<i64>, Option<i64>) =
                sqlx::query_as("SELECT MIN(seq), MAX(seq) FROM ledger")
                    .fetch_one(pool)
                    .await?;
            let (Some(mut lo), Some(mut hi)) = bounds else {
                return Ok(Vec::new());
            };
            hi += 1;
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let ts: Option<i64> =
                    sqlx::query_scalar("SELECT ts_ns FROM ledger WHERE seq >= $1 ORDER BY seq LIMIT 1")
                        .bind(mid)
                        .fetch_optional(pool)
                        .await?;
                match ts {
                    Some(ts) if ts < target => lo = mid + 1,
                    _ => hi = mid,
                }
            }
            let rows = sqlx::query(
                "SELECT ts_ns, kind, reservation, subjects, requests, tokens, input_tokens, output_tokens,
                 cost_micros, held, reserved_ns, caller, request_id, detail
                 FROM ledger WHERE seq >= $1 AND ts_ns >= $2 ORDER BY seq",
            )
            .bind(lo)
            .bind(to_i64(since_ns))
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let kind: String = r.try_get("kind")?;
                let Some(kind) = RowKind::parse(&kind) else {
                    continue;
                };
                let subjects: String = r.try_get("subjects")?;
                let held: Option<String> = r.try_get("held")?;
                let amounts = amounts_of(&r)?;
                out.push(LedgerRow {
                    ts_ns: to_u64(r.try_get("ts_ns")?),
                    kind,
                    reservation: r.try_get("reservation")?,
                    subjects: serde_json::from_str(&subjects).unwrap_or_default(),
                    amounts,
                    held: held.as_deref().and_then(parse_amounts_text),
                    reserved_ns: r.try_get::<Option<i64>, _>("reserved_ns")?.map(to_u64),
                    caller: r.try_get("caller")?,
                    request_id: r.try_get("request_id")?,
                    detail: r.try_get("detail")?,
                });
            }
            Ok(out)
        })
    }

    /// Ledger rows in all.
    pub async fn ledger_len(&self) -> Result<u64, DbError> {
        on_pool!(self, pool => {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger")
                .fetch_one(pool)
                .await?;
            Ok(to_u64(n))
        })
    }

    /// Spend of a subject on days `from..=to` (UTC, `YYYY-MM-DD`); `None` bounds mean all time.
    pub async fn spend(
        &self,
        subject: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Spend, DbError> {
        on_pool!(self, pool => {
            let r = sqlx::query(
                "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) AS requests,
                 CAST(COALESCE(SUM(tokens), 0) AS BIGINT) AS tokens,
                 CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens,
                 CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens,
                 CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS cost_micros
                 FROM spend_daily WHERE subject = $1 AND day >= $2 AND day <= $3",
            )
            .bind(subject)
            .bind(from.unwrap_or("0000-00-00"))
            .bind(to.unwrap_or("9999-99-99"))
            .fetch_one(pool)
            .await?;
            let amounts = amounts_of(&r)?;
            Ok(Spend { amounts })
        })
    }

    /// Idempotency records created at or after `since_ns`.
    pub async fn idempotency_since(&self, since_ns: u64) -> Result<Vec<IdemRow>, DbError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT scope, created_ns, fingerprint, status, headers, body FROM idempotency WHERE created_ns >= $1",
            )
            .bind(to_i64(since_ns))
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(IdemRow {
                        scope: r.try_get("scope")?,
                        created_ns: to_u64(r.try_get("created_ns")?),
                        fingerprint: r.try_get("fingerprint")?,
                        status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(200),
                        headers: r.try_get("headers")?,
                        body: r.try_get("body")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError)
        })
    }

    /// Drop idempotency records older than `before_ns`.
    pub async fn prune_idempotency(&self, before_ns: u64) -> Result<u64, DbError> {
        on_pool!(self, pool => {
            let r = sqlx::query("DELETE FROM idempotency WHERE created_ns < $1")
                .bind(to_i64(before_ns))
                .execute(pool)
                .await?;
            Ok(r.rows_affected())
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
