//! The LLM proxy. OpenAI wire: `POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/responses` and `GET /v1/models`;
//! Anthropic wire: `POST /v1/messages` and `/v1/messages/count_tokens`.
//!
//! One request: estimate its worst case ([`crate::estimate`] for the input,
//! the request's own output cap or the model's maximum, times `n`), reserve
//! it on every subject (the key's own, `user:`/`session:` from
//! `x-sluice-user`/`x-sluice-session`, `model:NAME`, `global`, and the
//! provider's quota `provider:PROVIDER/MODEL` when `rpm`/`tpm` are set),
//! forward with the server's upstream key, then commit what the upstream
//! reports in `usage`. Every exit path settles: an upstream error or an
//! unreachable upstream releases (nothing was served); a success without
//! `usage` is charged the held worst case; a stream cut short is charged what
//! was streamed; a client that goes away before the answer is charged the
//! hold at once (the upstream may still bill it).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_core::{Amounts, DenialReason, Request, Subject};

use crate::auth::Caller;
use crate::config::{Model, Wire};
use crate::db::{LedgerRow, RowKind};
use crate::engine::{Settle, Unavailable};
use crate::pricing::TokenUsage;
use crate::ratelimit;
use crate::reservations::Meta;
use crate::server::AppState;

/// The longest wait the official OpenAI SDK honours from `Retry-After`
/// before falling back to its own backoff; beyond it we say `x-should-retry: false`.
const SDK_MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// An OpenAI-shaped error.
fn openai_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: impl Into<String>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "code": code, "param": null}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An error in the wire's own shape (the OpenAI `kind`/`code` map onto Anthropic's types by status).
fn wire_error(
    wire: Wire,
    status: StatusCode,
    kind: &str,
    code: &str,
    message: impl Into<String>,
) -> Response {
    match wire {
        Wire::OpenAi => openai_error(status, kind, code, message),
        Wire::Anthropic => {
            let t = match status.as_u16() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                500..=599 => "api_error",
                _ => "invalid_request_error",
            };
            let body = json!({"type": "error", "error": {"type": t, "message": message.into()}});
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// The shared limit store failed and `on_store_error = "deny"`: 503 in the
/// wire's shape (the SDKs retry it after the Retry-After).
fn unavailable(wire: Wire, e: &Unavailable) -> Response {
    let mut r = wire_error(
        wire,
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        "store_unavailable",
        format!("{e}; retry shortly"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A proxied route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// OpenAI `POST /v1/completions` (legacy text completions).
    Completions,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
}

impl Endpoint {
    /// Its wire format.
    pub fn wire(self) -> Wire {
        match self {
            Endpoint::Messages => Wire::Anthropic,
            _ => Wire::OpenAi,
        }
    }

    /// Its path under the provider's base URL.
    const fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// Whether it can stream.
    fn streams(self) -> bool {
        self != Endpoint::Embeddings
    }
}

/// Every upstream path the proxy calls.
pub const UPSTREAM_PATHS: &[&str] = &[
    Endpoint::Chat.path(),
    Endpoint::Completions.path(),
    Endpoint::Embeddings.path(),
    Endpoint::Responses.path(),
    Endpoint::Messages.path(),
    COUNT_TOKENS_PATH,
];

/// Anthropic's token counting, under the provider's base URL (forwarded, not an [`Endpoint`]: nothing is reserved).
const COUNT_TOKENS_PATH: &str = "messages/count_tokens";

/// Load the tokenizers the configured models need (at start, not on the first request).
pub fn warm_tokenizers(models: &std::collections::BTreeMap<String, Arc<Model>>) {
    crate::estimate::warm(models);
}

/// The input tokens of a request, for its worst case.
pub fn estimate_input_tokens(endpoint: Endpoint, model: &str, body: &Value) -> u64 {
    use crate::estimate as e;
    match endpoint {
        Endpoint::Chat => e::openai_chat(model, body),
        Endpoint::Completions => e::openai_prompt(model, &body["prompt"]),
        Endpoint::Embeddings => e::openai_prompt(model, &body["input"]),
        Endpoint::Responses => e::openai_responses(model, body),
        Endpoint::Messages => e::anthropic_messages(model, body),
    }
}

/// The output-token bound of a request: what it asks for (capped at the
/// model's maximum, or the maximum when it does not say), times the
/// completions it asks for (`n`, `best_of`). Embeddings produce none.
pub fn output_bound(endpoint: Endpoint, body: &Value, model: &Model) -> u64 {
    let asked = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
            .map_or(model.max_output_tokens, |n| n.min(model.max_output_tokens))
    };
    let copies = |keys: &[&str]| {
        keys.iter()
            .filter_map(|k| body.get(*k).and_then(Value::as_u64))
            .max()
            .unwrap_or(1)
            .max(1)
    };
    match endpoint {
        Endpoint::Chat => {
            asked(&["max_completion_tokens", "max_tokens"]).saturating_mul(copies(&["n"]))
        }
        Endpoint::Completions => asked(&["max_tokens"]).saturating_mul(copies(&["n", "best_of"])),
        Endpoint::Embeddings => 0,
        Endpoint::Responses => asked(&["max_output_tokens"]),
        Endpoint::Messages => asked(&["max_tokens"]),
    }
}

/// The subjects a proxied request is counted against, or what is wrong with a header.
fn subjects(caller: &Caller, headers: &HeaderMap, model: &Model) -> Result<Vec<Subject>, String> {
    let mut out = Vec::with_capacity(6);
    if let Caller::Agent(k) = caller {
        out.push(k.subject.clone());
    }
    for (header, kind) in [("x-sluice-user", "user"), ("x-sluice-session", "session")] {
        if let Some(v) = headers.get(header) {
            let text = format!("{kind}:{}", v.to_str().unwrap_or(""));
            let s = Subject::parse(&text).map_err(|e| format!("{header}: {e}"))?;
            out.push(s);
        }
    }
    out.push(model.subject.clone());
    out.push(Subject::global());
    // The provider's quota goes last: its statuses are left out of the agent's headers.
    if let Some(q) = &model.quota_subject {
        out.push(q.clone());
    }
    Ok(out)
}

/// The usage an answer (or a stream event carrying a whole answer) reports.
fn usage_of(endpoint: Endpoint, v: &Value) -> Option<TokenUsage> {
    usage_fields(endpoint, v.get("usage")?)
}

/// An answer's `usage`, the rest of it skipped without being built.
#[derive(serde::Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Value,
}

/// The usage in an answer's bytes: OpenAI's chat, completions and
/// embeddings read into a struct; anything else, or a usage the struct
/// cannot hold, through the tree ([`usage_fields`]).
fn usage_in(endpoint: Endpoint, bytes: &[u8]) -> Option<TokenUsage> {
    if matches!(
        endpoint,
        Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings
    ) {
        if let Ok(OpenAiAnswer { usage: Some(u) }) = serde_json::from_slice(bytes) {
            if let Some(t) = u.token_usage(endpoint) {
                return Some(t);
            }
        }
    }
    let answer: UsageOnly = serde_json::from_slice(bytes).ok()?;
    usage_fields(endpoint, &answer.usage)
}

/// An OpenAI answer's `usage`, the rest skipped.
#[derive(serde::Deserialize)]
struct OpenAiAnswer {
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

/// OpenAI's usage (chat, completions, embeddings), as [`usage_fields`] reads it.
#[derive(serde::Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedTokens>,
}

#[derive(serde::Deserialize)]
struct CachedTokens {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl OpenAiUsage {
    fn token_usage(&self, endpoint: Endpoint) -> Option<TokenUsage> {
        Some(TokenUsage {
            input: self.prompt_tokens?,
            cached_input: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            output: match endpoint {
                Endpoint::Embeddings => 0,
                _ => self.completion_tokens?,
            },
            ..TokenUsage::default()
        })
    }
}

fn usage_fields(endpoint: Endpoint, u: &Value) -> Option<TokenUsage> {
    if !u.is_object() {
        return None;
    }
    match endpoint {
        // The same rule as the struct read; a field of the wrong type reads as absent.
        Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => OpenAiUsage {
            prompt_tokens: u["prompt_tokens"].as_u64(),
            completion_tokens: u["completion_tokens"].as_u64(),
            prompt_tokens_details: Some(CachedTokens {
                cached_tokens: u["prompt_tokens_details"]["cached_tokens"].as_u64(),
            }),
        }
        .token_usage(endpoint),
        Endpoint::Responses => Some(TokenUsage {
            input: u.get("input_tokens")?.as_u64()?,
            cached_input: u["input_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            output: u.get("output_tokens")?.as_u64()?,
            ..TokenUsage::default()
        }),
        Endpoint::Messages => Some(TokenUsage {
            output: u.get("output_tokens")?.as_u64()?,
            ..anthropic_input(u)?
        }),
    }
}

/// Anthropic's input (output left 0): uncached + cache reads + cache writes,
/// with the reads and the writes (5-minute and 1-hour, from `cache_creation`
/// when given, else all 5-minute) priced apart.
fn anthropic_input(u: &Value) -> Option<TokenUsage> {
    let uncached = u.get("input_tokens")?.as_u64()?;
    let read = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let written = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    let written_1h = u["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(written);
    Some(TokenUsage {
        input: uncached + read + written,
        cached_input: read,
        cache_write: written - written_1h,
        cache_write_1h: written_1h,
        output: 0,
    })
}

fn amounts(model: &Model, usage: TokenUsage) -> Amounts {
    Amounts::one_request()
        .with_tokens(usage.input, usage.output)
        .with_cost_micros(model.price.cost_micros(usage))
}

/// The ledger row of a proxied reservation's settle outcome: `Some(actual)`
/// committed, `None` released; `None` if the lease had already run out and
/// the expiry pass recorded it.
fn settle_row(
    st: &AppState,
    public: String,
    outcome: Settle,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) -> Option<LedgerRow> {
    let (kind, amounts, meta) = match (outcome, actual) {
        (Settle::Done { meta, .. }, Some(a)) => (RowKind::Commit, a, meta),
        (Settle::Done { meta, .. }, None) => (RowKind::Release, Amounts::ZERO, meta),
        (Settle::Expired(Some(meta)), _) => (RowKind::Expire, meta.held, meta),
        (Settle::Expired(None) | Settle::Unknown | Settle::Forbidden, _) => return None,
    };
    Some(LedgerRow {
        ts_ns: st.now().as_nanos(),
        kind,
        reservation: Some(public),
        subjects: meta.subjects,
        amounts,
        held: Some(meta.held),
        reserved_ns: Some(meta.reserved_ns),
        caller: meta.caller,
        request_id,
        detail,
    })
}

/// Settle a proxied reservation and record it. If the shared store does not
/// answer, retry with back-off for as long as the lease lasts; past it, the
/// lease has run out in the store and the expiry pass records it at its held
/// amounts (never less than was spent).
async fn settle_record(
    st: &AppState,
    public: String,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) {
    let mut wait = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    let outcome = loop {
        match st.engine.settle(&public, None, actual).await {
            Ok(o) => break o,
            Err(e) if waited < proxy_lease(st) => {
                tracing::debug!("settling {public}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(
                    "settling {public}: {e}; given up, its lease settles it at the held amounts"
                );
                return;
            }
        }
    };
    if let Some(row) = settle_row(st, public, outcome, actual, detail, request_id) {
        st.ledger.record(vec![row], None).await;
    }
}

/// Settle from a `Drop` (which cannot wait): in memory at once, the ledger
/// row queued from a task; through Redis from a task.
fn settle_soon(
    st: &Arc<AppState>,
    public: String,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            "no runtime to settle {public}; its lease will settle it at the held amounts"
        );
        return;
    };
    let st = Arc::clone(st);
    if let Some(outcome) = st.engine.settle_in_process(&public, actual) {
        if let Some(row) = settle_row(&st, public, outcome, actual, detail, request_id) {
            if let Err(rows) = st.ledger.try_record(vec![row]) {
                rt.spawn(async move { st.ledger.record(rows, None).await });
            }
        }
        return;
    }
    rt.spawn(async move { settle_record(&st, public, actual, detail, request_id).await });
}

/// Every attempt and back-off fits in a proxied reservation's lease, with a minute to spare.
fn proxy_lease(st: &AppState) -> Duration {
    st.config.proxy.timeout * 2 + Duration::from_secs(60)
}

/// Settle and record.
async fn finish(
    st: &AppState,
    public: &str,
    actual: Option<Amounts>,
    detail: impl serde::Serialize,
    request_id: Option<String>,
) {
    let detail = serde_json::to_string(&detail).ok();
    settle_record(st, public.to_owned(), actual, detail, request_id).await;
}

/// Whether an Anthropic request asks for prompt caching anywhere.
fn body_mentions_cache_control(v: &Value) -> bool {
    match v {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k == "cache_control" || body_mentions_cache_control(v)),
        Value::Array(items) => items.iter().any(body_mentions_cache_control),
        _ => false,
    }
}

/// A reservation held for one candidate model.
struct Held {
    /// The reservation's public id.
    public: String,
    /// The agent's own limits (the provider quota's left out).
    limits: sluice_core::Statuses,
    amounts: Amounts,
    input_estimate: u64,
    now: sluice_core::Timestamp,
}

/// A refused reservation: the answer, and whether the provider's quota refused
/// (another model may serve) rather than one of the agent's own limits.
struct Refused {
    response: Response,
    by_quota: bool,
}

/// Reserve a request's worst case for `model`, record it, or answer the refusal.
async fn reserve_for(
    endpoint: Endpoint,
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: &Value,
    model: &Model,
) -> Result<Held, Refused> {
    let wire = endpoint.wire();
    let subjects = subjects(caller, headers, model).map_err(|e| Refused {
        response: wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_subject",
            e,
        ),
        by_quota: false,
    })?;
    if let Some(k) = st.kill.first(&subjects) {
        return Err(Refused {
            response: wire_error(
                wire,
                StatusCode::FORBIDDEN,
                "permission_error",
                "agent_killed",
                crate::killswitch::killed_message(&k),
            ),
            by_quota: false,
        });
    }
    // The worst case prices every input token as a 1-hour cache write when
    // the request marks anything for caching (the dearest way to read it).
    let input = estimate_input_tokens(endpoint, &model.upstream_name, req);
    let caches = endpoint == Endpoint::Messages && body_mentions_cache_control(req);
    let worst_usage = TokenUsage {
        input,
        cache_write_1h: if caches { input } else { 0 },
        output: output_bound(endpoint, req, model),
        ..TokenUsage::default()
    };
    let held = amounts(model, worst_usage);
    let lease = proxy_lease(st);
    let now = st.now();
    let subject_names: Vec<String> = subjects.iter().map(|s| s.as_str().to_owned()).collect();
    let meta = Meta {
        caller: caller.id().to_owned(),
        subjects: subject_names.clone(),
        held,
        reserved_ns: now.as_nanos(),
        forced: Vec::new(),
    };
    let reserved = match crate::routes::reserve_by_actions(
        st,
        &subjects,
        &Request::new(subjects.iter().cloned(), held),
        Some(lease),
        meta,
        "proxy",
        Some(&model.name),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            return Err(Refused {
                response: unavailable(wire, &e),
                by_quota: false,
            });
        }
    };
    let is_quota = |s: &Subject| model.quota_subject.as_ref() == Some(s);
    let (enforced, (reservation, public)) = match reserved {
        Ok((enforced, _forced, r)) => (enforced.unwrap_or_else(|| subjects.clone()), r),
        Err((d, enforced, approval)) => {
            let by_quota = enforced.get(d.subject).is_some_and(is_quota);
            return Err(Refused {
                response: refusal(wire, &d, &enforced, by_quota, approval.as_ref()),
                by_quota,
            });
        }
    };
    let quota_index = enforced.iter().position(is_quota);
    let row = LedgerRow {
        ts_ns: now.as_nanos(),
        kind: RowKind::Reserve,
        reservation: Some(public.clone()),
        subjects: subject_names,
        amounts: held,
        held: None,
        reserved_ns: None,
        caller: caller.id().to_owned(),
        request_id: None,
        detail: serde_json::to_string(&ModelDetail { model: &model.name }).ok(),
    };
    st.ledger.record(vec![row], None).await;
    st.alerts
        .observe(&st.policies, &enforced, &reservation.limits, now.as_nanos());
    let mut limits = reservation.limits;
    limits.retain(|l| Some(l.subject) != quota_index);
    Ok(Held {
        public,
        limits,
        amounts: held,
        input_estimate: worst_usage.input,
        now,
    })
}

