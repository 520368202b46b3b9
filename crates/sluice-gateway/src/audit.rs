//! The audit trail's breach records, gathered off the request path.
//!
//! Every refusal is a breach, and a runaway loop makes thousands a second;
//! one record per (subject, limit) per flush interval (1 s) carries how many
//! refusals it stands for, so the trail stays readable and the decision path
//! only bumps a counter in a map. Admin changes (policies, keys, the kill
//! switch) are written with the change itself, in its transaction
//! (`crate::db`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::{Denial, Subject};

use crate::db::Audit;

/// At most this many distinct (subject, limit) pairs wait for one flush;
/// refusals beyond are counted in one `breach.dropped` record.
const MAX_PENDING: usize = 65_536;

#[derive(Debug)]
struct Pending {
    first_ns: u64,
    last_ns: u64,
    refusals: u64,
    limit: u64,
    action: &'static str,
    endpoint: &'static str,
    caller: String,
}

/// Refusals waiting to be written.
#[derive(Debug, Default)]
pub struct Breaches {
    pending: Mutex<HashMap<(String, sluice_core::Metric, String), Pending>>,
    dropped: AtomicU64,
}

impl Breaches {
    /// Note a refusal by `denial` of a request on `subjects`, and the
    /// action taken (`block`; the proxy tries the next model on a provider
    /// quota: `next_model`).
    pub fn record(
        &self,
        denial: &Denial,
        subjects: &[Subject],
        endpoint: &'static str,
        action: &'static str,
        caller: &str,
        now_ns: u64,
    ) {
        let subject = subjects
            .get(denial.subject)
            .map(Subject::as_str)
            .unwrap_or("")
            .to_owned();
        let key = (
            subject,
            denial.metric,
            crate::wire::window_name(denial.window).into_owned(),
        );
        let mut map = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let len = map.len();
        match map.get_mut(&key) {
            Some(p) => {
                p.refusals += 1;
                p.last_ns = now_ns;
            }
            None if len >= MAX_PENDING => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                map.insert(
                    key,
                    Pending {
                        first_ns: now_ns,
                        last_ns: now_ns,
                        refusals: 1,
                        limit: denial.limit,
                        action,
                        endpoint,
                        caller: caller.to_owned(),
                    },
                );
            }
        }
    }

    /// Take what waits, as audit records.
    pub fn drain(&self) -> Vec<(u64, Audit)> {
        let map = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut out: Vec<(u64, Audit)> = map
            .into_iter()
            .map(|((subject, metric, window), p)| {
                let detail = serde_json::json!({
                    "metric": metric.name(),
                    "window": window,
                    "limit": crate::wire::metric_value(metric, p.limit),
                    "action": p.action,
                    "refusals": p.refusals,
                    "first_at": crate::wire::rfc3339(p.first_ns),
                    "last_at": crate::wire::rfc3339(p.last_ns),
                    "endpoint": p.endpoint,
                });
                (
                    p.first_ns,
                    Audit {
                        kind: "breach",
                        subject,
                        actor: p.caller,
                        detail: Some(detail.to_string()),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.subject.cmp(&b.1.subject)));
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.push((
                out.last().map_or(0, |l| l.0),
                Audit {
                    kind: "breach.dropped",
                    subject: "global".to_owned(),
                    actor: "sluice".to_owned(),
                    detail: Some(serde_json::json!({ "refusals": dropped }).to_string()),
                },
            ));
        }
        out
    }
}
