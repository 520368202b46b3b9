//! `fixed`: a count that resets exactly at the window's end, for calendar
//! windows (in the policy's zone) and epoch-aligned rolling durations.

use super::{Admit, Level};
use crate::policy::Params;
use crate::time::Timestamp;
use crate::window::calendar_bounds;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FixedState {
    /// End of the window `used` belongs to (ns, exclusive).
    window_end: u64,
    used: u64,
}

/// The end of the window containing `now`.
pub(crate) fn window_end(params: &Params, now: u64) -> u64 {
    match params {
        Params::FixedCalendar { unit, tz } => {
            calendar_bounds(*unit, tz, Timestamp::from_nanos(now)).1
        }
        Params::FixedRolling { window }
        | Params::Sliding { window, .. }
        | Params::Gcra { window, .. } => (now - now % window).saturating_add(*window),
    }
}

impl FixedState {
    fn used(&self, now: u64) -> u64 {
        if now < self.window_end { self.used } else { 0 }
    }

    pub(super) fn admit(&self, limit: u64, now: u64, amount: u64) -> Admit {
        if self.used(now) <= limit - amount {
            Admit::Now
        } else {
            // The count resets at the boundary and amount <= limit.
            Admit::At(self.window_end)
        }
    }

    pub(super) fn charge(&mut self, params: &Params, now: u64, amount: u64) -> u64 {
        if now >= self.window_end {
            self.window_end = window_end(params, now);
            self.used = 0;
        }
        self.used = self.used.saturating_add(amount);
        self.window_end
    }

    pub(super) fn refund(&mut self, mark: u64, amount: u64) {
        if mark == self.window_end {
            self.used = self.used.saturating_sub(amount);
        }
    }

    pub(super) fn level(&self, params: &Params, limit: u64, now: u64) -> Level {
        let used = self.used(now);
        let reset_at = if now < self.window_end {
            self.window_end
        } else {
            window_end(params, now)
        };
        Level {
            used,
            remaining: limit.saturating_sub(used),
            reset_at,
        }
    }

    pub(super) fn idle_at(&self) -> u64 {
        self.window_end
    }
}
