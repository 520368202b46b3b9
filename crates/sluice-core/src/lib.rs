//! `sluice-core`: Sluice's limit engine.
//!
//! Exact limits on requests, tokens and dollars per subject, over rolling
//! (`sliding`, `gcra`) and calendar (`fixed`) windows; all-or-nothing
//! decisions across many subjects and limits; reservations that hold a worst
//! case and settle the actual. No I/O and no async runtime: time comes from a
//! [`Clock`], state lives in a [`Store`].
//!
//! ```
//! use sluice_core::*;
//! use std::time::Duration;
//!
//! let clock = ManualClock::new(Timestamp::from_secs(1_700_000_000));
//! let limiter = Limiter::new(&clock, MemoryStore::new(), LimiterConfig::default());
//! let agent = Subject::parse("agent://acme/prod/bot").unwrap();
//! let policy = Policy::new(&PolicyDef {
//!     limits: vec![LimitDef::new("requests", 2, "1m")],
//!     timezone: None,
//! })
//! .unwrap();
//! limiter.set_policy(&agent, policy);
//!
//! let one = Request::new([agent.clone()], Amounts::one_request());
//! assert!(limiter.check(&one).is_allowed());
//! assert!(limiter.check(&one).is_allowed());
//! let Decision::Denied(denial) = limiter.check(&one) else { panic!() };
//! // A sliding window may refuse up to one sub-window (here 1 s of 60) early, never late.
//! let wait = denial.retry_after().unwrap();
//! assert!(wait > Duration::from_secs(60) - Duration::from_secs(1) && wait < Duration::from_secs(61));
//! clock.advance(wait);
//! assert!(limiter.check(&one).is_allowed());
//! ```

mod algo;
#[cfg(feature = "conformance")]
pub mod conformance;
mod decision;
mod limiter;
mod memory;
mod metric;
mod policy;
mod store;
mod subject;
mod time;
mod window;

pub use decision::{
    Decision, Denial, DenialReason, ExpiredReservation, HeldAmount, LimitStatus, Overshoot,
    Request, Reservation, ReservationError, ReservationId, Settlement, Statuses,
};
pub use limiter::{Limiter, LimiterConfig, Plan, PolicyTable};
pub use memory::{MemoryStore, STATE_SHARDS};
pub use metric::{
    Amounts, MICROS_PER_USD, Metric, UnknownMetric, UsdError, micros_to_usd, usd_to_micros,
};
pub use policy::{
    AlgorithmKind, DEFAULT_SLIDING_BUCKETS, Limit, LimitDef, MAX_LIMIT, MAX_LIMITS_PER_POLICY,
    MAX_SLIDING_BUCKETS, Policy, PolicyDef, PolicyError, Shape,
};
pub use store::{
    Acquired, Admit, Hold, Level, LimitKey, PlanSubject, PlannedLimit, Refusal, Store,
};
pub use subject::{MAX_SUBJECT_LEN, Subject, SubjectError, SubjectKind};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use window::{
    CalendarUnit, MAX_ROLLING, MIN_ROLLING, UnknownTimeZone, Window, WindowError, time_zone,
};