/// The wire-shaped answer to a refusal.
fn refusal(
    wire: Wire,
    d: &sluice_core::Denial,
    subjects: &[Subject],
    by_quota: bool,
    approval: Option<&crate::approvals::ApprovalRef>,
) -> Response {
    let subject = subjects.get(d.subject).map_or("", Subject::as_str);
    let whose = if by_quota {
        format!("the provider quota {subject}")
    } else {
        subject.to_owned()
    };
    let note = approval
        .map(|a| format!("; {}", crate::routes::approval_note(a)))
        .unwrap_or_default();
    let mut r = match d.reason {
        DenialReason::RetryAfter(wait) => {
            let mut r = wire_error(
                wire,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                format!(
                    "{whose} reached its {} limit per {}; retry in {}s{note}",
                    d.metric.name(),
                    crate::wire::window_name(d.window),
                    ratelimit::ceil_secs(wait)
                ),
            );
            if wait > SDK_MAX_RETRY_WAIT {
                r.headers_mut()
                    .insert("x-should-retry", HeaderValue::from_static("false"));
            }
            r
        }
        DenialReason::NeverFits { .. } => {
            let mut r = wire_error(
                wire,
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
                format!(
                    "this request's worst case exceeds {whose}'s {} limit itself; lower max_tokens{note}",
                    d.metric.name()
                ),
            );
            r.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
            r
        }
    };
    r.headers_mut()
        .extend(ratelimit::typed(ratelimit::denied(d)));
    if let Some(v) = approval.and_then(|a| HeaderValue::from_str(&a.id).ok()) {
        r.headers_mut().insert("x-sluice-approval-id", v);
    }
    r
}

