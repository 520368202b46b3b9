//! The rows the database holds, as Rust values.

use super::*;

/// What a ledger row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// `POST /v1/check`: taken at once.
    Check,
    /// `POST /v1/intents`: one intent and its cost.
    Intent,
    /// `POST /v1/reserve`: held (amounts are the held amounts).
    Reserve,
    /// A reservation committed (amounts are the actual amounts).
    Commit,
    /// A reservation released (amounts are zero).
    Release,
    /// A lease ran out (amounts are the held amounts, now spent).
    Expire,
    /// Found unsettled at start after a crash, settled at its held amounts.
    Restart,
}

impl RowKind {
    /// Its name in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Check => "check",
            RowKind::Intent => "intent",
            RowKind::Reserve => "reserve",
            RowKind::Commit => "commit",
            RowKind::Release => "release",
            RowKind::Expire => "expire",
            RowKind::Restart => "restart",
        }
    }

    pub(super) fn parse(s: &str) -> Option<RowKind> {
        Some(match s {
            "check" => RowKind::Check,
            "intent" => RowKind::Intent,
            "reserve" => RowKind::Reserve,
            "commit" => RowKind::Commit,
            "release" => RowKind::Release,
            "expire" => RowKind::Expire,
            "restart" => RowKind::Restart,
            _ => return None,
        })
    }

    /// Whether the row's amounts are spend (rather than a hold or nothing).
    pub fn is_spend(self) -> bool {
        !matches!(self, RowKind::Reserve | RowKind::Release)
    }
}

/// One ledger row.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    /// When, ns since the epoch.
    pub ts_ns: u64,
    /// What happened.
    pub kind: RowKind,
    /// The reservation it belongs to.
    pub reservation: Option<String>,
    /// Every subject charged.
    pub subjects: Vec<String>,
    /// Amounts (see [`RowKind`]).
    pub amounts: Amounts,
    /// For settle rows: what the reservation held.
    pub held: Option<Amounts>,
    /// For settle rows: when the reservation was made.
    pub reserved_ns: Option<u64>,
    /// `admin` or the agent key id.
    pub caller: String,
    /// Request id (the intent id, the caller's trace id, ...).
    pub request_id: Option<String>,
    /// JSON details (intent type, overshoot, ...).
    pub detail: Option<String>,
}

/// A stored idempotent answer.
#[derive(Debug, Clone)]
pub struct IdemRow {
    /// caller + method + path + key.
    pub scope: String,
    /// When it was first answered.
    pub created_ns: u64,
    /// Hash of the request body.
    pub fingerprint: String,
    /// Status code.
    pub status: u16,
    /// Headers to replay, JSON `[[name, value], ...]`.
    pub headers: String,
    /// Body.
    pub body: Vec<u8>,
}

/// A stored agent key (its hash, never the key).
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// `key_...`.
    pub id: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The subject it acts for.
    pub subject: String,
    /// A label.
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    /// Created, ns.
    pub created_ns: u64,
}

/// An agent an operator stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Killed {
    /// The agent's address.
    pub subject: String,
    /// When, ns.
    pub since_ns: u64,
    /// Who: `admin` or a key id.
    pub actor: String,
    /// Why, if said.
    pub reason: Option<String>,
}

/// One entry of the mesh's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEvent {
    /// Order of its log.
    pub seq: i64,
    /// Its log: `mesh_events` (kills, resumes) or `audit` (breaches).
    pub source: String,
    /// When, ns.
    pub ts_ns: u64,
    /// `kill`, `resume` or `breach`.
    pub kind: String,
    /// The agent.
    pub subject: String,
    /// Who.
    pub actor: String,
    /// JSON details.
    pub detail: Option<String>,
}

/// An audit record to write: what happened to which subject, and who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// `policy.created`, `policy.changed`, `policy.deleted`, `key.created`,
    /// `key.revoked`, `agent.killed`, `agent.resumed`, `breach`.
    pub kind: &'static str,
    /// The subject it concerns.
    pub subject: String,
    /// `admin`, a key id, or `sluice` (the gateway itself).
    pub actor: String,
    /// JSON details (old and new policy, key id, limit, ...).
    pub detail: Option<String>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Order of the trail.
    pub seq: i64,
    /// When, ns.
    pub ts_ns: u64,
    /// What.
    pub kind: String,
    /// Which subject.
    pub subject: String,
    /// Who.
    pub actor: String,
    /// JSON details.
    pub detail: Option<String>,
}

/// Which audit records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this subject.
    pub subject: Option<String>,
    /// Only this kind (`policy` matches every `policy.*`).
    pub kind: Option<String>,
    /// At or after, ns.
    pub since_ns: Option<u64>,
    /// Before, ns.
    pub until_ns: Option<u64>,
    /// After this record (paging).
    pub after: i64,
    /// At most this many.
    pub limit: u32,
}

/// A request for a human's approval, and its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// `apr_...`.
    pub id: String,
    /// When it was asked for, ns.
    pub created_ns: u64,
    /// The subject whose limit refused.
    pub subject: String,
    /// The limit's metric name.
    pub metric: String,
    /// The limit's window (`1h`, `day`).
    pub window: String,
    /// The limit.
    pub limit: u64,
    /// Its usage when asked.
    pub used: u64,
    /// What the parked request asked for (its worst case on the proxy).
    pub requested: Amounts,
    /// The proxied request's model.
    pub model: Option<String>,
    /// Who asked (key id or `admin`).
    pub caller: String,
    /// When the limit would have let the request through by itself, ns.
    pub resets_ns: u64,
    /// `pending`, `approved`, `denied`, `expired`.
    pub status: String,
    /// When decided, ns.
    pub decided_ns: Option<u64>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why (denials).
    pub reason: Option<String>,
    /// The override granted: extra amounts on the subject's limits.
    pub extra: Option<Amounts>,
    /// Until when the override stands, ns.
    pub until_ns: Option<u64>,
}

/// An early warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    /// Its id (0 before it is stored).
    pub seq: i64,
    /// When the threshold was crossed, ns.
    pub ts_ns: u64,
    /// Whose limit.
    pub subject: String,
    /// Which metric.
    pub metric: String,
    /// Which window (`1h`, `day`).
    pub window: String,
    /// The threshold, in basis points of the limit (8000 = 80%).
    pub threshold_bp: u32,
    /// The window instance (fixed: its end, ns; rolling: now / W).
    pub window_key: u64,
    /// Used when crossed.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// `pending`, `delivered`, `failed`, or `recorded` (no webhooks).
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// When delivered, ns.
    pub delivered_ns: Option<u64>,
    /// The approval it announces (`require_approval`), if any.
    pub approval_id: Option<String>,
}

/// Spend of a subject over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    /// Sum of amounts.
    pub amounts: Amounts,
}
