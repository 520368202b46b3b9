//! AXME-compatible cost policies: `GET/PUT /v1/mesh/agents/{address}/policies/cost`.

use super::*;

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

pub(super) fn mesh_address(uri: &Uri) -> Result<(Subject, String), ApiError> {
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

pub(super) async fn mesh_get(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
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

pub(super) async fn mesh_put(State(st): St, headers: HeaderMap, uri: Uri, body: Body) -> Response {
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
