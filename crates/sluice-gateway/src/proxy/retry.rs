//! Calling the upstream: retries on 429, 5xx and transport errors within the
//! attempt count and the deadline, waiting what the upstream asks or a
//! jittered back-off.

use super::*;

/// What the upstream finally said.
pub(super) enum Upstream {
    /// An answer to pass on (a success, or an error not worth retrying).
    Answer(crate::upstream::Answer),
    /// Retries exhausted (or stopped): the last error status and body, or
    /// a transport error; and whether an attempt may have been served.
    Failed(Option<(StatusCode, Bytes)>, String, MaybeServed),
}

/// Whether a failed call may still have been served (and billed) upstream:
/// an attempt timed out or broke after its request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MaybeServed(pub(super) bool);

/// The wait an upstream asks for: `retry-after-ms`, then `retry-after`
/// (seconds), then its rate-limit reset headers: OpenAI's
/// `x-ratelimit-reset-{requests,tokens}` (`1s`, `20ms`, `6m0s`) and
/// Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`
/// (RFC 3339 instants, measured from `now`). Of those, the latest reset among
/// the limits whose `remaining` is 0 (all of them must reset), else the earliest.
pub(super) fn upstream_wait(headers: &HeaderMap, now: sluice_core::Timestamp) -> Option<Duration> {
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
pub(super) fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = base
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(10));
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    cap.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
}

/// Call the upstream, retrying 429s, 5xx and transport errors within the
/// attempt count and the deadline.
pub(super) async fn call_upstream(
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
