//! The LLM proxy: OpenAI's `POST /v1/chat/completions`, Anthropic's
//! `POST /v1/messages` (both streaming or not) and `GET /v1/models`.
//!
//! One request: estimate the worst case (input tokens from the request's
//! size, output tokens from `max_completion_tokens`/`max_tokens` or the
//! model's maximum, priced exactly), reserve it on every subject (the key's
//! own, `user:`/`session:` from `x-sluice-user`/`x-sluice-session`,
//! `model:NAME`, `global`), forward with the server's upstream key, then
//! commit what the upstream reports in `usage`. Every exit path settles: an
//! upstream error or an unreachable upstream releases (nothing was served); a
//! success without `usage` is charged the held worst case; a client that goes
//! away leaves the lease to expire, which counts the held amounts.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_core::{Amounts, DenialReason, Request, ReservationError, Subject};

use crate::auth::Caller;
use crate::config::{Model, Wire};
use crate::db::{LedgerRow, RowKind};
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

/// The tiktoken encoding of an OpenAI model, by name; `None` for models
/// whose tokenizer Sluice does not know (other vendors on the OpenAI wire).
fn openai_encoding(model: &str) -> Option<&'static tiktoken_rs::CoreBPE> {
    let m = model.rsplit('/').next().unwrap_or(model);
    if [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ]
    .iter()
    .any(|p| m.starts_with(p))
    {
        Some(tiktoken_rs::o200k_base_singleton())
    } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") {
        Some(tiktoken_rs::cl100k_base_singleton())
    } else {
        None
    }
}

/// Load the tokenizers the configured models need (at start, not on the first request).
pub fn warm_tokenizers(models: &std::collections::BTreeMap<String, Model>) {
    for m in models.values() {
        let _ = openai_encoding(&m.upstream_name);
    }
}

/// Tokens an image part can cost at most (a high-detail 2048 × 768 image: 85 + 6 × 170).
const IMAGE_TOKENS: u64 = 1_105;

/// The conservative fallback: one token per two bytes of JSON.
fn bytes_estimate(v: &Value) -> u64 {
    (v.to_string().len() as u64).div_ceil(2)
}

