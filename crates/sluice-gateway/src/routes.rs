//! HTTP handlers. Each authenticates, parses (errors name the field), calls
//! the engine, queues ledger rows, and answers JSON.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_core::{
    Amounts, Decision, Denial, DenialReason, LimitStatus, Request, Subject, SubjectKind, Timestamp,
    Window, micros_to_usd,
};

use crate::approvals::{ApprovalRef, Parked};
use crate::auth::{AgentKey, Caller, generate_key, hash_key, hex, random_hex};
use crate::db::{Audit, IdemRow, KeyRow, LedgerRow, RowKind};
use crate::engine::{Settle, Unavailable};
use crate::error::ApiError;
use crate::idempotency::{self, Begin, Stored};
use crate::json;
use crate::metrics::{Endpoint, Gauges, Outcome};
use crate::ratelimit;
use crate::reservations::Meta;
use crate::server::{AppState, StoredPolicy};
use crate::wire::{
    self, AmountsBody, CheckBody, CommitBody, LimitBody, PolicyBody, ReserveBody, StatusOut,
    amounts_json, metric_value, parse_subjects, policy_json, rfc3339, status_out,
};

type St = State<Arc<AppState>>;

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let busy_poll = state.busy_poll.clone();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{*subject}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route("/v1/check", post(check))
        .route("/v1/reserve", post(reserve))
        .route("/v1/reservations/{id}/commit", post(commit))
        .route("/v1/reservations/{id}/release", post(release))
        .route("/v1/usage/{*subject}", get(usage))
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", delete(revoke_key))
        .route("/v1/mesh/agents", get(mesh_agents))
        .route(
            "/v1/mesh/agents/{*rest}",
            get(mesh_get).put(mesh_put).post(mesh_post),
        )
        .route("/v1/mesh/events", get(mesh_events))
        .route("/v1/audit", get(audit))
        .route("/v1/alerts", get(alerts))
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", get(get_approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .route("/v1/intents", post(intent))
        .route("/v1/chat/completions", post(crate::proxy::openai_chat))
        .route("/v1/completions", post(crate::proxy::openai_completions))
        .route("/v1/embeddings", post(crate::proxy::openai_embeddings))
        .route("/v1/responses", post(crate::proxy::openai_responses))
        .route(
            "/v1/messages/count_tokens",
            post(crate::proxy::anthropic_count_tokens),
        )
        .route("/v1/models", get(crate::proxy::openai_models))
        .route("/v1/messages", post(crate::proxy::anthropic_messages))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    match busy_poll {
        // Health checks and metrics scrapes do not keep the workers spinning.
        Some(busy) => router.layer(busy.layer(&["/healthz", "/metrics"])),
        None => router,
    }
}

/// A response built as parts, so an idempotent answer can be stored and replayed.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl Reply {
    fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    fn with_headers(mut self, headers: Vec<(&'static str, String)>) -> Reply {
        self.headers.extend(ratelimit::typed(headers));
        self
    }

    /// Headers as strings, to store with an idempotent answer.
    fn header_strings(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect()
    }

    fn into_response(self) -> Response {
        let mut r = (self.status, self.body).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in self.headers {
            h.insert(k, v);
        }
        r
    }
}

fn stored_reply(s: &Stored) -> Response {
    let mut headers: Vec<(HeaderName, HeaderValue)> = s
        .headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                HeaderName::try_from(k.as_str()).ok()?,
                HeaderValue::try_from(v.as_str()).ok()?,
            ))
        })
        .collect();
    headers.push((
        HeaderName::from_static("idempotent-replayed"),
        HeaderValue::from_static("true"),
    ));
    Reply {
        status: StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK),
        headers,
        body: s.body.clone(),
    }
    .into_response()
}

fn result(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Percent-decode a path part.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request("bad percent-encoding in the path"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("the path is not UTF-8"))
}

/// The subject after `prefix` in the raw path: raw (`agent://o/e/n`) or percent-encoded.
fn path_subject(uri: &Uri, prefix: &str) -> Result<Subject, ApiError> {
    let raw = uri.path().strip_prefix(prefix).unwrap_or("");
    let text = percent_decode(raw)?;
    Subject::parse(&text).map_err(|e| ApiError::invalid("subject", e.to_string()))
}

/// A subject whose policy the admin API may write: `provider:` quotas come from sluice.toml.
fn writable(subject: Subject) -> Result<Subject, ApiError> {
    if subject.kind() == SubjectKind::Provider {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "config_managed",
            format!("{subject} is a provider quota set in sluice.toml ([[models]] rpm/tpm); change it there"),
        )
        .field("subject"));
    }
    Ok(subject)
}

