//! Decisions: `POST /v1/check`, `/v1/reserve`, `/v1/reservations/{id}/commit|release`,
//! their idempotency and ledger rows.

use super::*;

pub(super) fn statuses_json<'a>(
    statuses: &[LimitStatus],
    subjects: &'a [Subject],
    now: Timestamp,
) -> Vec<StatusOut<'a>> {
    statuses
        .iter()
        .map(|s| status_out(s, subjects, now))
        .collect()
}

/// `POST /v1/check` allowed.
#[derive(serde::Serialize)]
struct CheckOut<'a> {
    allowed: bool,
    limits: Vec<StatusOut<'a>>,
    /// Subjects let past their limits (`alert` action).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    let_through: Vec<&'a str>,
}

/// Run a decision under the request's `Idempotency-Key` (if any): a replay
/// answers the stored reply; otherwise `decide` runs, its rows are queued
/// (with the stored reply, in one transaction) and its reply returned.
pub(super) async fn idempotent<F, Fut>(
    st: &Arc<AppState>,
    caller: &Caller,
    headers: &HeaderMap,
    route: &str,
    bytes: &[u8],
    decide: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(Reply, Vec<LedgerRow>), ApiError>>,
{
    let Some(key) = idempotency::key_of(headers)? else {
        let (reply, rows) = decide().await?;
        if !rows.is_empty() {
            st.ledger.record(rows, None).await;
        }
        return Ok(reply.into_response());
    };
    let scope = format!("{}\n{route}\n{key}", caller.id());
    let fp = idempotency::fingerprint(bytes);
    let guard = match st.idempotency.begin(scope, fp, st.now().as_nanos()).await? {
        Begin::Replay(stored) => return Ok(stored_reply(&stored)),
        Begin::Fresh(guard) => guard,
    };
    let (reply, rows) = decide().await?;
    if reply.status.is_success() {
        let stored = Stored {
            status: reply.status.as_u16(),
            headers: reply.header_strings(),
            body: reply.body.clone(),
            fingerprint: guard.fingerprint.clone(),
            created_ns: st.now().as_nanos(),
        };
        let row = IdemRow {
            scope: guard.scope.clone(),
            created_ns: stored.created_ns,
            fingerprint: stored.fingerprint.clone(),
            status: stored.status,
            headers: serde_json::to_string(&stored.headers).unwrap_or_else(|_| "[]".into()),
            body: stored.body.clone(),
        };
        st.ledger.record(rows, Some(row)).await;
        guard.complete(Some(stored));
    } else {
        if !rows.is_empty() {
            st.ledger.record(rows, None).await;
        }
        guard.complete(None);
    }
    Ok(reply.into_response())
}

fn subject_strings(subjects: &[Subject]) -> Vec<String> {
    subjects.iter().map(|s| s.as_str().to_owned()).collect()
}

/// A ledger row for amounts taken at once (a check or an intent).
pub(super) fn spend_row(
    kind: RowKind,
    now: Timestamp,
    subjects: &[Subject],
    amounts: Amounts,
    caller: &str,
    request_id: Option<String>,
    detail: Option<String>,
) -> LedgerRow {
    LedgerRow {
        ts_ns: now.as_nanos(),
        kind,
        reservation: None,
        subjects: subject_strings(subjects),
        amounts,
        held: None,
        reserved_ns: None,
        caller: caller.to_owned(),
        request_id,
        detail,
    }
}

pub(super) fn trace_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-trace-id")
        .or_else(|| headers.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
}

/// Count a decision's outcome and latency.
pub(super) fn observe(
    st: &AppState,
    endpoint: Endpoint,
    started: Timestamp,
    r: &Result<Response, ApiError>,
) {
    let outcome = match r {
        Ok(resp) if resp.status().is_success() => Outcome::Allowed,
        Ok(_) => Outcome::Error,
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => Outcome::Denied,
        Err(e) if e.kind == "exceeds_limit" => Outcome::NeverFits,
        Err(_) => Outcome::Error,
    };
    let latency = st.now().as_nanos().saturating_sub(started.as_nanos());
    st.metrics.record(endpoint, outcome, latency);
}

pub(super) async fn check(State(st): St, request: axum::extract::Request) -> Response {
    let started = st.now();
    // Take the request apart instead of extracting a cloned HeaderMap.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let r = async {
        // Read the body first: the connection stays reusable whatever the answer.
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        let req = json::parse::<CheckBody>(&bytes)?;
        let subjects = scope_subjects(&caller, parse_subjects(&req.subjects, "subjects")?)?;
        st.kill.ensure_running(&subjects)?;
        let amounts = amounts_or_one(req.amounts.as_ref())?;
        let st2 = Arc::clone(&st);
        let (who, trace) = (caller.id().to_owned(), trace_id(&headers));
        idempotent(&st, &caller, &headers, "check", &bytes, || async move {
            let request = Request::new(subjects.iter().cloned(), amounts);
            let now = st2.now();
            let (enforced, forced, statuses) =
                spend_by_actions(&st2, &subjects, amounts, "check", &who, &request).await?;
            let enforced = enforced.as_deref().unwrap_or(&subjects);
            st2.alerts
                .observe(&st2.policies, enforced, &statuses, now.as_nanos());
            let body = CheckOut {
                allowed: true,
                limits: statuses_json(&statuses, enforced, now),
                let_through: forced.iter().map(Subject::as_str).collect(),
            };
            let row = spend_row(
                RowKind::Check,
                now,
                &subjects,
                amounts,
                &who,
                trace.clone(),
                None,
            );
            Ok((
                Reply::json(StatusCode::OK, &body).with_headers(ratelimit::allowed(&statuses, now)),
                vec![row],
            ))
        })
        .await
    }
    .await;
    observe(&st, Endpoint::Check, started, &r);
    result(r)
}

