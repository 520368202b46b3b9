//! Breach actions on the decision paths: the refusing limit's action
//! (block, alert, require_approval, degrade), approval parking, refusal answers.

use super::*;

/// The subjects a caller decides for: an agent key always counts against its
/// own subject, and may not name another agent or key subject.
pub(super) fn scope_subjects(
    caller: &Caller,
    mut subjects: Vec<Subject>,
) -> Result<Vec<Subject>, ApiError> {
    if let Caller::Agent(k) = caller {
        for (i, s) in subjects.iter().enumerate() {
            if matches!(s.kind(), SubjectKind::Agent | SubjectKind::Key) && *s != k.subject {
                caller.require_subject(s, &format!("subjects[{i}]"))?;
            }
        }
        if !subjects.contains(&k.subject) {
            subjects.push(k.subject.clone());
        }
    }
    Ok(subjects)
}

pub(super) fn amounts_or_one(a: Option<&AmountsBody>) -> Result<Amounts, ApiError> {
    match a {
        Some(a) => a.to_amounts("amounts"),
        None => Ok(Amounts::one_request()),
    }
}

/// `f` of `subject`'s policy in force (its own, else its kind's tier).
pub(crate) fn policy_of<T>(
    st: &AppState,
    subject: &Subject,
    f: impl FnOnce(&crate::server::StoredPolicy) -> T,
) -> Option<T> {
    let policies = st
        .policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    policies
        .get(subject.as_str())
        .or_else(|| policies.get(Subject::wildcard(subject.kind()).as_str()))
        .map(f)
}

/// What a refusal of `subject` by `d`'s limit does: the limit's own
/// `action_on_breach` if set, else its policy's (its own, else its kind's tier).
pub(crate) fn action_of(st: &AppState, subject: &Subject, d: &Denial) -> crate::wire::Action {
    policy_of(st, subject, |p| {
        p.body
            .limits
            .iter()
            .zip(p.policy.limits())
            .find(|(_, l)| l.metric() == d.metric && l.window() == d.window)
            .and_then(|(b, _)| b.action_on_breach.as_deref())
            .and_then(|a| crate::wire::Action::parse(a, "action_on_breach").ok())
            .unwrap_or(p.action)
    })
    .unwrap_or_default()
}

/// What [`decide_by_actions`] decided: the subjects still enforced, the
/// ones let past their limits, and the decision's value.
pub(crate) type Let<T> = (Vec<Subject>, Vec<Subject>, T);