async fn healthz() -> Response {
    json::reply(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(st): St) -> Response {
    let stats = &st.ledger.stats;
    let store = st.engine.stats();
    let (approvals_held, approvals_pending, overrides) = st.approvals.gauges();
    let upstream = st.upstreams.connections();
    let g = Gauges {
        outstanding: st.engine.outstanding().await.unwrap_or(0),
        ledger_pending: stats.pending.load(Ordering::Relaxed),
        ledger_written: stats.written.load(Ordering::Relaxed),
        ledger_failures: stats.failures.load(Ordering::Relaxed),
        ledger_lag_s: stats.last_lag_ns.load(Ordering::Relaxed) as f64 / 1e9,
        policies: st
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64,
        keys: st.keys.list().len() as u64,
        subjects: st.engine.subjects(),
        idempotency: st.idempotency.len() as u64,
        store_errors: store.map_or(0, |s| s.errors.load(Ordering::Relaxed)),
        store_fallbacks: store.map_or(0, |s| s.fallbacks.load(Ordering::Relaxed)),
        store_denied: store.map_or(0, |s| s.denied.load(Ordering::Relaxed)),
        approvals_held,
        approvals_pending,
        overrides,
        upstream_opened: upstream.opened,
        upstream_idle: upstream.idle,
        busy_poll_spinning: st.busy_poll.as_ref().map_or(0, |b| b.spinning() as u64),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        st.metrics.render(&g),
    )
        .into_response()
}

/// Read and drop a body we will not use, so the connection stays reusable.
async fn drain(body: Body) {
    let _ = axum::body::to_bytes(body, json::MAX_BODY).await;
}

async fn not_found(request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    drain(body).await;
    ApiError::not_found(format!("no route for {}", parts.uri.path())).into_response()
}

async fn method_not_allowed(request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    drain(body).await;
    let (method, uri) = (parts.method, parts.uri);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

// ---------------------------------------------------------------- policies

fn stored_json(subject: &str, p: &StoredPolicy) -> Value {
    policy_json(subject, &p.body, &p.policy, p.updated_ns)
}

/// A subject's own policy as written (for the audit trail).
fn policy_body(st: &AppState, subject: &Subject) -> Option<Value> {
    st.policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(subject.as_str())
        .map(|p| serde_json::to_value(&p.body).unwrap_or(Value::Null))
}

/// Check, store, then put in force; answers (created?, stored policy).
async fn set_policy(
    st: &AppState,
    subject: &Subject,
    body: PolicyBody,
    actor: &str,
) -> Result<(bool, StoredPolicy), ApiError> {
    let (policy, action) = body.to_policy()?;
    for (i, r) in body
        .degrade
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(m) = &r.model {
            if !st.config.proxy.models.contains_key(m) {
                return Err(ApiError::invalid(
                    format!("degrade[{i}].model"),
                    format!("{m:?} is not a model configured on this gateway ([[models]])"),
                ));
            }
        }
    }
    let text =
        serde_json::to_string(&body).map_err(|e| ApiError::internal("encoding a policy", e))?;
    let _write = st.policy_write.lock().await;
    let now = st.now().as_nanos();
    let old = policy_body(st, subject);
    let audit = Audit {
        kind: if old.is_some() {
            "policy.changed"
        } else {
            "policy.created"
        },
        subject: subject.as_str().to_owned(),
        actor: actor.to_owned(),
        detail: Some(
            json!({"old": old, "new": serde_json::to_value(&body).unwrap_or(Value::Null)})
                .to_string(),
        ),
    };
    st.db
        .put_policy(subject.as_str(), &text, now, &audit)
        .await
        .map_err(|e| ApiError::internal("storing a policy", e))?;
    let stored = StoredPolicy {
        body,
        action,
        policy: Arc::new(policy.clone()),
        updated_ns: now,
    };
    st.engine.set_policy(subject, policy);
    if stored.body.alert_at.is_some() {
        st.alerts.enable();
    }
    if stored.body.degrade.is_some() {
        st.degrade_any
            .store(true, std::sync::atomic::Ordering::Release);
    }
    let old = st
        .policies
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(subject.as_str().to_owned(), stored.clone());
    crate::approvals::reapply_all(st);
    Ok((old.is_none(), stored))
}

async fn put_policy(State(st): St, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    result(
        async {
            // Read the body first: the connection stays reusable whatever the answer.
            let bytes = json::read_body(&headers, body).await?;
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = writable(path_subject(&uri, "/v1/policies/")?)?;
            let policy = json::parse::<PolicyBody>(&bytes)?;
            let (created, stored) = set_policy(&st, &subject, policy, caller.id()).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json::reply(status, &stored_json(subject.as_str(), &stored)))
        }
        .await,
    )
}

async fn get_policy(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let subject = path_subject(&uri, "/v1/policies/")?;
        let policies = st
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = policies
            .get(subject.as_str())
            .ok_or_else(|| ApiError::not_found(format!("no policy for {subject}")))?;
        Ok(json::reply(
            StatusCode::OK,
            &stored_json(subject.as_str(), p),
        ))
    })())
}

async fn delete_policy(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = writable(path_subject(&uri, "/v1/policies/")?)?;
            let _write = st.policy_write.lock().await;
            let old = policy_body(&st, &subject);
            let audit = Audit {
                kind: "policy.deleted",
                subject: subject.as_str().to_owned(),
                actor: caller.id().to_owned(),
                detail: Some(json!({ "old": old, "new": null }).to_string()),
            };
            let existed = st
                .db
                .delete_policy(subject.as_str(), st.now().as_nanos(), &audit)
                .await
                .map_err(|e| ApiError::internal("deleting a policy", e))?;
            st.engine.remove_policy(&subject);
            st.policies
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(subject.as_str());
            crate::approvals::reapply_all(&st);
            if existed {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(ApiError::not_found(format!("no policy for {subject}")))
            }
        }
        .await,
    )
}

async fn list_policies(State(st): St, headers: HeaderMap) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let policies = st
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list: Vec<Value> = policies.iter().map(|(s, p)| stored_json(s, p)).collect();
        Ok(json::reply(StatusCode::OK, &json!({ "policies": list })))
    })())
}

// ---------------------------------------------------------------- decisions

/// The subjects a caller decides for: an agent key always counts against its
/// own subject, and may not name another agent or key subject.
fn scope_subjects(caller: &Caller, mut subjects: Vec<Subject>) -> Result<Vec<Subject>, ApiError> {
    if let Caller::Agent(k) = caller {
        for (i, s) in subjects.iter().enumerate() {
            if matches!(s.kind(), SubjectKind::Agent | SubjectKind::Key) && *s != k.subject {
                caller.require_subject(s, &format!("subjects[{i}]"))?;
            }
        }
        if !subjects.contains(&k.subject) {
            subjects.push(k.subject.clone());
        }
    }
    Ok(subjects)
}

fn amounts_or_one(a: Option<&AmountsBody>) -> Result<Amounts, ApiError> {
    match a {
        Some(a) => a.to_amounts("amounts"),
        None => Ok(Amounts::one_request()),
    }
}

