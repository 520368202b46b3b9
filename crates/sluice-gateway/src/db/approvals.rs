//! Approvals: requests held for a human, one pending per (subject, limit).

use super::*;

impl Db {
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
}
