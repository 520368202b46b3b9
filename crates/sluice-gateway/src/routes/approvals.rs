//! Requests held for a human: `GET /v1/approvals[/{id}]`, `POST .../approve|deny`.

use super::*;

/// An approval as answered.
fn approval_json(a: &crate::db::ApprovalRow) -> Value {
    let metric: sluice_core::Metric = a.metric.parse().unwrap_or(sluice_core::Metric::Requests);
    json!({
        "id": a.id,
        "status": a.status,
        "subject": a.subject,
        "limit": {
            "metric": a.metric,
            "window": a.window,
            "limit": metric_value(metric, a.limit),
            "used": metric_value(metric, a.used),
        },
        "requested": wire::amounts_json(&a.requested),
        "model": a.model,
        "estimated_cost_usd": metric_value(sluice_core::Metric::CostUsd, a.requested.get(sluice_core::Metric::CostUsd)),
        "caller": a.caller,
        "created_at": rfc3339(a.created_ns),
        "resets_at": rfc3339(a.resets_ns),
        "decided_at": a.decided_ns.map(rfc3339),
        "decided_by": a.decided_by,
        "reason": a.reason,
        "extra": a.extra.as_ref().map(wire::amounts_json),
        "until": a.until_ns.map(rfc3339),
    })
}

/// `GET /v1/approvals?status=pending&subject=&limit=`: newest first.
pub(super) async fn list_approvals(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 100, 1_000)?;
            let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            let status = get("status");
            if let Some(s) = status {
                if !["pending", "approved", "denied", "expired"].contains(&s) {
                    return Err(ApiError::invalid(
                        "status",
                        format!("expected pending, approved, denied or expired, got {s:?}"),
                    ));
                }
            }
            let subject = get("subject")
                .map(|s| {
                    Subject::parse(s)
                        .map(|s| s.as_str().to_owned())
                        .map_err(|e| ApiError::invalid("subject", e.to_string()))
                })
                .transpose()?;
            let rows = st
                .db
                .approvals(status, subject.as_deref(), limit)
                .await
                .map_err(|e| ApiError::internal("reading approvals", e))?;
            let out: Vec<Value> = rows.iter().map(approval_json).collect();
            Ok(json::reply(StatusCode::OK, &json!({ "approvals": out })))
        }
        .await,
    )
}

/// The approval a path names, or 404.
async fn path_approval(st: &AppState, id: &str) -> Result<crate::db::ApprovalRow, ApiError> {
    st.db
        .approval(id)
        .await
        .map_err(|e| ApiError::internal("reading an approval", e))?
        .ok_or_else(|| ApiError::not_found(format!("no approval {id}")).field("id"))
}

/// `GET /v1/approvals/{id}`.
pub(super) async fn get_approval(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let a = path_approval(&st, &id).await?;
            Ok(json::reply(StatusCode::OK, &approval_json(&a)))
        }
        .await,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    extra: Option<wire::AmountsBody>,
    #[serde(default)]
    until: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The longest override an approval grants.
const MAX_OVERRIDE_NS: u64 = 31 * 86_400 * 1_000_000_000;

/// `POST /v1/approvals/{id}/approve {"extra": {...}, "until": "..."}`: the
/// override (extra amounts on the subject's limits of those metrics; by
/// default what the parked request asked for on the refusing limit's
/// metric) stands until `until` (default: when the refusing limit resets);
/// the parked requests proceed.
pub(super) async fn approve(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    result(
        async {
            let (caller, req) =
                admin_with_optional_body::<ApproveBody>(&st, &headers, body).await?;
            let a = path_approval(&st, &id).await?;
            let now = st.now().as_nanos();
            let extra = match &req.extra {
                Some(e) => e.to_amounts("extra")?,
                None => {
                    let metric: sluice_core::Metric =
                        a.metric.parse().unwrap_or(sluice_core::Metric::Requests);
                    let mut x = Amounts::ZERO;
                    x.set(metric, a.requested.get(metric).max(1));
                    x
                }
            };
            if extra == Amounts::ZERO {
                return Err(ApiError::invalid(
                    "extra",
                    "grant at least one amount, e.g. {\"requests\": 50} or {\"cost_usd\": 5}",
                ));
            }
            let until = match &req.until {
                None => a.resets_ns.max(now.saturating_add(1_000_000_000)),
                Some(Value::String(t)) => query_time("until", t)?,
                Some(Value::Number(n)) => query_time("until", &n.to_string())?,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "until",
                        "expected RFC 3339 (2026-11-22T10:00:00Z) or seconds since the epoch",
                    ));
                }
            };
            if until <= now || until - now > MAX_OVERRIDE_NS {
                return Err(ApiError::invalid(
                    "until",
                    format!(
                        "must be after now ({}) and at most 31 days ahead",
                        rfc3339(now)
                    ),
                ));
            }
            decide(&st, &caller, a, "approved", None, Some(extra), Some(until)).await
        }
        .await,
    )
}

/// `POST /v1/approvals/{id}/deny {"reason": "..."}`: the parked requests
/// are refused; the limit stands until it resets.
pub(super) async fn deny(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    result(
        async {
            let (caller, req) = admin_with_optional_body::<DenyBody>(&st, &headers, body).await?;
            if req.reason.as_ref().is_some_and(|r| r.len() > 1_000) {
                return Err(ApiError::invalid("reason", "at most 1000 bytes"));
            }
            let a = path_approval(&st, &id).await?;
            decide(&st, &caller, a, "denied", req.reason.as_deref(), None, None).await
        }
        .await,
    )
}

/// Record a decision (409 unless pending), wake the parked requests,
/// install the override.
pub(super) async fn decide(
    st: &AppState,
    caller: &Caller,
    a: crate::db::ApprovalRow,
    status: &'static str,
    reason: Option<&str>,
    extra: Option<Amounts>,
    until: Option<u64>,
) -> Result<Response, ApiError> {
    let now = st.now().as_nanos();
    let audit = Audit {
        kind: if status == "approved" {
            "approval.approved"
        } else {
            "approval.denied"
        },
        subject: a.subject.clone(),
        actor: caller.id().to_owned(),
        detail: Some(
            json!({
                "approval_id": a.id,
                "metric": a.metric,
                "window": a.window,
                "extra": extra.as_ref().map(wire::amounts_json),
                "until": until.map(rfc3339),
                "reason": reason,
            })
            .to_string(),
        ),
    };
    let decided = st
        .db
        .decide_approval(
            &a.id,
            status,
            now,
            caller.id(),
            reason,
            extra.as_ref(),
            until,
            &audit,
        )
        .await
        .map_err(|e| ApiError::internal("recording an approval", e))?;
    let Some(row) = decided else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_decided",
            format!("approval {} is already {}", a.id, a.status),
        )
        .field("id"));
    };
    crate::approvals::decided_here(st, &row).await;
    tracing::warn!(
        "approval {} for {} {} by {}",
        row.id,
        row.subject,
        row.status,
        caller.id()
    );
    Ok(json::reply(StatusCode::OK, &approval_json(&row)))
}
