//! The ledger writer: rows are queued by request handlers and written by one
//! thread, with its own SQLite connection, in transactions (group commit). In `batch` mode the writer gathers
//! rows for `ledger_batch_ms` (default 10 ms) after the first one, then writes
//! them all, so a row reaches disk at most that long plus one write after it
//! is acknowledged; in `always` mode the handler waits for the transaction
//! before it answers (and the writer does not wait to gather). A failed write is retried with
//! backoff and never dropped; the queue is bounded, so a stalled database
//! slows decisions instead of losing rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_core::Clock;

use crate::server::SharedClock;
use tokio::sync::{mpsc, oneshot};

use crate::config::LedgerSync;
use sluice_core::Metric;

use crate::db::{IdemRow, LedgerRow};

/// Rows that may wait in the queue before handlers wait for room.
pub const QUEUE: usize = 65_536;
/// Most rows in one transaction.
const MAX_BATCH: usize = 4_096;

enum Msg {
    Rows {
        rows: Vec<LedgerRow>,
        idem: Option<IdemRow>,
        enqueued_ns: u64,
        ack: Option<oneshot::Sender<()>>,
    },
    Flush(oneshot::Sender<()>),
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Rows queued and not yet written.
    pub pending: AtomicU64,
    /// Rows written since start.
    pub written: AtomicU64,
    /// Write transactions that failed (and were retried).
    pub failures: AtomicU64,
    /// How long the oldest row of the last batch waited, ns.
    pub last_lag_ns: AtomicU64,
}

