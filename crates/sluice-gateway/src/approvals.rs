//! Human approval: the `require_approval` breach action.
//!
//! A request refused by a limit whose policy says `require_approval` is
//! parked: it opens (or joins) the one pending approval of that subject and
//! limit, and waits up to the policy's `approval_wait` for a human. Approved
//! in time, the approval's override (extra amounts on the subject's limits
//! until a time) is in force and the request is decided again; otherwise it
//! is refused with the approval's id. A denial stands until the limit would
//! have let the request through by itself: meanwhile refusals answer at once,
//! naming it, without opening another.
//!
//! Approvals live in the database (`approvals`); this module keeps what the
//! decision path needs in memory: the open approvals by (subject, limit),
//! the parked requests' wake-ups, and the overrides in force, which it
//! installs in the engine as the subject's policy raised by the extra
//! amounts (usage is kept: limits are matched by metric, window and
//! algorithm, not by amount). Replicas on PostgreSQL rebuild it on each
//! change notice, so an approval given through any replica releases the
//! requests parked on every replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use sluice_core::{Amounts, Denial, Metric, Subject};
use tokio::sync::watch;

use crate::db::{ApprovalRow, Audit};
use crate::server::AppState;

/// Where an approval stands, as parked requests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a human.
    Pending,
    /// Approved: its override is in force.
    Approved,
    /// Denied.
    Denied,
    /// The limit let requests through by itself before anyone decided.
    Expired,
}

impl Phase {
    /// The API's name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Approved => "approved",
            Phase::Denied => "denied",
            Phase::Expired => "expired",
        }
    }

    fn of(status: &str) -> Phase {
        match status {
            "approved" => Phase::Approved,
            "denied" => Phase::Denied,
            "expired" => Phase::Expired,
            _ => Phase::Pending,
        }
    }
}

/// The approval a refusal names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRef {
    /// `apr_...`.
    pub id: String,
    /// Where it stands.
    pub phase: Phase,
}

/// What parking a refused request came to.
#[derive(Debug)]
pub enum Parked {
    /// Approved in time: decide the request again.
    Approved,
    /// Not approved in time, denied, or no approval could be opened (`None`:
    /// the database failed; the refusal stands as a plain block).
    Refused(Option<ApprovalRef>),
}

/// What the parked request asked for, for the human deciding.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// Its amounts (the proxy's worst case).
    pub amounts: Amounts,
    /// The proxied request's model.
    pub model: Option<&'a str>,
    /// Who asked.
    pub caller: &'a str,
}

#[derive(Debug, Clone)]
struct Open {
    id: String,
    denied: bool,
    resets_ns: u64,
}

#[derive(Debug, Clone)]
struct Override {
    id: String,
    extra: Amounts,
    until_ns: u64,
}

#[derive(Debug)]
struct Waiter {
    tx: watch::Sender<Phase>,
    /// When it was decided (kept a while for requests that arrive just after).
    decided_ns: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pending approvals and standing denials by (subject, metric, window).
    open: HashMap<(String, String, String), Open>,
    /// Wake-ups by approval id.
    waiters: HashMap<String, Waiter>,
    /// Overrides in force by subject.
    overrides: HashMap<String, Vec<Override>>,
}

impl Inner {
    /// The wake-up of approval `id` (made pending if none yet).
    fn waiter(&mut self, id: &str) -> &mut Waiter {
        self.waiters.entry(id.to_owned()).or_insert_with(|| Waiter {
            tx: watch::channel(Phase::Pending).0,
            decided_ns: None,
        })
    }
}

/// Approvals as the decision path needs them.
#[derive(Debug, Default)]
pub struct Approvals {
    inner: Mutex<Inner>,
    /// Requests held on this replica now.
    held: std::sync::atomic::AtomicU64,
}

