//! JSON shapes of the API and their conversion to and from the engine's types.
//! Dollars are JSON numbers at the edge and integer micro-dollars inside.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value, json};
use sluice_core::{
    AlgorithmKind, Amounts, LimitDef, LimitStatus, MAX_LIMIT, Metric, Policy, PolicyDef, Subject,
    Timestamp, micros_to_usd, usd_to_micros,
};

use crate::error::ApiError;

/// Most subjects in one decision.
pub const MAX_SUBJECTS: usize = 16;

/// Amounts as a caller writes them; missing metrics are zero, and `tokens`
/// defaults to `input_tokens + output_tokens`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmountsBody {
    /// Requests.
    pub requests: Option<u64>,
    /// Tokens (input + output).
    pub tokens: Option<u64>,
    /// Input tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
    /// US dollars.
    pub cost_usd: Option<f64>,
}

impl AmountsBody {
    /// Check and convert; `field` prefixes error fields (`amounts`).
    pub fn to_amounts(&self, field: &str) -> Result<Amounts, ApiError> {
        let mut a = Amounts::ZERO;
        let input = self.input_tokens.unwrap_or(0);
        let output = self.output_tokens.unwrap_or(0);
        let tokens = self.tokens.unwrap_or_else(|| input.saturating_add(output));
        for (m, v) in [
            (Metric::Requests, self.requests.unwrap_or(0)),
            (Metric::Tokens, tokens),
            (Metric::InputTokens, input),
            (Metric::OutputTokens, output),
        ] {
            if v > MAX_LIMIT {
                return Err(ApiError::invalid(
                    format!("{field}.{}", m.name()),
                    format!("must be at most {MAX_LIMIT}"),
                ));
            }
            a.set(m, v);
        }
        if let Some(usd) = self.cost_usd {
            let micros = usd_to_micros(usd)
                .map_err(|e| ApiError::invalid(format!("{field}.cost_usd"), e.to_string()))?;
            if micros > MAX_LIMIT {
                return Err(ApiError::invalid(format!("{field}.cost_usd"), "too large"));
            }
            a.set(Metric::CostUsd, micros);
        }
        Ok(a)
    }
}

/// Amounts as JSON (cost in dollars).
pub fn amounts_json(a: &Amounts) -> Value {
    json!({
        "requests": a.get(Metric::Requests),
        "tokens": a.get(Metric::Tokens),
        "input_tokens": a.get(Metric::InputTokens),
        "output_tokens": a.get(Metric::OutputTokens),
        "cost_usd": micros_to_usd(a.get(Metric::CostUsd)),
    })
}

/// A value of a metric as JSON: dollars for `cost_usd`, a count otherwise.
pub fn metric_value(metric: Metric, v: u64) -> Value {
    if metric == Metric::CostUsd {
        Value::from(micros_to_usd(v))
    } else {
        Value::from(v)
    }
}

/// Parse subjects, naming the bad one.
pub fn parse_subjects(subjects: &[String], field: &str) -> Result<Vec<Subject>, ApiError> {
    if subjects.is_empty() {
        return Err(ApiError::invalid(field, "at least one subject is required"));
    }
    if subjects.len() > MAX_SUBJECTS {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_SUBJECTS} subjects"),
        ));
    }
    subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let subject = Subject::parse(s)
                .map_err(|e| ApiError::invalid(format!("{field}[{i}]"), e.to_string()))?;
            if subject.is_wildcard() {
                return Err(ApiError::invalid(
                    format!("{field}[{i}]"),
                    "a decision names real subjects; `kind:*` is only for policies",
                ));
            }
            Ok(subject)
        })
        .collect()
}

/// `POST /v1/check` and `POST /v1/intents`-style decision body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    /// Who is limited.
    pub subjects: Vec<String>,
    /// How much (default: one request).
    pub amounts: Option<AmountsBody>,
}

/// `POST /v1/reserve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    /// Who is limited.
    pub subjects: Vec<String>,
    /// How much to hold (default: one request).
    pub amounts: Option<AmountsBody>,
    /// Lease in seconds (default from config, capped at `max_lease_s`).
    pub lease_s: Option<f64>,
}

/// `POST /v1/reservations/{id}/commit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    /// The actual amounts.
    pub amounts: AmountsBody,
}