/// The input tokens of a request, for its worst case.
///
/// OpenAI models with a known tokenizer: exact tiktoken counts of every text
/// (message contents and names, the system prompt), OpenAI's per-message
/// framing (3 tokens a message, 3 to prime the reply), an image's maximum
/// (1,105) per image part, and one token per two bytes for anything else
/// (tools, audio, unknown parts). Other models (Anthropic's, unknown ones):
/// one token per two bytes of the messages, system prompt and tools as JSON,
/// which over-counts English about twofold. Either way the commit charges
/// the upstream's own count; the estimate only decides what is held.
pub fn estimate_input_tokens(model: &str, body: &Value) -> u64 {
    let extras = ["tools", "functions", "response_format"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(bytes_estimate)
        .sum::<u64>();
    let Some(bpe) = openai_encoding(model) else {
        let system = body.get("system").map_or(0, bytes_estimate);
        return bytes_estimate(&body["messages"]) + system + extras + 16;
    };
    let count = |t: &str| bpe.encode_with_special_tokens(t).len() as u64;
    let mut total = 3 + extras;
    for m in body["messages"].as_array().into_iter().flatten() {
        total += 3 + m["role"].as_str().map_or(1, count);
        if let Some(name) = m["name"].as_str() {
            total += 1 + count(name);
        }
        match &m["content"] {
            Value::String(t) => total += count(t),
            Value::Array(parts) => {
                for part in parts {
                    total += match part["type"].as_str() {
                        Some("text") => part["text"].as_str().map_or(0, count),
                        Some("image_url") | Some("input_image") => IMAGE_TOKENS,
                        _ => bytes_estimate(part),
                    };
                }
            }
            Value::Null => {}
            other => total += bytes_estimate(other),
        }
        if let Some(calls) = m.get("tool_calls") {
            total += bytes_estimate(calls);
        }
    }
    total
}

/// The output-token bound of a request: what it asks for, capped at the model's maximum.
pub fn output_bound(body: &Value, model: &Model) -> u64 {
    body.get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .map_or(model.max_output_tokens, |n| n.min(model.max_output_tokens))
}

/// The subjects a proxied request is counted against, or what is wrong with a header.
fn subjects(caller: &Caller, headers: &HeaderMap, model: &str) -> Result<Vec<Subject>, String> {
    let mut out = Vec::new();
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
    let model = Subject::parse(&format!("model:{model}")).map_err(|e| format!("model: {e}"))?;
    out.push(model);
    out.push(Subject::global());
    Ok(out)
}

fn usage_of(wire: Wire, v: &Value) -> Option<TokenUsage> {
    let u = v.get("usage")?;
    match wire {
        Wire::OpenAi => Some(TokenUsage {
            input: u.get("prompt_tokens")?.as_u64()?,
            cached_input: u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            output: u.get("completion_tokens")?.as_u64()?,
        }),
        Wire::Anthropic => {
            let (input, cached) = anthropic_input(u)?;
            Some(TokenUsage {
                input,
                cached_input: cached,
                output: u.get("output_tokens")?.as_u64()?,
            })
        }
    }
}

/// Anthropic's input: uncached + cache reads + cache writes (writes priced as
/// input), and the cache reads.
fn anthropic_input(u: &Value) -> Option<(u64, u64)> {
    let uncached = u.get("input_tokens")?.as_u64()?;
    let read = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let written = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    Some((uncached + read + written, read))
}

fn amounts(model: &Model, usage: TokenUsage) -> Amounts {
    Amounts::one_request()
        .with_tokens(usage.input, usage.output)
        .with_cost_micros(model.price.cost_micros(usage))
}

/// Settle a proxied reservation in the engine at once and return its ledger
/// row: `Some(actual)` commits, `None` releases. `None` if the lease already
/// ran out and the expiry task recorded it.
fn settle_now(
    st: &AppState,
    id: sluice_core::ReservationId,
    actual: Option<Amounts>,
    detail: &Value,
) -> Option<LedgerRow> {
    let public = st.reservations.public_id(id);
    let meta = st.reservations.take(id)?;
    let outcome = match actual {
        Some(a) => st.limiter.commit(id, &a).map(|_| ()),
        None => st.limiter.release(id),
    };
    let (kind, amounts) = match (outcome, actual) {
        (Ok(()), Some(a)) => (RowKind::Commit, a),
        (Ok(()), None) => (RowKind::Release, Amounts::ZERO),
        (Err(ReservationError::Expired(_) | ReservationError::Unknown(_)), _) => {
            st.reservations.mark_expired(public.clone());
            (RowKind::Expire, meta.held)
        }
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
        request_id: None,
        detail: Some(detail.to_string()),
    })
}

/// Settle and record.
async fn finish(
    st: &AppState,
    id: sluice_core::ReservationId,
    actual: Option<Amounts>,
    detail: Value,
) {
    if let Some(row) = settle_now(st, id, actual, &detail) {
        st.ledger.record(vec![row], None).await;
    }
}

/// A reservation held for one candidate model.
struct Held {
    id: sluice_core::ReservationId,
    limits: sluice_core::Statuses,
    amounts: Amounts,
    input_estimate: u64,
    now: sluice_core::Timestamp,
}