/// What the upstream finally said.
enum Upstream {
    /// An answer to pass on (a success, or an error not worth retrying).
    Answer(crate::upstream::Answer),
    /// Retries exhausted (or stopped): the last error status and body, or
    /// a transport error; and whether an attempt may have been served.
    Failed(Option<(StatusCode, Bytes)>, String, MaybeServed),
}

/// Whether a failed call may still have been served (and billed) upstream:
/// an attempt timed out or broke after its request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MaybeServed(bool);

/// The wait an upstream asks for: `retry-after-ms`, then `retry-after`
/// (seconds), then its rate-limit reset headers: OpenAI's
/// `x-ratelimit-reset-{requests,tokens}` (`1s`, `20ms`, `6m0s`) and
/// Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`
/// (RFC 3339 instants, measured from `now`). Of those, the latest reset among
/// the limits whose `remaining` is 0 (all of them must reset), else the earliest.
fn upstream_wait(headers: &HeaderMap, now: sluice_core::Timestamp) -> Option<Duration> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(
            ms.clamp(0.0, 86_400_000.0) / 1000.0,
        ));
    }
    if let Some(s) = get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(s.clamp(0.0, 86_400.0)));
    }
    let mut resets: Vec<(bool, Duration)> = Vec::new();
    for limit in ["requests", "tokens"] {
        if let Some(d) = get(&format!("x-ratelimit-reset-{limit}")).and_then(parse_go_duration) {
            let exhausted = get(&format!("x-ratelimit-remaining-{limit}")) == Some("0");
            resets.push((exhausted, d));
        }
    }
    for limit in ["requests", "tokens", "input-tokens", "output-tokens"] {
        let at = get(&format!("anthropic-ratelimit-{limit}-reset"))
            .and_then(|v| v.trim().parse::<jiff::Timestamp>().ok());
        if let Some(at) = at {
            let at_ns = u64::try_from(at.as_nanosecond()).unwrap_or(0);
            let d = Duration::from_nanos(at_ns.saturating_sub(now.as_nanos()));
            let exhausted = get(&format!("anthropic-ratelimit-{limit}-remaining")) == Some("0");
            resets.push((exhausted, d));
        }
    }
    let exhausted = resets.iter().filter(|r| r.0).map(|r| r.1).max();
    exhausted.or_else(|| resets.iter().map(|r| r.1).min())
}

/// `1s`, `20ms`, `6m0s`, `1h2m3.5s`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s.trim();
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(n);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        total += value
            * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

/// Exponential back-off with full jitter: uniform in [0, base × 2^attempt], capped at 10 s.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = base
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(10));
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    cap.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
}

/// Call the upstream, retrying 429s, 5xx and transport errors within the
/// attempt count and the deadline.
async fn call_upstream(
    st: &AppState,
    provider_index: usize,
    path: &str,
    body: Bytes,
    client_headers: &HeaderMap,
) -> Upstream {
    let proxy = &st.config.proxy;
    let provider = &proxy.providers[provider_index];
    #[allow(clippy::disallowed_methods)] // a deadline for sleeping, not a decision's clock
    let deadline = tokio::time::Instant::now() + proxy.timeout;
    // The provider's key is added by `Upstreams::post` (it never passes through here).
    let mut headers = HeaderMap::new();
    if provider.wire == Wire::Anthropic {
        let version = client_headers
            .get("anthropic-version")
            .cloned()
            .unwrap_or(HeaderValue::from_static("2023-06-01"));
        headers.insert("anthropic-version", version);
        if let Some(beta) = client_headers.get("anthropic-beta") {
            headers.insert("anthropic-beta", beta.clone());
        }
    }
    let mut last = (None, String::new());
    for attempt in 0..proxy.attempts {
        let wait = match st
            .upstreams
            .post(
                provider_index,
                path,
                headers.clone(),
                body.clone(),
                deadline,
            )
            .await
        {
            Ok(r) if r.status.as_u16() == 429 || r.status.is_server_error() => {
                let wait = upstream_wait(&r.headers, st.now())
                    .unwrap_or_else(|| backoff(proxy.backoff, attempt));
                let status = r.status;
                let bytes = r.bytes().await.unwrap_or_default();
                last = (Some((status, bytes)), format!("upstream answered {status}"));
                wait
            }
            Ok(r) => return Upstream::Answer(r),
            // Sent, then lost: the provider may be serving it. Another
            // attempt could be billed twice, so none is made.
            Err(e) if e.maybe_served() => {
                return Upstream::Failed(
                    None,
                    format!("upstream failed after the request was sent: {e}"),
                    MaybeServed(true),
                );
            }
            Err(e) => {
                last = (None, format!("upstream unreachable: {e}"));
                backoff(proxy.backoff, attempt)
            }
        };
        #[allow(clippy::disallowed_methods)]
        let now = tokio::time::Instant::now();
        if attempt + 1 == proxy.attempts || now + wait > deadline {
            break;
        }
        tokio::time::sleep(wait).await;
    }
    Upstream::Failed(last.0, last.1, MaybeServed(false))
}

