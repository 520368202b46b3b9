//! Ledger reads (replay at start), spend roll-ups, and idempotency records.

use super::*;

/// How far out of time order ledger rows may be (each row is stamped at its
/// decision and queued at once; only queueing separates them). Replay starts
/// this much earlier than it needs and filters by time.
const ORDER_SLACK_NS: u64 = 300 * 1_000_000_000;

impl Db {
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
}