/// Reserve a request's worst case for `model`, record it, or answer the refusal.
async fn reserve_for(
    wire: Wire,
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: &Value,
    model: &Model,
) -> Result<Held, Response> {
    let subjects = subjects(caller, headers, &model.name).map_err(|e| {
        wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_subject",
            e,
        )
    })?;
    let worst_usage = TokenUsage {
        input: estimate_input_tokens(&model.upstream_name, req),
        cached_input: 0,
        output: output_bound(req, model),
    };
    let held = amounts(model, worst_usage);
    // Every attempt and back-off fits in the lease, with a minute to spare.
    let lease = st.config.proxy.timeout * 2 + Duration::from_secs(60);
    let now = st.now();
    let reservation = match st
        .limiter
        .reserve(&Request::new(subjects.iter().cloned(), held), Some(lease))
    {
        Ok(r) => r,
        Err(d) => return Err(refusal(wire, &d, &subjects)),
    };
    let public = st.reservations.public_id(reservation.id);
    let subject_names: Vec<String> = subjects.iter().map(|s| s.as_str().to_owned()).collect();
    st.reservations.insert(
        reservation.id,
        Meta {
            caller: caller.id().to_owned(),
            subjects: subject_names.clone(),
            held,
            reserved_ns: now.as_nanos(),
        },
    );
    let row = LedgerRow {
        ts_ns: now.as_nanos(),
        kind: RowKind::Reserve,
        reservation: Some(public),
        subjects: subject_names,
        amounts: held,
        held: None,
        reserved_ns: None,
        caller: caller.id().to_owned(),
        request_id: None,
        detail: Some(json!({"model": model.name}).to_string()),
    };
    st.ledger.record(vec![row], None).await;
    Ok(Held {
        id: reservation.id,
        limits: reservation.limits,
        amounts: held,
        input_estimate: worst_usage.input,
        now,
    })
}