/// `POST /v1/chat/completions` (OpenAI wire).
pub async fn openai_chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    route(st, headers, body, Endpoint::Chat).await
}

/// `POST /v1/completions` (OpenAI wire).
pub async fn openai_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    route(st, headers, body, Endpoint::Completions).await
}

/// `POST /v1/embeddings` (OpenAI wire).
pub async fn openai_embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    route(st, headers, body, Endpoint::Embeddings).await
}

/// `POST /v1/responses` (OpenAI wire).
pub async fn openai_responses(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    route(st, headers, body, Endpoint::Responses).await
}

/// `POST /v1/messages` (Anthropic wire).
pub async fn anthropic_messages(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    route(st, headers, body, Endpoint::Messages).await
}

/// A proxied route: the body, bounded, then the call.
async fn route(st: Arc<AppState>, headers: HeaderMap, body: Body, endpoint: Endpoint) -> Response {
    match read_body(&st, &headers, body, endpoint.wire()).await {
        Ok(body) => proxy_request(st, headers, body, endpoint).await,
        Err(r) => r,
    }
}

/// A proxied call's body, at most `max_request_bytes` (refused from its
/// `Content-Length` before it is read when that says more), or the wire's
/// 413 `request_too_large`.
async fn read_body(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    wire: Wire,
) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let max = st.config.proxy.max_body;
    let too_large = || {
        wire_error(
            wire,
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {max} bytes (max_request_bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_body",
            format!("the request body could not be read: {e}"),
        )),
    }
}

