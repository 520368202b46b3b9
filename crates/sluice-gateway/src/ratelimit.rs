//! Rate-limit headers: `RateLimit-Policy` and `RateLimit` in the structured-
//! field syntax of draft-ietf-httpapi-ratelimit-headers, plus the common
//! `X-RateLimit-Limit/-Remaining/-Reset` (reset as delta seconds), and
//! `Retry-After` on refusals. Each describes one limit: the one that refused,
//! or on an allowed decision the tightest (least remaining, as a share of the
//! limit). Amounts of `cost_usd` limits are in micro-dollars here.

use std::time::Duration;

use sluice_core::{CalendarUnit, Denial, LimitStatus, Timestamp, Window};

/// Whole seconds, rounded up, at least 1.
pub fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

fn window_secs(w: Window) -> u64 {
    match w {
        Window::Rolling(ns) => (ns / 1_000_000_000).max(1),
        Window::Calendar(CalendarUnit::Minute) => 60,
        Window::Calendar(CalendarUnit::Hour) => 3_600,
        Window::Calendar(CalendarUnit::Day) => 86_400,
        Window::Calendar(CalendarUnit::Week) => 604_800,
        Window::Calendar(CalendarUnit::Month) => 2_592_000,
    }
}

fn headers(
    metric: &str,
    window: Window,
    limit: u64,
    remaining: u64,
    reset: u64,
) -> Vec<(&'static str, String)> {
    // Built by hand: these are on every answer.
    let mut num = itoa::Buffer::new();
    let name = {
        let mut n = String::with_capacity(24);
        n.push('"');
        n.push_str(metric);
        n.push('-');
        n.push_str(&crate::wire::window_name(window));
        n.push('"');
        n
    };
    let mut policy = String::with_capacity(48);
    policy.push_str(&name);
    policy.push_str(";q=");
    policy.push_str(num.format(limit));
    policy.push_str(";w=");
    policy.push_str(num.format(window_secs(window)));
    let mut current = name;
    current.push_str(";r=");
    current.push_str(num.format(remaining));
    current.push_str(";t=");
    current.push_str(num.format(reset));
    vec![
        ("ratelimit-policy", policy),
        ("ratelimit", current),
        ("x-ratelimit-limit", num.format(limit).to_owned()),
        ("x-ratelimit-remaining", num.format(remaining).to_owned()),
        ("x-ratelimit-reset", num.format(reset).to_owned()),
    ]
}

/// Header pairs as typed headers (names are static and valid; a value that
/// is not a valid header value is skipped).
pub fn typed(
    pairs: Vec<(&'static str, String)>,
) -> impl Iterator<Item = (axum::http::HeaderName, axum::http::HeaderValue)> {
    pairs.into_iter().filter_map(|(k, v)| {
        Some((
            axum::http::HeaderName::from_static(k),
            axum::http::HeaderValue::try_from(v).ok()?,
        ))
    })
}

/// The tightest limit of an allowed decision.
pub fn tightest(statuses: &[LimitStatus]) -> Option<&LimitStatus> {
    statuses.iter().min_by(|a, b| {
        // remaining/limit compared without floats: a.r * b.l vs b.r * a.l
        let l = u128::from(a.remaining) * u128::from(b.limit.max(1));
        let r = u128::from(b.remaining) * u128::from(a.limit.max(1));
        l.cmp(&r)
    })
}

/// Headers for an allowed decision.
pub fn allowed(statuses: &[LimitStatus], now: Timestamp) -> Vec<(&'static str, String)> {
    match tightest(statuses) {
        Some(s) => {
            let reset = if s.reset_at > now {
                ceil_secs(s.reset_at.saturating_since(now))
            } else {
                0
            };
            headers(s.metric.name(), s.window, s.limit, s.remaining, reset)
        }
        None => Vec::new(),
    }
}

/// Headers for a refusal (with `Retry-After` when waiting helps).
pub fn denied(d: &Denial) -> Vec<(&'static str, String)> {
    match d.retry_after() {
        Some(wait) => {
            let secs = ceil_secs(wait);
            let mut h = headers(d.metric.name(), d.window, d.limit, 0, secs);
            h.push(("retry-after", secs.to_string()));
            h
        }
        None => headers(d.metric.name(), d.window, d.limit, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(999)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }
}
