//! `gcra`: the generic cell rate algorithm, a token bucket kept as one number.
//!
//! Rate L per window W, burst B. The theoretical arrival time (TAT) is kept
//! scaled by L ("L-nanoseconds"), so one unit of amount is exactly W scaled
//! units and no rate is ever rounded. What is in the bucket at `t`,
//! `pending = max(TAT − t·L, 0)`, is then measured in units of W whatever the
//! rate, and an amount n fits iff `pending + n·W ≤ B·W`.
//!
//! The state remembers the rate it was scaled with. When a policy changes the
//! rate, what is pending carries over unchanged (the usage is kept) and drains
//! at the new rate from the next admitted request on.
//!
//! Limits and amounts are < 2^53 and times < 2^64 ns, so every product fits in u128.

use super::{Admit, Level};

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GcraState {
    /// TAT·scale, split in two words to keep the state 8-byte aligned.
    tat_hi: u64,
    tat_lo: u64,
    /// The rate L the TAT is scaled by; 0 for fresh state.
    scale: u64,
}

/// ⌈a / b⌉ for b > 0, with a u64 fast path (u128 division is slow).
fn div_ceil(a: u128, b: u64) -> u128 {
    match u64::try_from(a) {
        Ok(a) => u128::from(a.div_ceil(b)),
        Err(_) => a.div_ceil(u128::from(b)),
    }
}

impl GcraState {
    fn tat(&self) -> u128 {
        (u128::from(self.tat_hi) << 64) | u128::from(self.tat_lo)
    }

    /// What is in the bucket at `now`, in W-units (rate-independent).
    fn pending(&self, now: u64) -> u128 {
        self.tat()
            .saturating_sub(u128::from(now) * u128::from(self.scale))
    }

    fn store(&mut self, now: u64, rate: u64, pending: u128) {
        let tat = u128::from(now) * u128::from(rate) + pending;
        self.tat_hi = (tat >> 64) as u64;
        self.tat_lo = tat as u64;
        self.scale = rate;
    }

    pub(super) fn admit(&self, window: u64, rate: u64, burst: u64, now: u64, amount: u64) -> Admit {
        let w = u128::from(window);
        let need = self.pending(now) + u128::from(amount) * w;
        let cap = u128::from(burst) * w;
        if need <= cap {
            return Admit::Now;
        }
        // Pending drains by L per ns: the earliest t' with need − (t' − now)·L ≤ cap.
        let wait = div_ceil(need - cap, rate);
        Admit::At(u64::try_from(u128::from(now) + wait).unwrap_or(u64::MAX))
    }

    /// Take `amount` (even past the limit) and report the level after it,
    /// working out what is pending once.
    pub(super) fn charge_level(
        &mut self,
        window: u64,
        rate: u64,
        burst: u64,
        now: u64,
        amount: u64,
    ) -> Level {
        let pending = self.pending(now) + u128::from(amount) * u128::from(window);
        self.store(now, rate, pending);
        self.level_with(pending, window, burst, now)
    }

    pub(super) fn refund(&mut self, window: u64, amount: u64) {
        let tat = self
            .tat()
            .saturating_sub(u128::from(amount) * u128::from(window));
        self.tat_hi = (tat >> 64) as u64;
        self.tat_lo = tat as u64;
    }

    pub(super) fn level(&self, window: u64, burst: u64, now: u64) -> Level {
        self.level_with(self.pending(now), window, burst, now)
    }

    /// The level when `pending` is in the bucket at `now`.
    fn level_with(&self, pending: u128, window: u64, burst: u64, now: u64) -> Level {
        let used = u64::try_from(div_ceil(pending, window)).unwrap_or(u64::MAX);
        Level {
            used: used.min(burst),
            remaining: burst.saturating_sub(used),
            reset_at: self.empty_at(pending, now),
        }
    }

    /// When the bucket is empty at the rate it was last charged with
    /// (`now` if it already is).
    pub(super) fn idle_at(&self, now: u64) -> u64 {
        self.empty_at(self.pending(now), now)
    }

    /// When `pending` (at `now`) has drained. Divides only what is pending,
    /// which is small, not the whole scaled TAT.
    fn empty_at(&self, pending: u128, now: u64) -> u64 {
        if self.scale == 0 {
            return now;
        }
        let wait = u64::try_from(div_ceil(pending, self.scale)).unwrap_or(u64::MAX);
        now.saturating_add(wait)
    }
}
