//! Early warnings: a policy's `alert_at` thresholds, raised once per
//! threshold per window and delivered to the configured webhooks off the
//! request path.
//!
//! A decision only compares the levels it already has against the
//! thresholds and, on a first crossing, puts one event on a bounded queue
//! (`try_send`: a full queue drops and counts, it never waits). A task stores
//! each event (one row per subject, limit, threshold and window, so replicas
//! that see the same crossing raise it once) and delivers it with retries;
//! the outcome is on the row (`GET /v1/alerts`) and in the audit trail.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sluice_core::{AlgorithmKind, LimitStatus, Metric, Subject, Window};
use tokio::sync::{Semaphore, mpsc};

use crate::db::{AlertRow, Audit};
use crate::server::{AppState, StoredPolicy};

/// Events waiting to be stored and delivered.
const QUEUE: usize = 10_000;
/// Deliveries in flight at once (a slow receiver holds one each).
const IN_FLIGHT: usize = 16;
/// Attempts per webhook, and the back-off between them.
const ATTEMPTS: u32 = 5;
const BACKOFF: Duration = Duration::from_secs(1);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which thresholds have fired, and the queue to the delivery task.
#[derive(Debug)]
pub struct Alerts {
    /// Whether any policy has `alert_at` (the decision path reads only this
    /// while none has).
    any: AtomicBool,
    /// (subject, metric, window, threshold) -> when it may fire again, ns.
    fired: Mutex<HashMap<(String, Metric, Window, u32), u64>>,
    tx: mpsc::Sender<AlertRow>,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl Alerts {
    /// The alerts and the receiving end for [`run`].
    pub fn new() -> (Alerts, mpsc::Receiver<AlertRow>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Alerts {
                any: AtomicBool::new(false),
                fired: Mutex::new(HashMap::new()),
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Note that some policy has thresholds.
    pub fn enable(&self) {
        self.any.store(true, Ordering::Release);
    }

    /// After an allowed decision: raise each threshold that `statuses`
    /// crosses for the first time in its window.
    pub fn observe(
        &self,
        policies: &RwLock<BTreeMap<String, StoredPolicy>>,
        subjects: &[Subject],
        statuses: &[LimitStatus],
        now_ns: u64,
    ) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let policies = policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in statuses {
            let Some(subject) = subjects.get(s.subject) else {
                continue;
            };
            let policy = policies
                .get(subject.as_str())
                .or_else(|| policies.get(Subject::wildcard(subject.kind()).as_str()));
            let Some(policy) = policy else { continue };
            if policy.body.alert_at.is_none() || s.limit == 0 {
                continue;
            }
            for bp in policy.body.alert_bp() {
                if u128::from(s.used) * 10_000 < u128::from(bp) * u128::from(s.limit) {
                    break; // ascending: the rest are higher
                }
                self.crossed(subject, s, bp, now_ns);
            }
        }
    }

    /// A limit of an `alert`-action policy refused and the request was let
    /// through: raise one breach alert per limit per window (threshold 0
    /// marks a breach rather than an early warning).
    pub fn breached(&self, subject: &Subject, d: &sluice_core::Denial, now_ns: u64) {
        let wait = d
            .retry_after()
            .map_or(0, |w| u64::try_from(w.as_nanos()).unwrap_or(u64::MAX));
        let status = LimitStatus {
            subject: 0,
            metric: d.metric,
            window: d.window,
            algorithm: match d.window {
                Window::Calendar(_) => AlgorithmKind::Fixed,
                Window::Rolling(_) => AlgorithmKind::Sliding,
            },
            limit: d.limit,
            used: d.limit,
            remaining: 0,
            reset_at: sluice_core::Timestamp::from_nanos(now_ns.saturating_add(wait.max(1))),
        };
        self.crossed(subject, &status, 0, now_ns);
    }

    fn crossed(&self, subject: &Subject, s: &LimitStatus, bp: u32, now_ns: u64) {
        let fixed = s.algorithm == AlgorithmKind::Fixed || matches!(s.window, Window::Calendar(_));
        let width = match s.window {
            Window::Rolling(ns) => ns.max(1),
            Window::Calendar(_) => 1,
        };
        // Fixed windows: until the window ends. Rolling: one window length.
        let (rearm, window_key) = if fixed {
            (s.reset_at.as_nanos(), s.reset_at.as_nanos())
        } else {
            (now_ns.saturating_add(width), now_ns / width)
        };
        let key = (subject.as_str().to_owned(), s.metric, s.window, bp);
        {
            let mut fired = self
                .fired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if fired.get(&key).is_some_and(|until| now_ns < *until) {
                return;
            }
            fired.retain(|_, until| *until > now_ns);
            fired.insert(key, rearm);
        }
        let row = AlertRow {
            seq: 0,
            ts_ns: now_ns,
            subject: subject.as_str().to_owned(),
            metric: s.metric.name().to_owned(),
            window: crate::wire::window_name(s.window).into_owned(),
            threshold_bp: bp,
            window_key,
            used: s.used,
            limit: s.limit,
            status: String::new(),
            attempts: 0,
            last_error: None,
            delivered_ns: None,
            approval_id: None,
        };
        self.send(row);
    }

    /// A request is held for a human: announce its approval (one event per
    /// approval, whatever the window).
    pub fn approval_requested(
        &self,
        subject: &Subject,
        d: &sluice_core::Denial,
        used: u64,
        approval_id: &str,
        now_ns: u64,
    ) {
        self.send(AlertRow {
            seq: 0,
            ts_ns: now_ns,
            subject: subject.as_str().to_owned(),
            metric: d.metric.name().to_owned(),
            window: crate::wire::window_name(d.window).into_owned(),
            threshold_bp: 0,
            // Unique per approval (the table's key), not per window.
            window_key: now_ns,
            used,
            limit: d.limit,
            status: String::new(),
            attempts: 0,
            last_error: None,
            delivered_ns: None,
            approval_id: Some(approval_id.to_owned()),
        });
    }

    fn send(&self, row: AlertRow) {
        if self.tx.try_send(row).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The delivery task: store each event once across replicas, then deliver it.
pub async fn run(state: Arc<AppState>, mut rx: mpsc::Receiver<AlertRow>) {
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(mut row) = rx.recv().await {
        row.status = if state.config.webhooks.is_empty() {
            "recorded".to_owned()
        } else {
            "pending".to_owned()
        };
        let seq = match state.db.insert_alert(&row).await {
            Ok(Some(seq)) => seq,
            Ok(None) => continue, // another replica raised this one
            Err(e) => {
                tracing::warn!("storing an alert for {}: {e}", row.subject);
                continue;
            }
        };
        row.seq = seq;
        if state.config.webhooks.is_empty() {
            continue;
        }
        let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
            return;
        };
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            deliver(&st, row).await;
            drop(permit);
        });
    }
}

/// The alert as JSON, and as Slack text.
fn bodies(row: &AlertRow, at: &str) -> (String, String) {
    let metric: Metric = row.metric.parse().unwrap_or(Metric::Requests);
    let used = crate::wire::metric_value(metric, row.used);
    let limit = crate::wire::metric_value(metric, row.limit);
    let (json, text) = if let Some(id) = &row.approval_id {
        (
            serde_json::json!({
                "type": "sluice.approval_requested",
                "id": row.seq,
                "approval_id": id,
                "subject": row.subject,
                "metric": row.metric,
                "window": row.window,
                "used": used,
                "limit": limit,
                "at": at,
            }),
            format!(
                "Sluice: {} reached its {} limit per {} ({}) at {at}; a request is held for approval {id}: `sluice approvals approve {id}` or `sluice approvals deny {id}`",
                row.subject, row.metric, row.window, limit
            ),
        )
    } else if row.threshold_bp == 0 {
        (
            serde_json::json!({
                "type": "sluice.breach",
                "id": row.seq,
                "subject": row.subject,
                "metric": row.metric,
                "window": row.window,
                "limit": limit,
                "action": "alert",
                "at": at,
            }),
            format!(
                "Sluice: {} went over its {} limit per {} ({}) at {at}; action alert: the request was let through",
                row.subject, row.metric, row.window, limit
            ),
        )
    } else {
        let money = |v: &serde_json::Value| {
            if metric == Metric::CostUsd {
                format!("${v}")
            } else {
                v.to_string()
            }
        };
        (
            serde_json::json!({
                "type": "sluice.alert",
                "id": row.seq,
                "subject": row.subject,
                "metric": row.metric,
                "window": row.window,
                "threshold": f64::from(row.threshold_bp) / 10_000.0,
                "used": used,
                "limit": limit,
                "at": at,
            }),
            format!(
                "Sluice: {} crossed {}% of its {} limit per {} ({} of {}) at {at}",
                row.subject,
                row.threshold_bp / 100,
                row.metric,
                row.window,
                money(&used),
                money(&limit),
            ),
        )
    };
    (
        json.to_string(),
        serde_json::json!({ "text": text }).to_string(),
    )
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(), // HMAC takes keys of any length
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

async fn deliver(st: &AppState, row: AlertRow) {
    let at = crate::wire::rfc3339(row.ts_ns);
    let (json_body, slack_body) = bodies(&row, &at);
    let mut attempts = 0;
    let mut errors: Vec<String> = Vec::new();
    let mut failed = false;
    for hook in &st.config.webhooks {
        let body = if hook.slack { &slack_body } else { &json_body };
        let mut delivered = false;
        for n in 0..ATTEMPTS {
            if n > 0 {
                tokio::time::sleep(BACKOFF * 2u32.pow(n - 1)).await;
            }
            attempts += 1;
            let mut req = st
                .http
                .post(&hook.url)
                .timeout(ATTEMPT_TIMEOUT)
                .header("content-type", "application/json")
                .header("x-sluice-alert-id", row.seq.to_string())
                .body(body.clone());
            if let Some(secret) = &hook.secret {
                req = req.header("x-sluice-signature", signature(secret, body.as_bytes()));
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => errors.push(format!(
                    "{}: HTTP {}",
                    crate::config::redact(&hook.url),
                    r.status()
                )),
                Err(e) => errors.push(format!(
                    "{}: {}",
                    crate::config::redact(&hook.url),
                    e.without_url()
                )),
            }
        }
        if !delivered {
            failed = true;
            tracing::warn!(
                "alert {} for {} not delivered to {} after {ATTEMPTS} attempts: {}",
                row.seq,
                row.subject,
                crate::config::redact(&hook.url),
                errors.last().map_or("", String::as_str)
            );
        }
    }
    let status = if failed { "failed" } else { "delivered" };
    let now = st.now().as_nanos();
    let last_error = errors.last().cloned();
    // The audit record first: whoever sees the alert's final status finds
    // its audit record too.
    let audit = Audit {
        kind: if failed { "alert.failed" } else { "alert.sent" },
        subject: row.subject.clone(),
        actor: "sluice".to_owned(),
        detail: Some(
            serde_json::json!({
                "alert": row.seq,
                "metric": row.metric,
                "window": row.window,
                "threshold": f64::from(row.threshold_bp) / 10_000.0,
                "attempts": attempts,
                "error": last_error,
            })
            .to_string(),
        ),
    };
    if let Err(e) = st.db.audit_many(&[(now, audit)]).await {
        tracing::warn!("auditing alert {}: {e}", row.seq);
    }
    if let Err(e) = st
        .db
        .update_alert(
            row.seq,
            status,
            attempts,
            last_error.as_deref(),
            (!failed).then_some(now),
        )
        .await
    {
        tracing::warn!("recording alert {}'s delivery: {e}", row.seq);
    }
}