/// `f` of `subject`'s policy in force (its own, else its kind's tier).
pub(crate) fn policy_of<T>(
    st: &AppState,
    subject: &Subject,
    f: impl FnOnce(&crate::server::StoredPolicy) -> T,
) -> Option<T> {
    let policies = st
        .policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    policies
        .get(subject.as_str())
        .or_else(|| policies.get(Subject::wildcard(subject.kind()).as_str()))
        .map(f)
}

/// What a refusal of `subject` by `d`'s limit does: the limit's own
/// `action_on_breach` if set, else its policy's (its own, else its kind's tier).
pub(crate) fn action_of(st: &AppState, subject: &Subject, d: &Denial) -> crate::wire::Action {
    policy_of(st, subject, |p| {
        p.body
            .limits
            .iter()
            .zip(p.policy.limits())
            .find(|(_, l)| l.metric() == d.metric && l.window() == d.window)
            .and_then(|(b, _)| b.action_on_breach.as_deref())
            .and_then(|a| crate::wire::Action::parse(a, "action_on_breach").ok())
            .unwrap_or(p.action)
    })
    .unwrap_or_default()
}

/// What [`decide_by_actions`] decided: the subjects still enforced, the
/// ones let past their limits, and the decision's value.
pub(crate) type Let<T> = (Vec<Subject>, Vec<Subject>, T);

/// Decide `subjects` with `decide(enforced, forced)`, letting `alert`-action
/// subjects past their limits: a refusal by one of them records the breach
/// (action `alert`), raises its alert, and the rest are decided again
/// without it. A refusal by a `require_approval` subject parks the request
/// (approved: decided again, once). A refusal by any other subject is the
/// answer (with the subjects its index refers to, and the approval waited
/// on, if any).
pub(crate) async fn decide_by_actions<T, F, Fut>(
    st: &AppState,
    subjects: &[Subject],
    endpoint: &'static str,
    asked: crate::approvals::Asked<'_>,
    mut decide: F,
) -> Result<Result<Let<T>, (Denial, Vec<Subject>, Option<ApprovalRef>)>, Unavailable>
where
    F: FnMut(Vec<Subject>, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, Denial>, Unavailable>>,
{
    let who = asked.caller;
    let mut enforced = subjects.to_vec();
    let mut forced: Vec<Subject> = Vec::new();
    let mut approved = false;
    loop {
        let names = forced.iter().map(|s| s.as_str().to_owned()).collect();
        match decide(enforced.clone(), names).await? {
            Ok(v) => return Ok(Ok((enforced, forced, v))),
            Err(d) => {
                let now = st.now().as_nanos();
                let alerting = enforced
                    .get(d.subject)
                    .is_some_and(|s| action_of(st, s, &d) == crate::wire::Action::Alert);
                if !alerting {
                    match approval_gate(st, &enforced, &d, asked, endpoint).await {
                        Some(Parked::Approved) if !approved => {
                            approved = true;
                            continue;
                        }
                        Some(Parked::Refused(r)) => return Ok(Err((d, enforced, r))),
                        Some(Parked::Approved) => return Ok(Err((d, enforced, None))),
                        None => {}
                    }
                    let action = block_action(enforced.get(d.subject));
                    st.breaches
                        .record(&d, &enforced, endpoint, action, who, now);
                    return Ok(Err((d, enforced, None)));
                }
                st.breaches
                    .record(&d, &enforced, endpoint, "alert", who, now);
                let subject = enforced.remove(d.subject);
                st.alerts.breached(&subject, &d, now);
                forced.push(subject);
            }
        }
    }
}

/// Check-and-take for the spend paths (`check`, `intents`): the usual one
/// engine call; only when the refusing subject's policy says `alert` or
/// `require_approval` is the request decided further by
/// [`decide_by_actions`], the subjects it let through charged by
/// force. (enforced subjects if not all, forced subjects, the enforced
/// levels.)
async fn spend_by_actions(
    st: &AppState,
    subjects: &[Subject],
    amounts: Amounts,
    endpoint: &'static str,
    who: &str,
    request: &Request,
) -> Result<(Option<Vec<Subject>>, Vec<Subject>, sluice_core::Statuses), ApiError> {
    let d = match st.engine.check(request).await? {
        Decision::Allowed(statuses) => return Ok((None, Vec::new(), statuses)),
        Decision::Denied(d) => d,
    };
    if !decided_further(st, subjects, &d) {
        st.breaches
            .record(&d, subjects, endpoint, "block", who, st.now().as_nanos());
        return Err(denial_error(&d, subjects).0);
    }
    let asked = crate::approvals::Asked {
        amounts,
        model: None,
        caller: who,
    };
    let decided = decide_by_actions(
        st,
        subjects,
        endpoint,
        asked,
        move |enforced, _| async move {
            Ok(
                match st.engine.check(&Request::new(enforced, amounts)).await? {
                    Decision::Allowed(s) => Ok(s),
                    Decision::Denied(d) => Err(d),
                },
            )
        },
    )
    .await?;
    match decided {
        Ok((enforced, forced, statuses)) => {
            if !forced.is_empty() {
                let levels = st
                    .engine
                    .force(&Request::new(forced.iter().cloned(), amounts))
                    .await?;
                st.alerts
                    .observe(&st.policies, &forced, &levels, st.now().as_nanos());
            }
            Ok((Some(enforced), forced, statuses))
        }
        Err((d, enforced, r)) => Err(approval_error(denial_error(&d, &enforced).0, r.as_ref())),
    }
}

/// What [`reserve_by_actions`] answers: (enforced subjects if not all,
/// subjects let through, (reservation, public id)), or the refusal with the
/// subjects its index refers to and the approval it waited on, if any.
pub(crate) type Reserved = Result<
    (
        Option<Vec<Subject>>,
        Vec<Subject>,
        (sluice_core::Reservation, String),
    ),
    (Denial, Vec<Subject>, Option<ApprovalRef>),
>;

/// Whether a refusal is decided further by [`decide_by_actions`] (an
/// `alert` subject let through, a `require_approval` one held) rather than
/// answered at once.
fn decided_further(st: &AppState, subjects: &[Subject], d: &Denial) -> bool {
    subjects.get(d.subject).is_some_and(|s| {
        matches!(
            action_of(st, s, d),
            crate::wire::Action::Alert | crate::wire::Action::RequireApproval
        )
    })
}

/// The breach action of a plain refusal: a provider quota sends the proxy
/// to the next model, if any; anything else blocks.
fn block_action(refused_by: Option<&Subject>) -> &'static str {
    if refused_by.is_some_and(|s| s.as_str().starts_with("provider:")) {
        "next_model"
    } else {
        "block"
    }
}

