//! The counting algorithms as pure state machines over integer nanoseconds.
//!
//! Each state answers four questions for a limit at a time `now`: when would
//! `amount` fit ([`Admit`]), take it (returning a mark that locates the charge
//! for a later refund), give back a refund, and report usage. Nothing here
//! locks, allocates per call on the hot path, or reads a clock.

mod fixed;
mod gcra;
mod sliding;

pub(crate) use fixed::{FixedState, window_end};
pub(crate) use gcra::GcraState;
pub(crate) use sliding::SlidingState;

use crate::policy::{Limit, Params};

/// When an amount would fit under one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Now.
    Now,
    /// At this instant (ns) and not one nanosecond before, if nothing else happens.
    At(u64),
    /// Never: the amount is larger than the limit's capacity.
    Never,
}

/// Usage of one limit at one instant (times in ns since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Used now.
    pub used: u64,
    /// What a request could still take now.
    pub remaining: u64,
    /// When the current usage has fully drained (ns); `now` if nothing is used.
    pub reset_at: u64,
}

/// The counter state of one limit of one subject.
#[derive(Clone, Debug)]
pub(crate) enum LimitState {
    Sliding(SlidingState),
    Gcra(GcraState),
    Fixed(FixedState),
}

impl LimitState {
    pub(crate) fn new(limit: &Limit) -> LimitState {
        match limit.params {
            Params::Sliding { .. } => LimitState::Sliding(SlidingState::default()),
            Params::Gcra { .. } => LimitState::Gcra(GcraState::default()),
            Params::FixedRolling { .. } | Params::FixedCalendar { .. } => {
                LimitState::Fixed(FixedState::default())
            }
        }
    }

    /// Make sure the state's shape fits the limit (it always does, as state is
    /// keyed by algorithm; this keeps a mismatch from ever being a panic).
    fn conform(&mut self, limit: &Limit) {
        let fits = matches!(
            (&*self, &limit.params),
            (LimitState::Sliding(_), Params::Sliding { .. })
                | (LimitState::Gcra(_), Params::Gcra { .. })
                | (
                    LimitState::Fixed(_),
                    Params::FixedRolling { .. } | Params::FixedCalendar { .. }
                )
        );
        if !fits {
            *self = LimitState::new(limit);
        }
    }

    pub(crate) fn admit(&self, limit: &Limit, now: u64, amount: u64) -> Admit {
        if amount > limit.capacity() {
            return Admit::Never;
        }
        match (self, &limit.params) {
            (LimitState::Sliding(s), Params::Sliding { window, .. }) => {
                s.admit(*window, limit.limit(), now, amount)
            }
            (LimitState::Gcra(s), Params::Gcra { window, burst }) => {
                s.admit(*window, limit.limit(), *burst, now, amount)
            }
            (LimitState::Fixed(s), _) => s.admit(limit.limit(), now, amount),
            // A mismatched shape is treated as fresh state.
            _ => LimitState::new(limit).admit(limit, now, amount),
        }
    }

    /// Take `amount` (even past the limit) and return the mark for a refund.
    pub(crate) fn charge(&mut self, limit: &Limit, now: u64, amount: u64) -> u64 {
        self.conform(limit);
        match (self, &limit.params) {
            (
                LimitState::Sliding(s),
                Params::Sliding {
                    window,
                    granularity,
                },
            ) => s.charge(*window, *granularity, now, amount),
            (LimitState::Gcra(s), Params::Gcra { window, .. }) => {
                s.charge(*window, limit.limit(), now, amount)
            }
            (LimitState::Fixed(s), params) => s.charge(params, now, amount),
            _ => 0,
        }
    }

    /// Give back up to `amount` of a charge made with `mark`; what has already
    /// left the window is not given back (it no longer counts anyway).
    pub(crate) fn refund(&mut self, limit: &Limit, mark: u64, amount: u64) {
        match (self, &limit.params) {
            (LimitState::Sliding(s), Params::Sliding { granularity, .. }) => {
                s.refund(*granularity, mark, amount)
            }
            (LimitState::Gcra(s), Params::Gcra { window, .. }) => s.refund(*window, amount),
            (LimitState::Fixed(s), _) => s.refund(mark, amount),
            _ => {}
        }
    }

    pub(crate) fn level(&self, limit: &Limit, now: u64) -> Level {
        match (self, &limit.params) {
            (LimitState::Sliding(s), Params::Sliding { window, .. }) => {
                s.level(*window, limit.limit(), now)
            }
            (LimitState::Gcra(s), Params::Gcra { window, burst }) => s.level(*window, *burst, now),
            (LimitState::Fixed(s), params) => s.level(params, limit.limit(), now),
            _ => LimitState::new(limit).level(limit, now),
        }
    }

    /// The instant from which this state is the same as fresh state, so it may be dropped.
    pub(crate) fn idle_at(&self, limit: &Limit, now: u64) -> u64 {
        match (self, &limit.params) {
            (LimitState::Sliding(s), Params::Sliding { window, .. }) => s.idle_at(*window),
            (LimitState::Gcra(s), _) => s.idle_at(now),
            (LimitState::Fixed(s), _) => s.idle_at(),
            _ => 0,
        }
    }
}