/// Decide `subjects` with `decide(enforced, forced)`, letting `alert`-action
/// subjects past their limits: a refusal by one of them records the breach
/// (action `alert`), raises its alert, and the rest are decided again
/// without it. A refusal by a `require_approval` subject parks the request
/// (approved: decided again, once). A refusal by any other subject is the
/// answer (with the subjects its index refers to, and the approval waited
/// on, if any).
pub(crate) async fn decide_by_actions<T, F, Fut>(
    st: &AppState,
    subjects: &[Subject],
    endpoint: &'static str,
    asked: crate::approvals::Asked<'_>,
    mut decide: F,
) -> Result<Result<Let<T>, (Denial, Vec<Subject>, Option<ApprovalRef>)>, Unavailable>
where
    F: FnMut(Vec<Subject>, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, Denial>, Unavailable>>,
{
    let who = asked.caller;
    let mut enforced = subjects.to_vec();
    let mut forced: Vec<Subject> = Vec::new();
    let mut approved = false;
    loop {
        let names = forced.iter().map(|s| s.as_str().to_owned()).collect();
        match decide(enforced.clone(), names).await? {
            Ok(v) => return Ok(Ok((enforced, forced, v))),
            Err(d) => {
                let now = st.now().as_nanos();
                let alerting = enforced
                    .get(d.subject)
                    .is_some_and(|s| action_of(st, s, &d) == crate::wire::Action::Alert);
                if !alerting {
                    match approval_gate(st, &enforced, &d, asked, endpoint).await {
                        Some(Parked::Approved) if !approved => {
                            approved = true;
                            continue;
                        }
                        Some(Parked::Refused(r)) => return Ok(Err((d, enforced, r))),
                        Some(Parked::Approved) => return Ok(Err((d, enforced, None))),
                        None => {}
                    }
                    let action = block_action(enforced.get(d.subject));
                    st.breaches
                        .record(&d, &enforced, endpoint, action, who, now);
                    return Ok(Err((d, enforced, None)));
                }
                st.breaches
                    .record(&d, &enforced, endpoint, "alert", who, now);
                let subject = enforced.remove(d.subject);
                st.alerts.breached(&subject, &d, now);
                forced.push(subject);
            }
        }
    }
}

/// Check-and-take for the spend paths (`check`, `intents`): the usual one
/// engine call; only when the refusing subject's policy says `alert` or
/// `require_approval` is the request decided further by
/// [`decide_by_actions`], the subjects it let through charged by
/// force. (enforced subjects if not all, forced subjects, the enforced
/// levels.)
pub(super) async fn spend_by_actions(
    st: &AppState,
    subjects: &[Subject],
    amounts: Amounts,
    endpoint: &'static str,
    who: &str,
    request: &Request,
) -> Result<(Option<Vec<Subject>>, Vec<Subject>, sluice_core::Statuses), ApiError> {
    let d = match st.engine.check(request).await? {
        Decision::Allowed(statuses) => return Ok((None, Vec::new(), statuses)),
        Decision::Denied(d) => d,
    };
    if !decided_further(st, subjects, &d) {
        st.breaches
            .record(&d, subjects, endpoint, "block", who, st.now().as_nanos());
        return Err(denial_error(&d, subjects).0);
    }
    let asked = crate::approvals::Asked {
        amounts,
        model: None,
        caller: who,
    };
    let decided = decide_by_actions(
        st,
        subjects,
        endpoint,
        asked,
        move |enforced, _| async move {
            Ok(
                match st.engine.check(&Request::new(enforced, amounts)).await? {
                    Decision::Allowed(s) => Ok(s),
                    Decision::Denied(d) => Err(d),
                },
            )
        },
    )
    .await?;
    match decided {
        Ok((enforced, forced, statuses)) => {
            if !forced.is_empty() {
                let levels = st
                    .engine
                    .force(&Request::new(forced.iter().cloned(), amounts))
                    .await?;
                st.alerts
                    .observe(&st.policies, &forced, &levels, st.now().as_nanos());
            }
            Ok((Some(enforced), forced, statuses))
        }
        Err((d, enforced, r)) => Err(approval_error(denial_error(&d, &enforced).0, r.as_ref())),
    }
}

/// What [`reserve_by_actions`] answers: (enforced subjects if not all,
/// subjects let through, (reservation, public id)), or the refusal with the
/// subjects its index refers to and the approval it waited on, if any.
pub(crate) type Reserved = Result<
    (
        Option<Vec<Subject>>,
        Vec<Subject>,
        (sluice_core::Reservation, String),
    ),
    (Denial, Vec<Subject>, Option<ApprovalRef>),
>;

/// Whether a refusal is decided further by [`decide_by_actions`] (an
/// `alert` subject let through, a `require_approval` one held) rather than
/// answered at once.
fn decided_further(st: &AppState, subjects: &[Subject], d: &Denial) -> bool {
    subjects.get(d.subject).is_some_and(|s| {
        matches!(
            action_of(st, s, d),
            crate::wire::Action::Alert | crate::wire::Action::RequireApproval
        )
    })
}

/// The breach action of a plain refusal: a provider quota sends the proxy
/// to the next model, if any; anything else blocks.
fn block_action(refused_by: Option<&Subject>) -> &'static str {
    if refused_by.is_some_and(|s| s.as_str().starts_with("provider:")) {
        "next_model"
    } else {
        "block"
    }
}

/// When the refusing subject's policy says `require_approval`: record the
/// breach and park the request (`None` for any other action).
async fn approval_gate(
    st: &AppState,
    subjects: &[Subject],
    d: &Denial,
    asked: crate::approvals::Asked<'_>,
    endpoint: &'static str,
) -> Option<Parked> {
    let s = subjects.get(d.subject)?;
    if action_of(st, s, d) != crate::wire::Action::RequireApproval {
        return None;
    }
    st.breaches.record(
        d,
        subjects,
        endpoint,
        "require_approval",
        asked.caller,
        st.now().as_nanos(),
    );
    Some(crate::approvals::park(st, s, d, asked).await)
}

