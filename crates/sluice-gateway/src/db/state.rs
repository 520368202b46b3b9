//! Policies, the kill switch and its events, and agent keys.

use super::*;

impl Db {
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
}
