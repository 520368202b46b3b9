//! The engine's property tests, generic over the [`Store`]: every store
//! (in memory here, Redis in `sluice-redis`) is held to the same brute-force
//! reference models. Enabled by the `conformance` feature; each function runs
//! `cases` random cases on fresh stores from `store` and panics on the first
//! failure (with proptest's shrunk counterexample).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "a test suite: failing loudly is its job"
)]

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::*;

const SEC: u64 = 1_000_000_000;

/// 2027-01-15T08:00:00Z: a fixed start far from any calendar edge.
pub const T0: u64 = 1_800_000_000 * 1_000_000_000;

fn run<T: Strategy>(cases: u32, strategy: T, test: impl Fn(T::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn limiter<S: Store>(clock: &ManualClock, store: S) -> Limiter<&ManualClock, S> {
    Limiter::new(clock, store, LimiterConfig::default())
}

fn subject(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

fn policy(limits: Vec<LimitDef>, tz: Option<&str>) -> Policy {
    Policy::new(&PolicyDef {
        limits,
        timezone: tz.map(str::to_owned),
    })
    .unwrap()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap()
}

/// Checks that a denial's retry-after is exact: the same request is refused
/// 1 ns before it and passes at it (peek changes nothing).
pub fn assert_exact_retry<S: Store>(
    clock: &ManualClock,
    limiter: &Limiter<&ManualClock, S>,
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

/// Every test of the suite, `cases` cases each.
pub fn all<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    sliding_never_exceeds_and_retry_is_exact(cases, store);
    gcra_matches_reference(cases, store);
    calendar_windows_reset_exactly_at_boundaries(cases, store);
    multi_limit_requests_are_all_or_nothing(cases, store);
    reservations_conserve_amounts(cases, store);
}

/// `sliding` never admits more than the limit in any window of length W,
/// its retry_after is exact, and it is never more than one sub-window
/// later than an exact sliding log's.
pub fn sliding_never_exceeds_and_retry_is_exact<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    run(
        cases,
        (
            prop::sample::select(vec![1u64, 10, 60, 3_600]),
            1u32..=30,
            1u64..=40,
            prop::collection::vec((0u64..600, 1u64..=12), 1..120),
        ),
        |(window_s, buckets, limit, ops)| {
            let w = window_s * SEC;
            let g = w.div_ceil(u64::from(buckets));
            let clock = ManualClock::new(Timestamp::from_nanos(T0 + 12_345));
            let limiter = limiter(&clock, store());
            let who = subject("user:s");
            limiter.set_policy(
                &who,
                policy(
                    vec![
                        LimitDef::new("requests", limit, &format!("{window_s}s")).buckets(buckets),
                    ],
                    None,
                ),
            );
            let mut log: Vec<(u64, u64)> = Vec::new();
            for (frac, amount) in ops {
                clock.advance(Duration::from_nanos(w / 1_000 * frac + frac));
                let now = clock.now().as_nanos();
                let request =
                    Request::new([who.clone()], Amounts::ZERO.with(Metric::Requests, amount));
                match limiter.check(&request) {
                    Decision::Allowed(_) => log.push((now, amount)),
                    Decision::Denied(denial) => match denial.reason {
                        DenialReason::NeverFits {
                            requested,
                            capacity,
                        } => {
                            prop_assert!(amount > limit);
                            prop_assert_eq!((requested, capacity), (amount, limit));
                        }
                        DenialReason::RetryAfter(retry) => {
                            prop_assert!(amount <= limit);
                            assert_exact_retry(&clock, &limiter, &request, retry);
                            // The exact sliding log's earliest time.
                            let fits = |t: u64| {
                                let in_window: u64 =
                                    log.iter().filter(|(s, _)| *s + w > t).map(|(_, a)| a).sum();
                                in_window + amount <= limit
                            };
                            let exact = std::iter::once(now)
                                .chain(log.iter().map(|(s, _)| s + w))
                                .filter(|&t| t >= now && fits(t))
                                .min()
                                .unwrap();
                            let at = now + nanos(retry);
                            prop_assert!(at >= exact, "admits before the exact log would");
                            prop_assert!(
                                at < exact + g,
                                "more than one sub-window late: at {at}, exact {exact}, g {g}"
                            );
                        }
                    },
                }
            }
            for &(t, _) in &log {
                let sum: u64 = log
                    .iter()
                    .filter(|(s, _)| *s <= t && *s + w > t)
                    .map(|(_, a)| a)
                    .sum();
                prop_assert!(sum <= limit, "window ending at {t} holds {sum} > {limit}");
            }
            Ok(())
        },
    );
}

/// `gcra` matches a reference continuous-state leaky bucket exactly:
/// decisions, retry-after, and the status an allowed request reports.
pub fn gcra_matches_reference<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    run(
        cases,
        (
            prop::sample::select(vec![1u64, 60, 3_600, 86_400]),
            1u64..=1_000,
            1u64..=200,
            prop::collection::vec((0u64..2_000, 1u64..=100), 1..150),
        ),
        |(window_s, rate, burst_frac, ops)| {
            let w = window_s * SEC;
            let burst = (rate * burst_frac / 100).max(1);
            let clock = ManualClock::new(Timestamp::from_nanos(T0 + 777));
            let limiter = limiter(&clock, store());
            let who = subject("key:g");
            limiter.set_policy(
                &who,
                policy(
                    vec![
                        LimitDef::new("tokens", rate, &format!("{window_s}s"))
                            .algorithm("gcra")
                            .burst(burst),
                    ],
                    None,
                ),
            );
            // Reference: bucket level in (ns · rate) units, drained by `rate` per ns.
            let (l, wu, cap) = (
                u128::from(rate),
                u128::from(w),
                u128::from(burst) * u128::from(w),
            );
            let (mut level, mut last) = (0u128, clock.now().as_nanos());
            for (step, pct) in ops {
                clock.advance(Duration::from_nanos(w / rate * step / 100 + step));
                let now = clock.now().as_nanos();
                let n = (burst * pct / 90).max(1);
                let drained = level.saturating_sub(u128::from(now - last) * l);
                let expected = if n > burst {
                    None
                } else if drained + u128::from(n) * wu <= cap {
                    Some(Duration::ZERO)
                } else {
                    let wait = (drained + u128::from(n) * wu - cap).div_ceil(l);
                    Some(Duration::from_nanos(u64::try_from(wait).unwrap()))
                };
                let request = Request::new([who.clone()], Amounts::ZERO.with_tokens(n, 0));
                match (limiter.check(&request), expected) {
                    (Decision::Allowed(statuses), Some(Duration::ZERO)) => {
                        level = drained + u128::from(n) * wu;
                        last = now;
                        // The status after the charge: what is in the bucket
                        // (in whole units, rounded up), what is left of the
                        // burst, and when the bucket is empty again.
                        let used = u64::try_from(level.div_ceil(wu)).unwrap();
                        let empty = now + u64::try_from(level.div_ceil(l)).unwrap();
                        prop_assert_eq!(statuses.len(), 1);
                        prop_assert_eq!(statuses[0].used, used.min(burst));
                        prop_assert_eq!(statuses[0].remaining, burst.saturating_sub(used));
                        prop_assert_eq!(statuses[0].reset_at, Timestamp::from_nanos(empty));
                    }
                    (Decision::Denied(d), Some(wait)) if wait > Duration::ZERO => {
                        prop_assert_eq!(d.retry_after(), Some(wait));
                        assert_exact_retry(&clock, &limiter, &request, wait);
                    }
                    (Decision::Denied(d), None) => {
                        prop_assert_eq!(
                            d.reason,
                            DenialReason::NeverFits {
                                requested: n,
                                capacity: burst
                            }
                        );
                    }
                    (got, want) => prop_assert!(false, "engine {got:?}, reference {want:?}"),
                }
            }
            Ok(())
        },
    );
}

/// Calendar windows reset exactly at their boundary in a non-UTC zone,
/// across DST changes and month ends.
pub fn calendar_windows_reset_exactly_at_boundaries<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    run(
        cases,
        (
            prop::sample::select(vec![
                "America/New_York",
                "Europe/Berlin",
                "Australia/Sydney",
                "Asia/Kolkata",
            ]),
            prop::sample::select(vec!["hour", "day", "week", "month"]),
            prop::sample::select(vec![
                "2026-03-07T20:00:00Z",
                "2026-03-28T20:00:00Z",
                "2026-04-04T10:00:00Z",
                "2026-10-24T20:00:00Z",
                "2026-10-31T20:00:00Z",
                "2026-01-31T20:00:00Z",
                "2028-02-28T20:00:00Z",
            ]),
            1u64..=6,
            prop::collection::vec((0u64..=100, 1u64..=3), 1..100),
        ),
        |(zone, unit, start, limit, ops)| {
            let tz = time_zone(zone).unwrap();
            let start: jiff::Timestamp = start.parse().unwrap();
            let clock = ManualClock::new(Timestamp::from_nanos(
                u64::try_from(start.as_nanosecond()).unwrap(),
            ));
            let limiter = limiter(&clock, store());
            let who = subject("team:cal");
            limiter.set_policy(
                &who,
                policy(vec![LimitDef::new("requests", limit, unit)], Some(zone)),
            );
            let step = match unit {
                "hour" => 60 * SEC,
                "day" => 30 * 60 * SEC,
                _ => 4 * 3_600 * SEC,
            };
            // Reference: the civil period an instant falls in, computed independently.
            let period = |t: u64| -> String {
                let z = jiff::Timestamp::from_nanosecond(i128::from(t))
                    .unwrap()
                    .to_zoned(tz.clone());
                match unit {
                    "hour" => format!("{} {}", z.datetime().strftime("%Y-%m-%d %H"), z.offset()),
                    "day" => z.date().to_string(),
                    "week" => {
                        let w = z.date().iso_week_date();
                        format!("{}-W{}", w.year(), w.week())
                    }
                    _ => z.date().strftime("%Y-%m").to_string(),
                }
            };
            let mut counts: HashMap<String, u64> = HashMap::new();
            for (frac, amount) in ops {
                clock.advance(Duration::from_nanos(step * frac / 10));
                let now = clock.now().as_nanos();
                let key = period(now);
                let used = counts.get(&key).copied().unwrap_or(0);
                let request =
                    Request::new([who.clone()], Amounts::ZERO.with(Metric::Requests, amount));
                match limiter.check(&request) {
                    Decision::Allowed(_) => {
                        prop_assert!(used + amount <= limit, "{key}: admitted past the limit");
                        *counts.entry(key).or_default() += amount;
                    }
                    Decision::Denied(d) => {
                        prop_assert!(used + amount > limit, "{key}: refused with room left");
                        if let Some(retry) = d.retry_after() {
                            let at = now + nanos(retry);
                            prop_assert_eq!(
                                period(at - 1),
                                key.clone(),
                                "reset before the boundary"
                            );
                            prop_assert_ne!(period(at), key, "no reset at the boundary");
                            assert_exact_retry(&clock, &limiter, &request, retry);
                        }
                    }
                }
            }
            Ok(())
        },
    );
}

