//! Idle state is dropped, live state never is: memory stays bounded under a
//! stream of one-off subjects, and a sweep (which re-indexes a shard) keeps
//! every live counter exactly.

mod support;

use std::time::Duration;

use sluice_core::*;
use support::*;

fn users(range: std::ops::Range<usize>) -> Vec<Request> {
    range
        .map(|i| Request::new([subject(&format!("user:{i}"))], Amounts::one_request()))
        .collect()
}

#[test]
fn one_off_subjects_do_not_grow_the_store_without_bound() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    limiter.set_policy(
        &Subject::wildcard(SubjectKind::Ip),
        policy(vec![LimitDef::new("requests", 1, "1s")], None),
    );
    // 300,000 one-off subjects, one per millisecond: about 1,000 are live
    // (inside their 1 s window) at any instant.
    let mut most = 0;
    for i in 0..300_000u32 {
        let ip = format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        assert!(
            limiter
                .check(&Request::new([subject(&ip)], Amounts::one_request()))
                .is_allowed()
        );
        clock.advance(Duration::from_millis(1));
        most = most.max(limiter.store().subjects());
    }
    // A shard sweeps once it has doubled since its last sweep (1,024 entries
    // at the least), so it never holds more than 2,048 here.
    assert!(most <= STATE_SHARDS * 2_048, "{most} subjects held at once");
    assert!(limiter.sweep() > 0);
    assert!(limiter.store().subjects() <= 1_000);
    assert_eq!(limiter.sweep(), 0);
}

#[test]
fn a_sweep_keeps_every_live_counter() {
    for algorithm in ["sliding", "gcra", "fixed"] {
        sweeps_keep_live_counters(LimitDef::new("requests", 1, "1h").algorithm(algorithm));
    }
}

fn sweeps_keep_live_counters(limit: LimitDef) {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    limiter.set_policy(
        &Subject::wildcard(SubjectKind::User),
        policy(vec![limit], None),
    );
    let old = users(0..60_000);
    let live = users(60_000..120_000);
    for r in &old {
        assert!(limiter.check(r).is_allowed());
    }
    clock.advance(Duration::from_secs(2 * 3_600));
    // The old subjects are idle now; adding the live ones sweeps them out of
    // their shards as the shards double, moving live entries around.
    for r in &live {
        assert!(limiter.check(r).is_allowed());
    }
    // Every live subject is still at its limit...
    for r in &live {
        assert!(!limiter.check(r).is_allowed());
    }
    // ...and still is half an hour on, after sweeps that drop only the old.
    clock.advance(Duration::from_secs(1_800));
    limiter.sweep();
    assert_eq!(limiter.store().subjects(), 60_000);
    for r in &live {
        assert!(!limiter.check(r).is_allowed());
    }
    // And the swept subjects start afresh.
    for r in &old[..1_000] {
        assert!(limiter.check(r).is_allowed());
    }
}

#[test]
fn reservations_settle_on_entries_that_moved() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    limiter.set_policy(
        &Subject::wildcard(SubjectKind::User),
        policy(vec![LimitDef::new("tokens", 100, "1h")], None),
    );
    for mut r in users(0..20_000) {
        r.amounts = Amounts::ZERO.with_tokens(1, 0);
        assert!(limiter.check(&r).is_allowed());
    }
    clock.advance(Duration::from_secs(3_601));
    // Reserved after the others, so its entry sits behind them in its shard;
    // the sweep drops them and moves it.
    let held = Request::new([subject("user:held")], Amounts::ZERO.with_tokens(60, 0));
    let reservation = limiter.reserve(&held, None).unwrap();
    assert_eq!(limiter.sweep(), 20_000);
    limiter
        .commit(reservation.id, &Amounts::ZERO.with_tokens(10, 0))
        .unwrap();
    assert_eq!(limiter.usage(&subject("user:held"))[0].used, 10);
    assert_eq!(limiter.store().subjects(), 1);
}
