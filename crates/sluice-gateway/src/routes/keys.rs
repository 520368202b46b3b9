//! Agent keys: `POST/GET /v1/keys`, `DELETE /v1/keys/{id}`.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    subject: String,
    #[serde(default)]
    name: Option<String>,
}

fn key_json(k: &AgentKey) -> Value {
    json!({
        "id": k.id,
        "subject": k.subject.as_str(),
        "name": k.name,
        "prefix": k.prefix,
        "created_at": rfc3339(k.created_ns),
    })
}

pub(super) async fn create_key(State(st): St, headers: HeaderMap, body: Body) -> Response {
    result(
        async {
            // Read the body first: the connection stays reusable whatever the answer.
            let bytes = json::read_body(&headers, body).await?;
            st.keys.authenticate(&headers)?.require_admin()?;
            let req = json::parse::<KeyBody>(&bytes)?;
            let subject = Subject::parse(&req.subject)
                .map_err(|e| ApiError::invalid("subject", e.to_string()))?;
            if subject.is_wildcard() {
                return Err(ApiError::invalid(
                    "subject",
                    "a key acts for one subject, not a `kind:*` tier",
                ));
            }
            let name = req.name.unwrap_or_default();
            if name.chars().count() > 128 || name.chars().any(char::is_control) {
                return Err(ApiError::invalid(
                    "name",
                    "must be at most 128 characters, without control characters",
                ));
            }
            let key = generate_key();
            let row = KeyRow {
                id: format!("key_{}", random_hex(8)),
                hash: hex(&hash_key(&key)),
                subject: subject.as_str().to_owned(),
                name,
                prefix: key
                    .chars()
                    .take(crate::auth::KEY_PREFIX.len() + 6)
                    .collect(),
                created_ns: st.now().as_nanos(),
            };
            let audit = Audit {
                kind: "key.created",
                subject: row.subject.clone(),
                actor: "admin".to_owned(),
                detail: Some(
                    json!({"id": row.id, "name": row.name, "prefix": row.prefix}).to_string(),
                ),
            };
            st.db
                .insert_key(&row, &audit)
                .await
                .map_err(|e| ApiError::internal("storing a key", e))?;
            let agent = AgentKey {
                id: row.id.clone(),
                subject,
                name: row.name.clone(),
                prefix: row.prefix.clone(),
                created_ns: row.created_ns,
            };
            let mut body = key_json(&agent);
            body["key"] = Value::from(key);
            st.keys.insert(&row.hash, agent);
            Ok(json::reply(StatusCode::CREATED, &body))
        }
        .await,
    )
}

pub(super) async fn list_keys(State(st): St, headers: HeaderMap) -> Response {
    result((|| {
        st.keys.authenticate(&headers)?.require_admin()?;
        let keys: Vec<Value> = st.keys.list().iter().map(|k| key_json(k)).collect();
        Ok(json::reply(StatusCode::OK, &json!({ "keys": keys })))
    })())
}

pub(super) async fn revoke_key(
    State(st): St,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            caller.require_admin()?;
            let subject = st
                .keys
                .list()
                .iter()
                .find(|k| k.id == id)
                .map(|k| k.subject.as_str().to_owned())
                .unwrap_or_default();
            let audit = Audit {
                kind: "key.revoked",
                subject,
                actor: caller.id().to_owned(),
                detail: Some(json!({ "id": id }).to_string()),
            };
            let revoked = st
                .db
                .revoke_key(&id, st.now().as_nanos(), &audit)
                .await
                .map_err(|e| ApiError::internal("revoking a key", e))?;
            st.keys.remove(&id);
            if revoked {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(ApiError::not_found(format!("no live key {id:?}")).field("id"))
            }
        }
        .await,
    )
}
