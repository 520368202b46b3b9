//! `sliding`: a rolling window of length W cut into sub-windows ("buckets") of
//! length g = ⌈W / buckets⌉, aligned to the epoch.
//!
//! Each bucket keeps the amount charged in it and the time of its latest
//! charge, and counts until that time has left the window `(now − W, now]`.
//! Every event admitted in the last W is therefore counted (the limit is never
//! exceeded in any window of length W), and the error is one-sided: an amount
//! charged earlier in a bucket than the bucket's latest charge is counted for
//! up to g − 1 ns after it has really left, so a request may be refused up to
//! one bucket (W / buckets) early, never admitted late. A burst inside one
//! bucket (the common case) is exact.
//!
//! Only non-empty buckets are stored, oldest first; at most `buckets + 1`.

use smallvec::SmallVec;

use super::{Admit, Level};

#[derive(Clone, Debug, Default)]
pub(crate) struct SlidingState {
    /// (time of the bucket's latest charge, amount), ascending. A bucket's
    /// index is `latest / g`.
    buckets: SmallVec<[(u64, u64); 1]>,
}

/// The first instant at which a bucket whose latest charge was at `latest`
/// no longer counts.
fn expires_at(latest: u64, window: u64) -> u64 {
    latest.saturating_add(window)
}

impl SlidingState {
    fn counted(&self, window: u64, now: u64) -> impl Iterator<Item = &(u64, u64)> {
        self.buckets
            .iter()
            .filter(move |(latest, _)| now < expires_at(*latest, window))
    }

    fn used(&self, window: u64, now: u64) -> u64 {
        self.counted(window, now)
            .fold(0u64, |sum, (_, amount)| sum.saturating_add(*amount))
    }

    pub(super) fn admit(&self, window: u64, limit: u64, now: u64, amount: u64) -> Admit {
        let used = self.used(window, now);
        let allowed = limit - amount; // amount <= capacity == limit, checked by the caller
        if used <= allowed {
            return Admit::Now;
        }
        // Wait for the oldest buckets to leave until enough has been freed.
        let mut left = used;
        for &(latest, bucket) in self.counted(window, now) {
            left = left.saturating_sub(bucket);
            if left <= allowed {
                return Admit::At(expires_at(latest, window));
            }
        }
        Admit::Never // unreachable: once every bucket has left, `left` is 0
    }

    pub(super) fn charge(&mut self, window: u64, granularity: u64, now: u64, amount: u64) -> u64 {
        let stale = self
            .buckets
            .iter()
            .take_while(|(latest, _)| now >= expires_at(*latest, window))
            .count();
        if stale > 0 {
            self.buckets.drain(..stale);
        }
        match self.buckets.last_mut() {
            Some((latest, sum)) if *latest / granularity == now / granularity => {
                *latest = (*latest).max(now);
                *sum = sum.saturating_add(amount);
                *latest / granularity
            }
            // A clock that stepped back: charge the newest bucket, which
            // expires later (conservative).
            Some((latest, sum)) if *latest > now => {
                *sum = sum.saturating_add(amount);
                *latest / granularity
            }
            _ => {
                self.buckets.push((now, amount));
                now / granularity
            }
        }
    }

    /// Refund from the bucket with index `mark`; its latest time stays (conservative).
    pub(super) fn refund(&mut self, granularity: u64, mark: u64, amount: u64) {
        if let Some(pos) = self
            .buckets
            .iter()
            .position(|(latest, _)| latest / granularity == mark)
        {
            let sum = &mut self.buckets[pos].1;
            *sum = sum.saturating_sub(amount);
            if *sum == 0 {
                self.buckets.remove(pos);
            }
        }
    }

    pub(super) fn level(&self, window: u64, limit: u64, now: u64) -> Level {
        let used = self.used(window, now);
        let reset_at = self
            .counted(window, now)
            .last()
            .map_or(now, |(latest, _)| expires_at(*latest, window));
        Level {
            used,
            remaining: limit.saturating_sub(used),
            reset_at,
        }
    }

    pub(super) fn idle_at(&self, window: u64) -> u64 {
        self.buckets
            .last()
            .map_or(0, |(latest, _)| expires_at(*latest, window))
    }
}