pub(super) async fn reserve(State(st): St, request: axum::extract::Request) -> Response {
    let started = st.now();
    // Take the request apart instead of extracting a cloned HeaderMap.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let r = async {
        // Read the body first: the connection stays reusable whatever the answer.
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        let req = json::parse::<ReserveBody>(&bytes)?;
        let subjects = scope_subjects(&caller, parse_subjects(&req.subjects, "subjects")?)?;
        st.kill.ensure_running(&subjects)?;
        let amounts = amounts_or_one(req.amounts.as_ref())?;
        let max = st.config.max_lease;
        let lease = match req.lease_s {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s <= max.as_secs_f64() => {
                Some(std::time::Duration::from_secs_f64(s))
            }
            Some(s) => {
                return Err(ApiError::invalid(
                    "lease_s",
                    format!(
                        "must be above 0 and at most {} seconds (max_lease_s), got {s}",
                        max.as_secs_f64()
                    ),
                ));
            }
        };
        let st2 = Arc::clone(&st);
        let (who, trace) = (caller.id().to_owned(), trace_id(&headers));
        idempotent(&st, &caller, &headers, "reserve", &bytes, || async move {
            let request = Request::new(subjects.iter().cloned(), amounts);
            let now = st2.now();
            let meta = Meta {
                caller: who.clone(),
                subjects: subject_strings(&subjects),
                held: amounts,
                reserved_ns: now.as_nanos(),
                forced: Vec::new(),
            };
            match reserve_by_actions(&st2, &subjects, &request, lease, meta, "reserve", None)
                .await?
            {
                Ok((enforced, forced, (r, public))) => {
                    let enforced = enforced.as_deref().unwrap_or(&subjects);
                    st2.alerts
                        .observe(&st2.policies, enforced, &r.limits, now.as_nanos());
                    let mut body = json!({
                        "reservation_id": public,
                        "expires_at": rfc3339(r.expires_at.as_nanos()),
                        "held": amounts_json(&amounts),
                        "limits": statuses_json(&r.limits, enforced, now),
                    });
                    if !forced.is_empty() {
                        body["let_through"] = json!(subject_strings(&forced));
                    }
                    let row = LedgerRow {
                        ts_ns: now.as_nanos(),
                        kind: RowKind::Reserve,
                        reservation: Some(public),
                        subjects: subject_strings(&subjects),
                        amounts,
                        held: None,
                        reserved_ns: None,
                        caller: who.clone(),
                        request_id: trace.clone(),
                        detail: None,
                    };
                    Ok((
                        Reply::json(StatusCode::OK, &body)
                            .with_headers(ratelimit::allowed(&r.limits, now)),
                        vec![row],
                    ))
                }
                Err((d, enforced, approval)) => Err(approval_error(
                    denial_error(&d, &enforced).0,
                    approval.as_ref(),
                )),
            }
        })
        .await
    }
    .await;
    observe(&st, Endpoint::Reserve, started, &r);
    result(r)
}

