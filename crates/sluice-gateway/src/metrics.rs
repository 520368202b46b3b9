//! Prometheus text exposition, from atomics bumped on the request path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Decision endpoints.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    /// `POST /v1/check`.
    Check = 0,
    /// `POST /v1/reserve`.
    Reserve = 1,
    /// `POST /v1/reservations/{id}/commit`.
    Commit = 2,
    /// `POST /v1/reservations/{id}/release`.
    Release = 3,
    /// `POST /v1/intents`.
    Intent = 4,
}

const ENDPOINTS: [&str; 5] = ["check", "reserve", "commit", "release", "intent"];

/// Outcomes.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Allowed / settled.
    Allowed = 0,
    /// Refused with a retry-after.
    Denied = 1,
    /// Refused: larger than the limit.
    NeverFits = 2,
    /// A 4xx/5xx error.
    Error = 3,
}

const OUTCOMES: [&str; 4] = ["allowed", "denied", "never_fits", "error"];

/// Histogram bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    decisions: [[AtomicU64; 4]; 5],
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// Gauges read at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Reservations not yet settled.
    pub outstanding: u64,
    /// Ledger rows queued, not yet written.
    pub ledger_pending: u64,
    /// Ledger rows written since start.
    pub ledger_written: u64,
    /// Failed ledger write attempts since start.
    pub ledger_failures: u64,
    /// Wait of the oldest row of the last ledger batch, seconds.
    pub ledger_lag_s: f64,
    /// Policies.
    pub policies: u64,
    /// Live agent keys.
    pub keys: u64,
    /// Subjects with counter state in memory.
    pub subjects: u64,
    /// Idempotent answers held.
    pub idempotency: u64,
    /// Shared store calls that failed since start.
    pub store_errors: u64,
    /// Decisions made by the `on_store_error` fallback since start.
    pub store_fallbacks: u64,
    /// Decisions refused with 503 because the store failed since start.
    pub store_denied: u64,
    /// Requests held for a human's approval on this replica now.
    pub approvals_held: u64,
    /// Pending approvals this replica knows of.
    pub approvals_pending: u64,
    /// Subjects with an approval's override in force.
    pub overrides: u64,
    /// Upstream connections opened since start.
    pub upstream_opened: u64,
    /// Upstream connections parked for reuse now.
    pub upstream_idle: u64,
    /// Busy-polling spinners spinning now (0 when off or idle).
    pub busy_poll_spinning: u64,
}

impl Metrics {
    /// Count a decision and its latency.
    pub fn record(&self, endpoint: Endpoint, outcome: Outcome, latency_ns: u64) {
        self.decisions[endpoint as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
        let secs = latency_ns as f64 / 1e9;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(latency_ns, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        let _ = writeln!(
            s,
            "# HELP sluice_decisions_total Decisions by endpoint and outcome."
        );
        let _ = writeln!(s, "# TYPE sluice_decisions_total counter");
        for (e, name) in ENDPOINTS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let v = self.decisions[e][o].load(Ordering::Relaxed);
                let _ = writeln!(
                    s,
                    "sluice_decisions_total{{endpoint=\"{name}\",outcome=\"{outcome}\"}} {v}"
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP sluice_decision_duration_seconds Time to decide, from request to answer."
        );
        let _ = writeln!(s, "# TYPE sluice_decision_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                s,
                "sluice_decision_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "sluice_decision_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "sluice_decision_duration_seconds_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(s, "sluice_decision_duration_seconds_count {count}");
        for (name, help, kind, value) in [
            (
                "sluice_reservations_outstanding",
                "Reservations held and not yet settled.",
                "gauge",
                g.outstanding as f64,
            ),
            (
                "sluice_ledger_pending_rows",
                "Ledger rows queued and not yet written.",
                "gauge",
                g.ledger_pending as f64,
            ),
            (
                "sluice_ledger_lag_seconds",
                "How long the oldest row of the last ledger batch waited to be written.",
                "gauge",
                g.ledger_lag_s,
            ),
            (
                "sluice_ledger_rows_written_total",
                "Ledger rows written since start.",
                "counter",
                g.ledger_written as f64,
            ),
            (
                "sluice_ledger_write_failures_total",
                "Ledger write attempts that failed (each is retried).",
                "counter",
                g.ledger_failures as f64,
            ),
            (
                "sluice_policies",
                "Policies in force.",
                "gauge",
                g.policies as f64,
            ),
            (
                "sluice_agent_keys",
                "Live agent keys.",
                "gauge",
                g.keys as f64,
            ),
            (
                "sluice_subjects_in_memory",
                "Subjects with counter state in memory.",
                "gauge",
                g.subjects as f64,
            ),
            (
                "sluice_idempotency_entries",
                "Idempotent answers held.",
                "gauge",
                g.idempotency as f64,
            ),
            (
                "sluice_store_errors_total",
                "Calls to the shared limit store (Redis) that failed or timed out.",
                "counter",
                g.store_errors as f64,
            ),
            (
                "sluice_store_fallback_decisions_total",
                "Decisions made on this replica alone while the shared store failed (on_store_error allow or local).",
                "counter",
                g.store_fallbacks as f64,
            ),
            (
                "sluice_store_denied_total",
                "Decisions refused with 503 while the shared store failed (on_store_error deny).",
                "counter",
                g.store_denied as f64,
            ),
            (
                "sluice_approvals_held_requests",
                "Requests held open on this replica waiting for a human's approval (require_approval).",
                "gauge",
                g.approvals_held as f64,
            ),
            (
                "sluice_approvals_pending",
                "Pending approvals this replica knows of.",
                "gauge",
                g.approvals_pending as f64,
            ),
            (
                "sluice_approval_overrides",
                "Subjects whose limits an approval's override raises now.",
                "gauge",
                g.overrides as f64,
            ),
            (
                "sluice_upstream_connections_opened_total",
                "Connections opened to upstream providers (each reused while kept alive).",
                "counter",
                g.upstream_opened as f64,
            ),
            (
                "sluice_upstream_connections_idle",
                "Upstream connections parked for reuse.",
                "gauge",
                g.upstream_idle as f64,
            ),
            (
                "sluice_busy_poll_spinning",
                "Worker threads kept polling by busy_poll_ms now (0: off, or no recent requests).",
                "gauge",
                g.busy_poll_spinning as f64,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        s
    }
}
