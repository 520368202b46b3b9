//! What the engine answers: being limited is a value, not an error.

use std::time::Duration;

use smallvec::SmallVec;

use crate::metric::Metric;
use crate::policy::AlgorithmKind;
use crate::subject::Subject;
use crate::time::Timestamp;
use crate::window::Window;

/// A request: every limit of every subject applies to its amounts.
#[derive(Clone, Debug)]
pub struct Request {
    /// Who is limited. Duplicates are counted once.
    pub subjects: SmallVec<[Subject; 4]>,
    /// How much of each metric.
    pub amounts: crate::metric::Amounts,
}

impl Request {
    /// A request for these subjects and amounts.
    pub fn new(
        subjects: impl IntoIterator<Item = Subject>,
        amounts: crate::metric::Amounts,
    ) -> Request {
        Request {
            subjects: subjects.into_iter().collect(),
            amounts,
        }
    }
}

/// One limit's state after a decision (or in a usage report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    /// Index into the request's subjects.
    pub subject: usize,
    /// What is counted.
    pub metric: Metric,
    /// The window.
    pub window: Window,
    /// The algorithm.
    pub algorithm: AlgorithmKind,
    /// The limit per window.
    pub limit: u64,
    /// Used now (for `gcra`: what is in the bucket, out of the burst).
    pub used: u64,
    /// What a request could still take now.
    pub remaining: u64,
    /// When the current usage will have fully drained (`fixed`: the window's end).
    pub reset_at: Timestamp,
}

/// Per-limit statuses, inline for up to four limits.
pub type Statuses = SmallVec<[LimitStatus; 4]>;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialReason {
    /// The exact earliest wait after which the same request would pass if
    /// nothing else happened. Never zero.
    RetryAfter(Duration),
    /// The request is larger than the limit's capacity: no wait helps.
    NeverFits {
        /// What was asked for.
        requested: u64,
        /// The most the limit can ever give one request.
        capacity: u64,
    },
}

/// The limit that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    /// Index into the request's subjects.
    pub subject: usize,
    /// What is counted.
    pub metric: Metric,
    /// The window.
    pub window: Window,
    /// The limit per window.
    pub limit: u64,
    /// Wait or never.
    pub reason: DenialReason,
}

impl Denial {
    /// The wait, if waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.reason {
            DenialReason::RetryAfter(d) => Some(d),
            DenialReason::NeverFits { .. } => None,
        }
    }
}

/// The answer to `check` and `peek`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every limit had room (and, for `check`, the amounts were taken).
    Allowed(Statuses),
    /// A limit refused; nothing was taken anywhere.
    Denied(Denial),
}

impl Decision {
    /// Whether the request was allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }
}

/// A reservation's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

/// Amounts held by `reserve` until commit, release or expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// When the lease runs out and the held amounts are settled as spent.
    pub expires_at: Timestamp,
    /// Statuses after holding.
    pub limits: Statuses,
}

/// A limit that a commit took past its limit (actual > held).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overshoot {
    /// The subject.
    pub subject: Subject,
    /// What is counted.
    pub metric: Metric,
    /// The window.
    pub window: Window,
    /// The limit per window.
    pub limit: u64,
    /// Used after the commit, more than the limit.
    pub used: u64,
}

/// What settling a reservation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Limits left over their limit by charging more than was held.
    pub overshoot: Vec<Overshoot>,
}

/// A held amount of one limit, as reported when a lease expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldAmount {
    /// The subject.
    pub subject: Subject,
    /// What is counted.
    pub metric: Metric,
    /// The window.
    pub window: Window,
    /// How much was held (and is now spent).
    pub amount: u64,
}

/// A lease that ran out and was settled at its held amounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredReservation {
    /// Its id.
    pub id: ReservationId,
    /// When it ran out.
    pub expires_at: Timestamp,
    /// What it held, now counted as spent.
    pub held: Vec<HeldAmount>,
}

/// A reservation that cannot be settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    /// Never existed, or already committed or released.
    #[error("unknown reservation {}: never issued, or already settled", .0.0)]
    Unknown(ReservationId),
    /// Its lease ran out; it was settled at the held amounts.
    #[error("reservation {} expired and was settled at its held amounts", .0.0)]
    Expired(ReservationId),
}
