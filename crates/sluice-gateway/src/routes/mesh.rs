//! The kill switch (`POST /v1/mesh/agents/{address}/kill|resume`), the agent and
//! event lists, and AXME intents (`POST /v1/intents`).

use super::*;

/// `POST /v1/mesh/agents/{address}/kill` and `/resume`: optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    #[serde(default)]
    reason: Option<String>,
}

fn agent_json(address: &str, killed: Option<&crate::db::Killed>) -> Value {
    json!({
        "address": address,
        "address_id": address,
        "status": if killed.is_some() { "killed" } else { "active" },
        "killed_at": killed.map(|k| rfc3339(k.since_ns)),
        "killed_by": killed.map(|k| k.actor.clone()),
        "reason": killed.and_then(|k| k.reason.clone()),
    })
}

/// An agent's status and the usage of each of its limits.
pub(super) async fn agent_detail(st: &AppState, subject: &Subject) -> Result<Value, ApiError> {
    let mut out = agent_json(subject.as_str(), st.kill.get(subject.as_str()).as_ref());
    let now = st.now();
    let statuses = st.engine.usage(subject).await?;
    out["limits"] =
        serde_json::to_value(statuses_json(&statuses, std::slice::from_ref(subject), now))
            .unwrap_or(Value::Null);
    Ok(out)
}

pub(super) async fn mesh_post(State(st): St, headers: HeaderMap, uri: Uri, body: Body) -> Response {
    result(
        async {
            let (caller, req) = admin_with_optional_body::<KillBody>(&st, &headers, body).await?;
            let (subject, rest) = mesh_address(&uri)?;
            let kill = match rest.as_str() {
                "/kill" => true,
                "/resume" => false,
                _ => return Err(ApiError::not_found(format!("no route for {}", uri.path()))),
            };
            if req.reason.as_ref().is_some_and(|r| r.len() > 1_000) {
                return Err(ApiError::invalid("reason", "at most 1000 bytes"));
            }
            let now = st.now().as_nanos();
            let audit = Audit {
                kind: if kill {
                    "agent.killed"
                } else {
                    "agent.resumed"
                },
                subject: subject.as_str().to_owned(),
                actor: caller.id().to_owned(),
                detail: req
                    .reason
                    .as_ref()
                    .map(|r| json!({ "reason": r }).to_string()),
            };
            let changed = st
                .db
                .set_killed(
                    subject.as_str(),
                    kill,
                    now,
                    caller.id(),
                    req.reason.as_deref(),
                    &audit,
                )
                .await
                .map_err(|e| ApiError::internal("recording the kill switch", e))?;
            if kill {
                if changed {
                    st.kill.kill(crate::db::Killed {
                        subject: subject.as_str().to_owned(),
                        since_ns: now,
                        actor: caller.id().to_owned(),
                        reason: req.reason.clone(),
                    });
                    tracing::warn!(
                        "{} stopped by {} (kill switch){}",
                        subject.as_str(),
                        caller.id(),
                        req.reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
            } else if changed {
                st.kill.resume(subject.as_str());
                tracing::warn!("{} resumed by {}", subject.as_str(), caller.id());
            }
            let mut out = agent_json(subject.as_str(), st.kill.get(subject.as_str()).as_ref());
            out["changed"] = Value::from(changed);
            Ok(json::reply(StatusCode::OK, &out))
        }
        .await,
    )
}

/// `GET /v1/mesh/agents`: every agent with a policy, a key or a kill record,
/// its status and usage (`?status=killed|active`, `?limit=`).
pub(super) async fn mesh_agents(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 100, 1_000)?;
            let status = pairs
                .iter()
                .find(|(k, _)| k == "status" || k == "health")
                .map(|(_, v)| v.as_str());
            if let Some(s) = status {
                if s != "killed" && s != "active" {
                    return Err(ApiError::invalid(
                        "status",
                        format!("expected \"killed\" or \"active\", got {s:?}"),
                    ));
                }
            }
            let mut names: std::collections::BTreeSet<String> = st
                .policies
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            names.extend(st.keys.list().iter().map(|k| k.subject.as_str().to_owned()));
            names.extend(
                st.db
                    .killed()
                    .await
                    .map_err(|e| ApiError::internal("reading the kill switch", e))?
                    .into_iter()
                    .map(|k| k.subject),
            );
            let mut agents = Vec::new();
            for name in names {
                let Ok(subject) = Subject::parse(&name) else {
                    continue;
                };
                if subject.kind() != SubjectKind::Agent || subject.is_wildcard() {
                    continue;
                }
                let killed = st.kill.get(&name).is_some();
                if status.is_some_and(|s| (s == "killed") != killed) {
                    continue;
                }
                if agents.len() >= limit as usize {
                    break;
                }
                agents.push(agent_detail(&st, &subject).await?);
            }
            Ok(json::reply(StatusCode::OK, &json!({ "agents": agents })))
        }
        .await,
    )
}

