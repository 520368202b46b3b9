//! Many threads racing on shared subjects.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::*;
use support::*;

const THREADS: usize = 8;

fn race(limit_def: LimitDef, limit: u64) {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    let who = subject("agent://acme/prod/racer");
    limiter.set_policy(&who, policy(vec![limit_def], None));
    let admitted = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                let request = Request::new([who.clone()], Amounts::one_request());
                for _ in 0..limit {
                    if limiter.check(&request).is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), limit);
    assert_eq!(limiter.usage(&who)[0].used, limit);
}

#[test]
fn threads_racing_on_one_subject_admit_exactly_the_limit() {
    race(LimitDef::new("requests", 5_000, "1h"), 5_000);
    race(LimitDef::new("requests", 5_000, "day"), 5_000);
    race(
        LimitDef::new("requests", 5_000, "1h").algorithm("gcra"),
        5_000,
    );
    race(
        LimitDef::new("requests", 5_000, "1h").algorithm("fixed"),
        5_000,
    );
}

/// Requests over overlapping subject pairs, locked in different orders by
/// different threads: no deadlock, and every subject counts exactly what was
/// admitted with it, never past its limit.
#[test]
fn overlapping_multi_subject_requests_stay_exact() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    let subjects: Vec<Subject> = (0..4).map(|i| subject(&format!("team:t{i}"))).collect();
    for s in &subjects {
        limiter.set_policy(
            s,
            policy(vec![LimitDef::new("requests", 3_000, "1h")], None),
        );
    }
    let per_subject: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (subjects, per_subject, limiter) = (&subjects, &per_subject, &limiter);
            scope.spawn(move || {
                let (a, b) = (t % 4, (t + 1 + t / 4) % 4);
                let pair = if t % 2 == 0 { [a, b] } else { [b, a] };
                let request = Request::new(
                    pair.iter().map(|&i| subjects[i].clone()),
                    Amounts::one_request(),
                );
                for _ in 0..2_000 {
                    if limiter.check(&request).is_allowed() {
                        for &i in &pair {
                            per_subject[i].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    for (s, count) in subjects.iter().zip(&per_subject) {
        let used = limiter.usage(s)[0].used;
        assert_eq!(used, count.load(Ordering::Relaxed), "{s}");
        assert!(used <= 3_000);
    }
}

/// Reservations from many threads, committed at less than held, released or
/// left to expire: nothing is outstanding at the end and nothing leaks.
#[test]
fn concurrent_reservations_settle_exactly() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    let who = subject("user:budget");
    limiter.set_policy(
        &who,
        policy(vec![LimitDef::new("cost_usd", 1_000_000, "day")], None),
    );
    let spent = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS as u64 {
            let (limiter, who, spent) = (&limiter, &who, &spent);
            scope.spawn(move || {
                for i in 0..500u64 {
                    let request = Request::new([who.clone()], Amounts::ZERO.with_cost_micros(500));
                    let Ok(r) = limiter.reserve(&request, None) else {
                        continue;
                    };
                    if (i + t) % 3 == 0 {
                        limiter.release(r.id).unwrap();
                    } else {
                        let actual = (i * 7 + t) % 500;
                        limiter
                            .commit(r.id, &Amounts::ZERO.with_cost_micros(actual))
                            .unwrap();
                        spent.fetch_add(actual, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(limiter.outstanding(), 0);
    assert_eq!(limiter.usage(&who)[0].used, spent.load(Ordering::Relaxed));
}

/// Policies change (exact and tiers) while other threads decide: every
/// decision sees one whole policy, old or new, and nothing is lost.
#[test]
fn policy_changes_while_deciding_are_seen_whole() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    let tier = Subject::wildcard(SubjectKind::User);
    let subjects: Vec<Subject> = (0..500).map(|i| subject(&format!("user:{i}"))).collect();
    let two = |n| {
        policy(
            vec![
                LimitDef::new("requests", n, "1h"),
                LimitDef::new("tokens", n * 10, "day"),
            ],
            None,
        )
    };
    limiter.set_policy(&tier, two(1_000_000));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 1..=20u64 {
                for s in &subjects {
                    limiter.set_policy(s, two(round * 1_000_000));
                }
                limiter.set_policy(&tier, two(round * 1_000_000 + 1));
                for s in subjects.iter().step_by(2) {
                    limiter.remove_policy(s);
                }
            }
        });
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..20 {
                    for s in &subjects {
                        let request = Request::new([s.clone()], Amounts::one_request());
                        let Decision::Allowed(statuses) = limiter.check(&request) else {
                            panic!("refused under a huge limit");
                        };
                        // Both limits of one policy: requests n, tokens 10n.
                        assert_eq!(statuses.len(), 2);
                        assert_eq!(statuses[1].limit, statuses[0].limit * 10);
                    }
                }
            });
        }
    });
    // Odd subjects kept their own policy; even ones fell back to the tier.
    let all = limiter.policies();
    assert_eq!(all.len(), 250 + 1);
    assert_eq!(
        limiter.effective_policy(&subjects[0]).unwrap().limits()[0].limit(),
        20_000_001
    );
    assert_eq!(
        limiter.effective_policy(&subjects[1]).unwrap().limits()[0].limit(),
        20_000_000
    );
}

/// Loading policies in bulk gives the same table as setting them one by one
/// (later entries win, tiers included), and decisions see them.
#[test]
fn bulk_loaded_policies_equal_one_by_one() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let one = limiter(&clock);
    let bulk = limiter(&clock);
    let limit = |n| policy(vec![LimitDef::new("requests", n, "1h")], None);
    let mut all: Vec<(Subject, Policy)> = (0..3_000u64)
        .map(|i| {
            (
                subject(&format!("agent://o/e/a{}", i % 2_000)),
                limit(i + 1),
            )
        })
        .collect();
    all.push((Subject::wildcard(SubjectKind::User), limit(7)));
    all.push((Subject::wildcard(SubjectKind::User), limit(8)));
    for (s, p) in &all {
        one.set_policy(s, p.clone());
    }
    bulk.set_policies(all);
    let view = |l: &TestLimiter<'_>| {
        l.policies()
            .into_iter()
            .map(|(s, p)| (s.as_str().to_owned(), p.limits()[0].limit()))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&one), view(&bulk));
    assert_eq!(view(&bulk).len(), 2_001);
    // a0 was set at i = 0 and i = 2000: the later one (2001) won.
    let a0 = subject("agent://o/e/a0");
    assert_eq!(
        bulk.effective_policy(&a0).unwrap().limits()[0].limit(),
        2_001
    );
    let user = Request::new([subject("user:1")], Amounts::one_request());
    let Decision::Allowed(statuses) = bulk.check(&user) else {
        panic!("refused");
    };
    assert_eq!(statuses[0].limit, 8);
}
