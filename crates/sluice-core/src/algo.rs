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

/// The counter state of one limit of one subject, tagged with the store's
/// key for that limit (a `u32` that fits beside the enum's tag, so a slot is
/// 32 bytes in all).
#[derive(Clone, Debug)]
pub(crate) enum LimitState {
    Sliding(u32, SlidingState),
    Gcra(u32, GcraState),
    Fixed(u32, FixedState),
}

impl LimitState {
    pub(crate) fn new(limit: &Limit, key: u32) -> LimitState {
        match limit.params {
            Params::Sliding { .. } => LimitState::Sliding(key, SlidingState::default()),
            Params::Gcra { .. } => LimitState::Gcra(key, GcraState::default()),
            Params::FixedRolling { .. } | Params::FixedCalendar { .. } => {
                LimitState::Fixed(key, FixedState::default())
            }
        }
    }

    /// The store's key this state belongs to.
    pub(crate) fn key(&self) -> u32 {
        match self {
            LimitState::Sliding(k, _) | LimitState::Gcra(k, _) | LimitState::Fixed(k, _) => *k,
        }
    }

    /// Make sure the state's shape fits the limit (it always does, as state is
    /// keyed by algorithm; this keeps a mismatch from ever being a panic).
    fn conform(&mut self, limit: &Limit) {
        let fits = matches!(
            (&*self, &limit.params),
            (LimitState::Sliding(..), Params::Sliding { .. })
                | (LimitState::Gcra(..), Params::Gcra { .. })
                | (
                    LimitState::Fixed(..),
                    Params::FixedRolling { .. } | Params::FixedCalendar { .. }
                )
        );
        if !fits {
            *self = LimitState::new(limit, self.key());
        }
    }

    pub(crate) fn admit(&self, limit: &Limit, now: u64, amount: u64) -> Admit {
        if amount > limit.capacity() {
            return Admit::Never;
        }
        match (self, &limit.params) {
            (LimitState::Sliding(_, s), Params::Sliding { window, .. }) => {
                s.admit(*window, limit.limit(), now, amount)
            }
            (LimitState::Gcra(_, s), Params::Gcra { window, burst }) => {
                s.admit(*window, limit.limit(), *burst, now, amount)
            }
            (LimitState::Fixed(_, s), _) => s.admit(limit.limit(), now, amount),
            // A mismatched shape is treated as fresh state.
            _ => LimitState::new(limit, 0).admit(limit, now, amount),
        }
    }

    /// Take `amount` (even past the limit); the mark for a refund and the
    /// level right after.
    pub(crate) fn charge_level(&mut self, limit: &Limit, now: u64, amount: u64) -> (u64, Level) {
        self.conform(limit);
        let mark = match (&mut *self, &limit.params) {
            // GCRA reports its level from the same arithmetic.
            (LimitState::Gcra(_, s), Params::Gcra { window, burst }) => {
                return (
                    0,
                    s.charge_level(*window, limit.limit(), *burst, now, amount),
                );
            }
            (
                LimitState::Sliding(_, s),
                Params::Sliding {
                    window,
                    granularity,
                },
            ) => s.charge(*window, *granularity, now, amount),
            (LimitState::Fixed(_, s), params) => s.charge(params, now, amount),
            _ => 0,
        };
        (mark, self.level(limit, now))
    }

    /// Give back up to `amount` of a charge made with `mark`; what has already
    /// left the window is not given back (it no longer counts anyway).
    pub(crate) fn refund(&mut self, limit: &Limit, mark: u64, amount: u64) {
        match (self, &limit.params) {
            (LimitState::Sliding(_, s), Params::Sliding { granularity, .. }) => {
                s.refund(*granularity, mark, amount)
            }
            (LimitState::Gcra(_, s), Params::Gcra { window, .. }) => s.refund(*window, amount),
            (LimitState::Fixed(_, s), _) => s.refund(mark, amount),
            _ => {}
        }
    }

    pub(crate) fn level(&self, limit: &Limit, now: u64) -> Level {
        match (self, &limit.params) {
            (LimitState::Sliding(_, s), Params::Sliding { window, .. }) => {
                s.level(*window, limit.limit(), now)
            }
            (LimitState::Gcra(_, s), Params::Gcra { window, burst }) => {
                s.level(*window, *burst, now)
            }
            (LimitState::Fixed(_, s), params) => s.level(params, limit.limit(), now),
            _ => LimitState::new(limit, 0).level(limit, now),
        }
    }

    /// Whether this state is the same as fresh state at `now`, so it may be
    /// dropped. `window` is the rolling window of a `sliding` limit (the only
    /// state that does not know its own end).
    pub(crate) fn is_idle(&self, window: u64, now: u64) -> bool {
        match self {
            LimitState::Sliding(_, s) => s.idle_at(window) <= now,
            LimitState::Gcra(_, s) => s.idle_at(now) <= now,
            LimitState::Fixed(_, s) => s.idle_at() <= now,
        }
    }
}