/// Counts a held request while it lives (a client that goes away drops it).
struct Holding<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The default `approval_wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// How long a decided approval's wake-up is kept for late arrivals.
const KEEP_DECIDED_NS: u64 = 60_000_000_000;

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// (requests held here now, pending approvals known here, subjects with
    /// an override in force), for `/metrics`.
    pub fn gauges(&self) -> (u64, u64, u64) {
        let held = self.held.load(std::sync::atomic::Ordering::Relaxed);
        let inner = self.lock();
        let pending = inner.open.values().filter(|o| !o.denied).count() as u64;
        (held, pending, inner.overrides.len() as u64)
    }

    /// The extra amounts in force on `subject` (zero if none).
    pub fn extra(&self, subject: &str) -> Amounts {
        let inner = self.lock();
        sum(inner
            .overrides
            .get(subject)
            .map(Vec::as_slice)
            .unwrap_or_default())
    }

    /// Subjects with an override in force.
    fn overridden(&self) -> Vec<String> {
        self.lock().overrides.keys().cloned().collect()
    }

    /// An approval as the database has it (pending, or decided here or on
    /// another replica): update what is open and the overrides. Its parked requests are woken by
    /// [`Approvals::wake`], once the override is installed, so none decides
    /// again before it is in force.
    fn record(&self, row: &ApprovalRow) {
        let phase = Phase::of(&row.status);
        let mut inner = self.lock();
        let key = (row.subject.clone(), row.metric.clone(), row.window.clone());
        match phase {
            Phase::Pending | Phase::Denied => {
                inner.open.insert(
                    key,
                    Open {
                        id: row.id.clone(),
                        denied: phase == Phase::Denied,
                        resets_ns: row.resets_ns,
                    },
                );
            }
            Phase::Approved | Phase::Expired => {
                if inner.open.get(&key).is_some_and(|o| o.id == row.id) {
                    inner.open.remove(&key);
                }
            }
        }
        if phase == Phase::Approved {
            if let (Some(extra), Some(until_ns)) = (row.extra, row.until_ns) {
                let list = inner.overrides.entry(row.subject.clone()).or_default();
                if !list.iter().any(|o| o.id == row.id) {
                    list.push(Override {
                        id: row.id.clone(),
                        extra,
                        until_ns,
                    });
                }
            }
        }
    }

    /// Wake the requests parked on a decided approval.
    fn wake(&self, row: &ApprovalRow, now_ns: u64) {
        let phase = Phase::of(&row.status);
        let mut inner = self.lock();
        let w = inner.waiter(&row.id);
        w.tx.send_replace(phase);
        w.decided_ns = Some(now_ns);
    }
}

fn sum(list: &[Override]) -> Amounts {
    let mut out = Amounts::ZERO;
    for o in list {
        for m in Metric::ALL {
            out.set(m, out.get(m).saturating_add(o.extra.get(m)));
        }
    }
    out
}

/// The policy's `approval_wait` for `subject` (its own policy, else its tier's).
fn wait_of(st: &AppState, subject: &Subject) -> Duration {
    crate::routes::policy_of(st, subject, |p| p.body.approval_wait())
        .flatten()
        .unwrap_or(DEFAULT_WAIT)
}

/// Park a request `subject`'s limit refused (`d`): open or join the pending
/// approval and wait for its decision up to the policy's `approval_wait`.
pub async fn park(st: &AppState, subject: &Subject, d: &Denial, asked: Asked<'_>) -> Parked {
    let now = st.now().as_nanos();
    let window = crate::wire::window_name(d.window).into_owned();
    let key = (
        subject.as_str().to_owned(),
        d.metric.name().to_owned(),
        window.clone(),
    );
    let known = st.approvals.lock().open.get(&key).cloned();
    let id = match known {
        Some(o) if o.denied && o.resets_ns > now => {
            return Parked::Refused(Some(ApprovalRef {
                id: o.id,
                phase: Phase::Denied,
            }));
        }
        Some(o) if !o.denied => (o.id, o.resets_ns),
        _ => match open(st, subject, d, &window, asked, now).await {
            Some(opened) => opened,
            None => return Parked::Refused(None),
        },
    };
    let (id, resets_ns) = id;
    let mut rx = {
        let mut inner = st.approvals.lock();
        let rx = inner.waiter(&id).tx.subscribe();
        if *rx.borrow() == Phase::Pending {
            inner.open.entry(key).or_insert(Open {
                id: id.clone(),
                denied: false,
                resets_ns,
            });
        }
        rx
    };
    let wait = wait_of(st, subject);
    st.approvals
        .held
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _holding = Holding(&st.approvals.held);
    let waited = tokio::time::timeout(wait, rx.wait_for(|p| *p != Phase::Pending))
        .await
        .map(|r| r.map(|p| *p));
    let phase = match waited {
        Ok(Ok(p)) => p,
        _ => *rx.borrow(),
    };
    match phase {
        Phase::Approved => Parked::Approved,
        phase => Parked::Refused(Some(ApprovalRef { id, phase })),
    }
}

/// Open a pending approval for the refusal (or find the one another request
/// or replica opened first); its id and when its limit resets.
async fn open(
    st: &AppState,
    subject: &Subject,
    d: &Denial,
    window: &str,
    asked: Asked<'_>,
    now: u64,
) -> Option<(String, u64)> {
    // The limit's usage, and when it would let the request through by itself.
    let fallback_reset = now.saturating_add(d.retry_after().map_or(u64::MAX, |w| {
        u64::try_from(w.as_nanos()).unwrap_or(u64::MAX)
    }));
    let (used, resets_ns) = match st.engine.usage(subject).await {
        Ok(levels) => levels
            .iter()
            .find(|l| l.metric == d.metric && l.window == d.window)
            .map_or((d.limit, fallback_reset), |l| {
                (l.used, l.reset_at.as_nanos().max(now.saturating_add(1)))
            }),
        Err(_) => (d.limit, fallback_reset),
    };
    let row = ApprovalRow {
        id: format!("apr_{}", crate::auth::random_hex(8)),
        created_ns: now,
        subject: subject.as_str().to_owned(),
        metric: d.metric.name().to_owned(),
        window: window.to_owned(),
        limit: d.limit,
        used,
        requested: asked.amounts,
        model: asked.model.map(str::to_owned),
        caller: asked.caller.to_owned(),
        resets_ns,
        status: "pending".into(),
        decided_ns: None,
        decided_by: None,
        reason: None,
        extra: None,
        until_ns: None,
    };
    let audit = Audit {
        kind: "approval.requested",
        subject: row.subject.clone(),
        actor: row.caller.clone(),
        detail: Some(
            json!({
                "approval_id": row.id,
                "metric": row.metric,
                "window": row.window,
                "limit": crate::wire::metric_value(d.metric, row.limit),
                "used": crate::wire::metric_value(d.metric, row.used),
                "model": row.model,
                "estimated_cost_usd": crate::wire::metric_value(Metric::CostUsd, row.requested.get(Metric::CostUsd)),
            })
            .to_string(),
        ),
    };
    match st.db.open_approval(&row, &audit).await {
        Ok(opened) => {
            if opened.id == row.id {
                tracing::warn!(
                    "{} reached its {} limit per {}: approval {} is pending (POST /v1/approvals/{}/approve)",
                    row.subject,
                    row.metric,
                    row.window,
                    row.id,
                    row.id
                );
                st.alerts
                    .approval_requested(subject, d, row.used, &row.id, now);
            }
            Some((opened.id, opened.resets_ns))
        }
        Err(e) => {
            tracing::warn!("opening an approval for {}: {e}", row.subject);
            None
        }
    }
}

/// Install the engine policy of `subject`: its own (or its tier's) raised
/// by the overrides in force, or the plain one when none is. The caller
/// holds `policy_write`.
pub fn apply(st: &AppState, subject: &str) {
    let Ok(s) = Subject::parse(subject) else {
        return;
    };
    let extra = st.approvals.extra(subject);
    let own = st
        .policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(subject)
        .map(|p| (*p.policy).clone());
    if extra == Amounts::ZERO {
        match own {
            Some(p) => st.engine.set_policy(&s, p),
            None => st.engine.remove_policy(&s),
        }
        return;
    }
    let Some(body) = crate::routes::policy_of(st, &s, |p| p.body.clone()) else {
        return;
    };
    match body.to_policy_with_extra(&extra) {
        Ok(p) => st.engine.set_policy(&s, p),
        Err(e) => tracing::warn!(
            "cannot raise {subject}'s policy by its override: {}",
            e.message
        ),
    }
}

/// After a policy change: reinstall every override (a tier's change reaches
/// the subjects it raises). The caller holds `policy_write`.
pub fn reapply_all(st: &AppState) {
    for subject in st.approvals.overridden() {
        apply(st, &subject);
    }
}

/// A decision taken on this replica: wake its parked requests, install its
/// override.
pub async fn decided_here(st: &AppState, row: &ApprovalRow) {
    {
        let _write = st.policy_write.lock().await;
        st.approvals.record(row);
        apply(st, &row.subject);
    }
    st.approvals.wake(row, st.now().as_nanos());
}

/// Rebuild from the database (at start, and on another replica's change
/// notice); the caller holds `policy_write`.
pub async fn reload(st: &AppState) -> Result<(), crate::db::DbError> {
    let now = st.now().as_nanos();
    let rows = st.db.live_approvals(now).await?;
    let before = st.approvals.overridden();
    {
        let mut inner = st.approvals.lock();
        inner.open.clear();
        inner.overrides.clear();
    }
    let live: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    for r in &rows {
        st.approvals.record(r);
    }
    {
        // Parked on an approval no longer live: it expired (or its override already ended).
        let mut inner = st.approvals.lock();
        for (id, w) in &mut inner.waiters {
            if w.decided_ns.is_none() && !live.contains(id.as_str()) {
                w.tx.send_replace(Phase::Expired);
                w.decided_ns = Some(now);
            }
        }
    }
    let mut subjects = before;
    subjects.extend(st.approvals.overridden());
    subjects.sort();
    subjects.dedup();
    for s in subjects {
        apply(st, &s);
    }
    for r in rows.iter().filter(|r| r.status != "pending") {
        let parked = st
            .approvals
            .lock()
            .waiters
            .get(&r.id)
            .is_some_and(|w| w.decided_ns.is_none());
        if parked {
            st.approvals.wake(r, now);
        }
    }
    Ok(())
}

/// Once a second: end overrides whose time is up, drop denials whose limit
/// has reset, expire pending approvals whose limit let requests through by
/// itself, forget old wake-ups.
pub async fn tick(st: &AppState) {
    let now = st.now().as_nanos();
    let (ended, expire) = {
        let mut inner = st.approvals.lock();
        let mut ended = Vec::new();
        for (subject, list) in &mut inner.overrides {
            let n = list.len();
            list.retain(|o| o.until_ns > now);
            if list.len() != n {
                ended.push(subject.clone());
            }
        }
        inner.overrides.retain(|_, l| !l.is_empty());
        inner.open.retain(|_, o| !(o.denied && o.resets_ns <= now));
        let expire = inner.open.values().any(|o| !o.denied && o.resets_ns <= now);
        inner.waiters.retain(|_, w| {
            w.decided_ns.is_none_or(|d| {
                now.saturating_sub(d) < KEEP_DECIDED_NS || w.tx.receiver_count() > 0
            })
        });
        (ended, expire)
    };
    if !ended.is_empty() {
        let _write = st.policy_write.lock().await;
        for s in &ended {
            tracing::info!("{s}: an approval's override ended");
            apply(st, s);
        }
    }
    if expire {
        match st.db.expire_approvals(now).await {
            Ok(_) => {
                let _write = st.policy_write.lock().await;
                if let Err(e) = reload(st).await {
                    tracing::warn!("reloading approvals: {e}");
                }
            }
            Err(e) => tracing::warn!("expiring approvals: {e}"),
        }
    }
}
