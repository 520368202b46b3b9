//! Policies: `GET/PUT/DELETE /v1/policies/{subject}`, `GET /v1/policies`.

use super::*;

fn stored_json(subject: &str, p: &StoredPolicy) -> Value {
    policy_json(subject, &p.body, &p.policy, p.updated_ns)
}

/// A subject's own policy as written (for the audit trail).
fn policy_body(st: &AppState, subject: &Subject) -> Option<Value> {
    st.policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(subject.as_str())
        .map(|p| serde_json::to_value(&p.body).unwrap_or(Value::Null))
}

/// Check, store, then put in force; answers (created?, stored policy).
pub(super) async fn set_policy(
    st: &AppState,
    subject: &Subject,
    body: PolicyBody,
    actor: &str,
) -> Result<(bool, StoredPolicy), ApiError> {
    let (policy, action) = body.to_policy()?;
    for (i, r) in body
        .degrade
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(m) = &r.model {
            if !st.config.proxy.models.contains_key(m) {
                return Err(ApiError::invalid(
                    format!("degrade[{i}].model"),
                    format!("{m:?} is not a model configured on this gateway ([[models]])"),
                ));
            }
        }
    }
    let text =
        serde_json::to_string(&body).map_err(|e| ApiError::internal("encoding a policy", e))?;
    let _write = st.policy_write.lock().await;
    let now = st.now().as_nanos();
    let old = policy_body(st, subject);
    let audit = Audit {
        kind: if old.is_some() {
            "policy.changed"
        } else {
            "policy.created"
        },
        subject: subject.as_str().to_owned(),
        actor: actor.to_owned(),
        detail: Some(
            json!({"old": old, "new": serde_json::to_value(&body).unwrap_or(Value::Null)})
                .to_string(),
        ),
    };
    st.db
        .put_policy(subject.as_str(), &text, now, &audit)
        .await
        .map_err(|e| ApiError::internal("storing a policy", e))?;
    let stored = StoredPolicy {
        body,
        action,
        policy: Arc::new(policy.clone()),
        updated_ns: now,
    };
    st.engine.set_policy(subject, policy);
    if stored.body.alert_at.is_some() {
        st.alerts.enable();
    }
    if stored.body.degrade.is_some() {
        st.degrade_any
            .store(true, std::sync::atomic::Ordering::Release);
    }
    let old = st
        .policies
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(subject.as_str().to_owned(), stored.clone());
    crate::approvals::reapply_all(st);
    Ok((old.is_none(), stored))
}

pub(super) async fn put_policy(
    State(st): St,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    result(
        async {
            // Read the body first: the connection stays reusable whatever the answer.
            let bytes = json::read_body(&headers, body).await?;
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = writable(path_subject(&uri, "/v1/policies/")?)?;
            let policy = json::parse::<PolicyBody>(&bytes)?;
            let (created, stored) = set_policy(&st, &subject, policy, caller.id()).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json::reply(status, &stored_json(subject.as_str(), &stored)))
        }
        .await,
    )
}

pub(super) async fn get_policy(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let subject = path_subject(&uri, "/v1/policies/")?;
        let policies = st
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = policies
            .get(subject.as_str())
            .ok_or_else(|| ApiError::not_found(format!("no policy for {subject}")))?;
        Ok(json::reply(
            StatusCode::OK,
            &stored_json(subject.as_str(), p),
        ))
    })())
}

pub(super) async fn delete_policy(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = writable(path_subject(&uri, "/v1/policies/")?)?;
            let _write = st.policy_write.lock().await;
            let old = policy_body(&st, &subject);
            let audit = Audit {
                kind: "policy.deleted",
                subject: subject.as_str().to_owned(),
                actor: caller.id().to_owned(),
                detail: Some(json!({ "old": old, "new": null }).to_string()),
            };
            let existed = st
                .db
                .delete_policy(subject.as_str(), st.now().as_nanos(), &audit)
                .await
                .map_err(|e| ApiError::internal("deleting a policy", e))?;
            st.engine.remove_policy(&subject);
            st.policies
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(subject.as_str());
            crate::approvals::reapply_all(&st);
            if existed {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(ApiError::not_found(format!("no policy for {subject}")))
            }
        }
        .await,
    )
}

pub(super) async fn list_policies(State(st): St, headers: HeaderMap) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let policies = st
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list: Vec<Value> = policies.iter().map(|(s, p)| stored_json(s, p)).collect();
        Ok(json::reply(StatusCode::OK, &json!({ "policies": list })))
    })())
}
