//! `GET /v1/usage/{subject}`: used / remaining / reset per limit, and spend.

use super::*;

async fn spend_json(st: &AppState, subject: &Subject) -> Result<Value, ApiError> {
    let now = st.now().as_nanos();
    let today = crate::db::utc_day(now);
    let month_start = format!("{}-01", &today[..7]);
    let get = |from: Option<String>, to: Option<String>| async move {
        st.db
            .spend(subject.as_str(), from.as_deref(), to.as_deref())
            .await
            .map(|s| amounts_json(&s.amounts))
            .map_err(|e| ApiError::internal("reading spend", e))
    };
    Ok(json!({
        "today": get(Some(today.clone()), Some(today.clone())).await?,
        "month": get(Some(month_start), Some(today)).await?,
        "total": get(None, None).await?,
        "basis": "UTC days, from the ledger (written within milliseconds of each decision)",
    }))
}

pub(super) async fn usage(State(st): St, headers: HeaderMap, uri: Uri) -> Response {
    result(
        async {
            let caller = st.keys.authenticate(&headers)?;
            let subject = path_subject(&uri, "/v1/usage/")?;
            caller.require_subject(&subject, "subject")?;
            let now = st.now();
            let statuses = st.engine.usage(&subject).await?;
            let policy = {
                let policies = st
                    .policies
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if policies.contains_key(subject.as_str()) {
                    Some(subject.as_str().to_owned())
                } else {
                    let tier = Subject::wildcard(subject.kind());
                    policies
                        .contains_key(tier.as_str())
                        .then(|| tier.as_str().to_owned())
                }
            };
            let subjects = [subject.clone()];
            Ok(json::reply(
                StatusCode::OK,
                &json!({
                    "subject": subject.as_str(),
                    "policy": policy,
                    "limits": statuses_json(&statuses, &subjects, now),
                    "spend": spend_json(&st, &subject).await?,
                }),
            ))
        }
        .await,
    )
}