/// The OpenAI-shaped answer to a refusal.
fn refusal(wire: Wire, d: &sluice_core::Denial, subjects: &[Subject]) -> Response {
    let subject = subjects.get(d.subject).map_or("", Subject::as_str);
    let mut r = match d.reason {
        DenialReason::RetryAfter(wait) => {
            let mut r = wire_error(
                wire,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                format!(
                    "{subject} reached its {} limit per {}; retry in {}s",
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
                    "this request's worst case exceeds {subject}'s {} limit itself; lower max_tokens",
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
    r
}

/// What the upstream finally said.
enum Upstream {
    /// An answer to pass on (a success, or an error not worth retrying).
    Answer(reqwest::Response),
    /// Retries exhausted: the last error status and body, or a transport error.
    Failed(Option<(StatusCode, Bytes)>, String),
}

/// The wait an upstream asks for: `retry-after-ms`, `retry-after` (seconds),
/// or the earliest `x-ratelimit-reset-*` (`1s`, `20ms`, `6m0s`).
fn upstream_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    if let Some(s) = get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(s.max(0.0)));
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|k| get(k))
        .filter_map(parse_go_duration)
        .min()
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
    provider: &crate::config::Provider,
    body: &Value,
    client_headers: &HeaderMap,
) -> Upstream {
    let proxy = &st.config.proxy;
    #[allow(clippy::disallowed_methods)] // a deadline for sleeping, not a decision's clock
    let deadline = tokio::time::Instant::now() + proxy.timeout;
    let mut last = (None, String::new());
    for attempt in 0..proxy.attempts {
        let path = match provider.wire {
            Wire::OpenAi => "chat/completions",
            Wire::Anthropic => "messages",
        };
        let mut call = st
            .http
            .post(format!("{}/{path}", provider.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        match (provider.wire, &provider.api_key) {
            (Wire::OpenAi, Some(k)) => call = call.bearer_auth(k),
            (Wire::Anthropic, key) => {
                if let Some(k) = key {
                    call = call.header("x-api-key", k);
                }
                let version = client_headers
                    .get("anthropic-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("2023-06-01");
                call = call.header("anthropic-version", version);
                if let Some(beta) = client_headers
                    .get("anthropic-beta")
                    .and_then(|v| v.to_str().ok())
                {
                    call = call.header("anthropic-beta", beta);
                }
            }
            (Wire::OpenAi, None) => {}
        }
        let wait = match call.send().await {
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                let wait =
                    upstream_wait(r.headers()).unwrap_or_else(|| backoff(proxy.backoff, attempt));
                let status =
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let bytes = r.bytes().await.unwrap_or_default();
                last = (Some((status, bytes)), format!("upstream answered {status}"));
                wait
            }
            Ok(r) => return Upstream::Answer(r),
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
    Upstream::Failed(last.0, last.1)
}

/// `POST /v1/chat/completions` (OpenAI wire).
pub async fn openai_chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    proxy_request(st, headers, body, Wire::OpenAi).await
}

/// `POST /v1/messages` (Anthropic wire).
pub async fn anthropic_messages(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    proxy_request(st, headers, body, Wire::Anthropic).await
}

async fn proxy_request(st: Arc<AppState>, headers: HeaderMap, body: Bytes, wire: Wire) -> Response {
    let caller = match st.keys.authenticate(&headers) {
        Ok(c) => c,
        Err(e) => {
            return wire_error(
                wire,
                e.status,
                "invalid_request_error",
                "invalid_api_key",
                e.message,
            );
        }
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return wire_error(
                wire,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                "the body must be a JSON object",
            );
        }
        Err(e) => {
            return wire_error(
                wire,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!("malformed JSON: {e}"),
            );
        }
    };
    let Some(name) = req["model"].as_str().map(str::to_owned) else {
        return wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_model",
            "`model` is required",
        );
    };
    let Some(first) = st.config.proxy.models.get(&name).cloned() else {
        return wire_error(
            wire,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{name}` is not configured on this gateway"),
        );
    };
    if st.config.proxy.providers[first.provider].wire != wire {
        let route = match wire {
            Wire::OpenAi => "/v1/messages (the Anthropic wire)",
            Wire::Anthropic => "/v1/chat/completions (the OpenAI wire)",
        };
        return wire_error(
            wire,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "wrong_wire",
            format!("`{name}` is served on the other wire format: use {route}"),
        );
    }
    let streaming = req["stream"].as_bool() == Some(true);
    let client_wants_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    // The model asked for, then its fallbacks, in order.
    let candidates: Vec<Model> = std::iter::once(first.clone())
        .chain(
            first
                .fallbacks
                .iter()
                .filter_map(|f| st.config.proxy.models.get(f).cloned()),
        )
        .collect();
    let mut failure = (None, String::from("no model could serve the request"));
    for (i, model) in candidates.iter().enumerate() {
        let provider = st.config.proxy.providers[model.provider].clone();
        // Each candidate holds its own worst case on its own subjects (`model:NAME` differs).
        let held = match reserve_for(wire, &st, &caller, &headers, &req, model).await {
            Ok(h) => h,
            Err(refused) => return refused,
        };
        let mut upstream_body = req.clone();
        upstream_body["model"] = Value::from(model.upstream_name.clone());
        if streaming && wire == Wire::OpenAi {
            // Ask for the usage chunk; it is dropped on the way out unless the client asked too.
            upstream_body["stream_options"]["include_usage"] = Value::from(true);
        }
        // If the client goes away while the upstream works, this request is
        // dropped here: the guard settles it at once at the held worst case
        // (the upstream may still serve and bill it) instead of at lease expiry.
        let guard = Abandoned {
            st: Arc::clone(&st),
            id: Some(held.id),
            held: held.amounts,
            model: model.name.clone(),
        };
        let called = call_upstream(&st, &provider, &upstream_body, &headers).await;
        guard.disarm();
        let resp = match called {
            Upstream::Answer(r) => r,
            Upstream::Failed(last, why) => {
                tracing::warn!("{} via {}: {why}", model.name, provider.name);
                let more = i + 1 < candidates.len();
                finish(
                    &st,
                    held.id,
                    None,
                    json!({"model": model.name, "error": why, "failover": more}),
                )
                .await;
                failure = (last, why);
                continue;
            }
        };
        return answer(wire, &st, resp, model, held, streaming, client_wants_usage).await;
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

/// Settles a reservation at its held amounts if dropped before being disarmed.
struct Abandoned {
    st: Arc<AppState>,
    id: Option<sluice_core::ReservationId>,
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
        let Some(id) = self.id.take() else { return };
        let detail = json!({"model": self.model, "abandoned": "the client went away before the upstream answered"});
        if let Some(row) = settle_now(&self.st, id, Some(self.held), &detail) {
            let st = Arc::clone(&self.st);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { st.ledger.record(vec![row], None).await });
                }
                Err(_) => tracing::error!(
                    "no runtime to record an abandoned request's ledger row: {row:?}"
                ),
            }
        }
    }
}

/// Pass an upstream answer on and settle its reservation.
async fn answer(
    wire: Wire,
    st: &Arc<AppState>,
    resp: reqwest::Response,
    model: &Model,
    held: Held,
    streaming: bool,
    client_wants_usage: bool,
) -> Response {
    let status = resp.status();
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
            id: Some(held.id),
            model: model.clone(),
            held: held.amounts,
            input_estimate: held.input_estimate,
            known_input: None,
            text_bytes: 0,
            usage: None,
            started_ns: held.now.as_nanos(),
        };
        let mut r = stream_through(wire, resp, settle, client_wants_usage);
        headers_out(&mut r);
        return r;
    }
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            // The upstream answered but the body broke: it may have served; charge the hold.
            let detail = json!({"model": model.name, "error": format!("upstream body: {e}")});
            finish(st, held.id, Some(held.amounts), detail).await;
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
    let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let detail = json!({"model": model.name, "upstream_model": model.upstream_name, "status": status.as_u16(),
        "latency_ms": latency_ms, "usage_reported": usage_of(wire, &parsed).is_some()});
    if status.is_success() {
        let actual = usage_of(wire, &parsed).map_or(held.amounts, |u| amounts(model, u));
        finish(st, held.id, Some(actual), detail).await;
    } else {
        finish(st, held.id, None, detail).await;
    }
    let mut r = (
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response();
    headers_out(&mut r);
    r
}

/// Settles a streamed reservation exactly once: with the upstream's usage
/// when the stream completes, or, when it is cut short (client gone, upstream
/// broke), with the input estimate and the output estimated from the text
/// streamed so far (one token per three bytes, at least one), capped at the hold.
struct StreamSettle {
    st: Arc<AppState>,
    id: Option<sluice_core::ReservationId>,
    model: Model,
    held: Amounts,
    input_estimate: u64,
    /// Input (and cached input) reported before the stream's end (Anthropic's `message_start`).
    known_input: Option<(u64, u64)>,
    text_bytes: u64,
    usage: Option<TokenUsage>,
    started_ns: u64,
}

impl StreamSettle {
    fn settle(&mut self, completed: bool) {
        let Some(id) = self.id.take() else { return };
        let (usage, how) = match self.usage {
            Some(u) => (u, "usage"),
            None => (
                TokenUsage {
                    input: self.known_input.map_or(self.input_estimate, |k| k.0),
                    cached_input: self.known_input.map_or(0, |k| k.1),
                    output: (self.text_bytes.div_ceil(3)).max(1),
                },
                "estimated",
            ),
        };
        let mut actual = amounts(&self.model, usage);
        if self.usage.is_none() {
            // An estimate never exceeds what was held.
            for m in sluice_core::Metric::ALL {
                actual.set(m, actual.get(m).min(self.held.get(m)));
            }
        }
        let st = Arc::clone(&self.st);
        let latency_ms = st.now().as_nanos().saturating_sub(self.started_ns) / 1_000_000;
        let detail = json!({"model": self.model.name, "upstream_model": self.model.upstream_name, "stream": true,
            "completed": completed, "charged_from": how, "latency_ms": latency_ms});
        // Settled in the engine now; the ledger row is queued from a task (Drop cannot wait).
        if let Some(row) = settle_now(&st, id, Some(actual), &detail) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { st.ledger.record(vec![row], None).await });
                }
                Err(_) => {
                    tracing::error!("no runtime to record a settled stream's ledger row: {row:?}")
                }
            }
        }
    }
}

impl Drop for StreamSettle {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// Read one SSE event's `data:` JSON, if any.
fn event_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() || data == "[DONE]" {
        return None;
    }
    serde_json::from_str(&data).ok()
}

/// Pass the upstream's SSE through event by event (nothing is buffered
/// beyond one event), reading usage and text on the way; drop the usage-only
/// chunk Sluice asked for when the client did not.
fn stream_through(
    wire: Wire,
    resp: reqwest::Response,
    settle: StreamSettle,
    client_wants_usage: bool,
) -> Response {
    use futures_util::StreamExt;
    struct State {
        upstream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        buf: Vec<u8>,
        settle: StreamSettle,
        done: bool,
    }
    let state = State {
        upstream: resp.bytes_stream().boxed(),
        buf: Vec::new(),
        settle,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            // Emit every complete event in the buffer.
            let mut out: Vec<u8> = Vec::new();
            while let Some(end) = s.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = s.buf.drain(..end + 2).collect();
                let mut keep = true;
                if let Some(v) = event_json(&event) {
                    match wire {
                        Wire::OpenAi => {
                            if let Some(u) = usage_of(wire, &v) {
                                s.settle.usage = Some(u);
                                let usage_only = v["choices"].as_array().is_some_and(Vec::is_empty);
                                keep = client_wants_usage || !usage_only;
                            }
                            if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                                s.settle.text_bytes += text.len() as u64;
                            }
                        }
                        Wire::Anthropic => match v["type"].as_str() {
                            Some("message_start") => {
                                s.settle.known_input = anthropic_input(&v["message"]["usage"]);
                            }
                            Some("message_delta") => {
                                // Cumulative output; input from message_start (or the estimate).
                                if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                                    let (input, cached) = anthropic_input(&v["usage"])
                                        .or(s.settle.known_input)
                                        .unwrap_or((s.settle.input_estimate, 0));
                                    s.settle.usage = Some(TokenUsage {
                                        input,
                                        cached_input: cached,
                                        output: out,
                                    });
                                }
                            }
                            Some("content_block_delta") => {
                                let d = &v["delta"];
                                let text = d["text"]
                                    .as_str()
                                    .or(d["partial_json"].as_str())
                                    .unwrap_or("");
                                s.settle.text_bytes += text.len() as u64;
                            }
                            _ => {}
                        },
                    }
                }
                if keep {
                    out.extend_from_slice(&event);
                }
            }
            if !out.is_empty() {
                return Some((Ok::<_, std::io::Error>(Bytes::from(out)), s));
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
                    let rest = std::mem::take(&mut s.buf);
                    return Some((Ok(Bytes::from(rest)), s));
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

    #[test]
    fn openai_estimates_count_tokens_exactly_with_the_framing() {
        let body = json!({"messages": [{"role": "user", "content": "Say hello."}]});
        // 3 (reply priming) + 3 (message) + 1 ("user") + 3 ("Say", " hello", ".").
        assert_eq!(estimate_input_tokens("gpt-4o-mini", &body), 10);
        assert_eq!(estimate_input_tokens("gpt-4o-2024-08-06", &body), 10);
        assert_eq!(estimate_input_tokens("openai/gpt-4.1", &body), 10);
        // cl100k for gpt-4 and gpt-3.5.
        assert_eq!(estimate_input_tokens("gpt-3.5-turbo", &body), 10);
        // Unknown tokenizer: the byte estimate, larger.
        assert!(estimate_input_tokens("llama-3", &body) > 10);
        // Far tighter than the byte estimate on long English text, and never below the exact count.
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
        let long = json!({"messages": [{"role": "user", "content": text}]});
        let exact = tiktoken_rs::o200k_base_singleton()
            .encode_with_special_tokens(&text)
            .len() as u64;
        let est = estimate_input_tokens("gpt-4o", &long);
        assert!(est >= exact && est <= exact + 10, "{est} vs {exact}");
        assert!(est * 2 < estimate_input_tokens("llama-3", &long));
        // Parts: text counted, images at their maximum.
        let parts = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Say hello."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}]});
        assert_eq!(estimate_input_tokens("gpt-4o", &parts), 10 + IMAGE_TOKENS);
    }
}