/// When the refusing subject's policy says `require_approval`: record the
/// breach and park the request (`None` for any other action).
async fn approval_gate(
    st: &AppState,
    subjects: &[Subject],
    d: &Denial,
    asked: crate::approvals::Asked<'_>,
    endpoint: &'static str,
) -> Option<Parked> {
    let s = subjects.get(d.subject)?;
    if action_of(st, s, d) != crate::wire::Action::RequireApproval {
        return None;
    }
    st.breaches.record(
        d,
        subjects,
        endpoint,
        "require_approval",
        asked.caller,
        st.now().as_nanos(),
    );
    Some(crate::approvals::park(st, s, d, asked).await)
}

/// A refusal naming the approval it waited on.
pub(crate) fn approval_error(mut e: ApiError, r: Option<&ApprovalRef>) -> ApiError {
    let Some(r) = r else { return e };
    e.message = format!("{}; {}", e.message, approval_note(r));
    if let Ok(v) = HeaderValue::from_str(&r.id) {
        e.headers
            .push((HeaderName::from_static("x-sluice-approval-id"), v));
    }
    e.with("approval_id", Value::from(r.id.clone()))
        .with("approval_status", Value::from(r.phase.name()))
}

/// What a refused caller is told of the approval.
pub(crate) fn approval_note(r: &ApprovalRef) -> String {
    match r.phase {
        crate::approvals::Phase::Denied => format!(
            "approval {} was denied: the limit stands until it resets",
            r.id
        ),
        crate::approvals::Phase::Pending => format!(
            "approval {} is pending: an operator approves it with POST /v1/approvals/{}/approve",
            r.id, r.id
        ),
        p => format!("approval {} is {}", r.id, p.name()),
    }
}

/// Reserve `request` (on `subjects`) as one engine call; only when the
/// refusing subject's policy says `alert` or `require_approval` is it
/// decided further by [`decide_by_actions`]: the reservation made on the
/// others, the subjects let through recorded in its metadata to be charged
/// by force when it settles. Breaches are recorded either way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn reserve_by_actions(
    st: &AppState,
    subjects: &[Subject],
    request: &Request,
    lease: Option<std::time::Duration>,
    meta: Meta,
    endpoint: &'static str,
    model: Option<&str>,
) -> Result<Reserved, Unavailable> {
    let who = meta.caller.clone();
    let d = match st.engine.reserve(request, lease, meta.clone()).await? {
        Ok(r) => return Ok(Ok((None, Vec::new(), r))),
        Err(d) => d,
    };
    if !decided_further(st, subjects, &d) {
        let action = block_action(subjects.get(d.subject));
        st.breaches
            .record(&d, subjects, endpoint, action, &who, st.now().as_nanos());
        return Ok(Err((d, subjects.to_vec(), None)));
    }
    let amounts = request.amounts;
    let asked = crate::approvals::Asked {
        amounts: request.amounts,
        model,
        caller: &who,
    };
    let decided = decide_by_actions(st, subjects, endpoint, asked, move |enforced, forced| {
        let meta = Meta {
            forced,
            ..meta.clone()
        };
        async move {
            st.engine
                .reserve(&Request::new(enforced, amounts), lease, meta)
                .await
        }
    })
    .await?;
    Ok(decided.map(|(enforced, forced, r)| (Some(enforced), forced, r)))
}

/// A refusal: 429 with the exact wait, or 422 when no wait can help.
fn denial_error(d: &Denial, subjects: &[Subject]) -> (ApiError, Outcome) {
    let subject = subjects.get(d.subject).map(Subject::as_str).unwrap_or("");
    let (mut e, outcome) = match d.reason {
        DenialReason::RetryAfter(wait) => {
            let secs = ratelimit::ceil_secs(wait);
            (
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "{subject} reached its {} limit of {} per {}; retry in {secs}s",
                        d.metric.name(),
                        metric_value(d.metric, d.limit),
                        wire::window_name(d.window)
                    ),
                )
                .with("retry_after_s", Value::from(secs))
                .with("retry_after_ms", Value::from(wait.as_millis().max(1) as u64)),
                Outcome::Denied,
            )
        }
        DenialReason::NeverFits {
            requested,
            capacity,
        } => (
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "exceeds_limit",
                format!(
                    "the request asks for {} {} but {subject}'s limit can never give more than {} at once; waiting will not help",
                    metric_value(d.metric, requested),
                    d.metric.name(),
                    metric_value(d.metric, capacity)
                ),
            )
            .with("requested", metric_value(d.metric, requested))
            .with("capacity", metric_value(d.metric, capacity)),
            Outcome::NeverFits,
        ),
    };
    e = e
        .with("subject", Value::from(subject))
        .with("metric", Value::from(d.metric.name()))
        .with(
            "window",
            Value::from(wire::window_name(d.window).into_owned()),
        )
        .with("limit", metric_value(d.metric, d.limit));
    e.headers.extend(ratelimit::typed(ratelimit::denied(d)));
    (e, outcome)
}

fn statuses_json<'a>(
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

/// `POST /v1/intents` accepted.
#[derive(serde::Serialize)]
struct IntentOut<'a> {
    intent_id: &'a str,
    status: &'static str,
    intent_type: &'a str,
    to_agent: &'a str,
    limits: Vec<StatusOut<'a>>,
}

