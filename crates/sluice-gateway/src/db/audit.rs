//! The audit trail and early-warning alerts.

use super::*;

impl Db {
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
}