fn expired_error(public: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "reservation_expired",
        format!("reservation {public} is settled: its lease ran out (or the server restarted) and it was counted at its held amounts"),
    )
    .field("reservation_id")
}

/// Settle a reservation: commit with `Some(actual)`, release with `None`.
async fn settle(
    st: &Arc<AppState>,
    caller: &Caller,
    public: &str,
    actual: Option<Amounts>,
) -> Result<Response, ApiError> {
    let unknown = || {
        ApiError::not_found(format!(
            "unknown reservation {public:?}: never issued, or already committed or released"
        ))
        .field("reservation_id")
    };
    let owner = match caller {
        Caller::Admin => None,
        Caller::Agent(k) => Some(k.id.as_str()),
    };
    let outcome = st.engine.settle(public, owner, actual).await?;
    let now = st.now().as_nanos();
    let (settlement, meta) = match outcome {
        Settle::Done { settlement, meta } => (settlement, meta),
        Settle::Unknown => return Err(unknown()),
        Settle::Forbidden => {
            return Err(ApiError::forbidden(format!(
                "reservation {public} belongs to another key"
            ))
            .field("reservation_id"));
        }
        Settle::Expired(None) => return Err(expired_error(public)),
        Settle::Expired(Some(meta)) => {
            // The lease ran out: counted at its held amounts; we record that.
            let row = LedgerRow {
                ts_ns: now,
                kind: RowKind::Expire,
                reservation: Some(public.to_owned()),
                subjects: meta.subjects,
                amounts: meta.held,
                held: Some(meta.held),
                reserved_ns: Some(meta.reserved_ns),
                caller: meta.caller,
                request_id: None,
                detail: None,
            };
            st.ledger.record(vec![row], None).await;
            return Err(expired_error(public));
        }
    };
    let mut row = LedgerRow {
        ts_ns: now,
        kind: RowKind::Release,
        reservation: Some(public.to_owned()),
        subjects: meta.subjects.clone(),
        amounts: Amounts::ZERO,
        held: Some(meta.held),
        reserved_ns: Some(meta.reserved_ns),
        caller: meta.caller.clone(),
        request_id: None,
        detail: None,
    };
    let mut body = json!({ "reservation_id": public });
    if let Some(a) = actual {
        row.kind = RowKind::Commit;
        row.amounts = a;
        let overshoot: Vec<Value> = settlement
            .overshoot
            .iter()
            .map(|o| {
                json!({
                    "subject": o.subject.as_str(),
                    "metric": o.metric.name(),
                    "window": o.window.to_string(),
                    "limit": metric_value(o.metric, o.limit),
                    "used": metric_value(o.metric, o.used),
                })
            })
            .collect();
        if !overshoot.is_empty() {
            row.detail = Some(json!({ "overshoot": overshoot }).to_string());
        }
        body["status"] = Value::from("committed");
        body["committed"] = amounts_json(&a);
        body["overshoot"] = Value::from(overshoot);
    } else {
        body["status"] = Value::from("released");
    }
    st.ledger.record(vec![row], None).await;
    Ok(json::reply(StatusCode::OK, &body))
}

pub(super) async fn commit(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let started = st.now();
    let r = async {
        // Read the body first: the connection stays reusable whatever the answer.
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        let req = json::parse::<CommitBody>(&bytes)?;
        let actual = req.amounts.to_amounts("amounts")?;
        settle(&st, &caller, &id, Some(actual)).await
    }
    .await;
    observe(&st, Endpoint::Commit, started, &r);
    result(r)
}

pub(super) async fn release(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let started = st.now();
    let r = async {
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            let _: Map<String, Value> = json::parse(&bytes)?;
        }
        settle(&st, &caller, &id, None).await
    }
    .await;
    observe(&st, Endpoint::Release, started, &r);
    result(r)
}