/// A refusal naming the approval it waited on.
pub(crate) fn approval_error(mut e: ApiError, r: Option<&ApprovalRef>) -> ApiError {
    let Some(r) = r else { return e };
    e.message = format!("{}; {}", e.message, approval_note(r));
    if let Ok(v) = HeaderValue::from_str(&r.id) {
        e.headers
            .push((HeaderName::from_static("x-sluice-approval-id"), v));
    }
    e.with("approval_id", Value::from(r.id.clone()))
        .with("approval_status", Value::from(r.phase.name()))
}

/// What a refused caller is told of the approval.
pub(crate) fn approval_note(r: &ApprovalRef) -> String {
    match r.phase {
        crate::approvals::Phase::Denied => format!(
            "approval {} was denied: the limit stands until it resets",
            r.id
        ),
        crate::approvals::Phase::Pending => format!(
            "approval {} is pending: an operator approves it with POST /v1/approvals/{}/approve",
            r.id, r.id
        ),
        p => format!("approval {} is {}", r.id, p.name()),
    }
}

/// Reserve `request` (on `subjects`) as one engine call; only when the
/// refusing subject's policy says `alert` or `require_approval` is it
/// decided further by [`decide_by_actions`]: the reservation made on the
/// others, the subjects let through recorded in its metadata to be charged
/// by force when it settles. Breaches are recorded either way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn reserve_by_actions(
    st: &AppState,
    subjects: &[Subject],
    request: &Request,
    lease: Option<std::time::Duration>,
    meta: Meta,
    endpoint: &'static str,
    model: Option<&str>,
) -> Result<Reserved, Unavailable> {
    let who = meta.caller.clone();
    let d = match st.engine.reserve(request, lease, meta.clone()).await? {
        Ok(r) => return Ok(Ok((None, Vec::new(), r))),
        Err(d) => d,
    };
    if !decided_further(st, subjects, &d) {
        let action = block_action(subjects.get(d.subject));
        st.breaches
            .record(&d, subjects, endpoint, action, &who, st.now().as_nanos());
        return Ok(Err((d, subjects.to_vec(), None)));
    }
    let amounts = request.amounts;
    let asked = crate::approvals::Asked {
        amounts: request.amounts,
        model,
        caller: &who,
    };
    let decided = decide_by_actions(st, subjects, endpoint, asked, move |enforced, forced| {
        let meta = Meta {
            forced,
            ..meta.clone()
        };
        async move {
            st.engine
                .reserve(&Request::new(enforced, amounts), lease, meta)
                .await
        }
    })
    .await?;
    Ok(decided.map(|(enforced, forced, r)| (Some(enforced), forced, r)))
}

/// A refusal: 429 with the exact wait, or 422 when no wait can help.
pub(super) fn denial_error(d: &Denial, subjects: &[Subject]) -> (ApiError, Outcome) {
    let subject = subjects.get(d.subject).map(Subject::as_str).unwrap_or("");
    let (mut e, outcome) = match d.reason {
        DenialReason::RetryAfter(wait) => {
            let secs = ratelimit::ceil_secs(wait);
            (
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "{subject} reached its {} limit of {} per {}; retry in {secs}s",
                        d.metric.name(),
                        metric_value(d.metric, d.limit),
                        wire::window_name(d.window)
                    ),
                )
                .with("retry_after_s", Value::from(secs))
                .with("retry_after_ms", Value::from(wait.as_millis().max(1) as u64)),
                Outcome::Denied,
            )
        }
        DenialReason::NeverFits {
            requested,
            capacity,
        } => (
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "exceeds_limit",
                format!(
                    "the request asks for {} {} but {subject}'s limit can never give more than {} at once; waiting will not help",
                    metric_value(d.metric, requested),
                    d.metric.name(),
                    metric_value(d.metric, capacity)
                ),
            )
            .with("requested", metric_value(d.metric, requested))
            .with("capacity", metric_value(d.metric, capacity)),
            Outcome::NeverFits,
        ),
    };
    e = e
        .with("subject", Value::from(subject))
        .with("metric", Value::from(d.metric.name()))
        .with(
            "window",
            Value::from(wire::window_name(d.window).into_owned()),
        )
        .with("limit", metric_value(d.metric, d.limit));
    e.headers.extend(ratelimit::typed(ratelimit::denied(d)));
    (e, outcome)
}