/// The handle request handlers write through.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    sync: LedgerSync,
    clock: SharedClock,
    /// Counters.
    pub stats: Arc<LedgerStats>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Ledger {
    /// Start the writer thread on `db` (already migrated): SQLite through
    /// its own connection to the file `path`, PostgreSQL through the pool.
    pub fn start(
        db: &crate::db::Db,
        path: &std::path::Path,
        sync: LedgerSync,
        gather: Duration,
        clock: SharedClock,
    ) -> Result<Ledger, rusqlite::Error> {
        let sink = match db.pool() {
            crate::db::Pool::Sqlite(_) => Sink::Sqlite(SqliteSink::open(path, sync)?),
            crate::db::Pool::Postgres(pool) => Sink::Postgres(PgSink {
                pool: pool.clone(),
                runtime: tokio::runtime::Handle::current(),
                tag: format!("{:x}-{:x}", std::process::id(), clock.now().as_nanos()),
                batch: 0,
                clock: clock.clone(),
            }),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(LedgerStats::default());
        let gather = match sync {
            LedgerSync::Batch => gather,
            LedgerSync::Always => Duration::ZERO,
        };
        let (st, ck) = (Arc::clone(&stats), clock.clone());
        std::thread::Builder::new()
            .name("sluice-ledger".into())
            .spawn(move || writer(sink, rx, gather, &st, &ck))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Ledger {
            tx,
            sync,
            clock,
            stats,
        })
    }

    /// Queue rows (and an idempotency record, written in the same
    /// transaction); with `ledger_sync = "always"`, wait until they are durable.
    pub async fn record(&self, rows: Vec<LedgerRow>, idem: Option<IdemRow>) {
        let n = rows.len() as u64;
        let (ack, wait) = match self.sync {
            LedgerSync::Always => {
                let (a, w) = oneshot::channel();
                (Some(a), Some(w))
            }
            LedgerSync::Batch => (None, None),
        };
        let msg = self.rows(rows, idem, ack);
        if self.tx.send(msg).await.is_err() {
            tracing::error!("ledger writer has stopped; {n} rows not recorded");
            return;
        }
        if let Some(w) = wait {
            let _ = w.await;
        }
    }

    /// Queue rows without waiting, when that is all `record` would do
    /// (batch mode, room in the queue); otherwise give them back, for the
    /// caller to `record` from a task. For settling from a `Drop`, where a
    /// task per row would cost more than the row.
    pub fn try_record(&self, rows: Vec<LedgerRow>) -> Result<(), Vec<LedgerRow>> {
        if self.sync != LedgerSync::Batch {
            return Err(rows);
        }
        let n = rows.len() as u64;
        match self.tx.try_send(self.rows(rows, None, None)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.pending.fetch_sub(n, Ordering::Relaxed);
                match e.into_inner() {
                    Msg::Rows { rows, .. } => Err(rows),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The message that queues `rows`, counted as pending from now.
    fn rows(
        &self,
        rows: Vec<LedgerRow>,
        idem: Option<IdemRow>,
        ack: Option<oneshot::Sender<()>>,
    ) -> Msg {
        self.stats
            .pending
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Msg::Rows {
            rows,
            idem,
            enqueued_ns: self.clock.now().as_nanos(),
            ack,
        }
    }

    /// Wait until everything queued so far is written.
    pub async fn flush(&self) {
        let (a, w) = oneshot::channel();
        if self.tx.send(Msg::Flush(a)).await.is_ok() {
            let _ = w.await;
        }
    }
}

/// Writes ledger batches to SQLite through one connection of its own:
/// prepared statements, one transaction per batch.
#[derive(Debug)]
pub struct SqliteSink {
    conn: rusqlite::Connection,
}

const INSERT_ROW: &str = "INSERT INTO ledger (ts_ns, kind, reservation, subjects, requests, tokens, \
    input_tokens, output_tokens, cost_micros, held, reserved_ns, caller, request_id, detail) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const UPSERT_SPEND: &str = "INSERT INTO spend_daily (subject, day, requests, tokens, input_tokens, \
    output_tokens, cost_micros) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
    ON CONFLICT (subject, day) DO UPDATE SET \
    requests = spend_daily.requests + excluded.requests, \
    tokens = spend_daily.tokens + excluded.tokens, \
    input_tokens = spend_daily.input_tokens + excluded.input_tokens, \
    output_tokens = spend_daily.output_tokens + excluded.output_tokens, \
    cost_micros = spend_daily.cost_micros + excluded.cost_micros";

const INSERT_IDEM: &str = "INSERT INTO idempotency (scope, created_ns, fingerprint, status, headers, body) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (scope) DO NOTHING";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteSink {
    /// Open the (migrated) database file for writing.
    pub fn open(path: &std::path::Path, sync: LedgerSync) -> Result<SqliteSink, rusqlite::Error> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match sync {
                LedgerSync::Batch => "NORMAL",
                LedgerSync::Always => "FULL",
            },
        )?;
        conn.pragma_update(None, "cache_size", -16_384)?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(SqliteSink { conn })
    }

    /// Write rows and idempotency records in one transaction, rolling spend
    /// up per subject and UTC day.
    pub fn write(&mut self, rows: &[LedgerRow], idem: &[IdemRow]) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT_ROW)?;
            for row in rows {
                let subjects = subjects_json(&row.subjects);
                let a = &row.amounts;
                insert.execute(rusqlite::params![
                    i64_of(row.ts_ns),
                    row.kind.name(),
                    row.reservation.as_deref(),
                    subjects,
                    i64_of(a.get(Metric::Requests)),
                    i64_of(a.get(Metric::Tokens)),
                    i64_of(a.get(Metric::InputTokens)),
                    i64_of(a.get(Metric::OutputTokens)),
                    i64_of(a.get(Metric::CostUsd)),
                    row.held.as_ref().map(crate::db::amounts_text),
                    row.reserved_ns.map(i64_of),
                    row.caller.as_str(),
                    row.request_id.as_deref(),
                    row.detail.as_deref(),
                ])?;
            }
            let mut upsert = tx.prepare_cached(UPSERT_SPEND)?;
            for ((subject, day), a) in &rollup(rows) {
                upsert.execute(rusqlite::params![
                    subject,
                    crate::db::utc_day(day * 86_400_000_000_000),
                    i64_of(a.get(Metric::Requests)),
                    i64_of(a.get(Metric::Tokens)),
                    i64_of(a.get(Metric::InputTokens)),
                    i64_of(a.get(Metric::OutputTokens)),
                    i64_of(a.get(Metric::CostUsd)),
                ])?;
            }
            let mut idem_insert = tx.prepare_cached(INSERT_IDEM)?;
            for r in idem {
                idem_insert.execute(rusqlite::params![
                    r.scope,
                    i64_of(r.created_ns),
                    r.fingerprint,
                    i64::from(r.status),
                    r.headers,
                    r.body,
                ])?;
            }
        }
        tx.commit()
    }
}