/// What to do when a limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Refuse (429).
    #[default]
    Block,
    /// Let through and record (issue 6).
    Alert,
    /// Hold for a human (issue 6).
    RequireApproval,
    /// Switch to a cheaper model (issue 6).
    Degrade,
}

impl Action {
    /// Parse, naming the field on error.
    pub fn parse(s: &str, field: &str) -> Result<Action, ApiError> {
        Ok(match s {
            "block" => Action::Block,
            "alert" => Action::Alert,
            "require_approval" => Action::RequireApproval,
            "degrade" => Action::Degrade,
            other => {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "unknown action {other:?}: expected block, alert, require_approval or degrade"
                    ),
                ));
            }
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Alert => "alert",
            Action::RequireApproval => "require_approval",
            Action::Degrade => "degrade",
        }
    }
}

/// One limit as written in a policy body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitBody {
    /// `requests`, `tokens`, `input_tokens`, `output_tokens`, `cost_usd`.
    pub metric: String,
    /// Per window; dollars for `cost_usd`, a whole number otherwise.
    pub limit: Number,
    /// `"1h"`, `"day"`, ...
    pub window: String,
    /// `sliding`, `gcra` or `fixed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// GCRA burst (same unit as `limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Number>,
    /// Sliding sub-windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<u32>,
    /// What a refusal by this limit does, over the policy's
    /// `action_on_breach`: `block`, `alert` or `require_approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_on_breach: Option<String>,
}

/// A policy as written: `PUT /v1/policies/{subject}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// Every limit applies.
    pub limits: Vec<LimitBody>,
    /// IANA zone of calendar windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// `block` (default), `alert`, `require_approval`, `degrade`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_on_breach: Option<String>,
    /// Early warnings: fractions of each limit (`[0.5, 0.8, 1.0]`) whose
    /// first crossing in a window raises one alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_at: Option<Vec<f64>>,
    /// Graceful degradation of proxied requests as usage grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade: Option<Vec<DegradeRule>>,
    /// With `action_on_breach: "degrade"`: what applies once a limit is
    /// reached (`block` unless set; `alert` or `require_approval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_action: Option<String>,
    /// With `require_approval`: how long a refused request is held open for
    /// a human (`"30s"` unless set; `"0s"` to answer at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_wait: Option<String>,
}

/// The longest `approval_wait`.
pub const MAX_APPROVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// `"30s"`, `"2m"`, `"0s"`.
fn parse_wait(s: &str) -> Option<std::time::Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

/// Once usage of any of the policy's limits reaches `at` (a fraction),
/// proxied requests are rewritten before their reservation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DegradeRule {
    /// The fraction of a limit from which the rule applies.
    pub at: f64,
    /// Serve with this configured model instead (same wire format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Cap the request's output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

fn amount_of(metric: Option<Metric>, n: &Number, field: &str) -> Result<u64, ApiError> {
    if metric == Some(Metric::CostUsd) {
        let usd = n
            .as_f64()
            .ok_or_else(|| ApiError::invalid(field, "must be a number of dollars"))?;
        if usd <= 0.0 {
            return Err(ApiError::invalid(field, "must be above 0"));
        }
        let micros = usd_to_micros(usd).map_err(|e| ApiError::invalid(field, e.to_string()))?;
        if micros == 0 {
            return Err(ApiError::invalid(field, "must be at least $0.000001"));
        }
        Ok(micros)
    } else if let Some(v) = n.as_u64() {
        if v == 0 {
            return Err(ApiError::invalid(field, "must be above 0"));
        }
        Ok(v)
    } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f <= 0.0) {
        Err(ApiError::invalid(field, "must be above 0"))
    } else {
        Err(ApiError::invalid(field, "must be a whole number"))
    }
}

impl PolicyBody {
    /// The `approval_wait` set (checked by [`PolicyBody::to_policy`]).
    pub fn approval_wait(&self) -> Option<std::time::Duration> {
        self.approval_wait.as_deref().and_then(parse_wait)
    }

    /// Check and convert to the engine's policy and the action.
    pub fn to_policy(&self) -> Result<(Policy, Action), ApiError> {
        self.build(&Amounts::ZERO)
    }