/// The caller, the request's JSON and its configured model, or the wire-shaped error.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once
fn admit(
    st: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    wire: Wire,
) -> Result<(Caller, Value, Arc<Model>), Response> {
    let caller = st.keys.authenticate(headers).map_err(|e| {
        wire_error(
            wire,
            e.status,
            "invalid_request_error",
            "invalid_api_key",
            e.message,
        )
    })?;
    let bad = |code: &str, message: String| {
        wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    };
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Err(bad("invalid_json", "the body must be a JSON object".into())),
        Err(e) => return Err(bad("invalid_json", format!("malformed JSON: {e}"))),
    };
    let Some(name) = req["model"].as_str() else {
        return Err(bad("missing_model", "`model` is required".into()));
    };
    let Some(model) = st.config.proxy.models.get(name).cloned() else {
        return Err(wire_error(
            wire,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{name}` is not configured on this gateway"),
        ));
    };
    if st.config.proxy.providers[model.provider].wire != wire {
        let route = match wire {
            Wire::OpenAi => "/v1/messages (the Anthropic wire)",
            Wire::Anthropic => "the /v1/chat/completions family (the OpenAI wire)",
        };
        return Err(bad(
            "wrong_wire",
            format!("`{name}` is served on the other wire format: use {route}"),
        ));
    }
    for (field, value) in [("max_tokens", &req["max_tokens"]), ("n", &req["n"])] {
        if !value.is_null() && value.as_u64().is_none() {
            return Err(bad(
                "invalid_value",
                format!("`{field}` must be a non-negative integer"),
            ));
        }
    }
    Ok((caller, req, model))
}

/// `POST /v1/messages/count_tokens` (Anthropic wire): forwarded to the
/// provider (free there, and not charged here); the caller must hold a key.
pub async fn anthropic_count_tokens(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let wire = Wire::Anthropic;
    let body = match read_body(&st, &headers, body, wire).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (_, mut req, model) = match admit(&st, &headers, &body, wire) {
        Ok(x) => x,
        Err(r) => return r,
    };
    req["model"] = Value::from(model.upstream_name.clone());
    let bytes = Bytes::from(req.to_string());
    match call_upstream(&st, model.provider, COUNT_TOKENS_PATH, bytes, &headers).await {
        Upstream::Answer(resp) => {
            let status = resp.status;
            match resp.bytes().await {
                Ok(bytes) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
                }
                Err(e) => wire_error(
                    wire,
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream_error",
                    format!("the upstream's answer was cut short: {e}"),
                ),
            }
        }
        Upstream::Failed(Some((status, bytes)), _, _) => {
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Upstream::Failed(None, why, _) => wire_error(
            wire,
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_error",
            why,
        ),
    }
}

async fn proxy_request(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Response {
    let wire = endpoint.wire();
    let (caller, mut req, mut first) = match admit(&st, &headers, &body, wire) {
        Ok(x) => x,
        Err(r) => return r,
    };
    // Boxed, and only when a policy degrades: the rare path keeps its
    // kilobytes of future out of this one (see `call_upstream`).
    let degraded = if st.degrade_any.load(std::sync::atomic::Ordering::Acquire) {
        Box::pin(degrade(
            &st, &caller, &headers, endpoint, &mut req, &mut first,
        ))
        .await
    } else {
        None
    };
    let streaming = endpoint.streams() && req["stream"].as_bool() == Some(true);
    let client_wants_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    // The model asked for, then its fallbacks, in order.
    let candidates: Vec<Arc<Model>> = std::iter::once(Arc::clone(&first))
        .chain(
            first
                .fallbacks
                .iter()
                .filter_map(|f| st.config.proxy.models.get(f).cloned()),
        )
        .collect();
    let mut failure = (None, String::from("no model could serve the request"));
    for (i, model) in candidates.iter().enumerate() {
        let provider = &st.config.proxy.providers[model.provider];
        let more = i + 1 < candidates.len();
        // Each candidate holds its own worst case on its own subjects (`model:NAME` differs).
        // The three phases are boxed: each future is kilobytes, and inline
        // they made this one 17-27 KB, which axum moves whole twice when it
        // boxes the handler's future (see docs/BENCHMARKS.md, instructions
        // per proxied call).
        let held = match Box::pin(reserve_for(endpoint, &st, &caller, &headers, &req, model)).await
        {
            Ok(h) => h,
            // The provider's quota is spent: the next model may be under its own.
            Err(refused) if refused.by_quota && more => {
                tracing::debug!("{}: provider quota spent; failing over", model.name);
                continue;
            }
            Err(refused) => return refused.response,
        };
        // Ask for the usage chunk; it is dropped on the way out unless the client asked too.
        let ask_usage = streaming
            && !client_wants_usage
            && matches!(endpoint, Endpoint::Chat | Endpoint::Completions);
        // The client's bytes go as they came unless the model's name or the stream options change.
        let same = model.upstream_name == first.name && degraded.is_none();
        let upstream_body = if same && !ask_usage {
            body.clone()
        } else if same && req.get("stream_options").is_none() {
            with_include_usage(&body)
        } else {
            let mut b = req.clone();
            b["model"] = Value::from(model.upstream_name.clone());
            if ask_usage {
                b["stream_options"]["include_usage"] = Value::from(true);
            }
            Bytes::from(b.to_string())
        };
        // If the client goes away while the upstream works, this request is
        // dropped here: the guard settles it at once at the held worst case
        // (the upstream may still serve and bill it) instead of at lease expiry.
        let guard = Abandoned {
            st: Arc::clone(&st),
            id: Some(held.public.clone()),
            held: held.amounts,
            model: model.name.clone(),
        };
        let called = Box::pin(call_upstream(
            &st,
            model.provider,
            endpoint.path(),
            upstream_body,
            &headers,
        ))
        .await;
        guard.disarm();
        let resp = match called {
            Upstream::Answer(r) => r,
            Upstream::Failed(last, why, maybe_served) => {
                tracing::warn!("{} via {}: {why}", model.name, provider.name);
                // Error answers and failures to connect cost nothing; a call
                // that may have been served is charged its worst case.
                Box::pin(finish(
                    &st,
                    &held.public,
                    maybe_served.0.then_some(held.amounts),
                    json!({"model": model.name, "error": why, "failover": more,
                        "maybe_served": maybe_served.0}),
                    None,
                ))
                .await;
                failure = (last, why);
                continue;
            }
        };
        let mut answered = Box::pin(answer(
            endpoint,
            &st,
            resp,
            model,
            held,
            streaming,
            client_wants_usage,
        ))
        .await;
        if let Some(d) = degraded
            .as_deref()
            .and_then(|d| HeaderValue::from_str(d).ok())
        {
            answered.headers_mut().insert("x-sluice-degraded", d);
        }
        return answered;
    }
    match failure.0 {
        Some((status, bytes)) => {
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        None => wire_error(
            wire,
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_error",
            failure.1,
        ),
    }
}

/// The client's JSON object with `"stream_options":{"include_usage":true}`
/// added as its first member (the body has no `stream_options`), without
/// re-serializing it.
fn with_include_usage(body: &[u8]) -> Bytes {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    // The body parsed as an object, so it has an opening brace.
    let start = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
    let (head, rest) = body.split_at(start);
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|&b| b == b'}');
    let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(head);
    out.extend_from_slice(MEMBER);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// Graceful degradation: for each subject of the call whose policy has
/// `degrade` rules, the highest share used of its limits picks the rules
/// that apply (every rule with `at` at or below it, in order): the model is
/// swapped for a configured one on the same wire and the output tokens are
/// capped, before the reservation, so the worst case is the cheaper call's.
/// What changed, for `x-sluice-degraded`. A usage read that fails changes
/// nothing (the reservation then decides as usual). Called only when some
/// policy has degrade rules (`AppState::degrade_any`).
async fn degrade(
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    endpoint: Endpoint,
    req: &mut Value,
    model: &mut Arc<Model>,
) -> Option<String> {
    let Ok(subjects) = subjects(caller, headers, model) else {
        return None;
    };
    let mut rules = Vec::new();
    for subject in &subjects {
        let own = crate::routes::policy_of(st, subject, |p| p.body.degrade.clone()).flatten();
        let Some(own) = own else { continue };
        let Ok(levels) = st.engine.usage(subject).await else {
            continue;
        };
        let share = levels
            .iter()
            .filter(|l| l.limit > 0)
            .map(|l| l.used as f64 / l.limit as f64)
            .fold(0.0, f64::max);
        rules.extend(own.into_iter().filter(|r| r.at <= share));
    }
    if rules.is_empty() {
        return None;
    }
    rules.sort_by(|a, b| a.at.total_cmp(&b.at));
    let wire = endpoint.wire();
    let mut changed = Vec::new();
    if let Some(name) = rules.iter().rev().find_map(|r| r.model.as_ref()) {
        match st.config.proxy.models.get(name) {
            Some(m)
                if st.config.proxy.providers[m.provider].wire == wire && m.name != model.name =>
            {
                *model = Arc::clone(m);
                req["model"] = Value::from(m.name.clone());
                changed.push(format!("model={}", m.name));
            }
            Some(_) => {}
            None => tracing::warn!("degrade rule names {name:?}, which is not configured"),
        }
    }
    if let Some(cap) = rules.iter().filter_map(|r| r.max_tokens).min() {
        let field = match endpoint {
            Endpoint::Chat if !req["max_completion_tokens"].is_null() => {
                Some("max_completion_tokens")
            }
            Endpoint::Chat | Endpoint::Completions | Endpoint::Messages => Some("max_tokens"),
            Endpoint::Responses => Some("max_output_tokens"),
            Endpoint::Embeddings => None,
        };
        if let Some(field) = field {
            let asked = req[field].as_u64().unwrap_or(u64::MAX);
            if asked > cap {
                req[field] = Value::from(cap);
                changed.push(format!("{field}={cap}"));
            }
        }
    }
    (!changed.is_empty()).then(|| changed.join(", "))
}

/// Settles a reservation at its held amounts if dropped before being disarmed.
struct Abandoned {
    st: Arc<AppState>,
    id: Option<String>,
    held: Amounts,
    model: String,
}

impl Abandoned {
    fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(public) = self.id.take() else { return };
        let detail = json!({"model": self.model, "abandoned": "the client went away before the upstream answered"});
        settle_soon(
            &self.st,
            public,
            Some(self.held),
            Some(detail.to_string()),
            None,
        );
    }
}

/// A settled call's ledger detail (serialized straight from the struct: it is on every call).
#[derive(serde::Serialize)]
struct AnswerDetail<'a> {
    model: &'a str,
    upstream_model: &'a str,
    status: u16,
    latency_ms: u64,
    usage_reported: bool,
    endpoint: &'a str,
    cached_input_tokens: Option<u64>,
}

/// A reservation row's detail.
#[derive(serde::Serialize)]
struct ModelDetail<'a> {
    model: &'a str,
}

/// A streamed call's settle detail (keys in the order a JSON map sorts them).
#[derive(serde::Serialize)]
struct StreamDetail<'a> {
    cached_input_tokens: u64,
    charged_from: &'static str,
    completed: bool,
    latency_ms: u64,
    model: &'a str,
    stream: bool,
    upstream_model: &'a str,
}

/// Pass an upstream answer on and settle its reservation.
async fn answer(
    endpoint: Endpoint,
    st: &Arc<AppState>,
    resp: crate::upstream::Answer,
    model: &Arc<Model>,
    held: Held,
    streaming: bool,
    client_wants_usage: bool,
) -> Response {
    let wire = endpoint.wire();
    let status = resp.status;
    // The provider's id for the call, for reconciling with its bill.
    let request_id = ["x-request-id", "request-id"]
        .iter()
        .find_map(|k| resp.headers.get(*k))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(200).collect::<String>());
    let headers_out = |r: &mut Response| {
        if let Ok(v) = HeaderValue::try_from(model.name.as_str()) {
            r.headers_mut().insert("x-sluice-model", v);
        }
        r.headers_mut()
            .extend(ratelimit::typed(ratelimit::allowed(&held.limits, held.now)));
    };
    if streaming && status.is_success() {
        let settle = StreamSettle {
            st: Arc::clone(st),
            id: Some(held.public.clone()),
            model: Arc::clone(model),
            held: held.amounts,
            read: StreamRead {
                input_estimate: held.input_estimate,
                ..StreamRead::default()
            },
            started_ns: held.now.as_nanos(),
            request_id,
        };
        let mut r = stream_through(endpoint, resp, settle, client_wants_usage);
        headers_out(&mut r);
        return r;
    }
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            // The upstream answered but the body broke: it may have served; charge the hold.
            let detail = json!({"model": model.name, "error": format!("upstream body: {e}")});
            Box::pin(finish(
                st,
                &held.public,
                Some(held.amounts),
                detail,
                request_id,
            ))
            .await;
            return wire_error(
                wire,
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_error",
                "the upstream's answer was cut short",
            );
        }
    };
    let latency_ms = st.now().as_nanos().saturating_sub(held.now.as_nanos()) / 1_000_000;
    let usage = usage_in(endpoint, &bytes);
    let detail = AnswerDetail {
        model: &model.name,
        upstream_model: &model.upstream_name,
        status: status.as_u16(),
        latency_ms,
        usage_reported: usage.is_some(),
        endpoint: endpoint.path(),
        cached_input_tokens: usage.map(|u| u.cached_input),
    };
    if status.is_success() {
        let actual = usage.map_or(held.amounts, |u| amounts(model, u));
        finish(st, &held.public, Some(actual), detail, request_id).await;
    } else {
        finish(st, &held.public, None, detail, request_id).await;
    }
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
    headers_out(&mut r);
    r
}

/// Settles a streamed reservation exactly once: with the upstream's usage
/// when the stream completes, or, when it is cut short (client gone, upstream
/// broke), with the input estimate and the output estimated from the text
/// streamed so far (one token per three bytes, at least one), capped at the hold.
struct StreamSettle {
    st: Arc<AppState>,
    id: Option<String>,
    model: Arc<Model>,
    held: Amounts,
    read: StreamRead,
    started_ns: u64,
    request_id: Option<String>,
}

/// What a stream's events have said so far.
#[derive(Debug, Clone, Default, PartialEq)]
struct StreamRead {
    /// The worst-case input estimate, for a stream whose usage never came.
    input_estimate: u64,
    /// Input (and its cached parts) reported before the stream's end (Anthropic's `message_start`).
    known_input: Option<TokenUsage>,
    /// Bytes of text streamed.
    text_bytes: u64,
    usage: Option<TokenUsage>,
}

impl StreamSettle {
    fn settle(&mut self, completed: bool) {
        let Some(id) = self.id.take() else { return };
        let (usage, how) = self.read.charged();
        let mut actual = amounts(&self.model, usage);
        if self.read.usage.is_none() {
            // An estimate never exceeds what was held.
            for m in sluice_core::Metric::ALL {
                actual.set(m, actual.get(m).min(self.held.get(m)));
            }
        }
        let st = Arc::clone(&self.st);
        let latency_ms = st.now().as_nanos().saturating_sub(self.started_ns) / 1_000_000;
        let detail = serde_json::to_string(&StreamDetail {
            cached_input_tokens: usage.cached_input,
            charged_from: how,
            completed,
            latency_ms,
            model: &self.model.name,
            stream: true,
            upstream_model: &self.model.upstream_name,
        })
        .ok();
        // In memory settled now; the ledger row is queued from a task (Drop cannot wait).
        settle_soon(&st, id, Some(actual), detail, self.request_id.take());
    }
}

impl StreamRead {
    /// What the stream is charged for, and from what: the usage it
    /// reported, else an estimate from its text (and the input it reported,
    /// else the input estimate).
    fn charged(&self) -> (TokenUsage, &'static str) {
        match self.usage {
            Some(u) => (u, "usage"),
            None => (
                TokenUsage {
                    output: (self.text_bytes.div_ceil(3)).max(1),
                    ..self.known_input.unwrap_or(TokenUsage {
                        input: self.input_estimate,
                        ..TokenUsage::default()
                    })
                },
                "estimated",
            ),
        }
    }

    /// Read one stream event's usage and text; whether to pass it on (the
    /// usage-only chunk Sluice asked for is dropped unless the client asked too).
    fn observe(&mut self, endpoint: Endpoint, v: &Value, client_wants_usage: bool) -> bool {
        let text_len = |t: &Value| t.as_str().map_or(0, str::len) as u64;
        match endpoint {
            Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    self.text_bytes +=
                        text_len(&choice["text"]) + text_len(&choice["delta"]["content"]);
                    for call in choice["delta"]["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        self.text_bytes += text_len(&call["function"]["arguments"]);
                    }
                }
                if let Some(u) = usage_of(endpoint, v) {
                    self.usage = Some(u);
                    // No choices (none, or not a list): nothing a client
                    // that did not ask for usage could read from it.
                    let usage_only = v["choices"].as_array().is_none_or(Vec::is_empty);
                    return client_wants_usage || !usage_only;
                }
            }
            Endpoint::Responses => match v["type"].as_str() {
                Some("response.output_text.delta")
                | Some("response.function_call_arguments.delta")
                | Some("response.reasoning_summary_text.delta") => {
                    self.text_bytes += text_len(&v["delta"]);
                }
                Some("response.completed")
                | Some("response.incomplete")
                | Some("response.failed") => {
                    if let Some(u) = usage_of(endpoint, &v["response"]) {
                        self.usage = Some(u);
                    }
                }
                _ => {}
            },
            Endpoint::Messages => match v["type"].as_str() {
                Some("message_start") => {
                    self.known_input = anthropic_input(&v["message"]["usage"]);
                }
                Some("message_delta") => {
                    // Cumulative output; input from message_start (or the estimate).
                    if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                        let input = anthropic_input(&v["usage"]).or(self.known_input).unwrap_or(
                            TokenUsage {
                                input: self.input_estimate,
                                ..TokenUsage::default()
                            },
                        );
                        self.usage = Some(TokenUsage {
                            output: out,
                            ..input
                        });
                    }
                }
                Some("content_block_delta") => {
                    let d = &v["delta"];
                    self.text_bytes += text_len(&d["text"])
                        + text_len(&d["partial_json"])
                        + text_len(&d["thinking"]);
                }
                _ => {}
            },
        }
        true
    }
}

impl Drop for StreamSettle {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// One SSE event's `data:` payload: borrowed when it is one line (as every
/// provider sends it), joined otherwise; `None` for none or `[DONE]`.
fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let text = std::str::from_utf8(event).ok()?;
    let mut lines = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start);
    let first = lines.next()?;
    let data = match lines.next() {
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = format!("{first}\n{second}");
            for l in lines {
                joined.push('\n');
                joined.push_str(l);
            }
            std::borrow::Cow::Owned(joined)
        }
    };
    (!data.is_empty() && data != "[DONE]").then_some(data)
}

/// What Sluice reads of an OpenAI chat or completions chunk, borrowed from
/// the event (every other field is skipped, never allocated). A usage the
/// struct cannot hold sends the chunk through the tree.
#[derive(serde::Deserialize)]
struct ChatChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChatChoice<'a>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(serde::Deserialize)]
struct ChatChoice<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<ChatDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct ChatDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ChatToolCall<'a>>>,
}

#[derive(serde::Deserialize)]
struct ChatToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<ChatFunction<'a>>,
}

#[derive(serde::Deserialize)]
struct ChatFunction<'a> {
    #[serde(default, borrow)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

impl ChatChunk<'_> {
    /// Bytes of text this chunk streams.
    fn text_bytes(&self) -> u64 {
        let len = |t: Option<&std::borrow::Cow<'_, str>>| t.map_or(0, |s| s.len() as u64);
        let mut n = 0;
        for c in &self.choices {
            n += len(c.text.as_ref());
            if let Some(d) = &c.delta {
                n += len(d.content.as_ref());
                for call in d.tool_calls.iter().flatten() {
                    n += len(call.function.as_ref().and_then(|f| f.arguments.as_ref()));
                }
            }
        }
        n
    }
}

/// A chat or completions chunk read without a tree: the text it streams,
/// its usage, whether it has choices; `None` when it needs the tree.
fn chat_chunk_fast(endpoint: Endpoint, data: &str) -> Option<(u64, Option<TokenUsage>, bool)> {
    let chunk = serde_json::from_str::<ChatChunk<'_>>(data).ok()?;
    let usage = match &chunk.usage {
        None => None,
        Some(u) => Some(u.token_usage(endpoint)?),
    };
    Some((chunk.text_bytes(), usage, !chunk.choices.is_empty()))
}

impl StreamRead {
    /// Read one event (see [`StreamRead::observe`]); whether to pass it on.
    fn observe_event(
        &mut self,
        endpoint: Endpoint,
        event: &[u8],
        client_wants_usage: bool,
    ) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if matches!(endpoint, Endpoint::Chat | Endpoint::Completions) {
            // The common chunk, read without building a tree.
            if let Some((text, usage, has_choices)) = chat_chunk_fast(endpoint, &data) {
                self.text_bytes += text;
                let Some(u) = usage else { return true };
                self.usage = Some(u);
                return client_wants_usage || has_choices;
            }
        }
        match serde_json::from_str::<Value>(&data) {
            Ok(v) => self.observe(endpoint, &v, client_wants_usage),
            Err(_) => true,
        }
    }
}

/// Pass the upstream's SSE through event by event (nothing is buffered
/// beyond one event), reading usage and text on the way; drop the usage-only
/// chunk Sluice asked for when the client did not.
fn stream_through(
    endpoint: Endpoint,
    resp: crate::upstream::Answer,
    settle: StreamSettle,
    client_wants_usage: bool,
) -> Response {
    use futures_util::StreamExt;
    struct State {
        upstream:
            futures_util::stream::BoxStream<'static, Result<Bytes, crate::upstream::UpstreamError>>,
        buf: bytes::BytesMut,
        /// Bytes of `buf` already searched for an event's end.
        scanned: usize,
        settle: StreamSettle,
        done: bool,
    }
    let state = State {
        upstream: resp.stream().boxed(),
        buf: bytes::BytesMut::new(),
        scanned: 0,
        settle,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            // Every complete event in the buffer goes out as it came (one
            // slice of the buffer, not a copy) unless it is dropped.
            // (`unsplit` moves the first piece in and copies only after a drop.)
            let mut out = bytes::BytesMut::new();
            let mut at = 0; // start of the next event in `buf`
            let mut from = s.scanned;
            while let Some(i) = memchr::memmem::find(&s.buf[from..], b"\n\n") {
                let end = from + i + 2;
                if s.settle
                    .read
                    .observe_event(endpoint, &s.buf[at..end], client_wants_usage)
                {
                    at = end;
                } else {
                    out.unsplit(s.buf.split_to(at));
                    let _dropped = s.buf.split_to(end - at);
                    at = 0;
                }
                from = at;
            }
            out.unsplit(s.buf.split_to(at));
            // Search only the new bytes next time (an end may straddle).
            s.scanned = s.buf.len().saturating_sub(1);
            if !out.is_empty() {
                return Some((Ok::<_, std::io::Error>(out.freeze()), s));
            }
            match s.upstream.next().await {
                Some(Ok(chunk)) => s.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    s.done = true;
                    s.settle.settle(false);
                    return Some((
                        Err(std::io::Error::other(format!("upstream stream broke: {e}"))),
                        s,
                    ));
                }
                None => {
                    s.done = true;
                    s.settle.settle(true);
                    if s.buf.is_empty() {
                        return None;
                    }
                    let rest = s.buf.split().freeze();
                    return Some((Ok(rest), s));
                }
            }
        }
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /v1/models`: the configured models, OpenAI-shaped.
pub async fn openai_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.keys.authenticate(&headers) {
        return openai_error(
            e.status,
            "invalid_request_error",
            "invalid_api_key",
            e.message,
        );
    }
    let data: Vec<Value> = st
        .config
        .proxy
        .models
        .values()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": st.config.proxy.providers[m.provider].name}))
        .collect();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"object": "list", "data": data}).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    /// The size of what `f` returns (here: an async fn's future), without calling it.
    fn returned_size<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn the_proxy_handler_future_stays_small() {
        // axum moves a handler's future whole twice a call. With its phases
        // boxed it is about 1 KB; any one of them inline makes it 3-6 KB in
        // a debug build (27 KB in release before this was done).
        let size = returned_size(route);
        assert!(size <= 2048, "the proxy route's future is {size} bytes");
    }

    #[test]
    fn upstream_waits_from_every_header_family() {
        let now = sluice_core::Timestamp::from_nanos(1_700_000_000_000_000_000);
        let w = |pairs: &[(&'static str, &str)]| upstream_wait(&headers(pairs), now);
        assert_eq!(
            w(&[("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            w(&[("retry-after", "3"), ("retry-after-ms", "10")]),
            Some(Duration::from_millis(10))
        );
        assert_eq!(w(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        // OpenAI: the exhausted limit's reset, not the earliest.
        assert_eq!(
            w(&[
                ("x-ratelimit-reset-requests", "20ms"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("x-ratelimit-remaining-requests", "5"),
                ("x-ratelimit-remaining-tokens", "0")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            w(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "1m")
            ]),
            Some(Duration::from_secs(1))
        );
        // Anthropic: RFC 3339 instants, measured from now.
        assert_eq!(
            w(&[
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:22Z"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:13:21Z")
            ]),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            w(&[(
                "anthropic-ratelimit-output-tokens-reset",
                "2023-11-14T22:13:20.5Z"
            )]),
            Some(Duration::from_millis(500))
        );
        // A reset in the past waits nothing; junk is ignored.
        assert_eq!(
            w(&[("anthropic-ratelimit-tokens-reset", "2000-01-01T00:00:00Z")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            w(&[
                ("retry-after", "soon"),
                ("x-ratelimit-reset-tokens", "later")
            ]),
            None
        );
    }

    #[test]
    fn output_bounds_per_endpoint() {
        let model = Model {
            name: "m".into(),
            provider: 0,
            upstream_name: "m".into(),
            price: crate::pricing::Price::from_usd_per_mtok(1.0, 1.0, None).unwrap(),
            max_output_tokens: 1000,
            fallbacks: vec![],
            subject: Subject::parse("model:m").unwrap(),
            quota_subject: None,
        };
        let b = |e, v: Value| output_bound(e, &v, &model);
        assert_eq!(b(Endpoint::Chat, json!({})), 1000);
        assert_eq!(b(Endpoint::Chat, json!({"max_tokens": 10, "n": 3})), 30);
        assert_eq!(
            b(Endpoint::Chat, json!({"max_completion_tokens": 5000})),
            1000
        );
        assert_eq!(
            b(
                Endpoint::Completions,
                json!({"max_tokens": 10, "n": 2, "best_of": 4})
            ),
            40
        );
        assert_eq!(b(Endpoint::Embeddings, json!({"max_tokens": 10})), 0);
        assert_eq!(b(Endpoint::Responses, json!({"max_output_tokens": 7})), 7);
        assert_eq!(b(Endpoint::Messages, json!({"max_tokens": 70})), 70);
    }

    #[test]
    fn chat_chunks_are_read_as_the_tree_reads_them() {
        // The text a chunk streams, read from a `Value` as before.
        let by_tree = |v: &Value| -> u64 {
            let len = |t: &Value| t.as_str().map_or(0, str::len) as u64;
            let mut n = 0;
            for c in v["choices"].as_array().into_iter().flatten() {
                n += len(&c["text"]) + len(&c["delta"]["content"]);
                for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    n += len(&call["function"]["arguments"]);
                }
            }
            n
        };
        for v in [
            json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}], "usage": null}),
            json!({"choices": [{"delta": {"content": "héllo \"quoted\" \n wörld"}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\": 1}"}}, {"function": {"arguments": "xy"}}]}}]}),
            json!({"choices": [{"text": "completion text", "index": 0}]}),
            json!({"choices": [{"delta": {"content": null}}, {"delta": {"content": "ab"}}]}),
            json!({"choices": [], "extra": {"nested": [1, 2, {"x": "y"}]}}),
        ] {
            let text = v.to_string();
            let chunk: ChatChunk<'_> = serde_json::from_str(&text).unwrap();
            assert!(chunk.usage.is_none(), "{v}");
            assert_eq!(chunk.text_bytes(), by_tree(&v), "{v}");
        }
        let with_usage = json!({"choices": [], "usage": {"prompt_tokens": 3}}).to_string();
        let chunk: ChatChunk<'_> = serde_json::from_str(&with_usage).unwrap();
        assert!(chunk.usage.is_some(), "a usage chunk is read in full");
        // A shape the fast path does not know falls back to the tree.
        assert!(
            serde_json::from_str::<ChatChunk<'_>>(r#"{"choices": [{"delta": {"content": [1]}}]}"#)
                .is_err()
        );
    }

    #[test]
    fn openai_usage_is_read_as_the_tree_reads_it() {
        let usages = [
            json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}),
            json!({"prompt_tokens": 1000, "completion_tokens": 300,
                "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 64}}),
            json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": null}),
            json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": "x"}}),
            json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2.5}}),
            json!({"prompt_tokens": 7}),
            json!({"prompt_tokens": -1, "completion_tokens": 1}),
            json!({"completion_tokens": 1}),
            json!({"prompt_tokens": "7", "completion_tokens": 1}),
            json!(null),
            json!("usage"),
        ];
        for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
            for u in &usages {
                let answer =
                    json!({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": u});
                let tree = usage_fields(endpoint, u);
                assert_eq!(
                    usage_in(endpoint, answer.to_string().as_bytes()),
                    tree,
                    "{endpoint:?} {u}"
                );
                for choices in [json!([]), json!([{"delta": {"content": "abc"}}])] {
                    let chunk = json!({"choices": choices, "usage": u});
                    if let Some((text, usage, has_choices)) =
                        chat_chunk_fast(endpoint, &chunk.to_string())
                    {
                        assert_eq!(usage, usage_of(endpoint, &chunk), "{endpoint:?} {chunk}");
                        assert_eq!(text, if has_choices { 3 } else { 0 }, "{chunk}");
                        assert_eq!(
                            has_choices,
                            !chunk["choices"].as_array().unwrap().is_empty()
                        );
                    } else {
                        // Only a usage the struct cannot read goes to the tree.
                        assert!(!u.is_null(), "{chunk}");
                    }
                }
            }
        }
        assert_eq!(usage_in(Endpoint::Chat, b"{\"choices\": []}"), None);
    }

    #[test]
    fn include_usage_is_spliced_as_the_tree_would_set_it() {
        for body in [
            r#"{"model":"m","stream":true,"messages":[]}"#,
            "  {\n \"model\" : \"m\", \"stream\": true }  ",
            "{}",
            " { } ",
        ] {
            let spliced: Value = serde_json::from_slice(&with_include_usage(body.as_bytes()))
                .unwrap_or_else(|e| panic!("{body}: {e}"));
            let mut tree: Value = serde_json::from_str(body).unwrap();
            tree["stream_options"]["include_usage"] = Value::from(true);
            assert_eq!(spliced, tree, "{body}");
        }
    }

    /// Stream events of every wire's shapes, with the fields Sluice reads
    /// present or not, of the right type or not.
    fn stream_event() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = || {
            prop_oneof![
                Just(Value::Null),
                "[a-z é\"\\\\\n\u{1}😀]{0,8}".prop_map(Value::from),
                any::<u32>().prop_map(Value::from),
                Just(json!(["x"])),
            ]
        };
        let usage = prop_oneof![
            Just(Value::Null),
            Just(json!({"prompt_tokens": 5, "completion_tokens": 2})),
            Just(json!({"prompt_tokens": 5})),
            Just(json!({"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2})),
            Just(json!({"output_tokens": 9})),
            Just(json!(3)),
        ];
        let kind = prop::sample::select(vec![
            "content_block_delta",
            "message_start",
            "message_delta",
            "ping",
            "response.output_text.delta",
            "response.reasoning_summary_text.delta",
            "response.completed",
            "response.failed",
            "other",
        ]);
        (text(), text(), text(), usage, kind, any::<u16>()).prop_map(
            |(t1, t2, t3, usage, kind, shape)| {
                let bit = |i: u16| shape & (1 << i) != 0;
                let mut v = json!({"id": "x", "created": 1});
                if bit(0) {
                    let mut choice = json!({"index": 0, "delta": {"content": t1}});
                    if bit(1) {
                        choice["text"] = t2.clone();
                    }
                    if bit(2) {
                        choice["delta"]["tool_calls"] =
                            json!([{"index": 0, "function": {"name": "f", "arguments": t3}}]);
                    }
                    v["choices"] = if bit(3) { json!([]) } else { json!([choice, choice]) };
                }
                if bit(4) {
                    v["usage"] = usage.clone();
                }
                if bit(5) {
                    v["type"] = Value::from(kind);
                }
                if bit(6) {
                    v["delta"] = if bit(7) {
                        t1.clone()
                    } else {
                        json!({"type": "text_delta", "text": t1, "partial_json": t2, "thinking": t3})
                    };
                }
                if bit(8) {
                    v["message"] = json!({"usage": usage});
                }
                if bit(9) {
                    v["response"] = json!({"usage": usage});
                }
                v
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1024))]

        /// An event read from its bytes (a chat chunk into a borrowed
        /// struct, anything else into a tree) leaves the same usage, text
        /// and pass-on verdict as the tree read of it.
        #[test]
        fn stream_events_are_read_as_the_tree_reads_them(
            v in stream_event(),
            wants in proptest::prelude::any::<bool>(),
            pretty in proptest::prelude::any::<bool>(),
        ) {
            let data = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
            let event = format!("data: {}\n\n", data.replace('\n', "\ndata: "));
            for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses, Endpoint::Messages] {
                let start = StreamRead { input_estimate: 100, ..StreamRead::default() };
                let mut tree = start.clone();
                let pass = tree.observe(endpoint, &v, wants);
                let mut fast = start;
                proptest::prop_assert_eq!(fast.observe_event(endpoint, event.as_bytes(), wants), pass);
                proptest::prop_assert_eq!(&fast, &tree, "{:?} {}", endpoint, v);
            }
        }
    }

    #[test]
    fn a_chunk_of_usage_and_no_choices_reaches_only_a_client_that_asked() {
        let usage = json!({"prompt_tokens": 3, "completion_tokens": 1});
        let want = TokenUsage {
            input: 3,
            output: 1,
            ..TokenUsage::default()
        };
        for (chunk, usage_only) in [
            (json!({"choices": [], "usage": usage}), true),
            (json!({"usage": usage}), true),
            (json!({"choices": null, "usage": usage}), true),
            (
                json!({"choices": [{"delta": {"content": "ab"}}], "usage": usage}),
                false,
            ),
        ] {
            for wants in [false, true] {
                let mut read = StreamRead::default();
                let event = format!("data: {chunk}\n\n");
                let passed = read.observe_event(Endpoint::Chat, event.as_bytes(), wants);
                assert_eq!(passed, wants || !usage_only, "{chunk} {wants}");
                assert_eq!(read.usage, Some(want), "{chunk}");
            }
        }
    }

    #[test]
    fn event_data_borrows_one_line_and_joins_several() {
        assert_eq!(
            event_data(b"data: {\"a\":1}\n\n").as_deref(),
            Some("{\"a\":1}")
        );
        assert!(matches!(
            event_data(b"data: {}\n\n"),
            Some(std::borrow::Cow::Borrowed(_))
        ));
        assert_eq!(
            event_data(b"event: x\ndata: {\"a\":\ndata: 1}\n\n").as_deref(),
            Some("{\"a\":\n1}")
        );
        assert_eq!(event_data(b"data: [DONE]\n\n"), None);
        assert_eq!(event_data(b": keep-alive\n\n"), None);
        assert_eq!(event_data(b"data:\n\n"), None);
    }
}