/// Run a decision under the request's `Idempotency-Key` (if any): a replay
/// answers the stored reply; otherwise `decide` runs, its rows are queued
/// (with the stored reply, in one transaction) and its reply returned.
async fn idempotent<F, Fut>(
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
fn spend_row(
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

fn trace_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-trace-id")
        .or_else(|| headers.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
}

/// Count a decision's outcome and latency.
fn observe(st: &AppState, endpoint: Endpoint, started: Timestamp, r: &Result<Response, ApiError>) {
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

async fn check(State(st): St, request: axum::extract::Request) -> Response {
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

async fn reserve(State(st): St, request: axum::extract::Request) -> Response {
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

async fn commit(State(st): St, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Response {
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

async fn release(
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

// ---------------------------------------------------------------- usage

async fn spend_json(st: &AppState, subject: &Subject) -> Result<Value, ApiError> {
    let now = st.now().as_nanos();
    let today = crate::db::utc_day(now);
    let month_start = format!("{}-01", &today[..7]);
    let get = |from: Option<String>, to: Option<String>| async move {
        st.db
            .spend(subject.as_str(), from.as_deref(), to.as_deref())
            .await
            .map(|s| amounts_json(&s.amounts))
            .map_err(|e| ApiError::internal("reading spend", e))
    };
    Ok(json!({
        "today": get(Some(today.clone()), Some(today.clone())).await?,
        "month": get(Some(month_start), Some(today)).await?,
        "total": get(None, None).await?,
        "basis": "UTC days, from the ledger (written within milliseconds of each decision)",
    }))
}

async fn usage(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            let subject = path_subject(&uri, "/v1/usage/")?;
            caller.require_subject(&subject, "subject")?;
            let now = st.now();
            let statuses = st.engine.usage(&subject).await?;
            let policy = {
                let policies = st
                    .policies
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if policies.contains_key(subject.as_str()) {
                    Some(subject.as_str().to_owned())
                } else {
                    let tier = Subject::wildcard(subject.kind());
                    policies
                        .contains_key(tier.as_str())
                        .then(|| tier.as_str().to_owned())
                }
            };
            let subjects = [subject.clone()];
            Ok(json::reply(
                StatusCode::OK,
                &json!({
                    "subject": subject.as_str(),
                    "policy": policy,
                    "limits": statuses_json(&statuses, &subjects, now),
                    "spend": spend_json(&st, &subject).await?,
                }),
            ))
        }
        .await,
    )
}

// ---------------------------------------------------------------- keys

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    subject: String,
    #[serde(default)]
    name: Option<String>,
}

fn key_json(k: &AgentKey) -> Value {
    json!({
        "id": k.id,
        "subject": k.subject.as_str(),
        "name": k.name,
        "prefix": k.prefix,
        "created_at": rfc3339(k.created_ns),
    })
}

async fn create_key(State(st): St, headers: HeaderMap, body: Body) -> Response {
    result(
        async {
            // Read the body first: the connection stays reusable whatever the answer.
            let bytes = json::read_body(&headers, body).await?;
            st.keys.authenticate(&headers)?.require_admin()?;
            let req = json::parse::<KeyBody>(&bytes)?;
            let subject = Subject::parse(&req.subject)
                .map_err(|e| ApiError::invalid("subject", e.to_string()))?;
            if subject.is_wildcard() {
                return Err(ApiError::invalid(
                    "subject",
                    "a key acts for one subject, not a `kind:*` tier",
                ));
            }
            let name = req.name.unwrap_or_default();
            if name.chars().count() > 128 || name.chars().any(char::is_control) {
                return Err(ApiError::invalid(
                    "name",
                    "must be at most 128 characters, without control characters",
                ));
            }
            let key = generate_key();
            let row = KeyRow {
                id: format!("key_{}", random_hex(8)),
                hash: hex(&hash_key(&key)),
                subject: subject.as_str().to_owned(),
                name,
                prefix: key
                    .chars()
                    .take(crate::auth::KEY_PREFIX.len() + 6)
                    .collect(),
                created_ns: st.now().as_nanos(),
            };
            let audit = Audit {
                kind: "key.created",
                subject: row.subject.clone(),
                actor: "admin".to_owned(),
                detail: Some(
                    json!({"id": row.id, "name": row.name, "prefix": row.prefix}).to_string(),
                ),
            };
            st.db
                .insert_key(&row, &audit)
                .await
                .map_err(|e| ApiError::internal("storing a key", e))?;
            let agent = AgentKey {
                id: row.id.clone(),
                subject,
                name: row.name.clone(),
                prefix: row.prefix.clone(),
                created_ns: row.created_ns,
            };
            let mut body = key_json(&agent);
            body["key"] = Value::from(key);
            st.keys.insert(&row.hash, agent);
            Ok(json::reply(StatusCode::CREATED, &body))
        }
        .await,
    )
}

async fn list_keys(State(st): St, headers: HeaderMap) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let keys: Vec<Value> = st.keys.list().iter().map(|k| key_json(k)).collect();
        Ok(json::reply(StatusCode::OK, &json!({ "keys": keys })))
    })())
}

async fn revoke_key(State(st): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = st
                .keys
                .list()
                .iter()
                .find(|k| k.id == id)
                .map(|k| k.subject.as_str().to_owned())
                .unwrap_or_default();
            let audit = Audit {
                kind: "key.revoked",
                subject,
                actor: caller.id().to_owned(),
                detail: Some(json!({ "id": id }).to_string()),
            };
            let revoked = st
                .db
                .revoke_key(&id, st.now().as_nanos(), &audit)
                .await
                .map_err(|e| ApiError::internal("revoking a key", e))?;
            st.keys.remove(&id);
            if revoked {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(ApiError::not_found(format!("no live key {id:?}")).field("id"))
            }
        }
        .await,
    )
}

// ---------------------------------------------------------------- AXME-compatible

/// `PUT /v1/mesh/agents/{address}/policies/cost`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CostPolicyBody {
    #[serde(default)]
    max_intents_per_hour: Option<u64>,
    #[serde(default)]
    max_intents_per_day: Option<u64>,
    #[serde(default)]
    max_cost_per_day_usd: Option<serde_json::Number>,
    #[serde(default)]
    action_on_breach: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
}