    /// The engine's policy with every limit of a metric raised by `extra`'s
    /// amount of it (an approval's override); a GCRA burst too.
    pub fn to_policy_with_extra(&self, extra: &Amounts) -> Result<Policy, ApiError> {
        self.build(extra).map(|(p, _)| p)
    }

    fn build(&self, extra: &Amounts) -> Result<(Policy, Action), ApiError> {
        let mut limits = Vec::with_capacity(self.limits.len());
        // Each limit's own action, if set.
        let mut own_actions = Vec::with_capacity(self.limits.len());
        for (i, l) in self.limits.iter().enumerate() {
            let metric: Option<Metric> = l.metric.parse().ok();
            if metric.is_none() {
                return Err(ApiError::invalid(
                    format!("limits[{i}].metric"),
                    format!(
                        "unknown metric {:?}: expected requests, tokens, input_tokens, output_tokens or cost_usd",
                        l.metric
                    ),
                ));
            }
            let limit = amount_of(metric, &l.limit, &format!("limits[{i}].limit"))?;
            let burst = l
                .burst
                .as_ref()
                .map(|b| amount_of(metric, b, &format!("limits[{i}].burst")))
                .transpose()?;
            let own = l
                .action_on_breach
                .as_deref()
                .map(|a| Action::parse(a, &format!("limits[{i}].action_on_breach")))
                .transpose()?;
            if own == Some(Action::Degrade) {
                return Err(ApiError::invalid(
                    format!("limits[{i}].action_on_breach"),
                    "degrade acts on the whole policy (its degrade rules): expected block, alert or require_approval",
                ));
            }
            own_actions.push(own);
            let more = metric.map_or(0, |m| extra.get(m));
            limits.push(LimitDef {
                metric: l.metric.clone(),
                limit: limit.saturating_add(more).min(MAX_LIMIT),
                window: l.window.clone(),
                algorithm: l.algorithm.clone(),
                burst: burst.map(|b| b.saturating_add(more).min(MAX_LIMIT)),
                buckets: l.buckets,
            });
        }
        let policy = Policy::new(&PolicyDef {
            limits,
            timezone: self.timezone.clone(),
        })
        .map_err(|e| ApiError::invalid(e.field, e.reason))?;
        let action = match &self.action_on_breach {
            Some(a) => Action::parse(a, "action_on_breach")?,
            None => Action::Block,
        };
        let fallback = match &self.fallback_action {
            Some(_) if action != Action::Degrade => {
                return Err(ApiError::invalid(
                    "fallback_action",
                    "applies only with action_on_breach \"degrade\"",
                ));
            }
            Some(a) => match Action::parse(a, "fallback_action")? {
                Action::Degrade => {
                    return Err(ApiError::invalid(
                        "fallback_action",
                        "what applies at 100% cannot be degrade: expected block, alert or require_approval",
                    ));
                }
                other => other,
            },
            None => Action::Block,
        };
        if action == Action::Degrade && self.degrade.as_deref().unwrap_or_default().is_empty() {
            return Err(ApiError::invalid(
                "degrade",
                "action_on_breach \"degrade\" needs degrade rules, e.g. [{\"at\": 0.8, \"model\": \"a-cheaper-model\"}]",
            ));
        }
        if let Some(w) = &self.approval_wait {
            match parse_wait(w) {
                Some(d) if d <= MAX_APPROVAL_WAIT => {}
                _ => {
                    return Err(ApiError::invalid(
                        "approval_wait",
                        format!("expected seconds or minutes from \"0s\" to \"5m\", got {w:?}"),
                    ));
                }
            }
        }
        // Degrade rules act before the limit; at the limit the fallback decides.
        let action = if action == Action::Degrade {
            fallback
        } else {
            action
        };
        // `alert` lets the whole subject past its limits in that request, so
        // it cannot sit beside limits that must hold: all or none.
        let actions: Vec<Action> = own_actions
            .iter()
            .map(|own| own.unwrap_or(action))
            .collect();
        if actions.contains(&Action::Alert) {
            if let Some(i) = actions.iter().position(|a| *a != Action::Alert) {
                return Err(ApiError::invalid(
                    format!("limits[{i}].action_on_breach"),
                    "alert lets the subject past all its limits in the request it lets through, so a policy's limits either all alert or none does; put the limits that must hold on another subject (a team, a key) or make them require_approval",
                ));
            }
        }
        let at = self.alert_at.as_deref().unwrap_or_default();
        if at.len() > 10 {
            return Err(ApiError::invalid("alert_at", "at most 10 thresholds"));
        }
        for (i, f) in at.iter().enumerate() {
            if !(f.is_finite() && *f > 0.0 && *f <= 1.0) {
                return Err(ApiError::invalid(
                    format!("alert_at[{i}]"),
                    format!("must be a fraction of the limit above 0 and at most 1, got {f}"),
                ));
            }
            if at[..i].iter().any(|g| (g - f).abs() < 1e-4) {
                return Err(ApiError::invalid(
                    format!("alert_at[{i}]"),
                    format!("{f} is listed twice"),
                ));
            }
        }
        let rules = self.degrade.as_deref().unwrap_or_default();
        if rules.len() > 10 {
            return Err(ApiError::invalid("degrade", "at most 10 rules"));
        }
        for (i, r) in rules.iter().enumerate() {
            if !(r.at.is_finite() && r.at > 0.0 && r.at < 1.0) {
                return Err(ApiError::invalid(
                    format!("degrade[{i}].at"),
                    format!(
                        "must be a fraction of the limit above 0 and below 1 (at 1 the limit refuses), got {}",
                        r.at
                    ),
                ));
            }
            if r.model.is_none() && r.max_tokens.is_none() {
                return Err(ApiError::invalid(
                    format!("degrade[{i}]"),
                    "set model, max_tokens, or both",
                ));
            }
            if r.max_tokens == Some(0) {
                return Err(ApiError::invalid(
                    format!("degrade[{i}].max_tokens"),
                    "must be at least 1",
                ));
            }
        }
        Ok((policy, action))
    }

