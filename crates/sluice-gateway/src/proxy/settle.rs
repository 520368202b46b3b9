//! Settling a proxied reservation: the ledger row, at once or from a `Drop`.

use super::*;

/// The ledger row of a proxied reservation's settle outcome: `Some(actual)`
/// committed, `None` released; `None` if the lease had already run out and
/// the expiry pass recorded it.
fn settle_row(
    st: &AppState,
    public: String,
    outcome: Settle,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) -> Option<LedgerRow> {
    let (kind, amounts, meta) = match (outcome, actual) {
        (Settle::Done { meta, .. }, Some(a)) => (RowKind::Commit, a, meta),
        (Settle::Done { meta, .. }, None) => (RowKind::Release, Amounts::ZERO, meta),
        (Settle::Expired(Some(meta)), _) => (RowKind::Expire, meta.held, meta),
        (Settle::Expired(None) | Settle::Unknown | Settle::Forbidden, _) => return None,
    };
    Some(LedgerRow {
        ts_ns: st.now().as_nanos(),
        kind,
        reservation: Some(public),
        subjects: meta.subjects,
        amounts,
        held: Some(meta.held),
        reserved_ns: Some(meta.reserved_ns),
        caller: meta.caller,
        request_id,
        detail,
    })
}

/// Settle a proxied reservation and record it. If the shared store does not
/// answer, retry with back-off for as long as the lease lasts; past it, the
/// lease has run out in the store and the expiry pass records it at its held
/// amounts (never less than was spent).
async fn settle_record(
    st: &AppState,
    public: String,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) {
    let mut wait = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    let outcome = loop {
        match st.engine.settle(&public, None, actual).await {
            Ok(o) => break o,
            Err(e) if waited < proxy_lease(st) => {
                tracing::debug!("settling {public}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(
                    "settling {public}: {e}; given up, its lease settles it at the held amounts"
                );
                return;
            }
        }
    };
    if let Some(row) = settle_row(st, public, outcome, actual, detail, request_id) {
        st.ledger.record(vec![row], None).await;
    }
}

/// Settle from a `Drop` (which cannot wait): in memory at once, the ledger
/// row queued from a task; through Redis from a task.
pub(super) fn settle_soon(
    st: &Arc<AppState>,
    public: String,
    actual: Option<Amounts>,
    detail: Option<String>,
    request_id: Option<String>,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            "no runtime to settle {public}; its lease will settle it at the held amounts"
        );
        return;
    };
    let st = Arc::clone(st);
    if let Some(outcome) = st.engine.settle_in_process(&public, actual) {
        if let Some(row) = settle_row(&st, public, outcome, actual, detail, request_id) {
            if let Err(rows) = st.ledger.try_record(vec![row]) {
                rt.spawn(async move { st.ledger.record(rows, None).await });
            }
        }
        return;
    }
    rt.spawn(async move { settle_record(&st, public, actual, detail, request_id).await });
}

/// Every attempt and back-off fits in a proxied reservation's lease, with a minute to spare.
pub(super) fn proxy_lease(st: &AppState) -> Duration {
    st.config.proxy.timeout * 2 + Duration::from_secs(60)
}

/// Settle and record.
pub(super) async fn finish(
    st: &AppState,
    public: &str,
    actual: Option<Amounts>,
    detail: impl serde::Serialize,
    request_id: Option<String>,
) {
    let detail = serde_json::to_string(&detail).ok();
    settle_record(st, public.to_owned(), actual, detail, request_id).await;
}
