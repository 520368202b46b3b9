//! Helpers shared by the engine's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use sluice_core::*;

/// 2027-01-15T08:00:00Z: a fixed start far from any calendar edge.
pub const T0: u64 = 1_800_000_000 * 1_000_000_000;

pub type TestLimiter<'a> = Limiter<&'a ManualClock, MemoryStore>;

pub fn limiter(clock: &ManualClock) -> TestLimiter<'_> {
    Limiter::new(clock, MemoryStore::new(), LimiterConfig::default())
}

pub fn subject(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

pub fn policy(limits: Vec<LimitDef>, tz: Option<&str>) -> Policy {
    Policy::new(&PolicyDef {
        limits,
        timezone: tz.map(str::to_owned),
    })
    .unwrap()
}

pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap()
}

/// Checks that a denial's retry-after is exact: the same request is refused
/// 1 ns before it and passes at it (peek changes nothing).
pub fn assert_exact_retry(
    clock: &ManualClock,
    limiter: &TestLimiter<'_>,
    request: &Request,
    retry: Duration,
) {
    let now = clock.now();
    assert!(retry > Duration::ZERO);
    clock.set(now.saturating_add(retry - Duration::from_nanos(1)));
    assert!(
        !limiter.peek(request).is_allowed(),
        "passes 1 ns before retry_after {retry:?}"
    );
    clock.set(now.saturating_add(retry));
    assert!(
        limiter.peek(request).is_allowed(),
        "refused at retry_after {retry:?}"
    );
    clock.set(now);
}