/// A request over several subjects and limits is all-or-nothing: refused,
/// no counter anywhere moves; allowed, every limit moves by its amount.
pub fn multi_limit_requests_are_all_or_nothing<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    run(
        cases,
        prop::collection::vec(
            (0u8..8, 0u64..=4, 0u64..=300, 0u64..=3_000, 0u64..=50),
            1..100,
        ),
        |ops| {
            let clock = ManualClock::new(Timestamp::from_nanos(T0));
            let limiter = limiter(&clock, store());
            let subjects = [
                subject("agent://acme/prod/a"),
                subject("user:u"),
                subject("model:m"),
            ];
            limiter.set_policy(
                &subjects[0],
                policy(
                    vec![
                        LimitDef::new("requests", 10, "1m"),
                        LimitDef::new("tokens", 1_000, "1h")
                            .algorithm("gcra")
                            .burst(600),
                        LimitDef::new("cost_usd", 5_000, "day"),
                    ],
                    Some("Europe/Berlin"),
                ),
            );
            limiter.set_policy(
                &subjects[1],
                policy(
                    vec![
                        LimitDef::new("requests", 6, "30s").buckets(3),
                        LimitDef::new("input_tokens", 800, "10m").algorithm("fixed"),
                    ],
                    None,
                ),
            );
            limiter.set_policy(
                &Subject::wildcard(SubjectKind::Model),
                policy(vec![LimitDef::new("output_tokens", 2_000, "1m")], None),
            );
            let usage = |limiter: &Limiter<&ManualClock, S>| -> Vec<Vec<LimitStatus>> {
                subjects.iter().map(|s| limiter.usage(s)).collect()
            };
            for (mask, requests, input, output, cost) in ops {
                let who: Vec<Subject> = subjects
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| s.clone())
                    .collect();
                let amounts = Amounts::ZERO
                    .with(Metric::Requests, requests)
                    .with_tokens(input, output)
                    .with_cost_micros(cost * 100);
                let request = Request::new(who.clone(), amounts);
                let before = usage(&limiter);
                let decision = limiter.check(&request);
                let after = usage(&limiter);
                match decision {
                    Decision::Denied(d) => {
                        prop_assert_eq!(&before, &after, "a refusal moved a counter");
                        if let Some(retry) = d.retry_after() {
                            assert_exact_retry(&clock, &limiter, &request, retry);
                        }
                    }
                    Decision::Allowed(_) => {
                        for (i, s) in subjects.iter().enumerate() {
                            for (b, a) in before[i].iter().zip(&after[i]) {
                                let expected = if who.contains(s) {
                                    b.used + amounts.get(b.metric)
                                } else {
                                    b.used
                                };
                                prop_assert_eq!(
                                    a.used, expected, "{} {} {}", s, b.metric, b.window
                                );
                            }
                        }
                    }
                }
                clock.advance(Duration::from_millis(mask as u64 * 1_700 + input));
            }
            Ok(())
        },
    );
}

