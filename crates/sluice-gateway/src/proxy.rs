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

mod answer;
mod reserve;
mod retry;
mod settle;
mod stream;
#[cfg(test)]
mod tests;
mod usage;

use self::answer::*;
use self::reserve::*;
use self::retry::*;
use self::settle::*;
use self::stream::*;
use self::usage::*;

/// The longest wait the official OpenAI SDK honours from `Retry-After`
/// before falling back to its own backoff; beyond it we say `x-should-retry: false`.
const SDK_MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// An OpenAI-shaped error; `param` names the request field at fault, as OpenAI's own errors do.
fn openai_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    param: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "code": code, "param": param}});
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
        Wire::OpenAi => openai_error(status, kind, code, None, message),
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
            // UTF-8 ids (`ü`, `用户`) are taken as they are; other bytes are named as the fault.
            let id = std::str::from_utf8(v.as_bytes())
                .map_err(|_| format!("{header}: the value is not UTF-8"))?;
            let s =
                Subject::parse(&format!("{kind}:{id}")).map_err(|e| format!("{header}: {e}"))?;
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
    if let Err((field, message)) = check_fields(&req) {
        return Err(match wire {
            Wire::OpenAi => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                Some(field),
                message,
            ),
            Wire::Anthropic => bad("invalid_value", message),
        });
    }
    Ok((caller, req, model))
}

/// The fields that size the hold or choose how the answer is read, checked
/// for their type: a value Sluice would read as absent (`"max_tokens":
/// "100"`, `"stream": "true"`) is refused naming it, rather than held at
/// the model's maximum or read as a non-stream, whatever a lenient upstream
/// makes of it. `null` stands for absent, as on the providers' APIs.
fn check_fields(req: &Value) -> Result<(), (&'static str, String)> {
    for field in [
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
    ] {
        let v = &req[field];
        if !v.is_null() && v.as_u64().is_none() {
            return Err((field, format!("`{field}` must be a non-negative integer")));
        }
    }
    if !matches!(req["stream"], Value::Null | Value::Bool(_)) {
        return Err(("stream", "`stream` must be true or false".into()));
    }
    match &req["stream_options"] {
        Value::Null => {}
        Value::Object(o) => {
            if !matches!(
                o.get("include_usage"),
                None | Some(Value::Null | Value::Bool(_))
            ) {
                return Err((
                    "stream_options.include_usage",
                    "`stream_options.include_usage` must be true or false".into(),
                ));
            }
        }
        _ => {
            return Err((
                "stream_options",
                "`stream_options` must be an object".into(),
            ));
        }
    }
    Ok(())
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
    let bytes = with_model(&body, &model.upstream_name).unwrap_or_else(|| {
        req["model"] = Value::from(model.upstream_name.clone());
        Bytes::from(req.to_string())
    });
    match call_upstream(&st, model.provider, COUNT_TOKENS_PATH, bytes, &headers).await {
        Upstream::Answer(resp) => {
            let status = resp.status;
            let ids = answer::RequestIds::of(&resp.headers);
            match resp.bytes().await {
                Ok(bytes) => {
                    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], bytes)
                        .into_response();
                    ids.pass_on(&mut r);
                    r
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
        // The client's bytes go as they came, with the model's name and the
        // stream options spliced in where they change; re-serialized from
        // the tree only when a splice cannot do it (a degraded request, a
        // `stream_options` to edit, a body whose `model` is not one string
        // member).
        let spliced = if degraded.is_some() || (ask_usage && req.get("stream_options").is_some()) {
            None
        } else if model.upstream_name == first.name {
            Some(body.clone())
        } else {
            with_model(&body, &model.upstream_name)
        };
        let upstream_body = match spliced {
            Some(b) if ask_usage => with_include_usage(&b),
            Some(b) => b,
            None => {
                let mut b = req.clone();
                b["model"] = Value::from(model.upstream_name.clone());
                if ask_usage {
                    b["stream_options"]["include_usage"] = Value::from(true);
                }
                Bytes::from(b.to_string())
            }
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

/// The client's JSON object with its top-level `model` member's value
/// replaced by `name`, spliced into its bytes (the rest as it came, not
/// re-serialized); `None` when the body's `model` is not found as exactly
/// one member (a duplicate key: the tree, which keeps the last, decides).
fn with_model(body: &[u8], name: &str) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Model<'a> {
        #[serde(borrow)]
        model: &'a serde_json::value::RawValue,
    }
    let found: Model<'_> = serde_json::from_slice(body).ok()?;
    // The raw value borrows the body: its place in it is the pointers' difference.
    let raw = found.model.get().as_bytes();
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(raw.len())?;
    if body.get(start..end)? != raw {
        return None;
    }
    let (head, tail) = (body.get(..start)?, body.get(end..)?);
    let quoted = serde_json::to_string(name).ok()?;
    let mut out = Vec::with_capacity(head.len() + quoted.len() + tail.len());
    out.extend_from_slice(head);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(tail);
    Some(Bytes::from(out))
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

/// `GET /v1/models`: the configured models, OpenAI-shaped.
pub async fn openai_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.keys.authenticate(&headers) {
        return openai_error(
            e.status,
            "invalid_request_error",
            "invalid_api_key",
            None,
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