const HOUR: Window = Window::Rolling(3_600_000_000_000);
const DAY: Window = Window::Calendar(sluice_core::CalendarUnit::Day);

/// Which AXME field a native limit stands for.
fn axme_field(metric: &str, window: &str) -> Option<&'static str> {
    let window: Window = window.parse().ok()?;
    match (metric, window) {
        ("requests", w) if w == HOUR => Some("max_intents_per_hour"),
        ("requests", w) if w == DAY => Some("max_intents_per_day"),
        ("cost_usd", w) if w == DAY => Some("max_cost_per_day_usd"),
        _ => None,
    }
}

fn mesh_address(uri: &Uri) -> Result<(Subject, String), ApiError> {
    let raw = uri.path().strip_prefix("/v1/mesh/agents/").unwrap_or("");
    let decoded = percent_decode(raw)?;
    // `agent://org/env/name` is three segments after the scheme; what
    // follows is the route (`/policies/cost`, `/kill`, `/resume`, or none).
    let split = decoded.strip_prefix("agent://").and_then(|after| {
        let mut ends = after.match_indices('/').map(|(i, _)| i);
        let third = ends.nth(1).and_then(|_| ends.next());
        third.map(|i| "agent://".len() + i)
    });
    let (address, rest) = match split {
        Some(i) => (&decoded[..i], decoded[i..].to_owned()),
        None => (decoded.as_str(), String::new()),
    };
    let subject =
        Subject::parse(address).map_err(|e| ApiError::invalid("address", e.to_string()))?;
    if subject.kind() != SubjectKind::Agent {
        return Err(ApiError::invalid(
            "address",
            format!("expected an agent address agent://org/env/name, got {address:?}"),
        ));
    }
    Ok((subject, rest))
}

async fn cost_policy_json(st: &AppState, subject: &Subject) -> Result<Value, ApiError> {
    let mut out = json!({
        "address": subject.as_str(),
        "max_intents_per_hour": null,
        "max_intents_per_day": null,
        "max_cost_per_day_usd": null,
        "action_on_breach": "block",
    });
    if let Some(p) = st
        .policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(subject.as_str())
    {
        out["action_on_breach"] = Value::from(p.action.name());
        for l in p.policy.limits() {
            if let Some(f) = axme_field(l.metric().name(), &l.window().to_string()) {
                out[f] = metric_value(l.metric(), l.limit());
            }
        }
    }
    let mut usage = json!({"intents_per_hour": 0, "intents_per_day": 0, "cost_per_day_usd": 0.0});
    for s in st.engine.usage(subject).await? {
        match axme_field(s.metric.name(), &s.window.to_string()) {
            Some("max_intents_per_hour") => usage["intents_per_hour"] = Value::from(s.used),
            Some("max_intents_per_day") => usage["intents_per_day"] = Value::from(s.used),
            Some("max_cost_per_day_usd") => {
                usage["cost_per_day_usd"] = Value::from(micros_to_usd(s.used));
            }
            _ => {}
        }
    }
    out["usage"] = usage;
    Ok(out)
}

async fn mesh_get(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            let (subject, rest) = mesh_address(&uri)?;
            caller.require_subject(&subject, "address")?;
            match rest.as_str() {
                "/policies/cost" => Ok(json::reply(
                    StatusCode::OK,
                    &cost_policy_json(&st, &subject).await?,
                )),
                "" => Ok(json::reply(
                    StatusCode::OK,
                    &agent_detail(&st, &subject).await?,
                )),
                _ => Err(ApiError::not_found(format!("no route for {}", uri.path()))),
            }
        }
        .await,
    )
}

async fn mesh_put(State(st): St, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    result(
        async {
            // Read the body first: the connection stays reusable whatever the answer.
            let bytes = json::read_body(&headers, body).await?;
            st.keys.authenticate(&headers)?.require_admin()?;
            let (subject, rest) = mesh_address(&uri)?;
            if rest != "/policies/cost" {
                return Err(ApiError::not_found(format!("no route for {}", uri.path())));
            }
            let req = json::parse::<CostPolicyBody>(&bytes)?;
            if req.max_intents_per_hour.is_none()
                && req.max_intents_per_day.is_none()
                && req.max_cost_per_day_usd.is_none()
            {
                return Err(ApiError::invalid(
                    "max_intents_per_hour",
                    "set at least one of max_intents_per_hour, max_intents_per_day, max_cost_per_day_usd",
                ));
            }
            // Keep the agent's other native limits; replace the three AXME ones.
            let existing = st
                .policies
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(subject.as_str())
                .map(|p| p.body.clone());
            let mut limits: Vec<LimitBody> = existing
                .as_ref()
                .map(|b| {
                    b.limits
                        .iter()
                        .filter(|l| axme_field(&l.metric, &l.window).is_none())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let int = |v: u64| serde_json::Number::from(v);
            for (metric, limit, window) in [
                ("requests", req.max_intents_per_hour.map(int), "1h"),
                ("requests", req.max_intents_per_day.map(int), "day"),
                ("cost_usd", req.max_cost_per_day_usd.clone(), "day"),
            ] {
                if let Some(limit) = limit {
                    limits.push(LimitBody {
                        metric: metric.into(),
                        limit,
                        window: window.into(),
                        algorithm: None,
                        burst: None,
                        buckets: None,
                        action_on_breach: None,
                    });
                }
            }
            let body = PolicyBody {
                limits,
                timezone: req
                    .timezone
                    .or_else(|| existing.as_ref().and_then(|b| b.timezone.clone())),
                alert_at: existing.as_ref().and_then(|b| b.alert_at.clone()),
                degrade: existing.as_ref().and_then(|b| b.degrade.clone()),
                fallback_action: existing
                    .as_ref()
                    .and_then(|b| b.fallback_action.clone())
                    .filter(|_| req.action_on_breach.as_deref() == Some("degrade")),
                approval_wait: existing.as_ref().and_then(|b| b.approval_wait.clone()),
                action_on_breach: Some(req.action_on_breach.unwrap_or_else(|| "block".into())),
            };
            // Name AXME fields in errors rather than the native ones.
            let mapped = |e: ApiError| match e.field.as_deref() {
                Some(f) if f.starts_with("limits[") => {
                    let field = body
                        .limits
                        .get(f[7..].split(']').next().and_then(|i| i.parse::<usize>().ok()).unwrap_or(usize::MAX))
                        .and_then(|l| axme_field(&l.metric, &l.window))
                        .unwrap_or("limits");
                    ApiError::invalid(field, e.message)
                }
                _ => e,
            };
            body.to_policy().map_err(mapped)?;
            let (created, _) = set_policy(&st, &subject, body, "admin").await?;
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json::reply(status, &cost_policy_json(&st, &subject).await?))
        }
        .await,
    )
}

// ---------------------------------------------------------------- kill switch

/// `POST /v1/mesh/agents/{address}/kill` and `/resume`: optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    #[serde(default)]
    reason: Option<String>,
}

