//! The storage boundary: where counter state and reservations live.
//!
//! A [`Store`] sees a resolved plan (each subject with its limits and their
//! state keys) and the request's amounts; it decides all-or-nothing, holds and
//! settles. The engine's [`crate::Limiter`] resolves policies and time, then
//! calls one of these methods per request. The in-memory store is
//! [`crate::MemoryStore`]; a shared store (Redis) implements the same contract
//! with the same algorithms.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::decision::{ExpiredReservation, ReservationError, ReservationId, Settlement};
use crate::metric::Amounts;
use crate::policy::Limit;
use crate::subject::Subject;

pub use crate::algo::{Admit, Level};

/// Identifies a limit's counter state across policy versions (interned by the
/// limiter from metric, window, algorithm and their shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitKey(pub u32);

/// A limit with its state key.
#[derive(Clone, Debug)]
pub struct PlannedLimit {
    /// The state key.
    pub key: LimitKey,
    /// The limit.
    pub limit: Arc<Limit>,
}

/// One subject of a request with the limits that apply to it.
#[derive(Clone, Copy, Debug)]
pub struct PlanSubject<'a> {
    /// The subject.
    pub subject: &'a Subject,
    /// Its index in the request.
    pub index: usize,
    /// Its limits.
    pub limits: &'a [PlannedLimit],
}

/// What `acquire` should keep after taking the amounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Nothing: the amounts are spent (`check`).
    Spend,
    /// Nothing, and without deciding: the amounts are charged even past
    /// every limit (replaying a ledger; letting a request through on purpose).
    Force,
    /// A reservation whose lease runs out at this instant (ns).
    Lease {
        /// Lease end, ns since the epoch.
        expires_at: u64,
    },
}

/// Amounts taken: levels in plan order (subject by subject, limit by limit).
#[derive(Clone, Debug, Default)]
pub struct Acquired {
    /// The reservation, for [`Hold::Lease`].
    pub reservation: Option<ReservationId>,
    /// One level per planned limit, in plan order.
    pub levels: SmallVec<[Level; 4]>,
}

/// The limit that refused, and when the request would fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Index into the plan.
    pub plan_subject: usize,
    /// Index into that subject's limits.
    pub limit: usize,
    /// `At(t)` (the latest over every refusing limit) or `Never`.
    pub admit: Admit,
}

/// Where limit state lives. Every method is atomic with respect to the others.
pub trait Store: Send + Sync {
    /// If every limit of every subject fits `amounts` at `now`, take them all
    /// (and hold them under a lease); otherwise change nothing and say which
    /// limit refused.
    fn acquire(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
        hold: Hold,
    ) -> Result<Acquired, Refusal>;

    /// As `acquire`, without taking anything.
    fn peek(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Result<SmallVec<[Level; 4]>, Refusal>;

    /// Settle a reservation: `Some(actual)` commits (refunding what was held
    /// beyond it, charging what exceeds it even past the limit), `None`
    /// releases everything.
    fn settle(
        &self,
        now: u64,
        id: ReservationId,
        actual: Option<&Amounts>,
    ) -> Result<Settlement, ReservationError>;

    /// Settle every lease that has run out by `now` at its held amounts.
    fn expire(&self, now: u64) -> Vec<ExpiredReservation>;

    /// Drop state that is the same as fresh; returns how many subjects were dropped.
    fn sweep(&self, now: u64) -> usize;

    /// Reservations not yet settled.
    fn outstanding(&self) -> usize;
}