/// Reserve, commit, release and expiry conserve amounts: what a limit counts
/// is exactly what was committed, plus what is held, plus what expired held.
pub fn reservations_conserve_amounts<S: Store>(cases: u32, store: &dyn Fn() -> S) {
    run(
        cases,
        (
            prop::sample::select(vec!["sliding", "fixed"]),
            prop::collection::vec((0u8..5, 1u64..=40, 0u64..=60), 1..150),
        ),
        |(algorithm, ops)| {
            let clock = ManualClock::new(Timestamp::from_nanos(T0));
            let limiter = Limiter::new(
                &clock,
                store(),
                LimiterConfig {
                    default_lease: Duration::from_secs(30),
                    max_lease: Duration::from_secs(60),
                },
            );
            let who = subject("session:r");
            let limit = 200;
            limiter.set_policy(
                &who,
                policy(
                    vec![LimitDef::new("cost_usd", limit, "31d").algorithm(algorithm)],
                    None,
                ),
            );
            let used = |l: &Limiter<&ManualClock, S>| l.usage(&who)[0].used;
            let request =
                |amount: u64| Request::new([who.clone()], Amounts::ZERO.with_cost_micros(amount));
            let mut open: Vec<(ReservationId, u64, u64)> = Vec::new(); // id, held, expires_at
            let mut expected = 0u64;
            for (op, amount, actual) in ops {
                let now = clock.now().as_nanos();
                match op {
                    0 | 1 => match limiter.reserve(&request(amount), None) {
                        Ok(r) => {
                            expected += amount;
                            open.push((r.id, amount, r.expires_at.as_nanos()));
                        }
                        Err(_) => prop_assert!(expected + amount > limit),
                    },
                    2 if !open.is_empty() => {
                        let (id, held, expires_at) = open.remove(amount as usize % open.len());
                        let result = limiter.commit(id, &Amounts::ZERO.with_cost_micros(actual));
                        if now >= expires_at {
                            prop_assert_eq!(result, Err(ReservationError::Expired(id)));
                        } else {
                            let settlement = result.unwrap();
                            expected = expected - held + actual;
                            // Overshoot is reported by the commit that charges past what it held.
                            prop_assert_eq!(
                                !settlement.overshoot.is_empty(),
                                actual > held && expected > limit
                            );
                        }
                        prop_assert_eq!(
                            limiter.commit(id, &Amounts::ZERO),
                            Err(ReservationError::Unknown(id))
                        );
                    }
                    3 if !open.is_empty() => {
                        let (id, held, expires_at) = open.remove(amount as usize % open.len());
                        let result = limiter.release(id);
                        if now >= expires_at {
                            prop_assert_eq!(result, Err(ReservationError::Expired(id)));
                        } else {
                            prop_assert_eq!(result, Ok(()));
                            expected -= held;
                        }
                    }
                    _ => {
                        clock.advance(Duration::from_secs(actual / 3));
                        let now = clock.now().as_nanos();
                        let expired = limiter.expire_leases();
                        let due: Vec<_> = open.iter().filter(|o| o.2 <= now).map(|o| o.0).collect();
                        prop_assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), due);
                        open.retain(|o| o.2 > now);
                    }
                }
                prop_assert_eq!(used(&limiter), expected);
                prop_assert_eq!(limiter.outstanding(), open.len());
            }
            Ok(())
        },
    );
}