fn agent_json(address: &str, killed: Option<&crate::db::Killed>) -> Value {
    json!({
        "address": address,
        "address_id": address,
        "status": if killed.is_some() { "killed" } else { "active" },
        "killed_at": killed.map(|k| rfc3339(k.since_ns)),
        "killed_by": killed.map(|k| k.actor.clone()),
        "reason": killed.and_then(|k| k.reason.clone()),
    })
}

/// An agent's status and the usage of each of its limits.
async fn agent_detail(st: &AppState, subject: &Subject) -> Result<Value, ApiError> {
    let mut out = agent_json(subject.as_str(), st.kill.get(subject.as_str()).as_ref());
    let now = st.now();
    let statuses = st.engine.usage(subject).await?;
    out["limits"] =
        serde_json::to_value(statuses_json(&statuses, std::slice::from_ref(subject), now))
            .unwrap_or(Value::Null);
    Ok(out)
}

async fn mesh_post(State(st): St, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    result(
        async {
            let (caller, req) = admin_with_optional_body::<KillBody>(&st, &headers, body).await?;
            let (subject, rest) = mesh_address(&uri)?;
            let kill = match rest.as_str() {
                "/kill" => true,
                "/resume" => false,
                _ => return Err(ApiError::not_found(format!("no route for {}", uri.path()))),
            };
            if req.reason.as_ref().is_some_and(|r| r.len() > 1_000) {
                return Err(ApiError::invalid("reason", "at most 1000 bytes"));
            }
            let now = st.now().as_nanos();
            let audit = Audit {
                kind: if kill {
                    "agent.killed"
                } else {
                    "agent.resumed"
                },
                subject: subject.as_str().to_owned(),
                actor: caller.id().to_owned(),
                detail: req
                    .reason
                    .as_ref()
                    .map(|r| json!({ "reason": r }).to_string()),
            };
            let changed = st
                .db
                .set_killed(
                    subject.as_str(),
                    kill,
                    now,
                    caller.id(),
                    req.reason.as_deref(),
                    &audit,
                )
                .await
                .map_err(|e| ApiError::internal("recording the kill switch", e))?;
            if kill {
                if changed {
                    st.kill.kill(crate::db::Killed {
                        subject: subject.as_str().to_owned(),
                        since_ns: now,
                        actor: caller.id().to_owned(),
                        reason: req.reason.clone(),
                    });
                    tracing::warn!(
                        "{} stopped by {} (kill switch){}",
                        subject.as_str(),
                        caller.id(),
                        req.reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
            } else if changed {
                st.kill.resume(subject.as_str());
                tracing::warn!("{} resumed by {}", subject.as_str(), caller.id());
            }
            let mut out = agent_json(subject.as_str(), st.kill.get(subject.as_str()).as_ref());
            out["changed"] = Value::from(changed);
            Ok(json::reply(StatusCode::OK, &out))
        }
        .await,
    )
}

/// `?a=b&c=d` as pairs, percent-decoded (`+` is a space).
fn query_pairs(uri: &Uri) -> Result<Vec<(String, String)>, ApiError> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((
                percent_decode(&k.replace('+', " "))?,
                percent_decode(&v.replace('+', " "))?,
            ))
        })
        .collect()
}

/// `limit` from the query: 1 to `max`, else `default`.
fn query_limit(pairs: &[(String, String)], default: u32, max: u32) -> Result<u32, ApiError> {
    match pairs.iter().find(|(k, _)| k == "limit") {
        None => Ok(default),
        Some((_, v)) => match v.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(
                "limit",
                format!("expected a whole number from 1 to {max}, got {v:?}"),
            )),
        },
    }
}

/// `GET /v1/mesh/agents`: every agent with a policy, a key or a kill record,
/// its status and usage (`?status=killed|active`, `?limit=`).
async fn mesh_agents(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 100, 1_000)?;
            let status = pairs
                .iter()
                .find(|(k, _)| k == "status" || k == "health")
                .map(|(_, v)| v.as_str());
            if let Some(s) = status {
                if s != "killed" && s != "active" {
                    return Err(ApiError::invalid(
                        "status",
                        format!("expected \"killed\" or \"active\", got {s:?}"),
                    ));
                }
            }
            let mut names: std::collections::BTreeSet<String> = st
                .policies
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            names.extend(st.keys.list().iter().map(|k| k.subject.as_str().to_owned()));
            names.extend(
                st.db
                    .killed()
                    .await
                    .map_err(|e| ApiError::internal("reading the kill switch", e))?
                    .into_iter()
                    .map(|k| k.subject),
            );
            let mut agents = Vec::new();
            for name in names {
                let Ok(subject) = Subject::parse(&name) else {
                    continue;
                };
                if subject.kind() != SubjectKind::Agent || subject.is_wildcard() {
                    continue;
                }
                let killed = st.kill.get(&name).is_some();
                if status.is_some_and(|s| (s == "killed") != killed) {
                    continue;
                }
                if agents.len() >= limit as usize {
                    break;
                }
                agents.push(agent_detail(&st, &subject).await?);
            }
            Ok(json::reply(StatusCode::OK, &json!({ "agents": agents })))
        }
        .await,
    )
}