/// `GET /v1/mesh/events`: kills, resumes and breaches, newest first (`?event_type=`, `?limit=`).
pub(super) async fn mesh_events(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            st.keys.authenticate(&headers)?.require_admin()?;
            let pairs = query_pairs(&uri)?;
            let limit = query_limit(&pairs, 50, 1_000)?;
            let kind = pairs
                .iter()
                .find(|(k, _)| k == "event_type")
                .map(|(_, v)| v.as_str());
            if let Some(k) = kind {
                if !["kill", "resume", "breach"].contains(&k) {
                    return Err(ApiError::invalid(
                        "event_type",
                        format!("expected kill, resume or breach, got {k:?}"),
                    ));
                }
            }
            let events: Vec<Value> = st
                .db
                .mesh_events(limit, kind)
                .await
                .map_err(|e| ApiError::internal("reading mesh events", e))?
                .into_iter()
                .map(|e| {
                    json!({
                        "id": e.seq,
                        "source": e.source,
                        "event_type": e.kind,
                        "address": e.subject,
                        "actor": e.actor,
                        "at": rfc3339(e.ts_ns),
                        "detail": e.detail.and_then(|d| serde_json::from_str::<Value>(&d).ok()),
                    })
                })
                .collect();
            Ok(json::reply(StatusCode::OK, &json!({ "events": events })))
        }
        .await,
    )
}

/// `POST /v1/intents`: extra fields (`correlation_id`, ...) are accepted and kept out of the way.
/// `POST /v1/intents` accepted.
#[derive(serde::Serialize)]
struct IntentOut<'a> {
    intent_id: &'a str,
    status: &'static str,
    intent_type: &'a str,
    to_agent: &'a str,
    limits: Vec<StatusOut<'a>>,
}

#[derive(Debug, Deserialize)]
struct IntentBody {
    intent_type: Option<Value>,
    to_agent: Option<Value>,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    correlation_id: Option<Value>,
}

pub(super) async fn intent(State(st): St, request: axum::extract::Request) -> Response {
    let started = st.now();
    // Take the request apart instead of extracting a cloned HeaderMap.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let r = async {
        // Read the body first: the connection stays reusable whatever the answer.
        let bytes = json::read_body(&headers, body).await?;
        let caller = st.keys.authenticate(&headers)?;
        let req = json::parse::<IntentBody>(&bytes)?;
        let intent_type = match &req.intent_type {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "intent_type",
                    "must be 1 to 256 characters",
                ));
            }
            Some(_) => {
                return Err(
                    ApiError::bad_request("intent_type must be a string").field("intent_type")
                );
            }
            None => {
                return Err(
                    ApiError::bad_request("missing field `intent_type`").field("intent_type")
                );
            }
        };
        let to = match &req.to_agent {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(ApiError::bad_request("to_agent must be a string").field("to_agent"));
            }
            None => return Err(ApiError::bad_request("missing field `to_agent`").field("to_agent")),
        };
        let to_agent =
            Subject::parse(&to).map_err(|e| ApiError::invalid("to_agent", e.to_string()))?;
        if to_agent.kind() != SubjectKind::Agent {
            return Err(ApiError::invalid(
                "to_agent",
                format!("expected an agent address agent://org/env/name, got {to:?}"),
            ));
        }
        let amounts = AmountsBody {
            requests: Some(1),
            cost_usd: req.cost_usd,
            ..AmountsBody::default()
        }
        .to_amounts("")
        .map_err(|e| ApiError::invalid("cost_usd", e.message))?;
        // The receiving agent's limits apply, and the sender's own if it is an agent key.
        let mut subjects = vec![to_agent];
        if let Caller::Agent(k) = &caller {
            if !subjects.contains(&k.subject) {
                subjects.push(k.subject.clone());
            }
        }
        st.kill.ensure_running(&subjects)?;
        let correlation = req.correlation_id.clone();
        let st2 = Arc::clone(&st);
        let (who, trace) = (caller.id().to_owned(), trace_id(&headers));
        idempotent(&st, &caller, &headers, "intents", &bytes, || async move {
            let request = Request::new(subjects.iter().cloned(), amounts);
            let now = st2.now();
            let (enforced, _forced, statuses) =
                spend_by_actions(&st2, &subjects, amounts, "intents", &who, &request).await?;
            let enforced = enforced.as_deref().unwrap_or(&subjects);
            st2.alerts
                .observe(&st2.policies, enforced, &statuses, now.as_nanos());
            let n = st2.intents.fetch_add(1, Ordering::Relaxed);
            let intent_id = format!("int_{}_{n}", st2.engine.boot());
            let body = IntentOut {
                intent_id: &intent_id,
                status: "accepted",
                intent_type: &intent_type,
                to_agent: subjects[0].as_str(),
                limits: statuses_json(&statuses, enforced, now),
            };
            let detail = json!({
                "intent_type": intent_type,
                "correlation_id": correlation,
                "trace_id": trace,
            })
            .to_string();
            let row = spend_row(
                RowKind::Intent,
                now,
                &subjects,
                amounts,
                &who,
                Some(intent_id.clone()),
                Some(detail),
            );
            Ok((
                Reply::json(StatusCode::OK, &body).with_headers(ratelimit::allowed(&statuses, now)),
                vec![row],
            ))
        })
        .await
    }
    .await;
    observe(&st, Endpoint::Intent, started, &r);
    result(r)
}