/// Where the writer writes.
#[derive(Debug)]
enum Sink {
    Sqlite(SqliteSink),
    Postgres(PgSink),
}

impl Sink {
    fn write(&mut self, rows: &[LedgerRow], idem: &[IdemRow]) -> Result<(), String> {
        match self {
            Sink::Sqlite(s) => s.write(rows, idem).map_err(|e| e.to_string()),
            Sink::Postgres(s) => s.write(rows, idem).map_err(|e| e.to_string()),
        }
    }
}

/// Writes ledger batches to PostgreSQL: one transaction per batch, the rows
/// in one `INSERT ... SELECT FROM UNNEST` (one round trip however many).
///
/// Each batch is marked in `ledger_batches` in its own transaction: if a
/// commit's answer is lost (the connection drops after PostgreSQL committed),
/// the retry finds the mark and writes nothing twice. Marks older than a day
/// are pruned as the writer goes.
pub struct PgSink {
    pool: sqlx::PgPool,
    runtime: tokio::runtime::Handle,
    /// This process's writer, unique across replicas and restarts.
    tag: String,
    /// The batch being written (advances when one is written).
    batch: u64,
    clock: SharedClock,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink")
            .field("tag", &self.tag)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// How long a batch mark is kept: far longer than any retry runs.
const BATCH_MARK_NS: u64 = 86_400 * 1_000_000_000;

const PG_INSERT_ROWS: &str = "INSERT INTO ledger (ts_ns, kind, reservation, subjects, requests, tokens, \
    input_tokens, output_tokens, cost_micros, held, reserved_ns, caller, request_id, detail) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], \
    $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::bigint[], $12::text[], $13::text[], $14::text[])";

impl PgSink {
    fn write(&mut self, rows: &[LedgerRow], idem: &[IdemRow]) -> Result<(), sqlx::Error> {
        let col =
            |m: Metric| -> Vec<i64> { rows.iter().map(|r| i64_of(r.amounts.get(m))).collect() };
        let ts: Vec<i64> = rows.iter().map(|r| i64_of(r.ts_ns)).collect();
        let kind: Vec<&str> = rows.iter().map(|r| r.kind.name()).collect();
        let reservation: Vec<Option<&str>> =
            rows.iter().map(|r| r.reservation.as_deref()).collect();
        let subjects: Vec<String> = rows.iter().map(|r| subjects_json(&r.subjects)).collect();
        let held: Vec<Option<String>> = rows
            .iter()
            .map(|r| r.held.as_ref().map(crate::db::amounts_text))
            .collect();
        let reserved: Vec<Option<i64>> = rows.iter().map(|r| r.reserved_ns.map(i64_of)).collect();
        let caller: Vec<&str> = rows.iter().map(|r| r.caller.as_str()).collect();
        let request_id: Vec<Option<&str>> = rows.iter().map(|r| r.request_id.as_deref()).collect();
        let detail: Vec<Option<&str>> = rows.iter().map(|r| r.detail.as_deref()).collect();
        let rollup = rollup(rows);
        let id = format!("{}:{}", self.tag, self.batch);
        let now = self.clock.now().as_nanos();
        let prune = self.batch % 1_000 == 999;
        let written = self.runtime.block_on(async {
            let mut tx = self.pool.begin().await?;
            let fresh = sqlx::query(
                "INSERT INTO ledger_batches (id, ts_ns) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&id)
            .bind(i64_of(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if fresh == 0 {
                // Written by an attempt whose commit answer was lost.
                tx.rollback().await?;
                return Ok::<bool, sqlx::Error>(false);
            }
            if prune {
                sqlx::query("DELETE FROM ledger_batches WHERE ts_ns < $1")
                    .bind(i64_of(now.saturating_sub(BATCH_MARK_NS)))
                    .execute(&mut *tx)
                    .await?;
            }
            if !rows.is_empty() {
                sqlx::query(PG_INSERT_ROWS)
                    .bind(&ts)
                    .bind(&kind)
                    .bind(&reservation)
                    .bind(&subjects)
                    .bind(col(Metric::Requests))
                    .bind(col(Metric::Tokens))
                    .bind(col(Metric::InputTokens))
                    .bind(col(Metric::OutputTokens))
                    .bind(col(Metric::CostUsd))
                    .bind(&held)
                    .bind(&reserved)
                    .bind(&caller)
                    .bind(&request_id)
                    .bind(&detail)
                    .execute(&mut *tx)
                    .await?;
            }
            for ((subject, day), a) in &rollup {
                sqlx::query(UPSERT_SPEND_PG)
                    .bind(*subject)
                    .bind(crate::db::utc_day(day * 86_400_000_000_000))
                    .bind(i64_of(a.get(Metric::Requests)))
                    .bind(i64_of(a.get(Metric::Tokens)))
                    .bind(i64_of(a.get(Metric::InputTokens)))
                    .bind(i64_of(a.get(Metric::OutputTokens)))
                    .bind(i64_of(a.get(Metric::CostUsd)))
                    .execute(&mut *tx)
                    .await?;
            }
            for r in idem {
                sqlx::query(
                    "INSERT INTO idempotency (scope, created_ns, fingerprint, status, headers, body) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope) DO NOTHING",
                )
                .bind(&r.scope)
                .bind(i64_of(r.created_ns))
                .bind(&r.fingerprint)
                .bind(i64::from(r.status))
                .bind(&r.headers)
                .bind(&r.body)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })?;
        if !written {
            tracing::warn!(
                "ledger batch {id} was already written (a commit whose answer was lost); not written again"
            );
        }
        self.batch += 1;
        Ok(())
    }
}

const UPSERT_SPEND_PG: &str = "INSERT INTO spend_daily (subject, day, requests, tokens, input_tokens, \
    output_tokens, cost_micros) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (subject, day) DO UPDATE SET \
    requests = spend_daily.requests + excluded.requests, \
    tokens = spend_daily.tokens + excluded.tokens, \
    input_tokens = spend_daily.input_tokens + excluded.input_tokens, \
    output_tokens = spend_daily.output_tokens + excluded.output_tokens, \
    cost_micros = spend_daily.cost_micros + excluded.cost_micros";

/// `["a","b"]`: subjects hold no quotes, backslashes or control characters.
fn subjects_json(subjects: &[String]) -> String {
    let mut out = String::with_capacity(2 + subjects.iter().map(|s| s.len() + 3).sum::<usize>());
    out.push('[');
    for (i, s) in subjects.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
    out.push(']');
    out
}

/// Spend rows summed per subject and UTC day (index since the epoch).
fn rollup(rows: &[LedgerRow]) -> std::collections::HashMap<(&str, u64), sluice_core::Amounts> {
    let mut rollup: std::collections::HashMap<(&str, u64), sluice_core::Amounts> =
        std::collections::HashMap::new();
    for row in rows {
        if row.kind.is_spend() && row.amounts != sluice_core::Amounts::ZERO {
            let day = row.ts_ns / 86_400_000_000_000;
            for s in &row.subjects {
                let sum = rollup
                    .entry((s.as_str(), day))
                    .or_insert(sluice_core::Amounts::ZERO);
                for m in Metric::ALL {
                    sum.set(m, sum.get(m).saturating_add(row.amounts.get(m)));
                }
            }
        }
    }
    rollup
}

fn writer(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Msg>,
    gather: Duration,
    stats: &LedgerStats,
    clock: &SharedClock,
) {
    let mut rows = Vec::new();
    let mut idem = Vec::new();
    let mut acks = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut oldest = u64::MAX;
        let mut take = |msg: Msg,
                        rows: &mut Vec<LedgerRow>,
                        idem: &mut Vec<IdemRow>,
                        acks: &mut Vec<oneshot::Sender<()>>| match msg {
            Msg::Rows {
                rows: r,
                idem: i,
                enqueued_ns,
                ack,
            } => {
                oldest = oldest.min(enqueued_ns);
                rows.extend(r);
                idem.extend(i);
                acks.extend(ack);
            }
            Msg::Flush(ack) => acks.push(ack),
        };
        let flush = matches!(first, Msg::Flush(_));
        take(first, &mut rows, &mut idem, &mut acks);
        if !gather.is_zero() && !flush {
            // Gather by sleeping, then drain: one transaction carries a whole
            // interval's rows, and nothing is woken once per row.
            std::thread::sleep(gather);
        }
        while rows.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut rows, &mut idem, &mut acks),
                Err(_) => break,
            }
        }
        if !rows.is_empty() || !idem.is_empty() {
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = sink.write(&rows, &idem) {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "ledger write of {} rows failed, retrying in {:?}: {e}",
                    rows.len(),
                    backoff
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            let n = rows.len() as u64;
            stats.pending.fetch_sub(n, Ordering::Relaxed);
            stats.written.fetch_add(n, Ordering::Relaxed);
            if oldest != u64::MAX {
                stats.last_lag_ns.store(
                    clock.now().as_nanos().saturating_sub(oldest),
                    Ordering::Relaxed,
                );
            }
        }
        rows.clear();
        idem.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::db::{Db, LedgerRow, RowKind};
    use sluice_core::{Amounts, ManualClock, Timestamp};

    /// A batch retried after its commit answer was lost is not written twice
    /// (the retry finds the batch's mark); the next batch is written.
    #[test]
    fn postgres_batch_retried_after_a_lost_commit_is_written_once() {
        let Some(admin) = std::env::var("SLUICE_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            eprintln!("NOTICE: SLUICE_TEST_DATABASE_URL is not set; skipping");
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let name = format!("sluice_test_ledger_batches_{}", std::process::id());
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        let admin_pool = rt.block_on(async {
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&pool)
                .await
                .unwrap();
            pool
        });
        let db = rt.block_on(Db::open_postgres(&url)).unwrap();
        let crate::db::Pool::Postgres(pool) = db.pool().clone() else {
            panic!("not PostgreSQL");
        };
        let clock = SharedClock(Arc::new(ManualClock::new(Timestamp::from_nanos(
            1_800_000_000_000_000_000,
        ))));
        let mut sink = PgSink {
            pool: pool.clone(),
            runtime: rt.handle().clone(),
            tag: "test".to_owned(),
            batch: 0,
            clock,
        };
        let row = LedgerRow {
            ts_ns: 1_800_000_000_000_000_000,
            kind: RowKind::Check,
            reservation: None,
            subjects: vec!["user:1".to_owned()],
            amounts: Amounts::one_request(),
            held: None,
            reserved_ns: None,
            caller: "admin".to_owned(),
            request_id: None,
            detail: None,
        };
        let rows = vec![row.clone(), row];
        let count = || -> i64 {
            rt.block_on(sqlx::query_scalar("SELECT COUNT(*) FROM ledger").fetch_one(&pool))
                .unwrap()
        };
        sink.write(&rows, &[]).unwrap();
        assert_eq!(count(), 2);
        // The writer saw an error for batch 0 although it committed: it retries batch 0.
        sink.batch = 0;
        sink.write(&rows, &[]).unwrap();
        assert_eq!(count(), 2, "a retried batch was written twice");
        assert_eq!(sink.batch, 1);
        sink.write(&rows, &[]).unwrap();
        assert_eq!(count(), 4);
        rt.block_on(async {
            pool.close().await;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin_pool)
                .await
                .unwrap();
        });
    }
}
