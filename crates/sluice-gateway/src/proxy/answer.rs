//! Passing an upstream answer on and settling its reservation (the usage it
//! reports, or the hold when it reports none).

use super::*;

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
pub(super) struct ModelDetail<'a> {
    pub(super) model: &'a str,
}

/// A streamed call's settle detail (keys in the order a JSON map sorts them).
#[derive(serde::Serialize)]
pub(super) struct StreamDetail<'a> {
    pub(super) cached_input_tokens: u64,
    pub(super) charged_from: &'static str,
    pub(super) completed: bool,
    pub(super) latency_ms: u64,
    pub(super) model: &'a str,
    pub(super) stream: bool,
    pub(super) upstream_model: &'a str,
}

/// The provider's request ids of an answer (OpenAI's `x-request-id`,
/// Anthropic's `request-id`). Passed on as they came, for the SDKs
/// (`_request_id`) and the provider's support; no other upstream header is
/// (its rate-limit headers describe the shared upstream key, not this agent).
pub(super) struct RequestIds([Option<HeaderValue>; 2]);

impl RequestIds {
    const NAMES: [&'static str; 2] = ["x-request-id", "request-id"];

    pub(super) fn of(headers: &axum::http::HeaderMap) -> RequestIds {
        RequestIds(Self::NAMES.map(|k| headers.get(k).cloned()))
    }

    /// The first of them, as the ledger keeps it (at most 200 characters).
    fn for_ledger(&self) -> Option<String> {
        self.0
            .iter()
            .flatten()
            .next()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(200).collect())
    }

    pub(super) fn pass_on(&self, r: &mut Response) {
        for (name, v) in Self::NAMES.into_iter().zip(&self.0) {
            if let Some(v) = v {
                r.headers_mut().insert(name, v.clone());
            }
        }
    }
}

/// Pass an upstream answer on and settle its reservation.
pub(super) async fn answer(
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
    let upstream_ids = RequestIds::of(&resp.headers);
    // The provider's id for the call, for reconciling with its bill.
    let request_id = upstream_ids.for_ledger();
    let headers_out = |r: &mut Response| {
        if let Ok(v) = HeaderValue::try_from(model.name.as_str()) {
            r.headers_mut().insert("x-sluice-model", v);
        }
        upstream_ids.pass_on(r);
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