    /// The early-warning thresholds in basis points (0.8 -> 8000), ascending.
    pub fn alert_bp(&self) -> Vec<u32> {
        let mut bp: Vec<u32> = self
            .alert_at
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|f| (f * 10_000.0).round().clamp(1.0, 10_000.0) as u32)
            .collect();
        bp.sort_unstable();
        bp
    }
}

/// A policy as answered.
pub fn policy_json(subject: &str, body: &PolicyBody, policy: &Policy, updated_ns: u64) -> Value {
    let limits: Vec<Value> = body
        .limits
        .iter()
        .zip(policy.limits())
        .map(|(b, l)| {
            let mut v = json!({
                "metric": l.metric().name(),
                "limit": metric_value(l.metric(), l.limit()),
                "window": l.window().to_string(),
                "algorithm": l.algorithm().name(),
            });
            if l.algorithm() == AlgorithmKind::Gcra {
                v["burst"] = metric_value(l.metric(), l.burst().unwrap_or(l.limit()));
            }
            if let Some(b) = b.buckets {
                v["buckets"] = Value::from(b);
            }
            if let Some(a) = &b.action_on_breach {
                v["action_on_breach"] = Value::from(a.clone());
            }
            v
        })
        .collect();
    let mut v = json!({
        "subject": subject,
        "limits": limits,
        "timezone": policy.timezone(),
        "action_on_breach": body.action_on_breach.as_deref().unwrap_or("block"),
        "alert_at": body.alert_at.clone().unwrap_or_default(),
        "degrade": body.degrade.clone().unwrap_or_default(),
        "updated_at": rfc3339(updated_ns),
    });
    if body.action_on_breach.as_deref() == Some("degrade") {
        v["fallback_action"] = Value::from(body.fallback_action.as_deref().unwrap_or("block"));
    }
    if body.action_on_breach.as_deref() == Some("require_approval")
        || body.fallback_action.as_deref() == Some("require_approval")
    {
        v["approval_wait"] = Value::from(body.approval_wait.as_deref().unwrap_or("30s"));
    }
    v
}

