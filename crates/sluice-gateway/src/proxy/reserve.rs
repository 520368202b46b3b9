//! Reserving a call's worst case on every subject, the refusal in the wire's
//! shape, and degrade rules (which rewrite the call before it reserves).

use super::*;

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
pub(super) struct Held {
    /// The reservation's public id.
    pub(super) public: String,
    /// The agent's own limits (the provider quota's left out).
    pub(super) limits: sluice_core::Statuses,
    pub(super) amounts: Amounts,
    pub(super) input_estimate: u64,
    pub(super) now: sluice_core::Timestamp,
}

/// A refused reservation: the answer, and whether the provider's quota refused
/// (another model may serve) rather than one of the agent's own limits.
pub(super) struct Refused {
    pub(super) response: Response,
    pub(super) by_quota: bool,
}

/// Reserve a request's worst case for `model`, record it, or answer the refusal.
pub(super) async fn reserve_for(
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

/// Graceful degradation: for each subject of the call whose policy has
/// `degrade` rules, the highest share used of its limits picks the rules
/// that apply (every rule with `at` at or below it, in order): the model is
/// swapped for a configured one on the same wire and the output tokens are
/// capped, before the reservation, so the worst case is the cheaper call's.
/// What changed, for `x-sluice-degraded`. A usage read that fails changes
/// nothing (the reservation then decides as usual). Called only when some
/// policy has degrade rules (`AppState::degrade_any`).
pub(super) async fn degrade(
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
