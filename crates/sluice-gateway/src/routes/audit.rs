//! The audit trail (`GET /v1/audit`) and early-warning alerts (`GET /v1/alerts`).

use super::*;

/// An instant from a query: RFC 3339, or seconds since the epoch.
pub(super) fn query_time(field: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(secs) = v.parse::<u64>() {
        return secs
            .checked_mul(1_000_000_000)
            .ok_or_else(|| ApiError::invalid(field, format!("{v} seconds is too far out")));
    }
    let t: jiff::Timestamp = v.parse().map_err(|e| {
        ApiError::invalid(
            field,
            format!("expected RFC 3339 (2026-11-22T10:00:00Z) or seconds since the epoch, got {v:?}: {e}"),
        )
    })?;
    u64::try_from(t.as_nanosecond())
        .map_err(|_| ApiError::invalid(field, format!("{v:?} is before 1970")))
}

/// `GET /v1/audit?subject=&kind=&since=&until=&after=&limit=`: the trail,
/// oldest first; `next_after` pages on.
pub(super) async fn audit(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let mut q = crate::db::AuditQuery {
                limit: query_limit(&pairs, 100, 1_000)?,
                ..crate::db::AuditQuery::default()
            };
            for (k, v) in &pairs {
                match k.as_str() {
                    "subject" => {
                        let s = Subject::parse(v)
                            .map_err(|e| ApiError::invalid("subject", e.to_string()))?;
                        q.subject = Some(s.as_str().to_owned());
                    }
                    "kind" => {
                        const KINDS: &[&str] = &[
                            "policy",
                            "key",
                            "agent",
                            "breach",
                            "policy.created",
                            "policy.changed",
                            "policy.deleted",
                            "key.created",
                            "key.revoked",
                            "agent.killed",
                            "agent.resumed",
                            "breach.dropped",
                            "alert",
                            "alert.sent",
                            "alert.failed",
                            "approval",
                            "approval.requested",
                            "approval.approved",
                            "approval.denied",
                        ];
                        if !KINDS.contains(&v.as_str()) {
                            return Err(ApiError::invalid(
                                "kind",
                                format!("expected one of {}, got {v:?}", KINDS.join(", ")),
                            ));
                        }
                        q.kind = Some(v.clone());
                    }
                    "since" => q.since_ns = Some(query_time("since", v)?),
                    "until" => q.until_ns = Some(query_time("until", v)?),
                    "after" => {
                        q.after = v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                            ApiError::invalid("after", format!("expected a record id, got {v:?}"))
                        })?;
                    }
                    "limit" => {}
                    other => {
                        return Err(ApiError::invalid(
                            other,
                            "unknown parameter (subject, kind, since, until, after, limit)",
                        ));
                    }
                }
            }
            let rows = st
                .db
                .audit(&q)
                .await
                .map_err(|e| ApiError::internal("reading the audit trail", e))?;
            let next = (rows.len() == q.limit as usize)
                .then(|| rows.last().map(|r| r.seq))
                .flatten();
            let records: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    json!({
                        "id": r.seq,
                        "at": rfc3339(r.ts_ns),
                        "kind": r.kind,
                        "subject": r.subject,
                        "actor": r.actor,
                        "detail": r.detail.and_then(|d| serde_json::from_str::<Value>(&d).ok()),
                    })
                })
                .collect();
            Ok(json::reply(
                StatusCode::OK,
                &json!({ "records": records, "next_after": next }),
            ))
        }
        .await,
    )
}

/// `GET /v1/alerts?status=&limit=`: early warnings raised, newest first,
/// with their delivery outcome.
pub(super) async fn alerts(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 50, 1_000)?;
            let status = pairs
                .iter()
                .find(|(k, _)| k == "status")
                .map(|(_, v)| v.as_str());
            if let Some(s) = status {
                if !["pending", "delivered", "failed", "recorded"].contains(&s) {
                    return Err(ApiError::invalid(
                        "status",
                        format!("expected pending, delivered, failed or recorded, got {s:?}"),
                    ));
                }
            }
            let rows = st
                .db
                .alerts(status, limit)
                .await
                .map_err(|e| ApiError::internal("reading alerts", e))?;
            let alerts: Vec<Value> = rows
                .into_iter()
                .map(|a| {
                    let metric: sluice_core::Metric =
                        a.metric.parse().unwrap_or(sluice_core::Metric::Requests);
                    json!({
                        "id": a.seq,
                        "at": rfc3339(a.ts_ns),
                        "subject": a.subject,
                        "metric": a.metric,
                        "window": a.window,
                        "threshold": f64::from(a.threshold_bp) / 10_000.0,
                        "used": metric_value(metric, a.used),
                        "limit": metric_value(metric, a.limit),
                        "status": a.status,
                        "attempts": a.attempts,
                        "last_error": a.last_error,
                        "delivered_at": a.delivered_ns.map(rfc3339),
                        "approval_id": a.approval_id,
                    })
                })
                .collect();
            let dropped = st.alerts.dropped.load(std::sync::atomic::Ordering::Relaxed);
            Ok(json::reply(
                StatusCode::OK,
                &json!({ "alerts": alerts, "dropped_on_this_replica": dropped }),
            ))
        }
        .await,
    )
}