/// RFC 3339 (UTC) of an instant in ns: `2027-01-15T08:00:00Z`, with the
/// fraction (trailing zeros trimmed) when there is one. Hand-rolled: it is on
/// every decision's answer (civil date from days per H. Hinnant's algorithm).
pub fn rfc3339(ns: u64) -> String {
    fn digits(out: &mut Vec<u8>, v: u64, width: usize) {
        let mut buf = [b'0'; 20];
        let mut v = v;
        let mut i = buf.len();
        while v > 0 {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        let start = (buf.len() - width).min(i);
        out.extend_from_slice(&buf[start..]);
    }
    let secs = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = Vec::with_capacity(32);
    digits(&mut out, u64::try_from(year).unwrap_or(0), 4);
    out.push(b'-');
    digits(&mut out, u64::try_from(month).unwrap_or(0), 2);
    out.push(b'-');
    digits(&mut out, u64::try_from(day).unwrap_or(0), 2);
    out.push(b'T');
    digits(&mut out, rem / 3_600, 2);
    out.push(b':');
    digits(&mut out, rem % 3_600 / 60, 2);
    out.push(b':');
    digits(&mut out, rem % 60, 2);
    if frac != 0 {
        let mut f = frac;
        let mut width = 9;
        while f % 10 == 0 {
            f /= 10;
            width -= 1;
        }
        out.push(b'.');
        digits(&mut out, f, width);
    }
    out.push(b'Z');
    String::from_utf8(out).unwrap_or_default()
}

/// A window's name, without allocating for calendar windows.
pub fn window_name(w: sluice_core::Window) -> std::borrow::Cow<'static, str> {
    match w {
        sluice_core::Window::Calendar(unit) => std::borrow::Cow::Borrowed(unit.name()),
        other => std::borrow::Cow::Owned(other.to_string()),
    }
}

/// Seconds from `now` to `at`, as a float.
pub fn secs_until(at: Timestamp, now: Timestamp) -> f64 {
    at.saturating_since(now).as_secs_f64()
}

/// A metric's value, serialised as dollars for `cost_usd` and a count otherwise.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(untagged)]
pub enum Num {
    /// A count.
    Count(u64),
    /// Dollars.
    Usd(f64),
}

impl Num {
    /// The value of `v` in `metric`'s unit.
    pub fn of(metric: Metric, v: u64) -> Num {
        if metric == Metric::CostUsd {
            Num::Usd(micros_to_usd(v))
        } else {
            Num::Count(v)
        }
    }
}

/// One limit's status, as answered (serialised straight to bytes on the hot path).
#[derive(Debug, Serialize)]
pub struct StatusOut<'a> {
    /// The subject.
    pub subject: Option<&'a str>,
    /// The metric.
    pub metric: &'static str,
    /// The window.
    pub window: std::borrow::Cow<'static, str>,
    /// The algorithm.
    pub algorithm: &'static str,
    /// Per window.
    pub limit: Num,
    /// Used.
    pub used: Num,
    /// What a request could still take.
    pub remaining: Num,
    /// When usage has drained (RFC 3339).
    pub reset_at: String,
    /// Seconds until then.
    pub reset_in_s: f64,
}

/// One limit's status.
pub fn status_out<'a>(s: &LimitStatus, subjects: &'a [Subject], now: Timestamp) -> StatusOut<'a> {
    StatusOut {
        subject: subjects.get(s.subject).map(Subject::as_str),
        metric: s.metric.name(),
        window: window_name(s.window),
        algorithm: s.algorithm.name(),
        limit: Num::of(s.metric, s.limit),
        used: Num::of(s.metric, s.used),
        remaining: Num::of(s.metric, s.remaining),
        reset_at: rfc3339(s.reset_at.as_nanos()),
        reset_in_s: secs_until(s.reset_at, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_jiff() {
        for ns in [
            0u64,
            1,
            999_999_999,
            1_800_000_000_000_000_000,
            1_709_164_800_123_000_000, // 2024-02-29
            951_782_400_000_000_000,   // 2000-02-29
            4_102_444_799_999_999_999, // 2099-12-31T23:59:59.999999999
            1_234_567_890_500_000_000,
        ] {
            let expected = jiff::Timestamp::from_nanosecond(i128::from(ns))
                .unwrap()
                .to_string();
            assert_eq!(rfc3339(ns), expected, "{ns}");
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ns = x % 4_102_444_800_000_000_000;
            let expected = jiff::Timestamp::from_nanosecond(i128::from(ns))
                .unwrap()
                .to_string();
            assert_eq!(rfc3339(ns), expected, "{ns}");
        }
    }
}
