//! HTTP handlers. Each authenticates, parses (errors name the field), calls
//! the engine, queues ledger rows, and answers JSON. This file holds the
//! router and what handlers share; the handlers live in `routes/`, one file
//! per resource (the LLM proxy's are in [`crate::proxy`]).

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

mod actions;
mod approvals;
mod audit;
mod axme;
mod decisions;
mod keys;
mod mesh;
mod policies;
mod usage;

pub(crate) use self::actions::*;
use self::approvals::*;
use self::audit::*;
use self::axme::*;
use self::decisions::*;
use self::keys::*;
use self::mesh::*;
use self::policies::*;
use self::usage::*;

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