/// `GET /v1/mesh/events`: kills, resumes and breaches, newest first (`?event_type=`, `?limit=`).
async fn mesh_events(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 50, 1_000)?;
            let kind = pairs
                .iter()
                .find(|(k, _)| k == "event_type")
                .map(|(_, v)| v.as_str());
            if let Some(k) = kind {
                if !["kill", "resume", "breach"].contains(&k) {
                    return Err(ApiError::invalid(
                        "event_type",
                        format!("expected kill, resume or breach, got {k:?}"),
                    ));
                }
            }
            let events: Vec<Value> = st
                .db
                .mesh_events(limit, kind)
                .await
                .map_err(|e| ApiError::internal("reading mesh events", e))?
                .into_iter()
                .map(|e| {
                    json!({
                        "id": e.seq,
                        "source": e.source,
                        "event_type": e.kind,
                        "address": e.subject,
                        "actor": e.actor,
                        "at": rfc3339(e.ts_ns),
                        "detail": e.detail.and_then(|d| serde_json::from_str::<Value>(&d).ok()),
                    })
                })
                .collect();
            Ok(json::reply(StatusCode::OK, &json!({ "events": events })))
        }
        .await,
    )
}

/// `POST /v1/intents`: extra fields (`correlation_id`, ...) are accepted and kept out of the way.
#[derive(Debug, Deserialize)]
struct IntentBody {
    intent_type: Option<Value>,
    to_agent: Option<Value>,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    correlation_id: Option<Value>,
}

async fn intent(State(st): St, request: axum::extract::Request) -> Response {
    let started = st.now();
    // Take the request apart instead of extracting a cloned HeaderMap.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let r = async {
        // Read the body first: the connection stays reusable whatever the answer.
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        let req = json::parse::<IntentBody>(&bytes)?;
        let intent_type = match &req.intent_type {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "intent_type",
                    "must be 1 to 256 characters",
                ));
            }
            Some(_) => {
                return Err(
                    ApiError::bad_request("intent_type must be a string").field("intent_type")
                );
            }
            None => {
                return Err(
                    ApiError::bad_request("missing field `intent_type`").field("intent_type")
                );
            }
        };
        let to = match &req.to_agent {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(ApiError::bad_request("to_agent must be a string").field("to_agent"));
            }
            None => return Err(ApiError::bad_request("missing field `to_agent`").field("to_agent")),
        };
        let to_agent =
            Subject::parse(&to).map_err(|e| ApiError::invalid("to_agent", e.to_string()))?;
        if to_agent.kind() != SubjectKind::Agent {
            return Err(ApiError::invalid(
                "to_agent",
                format!("expected an agent address agent://org/env/name, got {to:?}"),
            ));
        }
        let amounts = AmountsBody {
            requests: Some(1),
            cost_usd: req.cost_usd,
            ..AmountsBody::default()
        }
        .to_amounts("")
        .map_err(|e| ApiError::invalid("cost_usd", e.message))?;
        // The receiving agent's limits apply, and the sender's own if it is an agent key.
        let mut subjects = vec![to_agent];
        if let Caller::Agent(k) = &caller {
            if !subjects.contains(&k.subject) {
                subjects.push(k.subject.clone());
            }
        }
        st.kill.ensure_running(&subjects)?;
        let correlation = req.correlation_id.clone();
        let st2 = Arc::clone(&st);
        let (who, trace) = (caller.id().to_owned(), trace_id(&headers));
        idempotent(&st, &caller, &headers, "intents", &bytes, || async move {
            let request = Request::new(subjects.iter().cloned(), amounts);
            let now = st2.now();
            let (enforced, _forced, statuses) =
                spend_by_actions(&st2, &subjects, amounts, "intents", &who, &request).await?;
            let enforced = enforced.as_deref().unwrap_or(&subjects);
            st2.alerts
                .observe(&st2.policies, enforced, &statuses, now.as_nanos());
            let n = st2.intents.fetch_add(1, Ordering::Relaxed);
            let intent_id = format!("int_{}_{n}", st2.engine.boot());
            let body = IntentOut {
                intent_id: &intent_id,
                status: "accepted",
                intent_type: &intent_type,
                to_agent: subjects[0].as_str(),
                limits: statuses_json(&statuses, enforced, now),
            };
            let detail = json!({
                "intent_type": intent_type,
                "correlation_id": correlation,
                "trace_id": trace,
            })
            .to_string();
            let row = spend_row(
                RowKind::Intent,
                now,
                &subjects,
                amounts,
                &who,
                Some(intent_id.clone()),
                Some(detail),
            );
            Ok((
                Reply::json(StatusCode::OK, &body).with_headers(ratelimit::allowed(&statuses, now)),
                vec![row],
            ))
        })
        .await
    }
    .await;
    observe(&st, Endpoint::Intent, started, &r);
    result(r)
}

// ---------------------------------------------------------------- audit

/// An instant from a query: RFC 3339, or seconds since the epoch.
fn query_time(field: &str, v: &str) -> Result<u64, ApiError> {
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
async fn audit(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
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
async fn alerts(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
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

/// An admin's request with an optional JSON body (empty: `T::default()`);
/// the body is read first, so the connection stays reusable whatever the answer.
async fn admin_with_optional_body<T: Default + serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Caller, T), ApiError> {
    let bytes = json::read_body(headers, body).await?;
    let caller = st.keys.authenticate(headers)?;
    caller.require_admin()?;
    let req = if bytes.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        json::parse::<T>(&bytes)?
    };
    Ok((caller, req))
}

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
async fn list_approvals(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
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
async fn get_approval(State(st): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
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
async fn approve(
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
async fn deny(State(st): St, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Response {
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
async fn decide(
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
