//! Replaying what was admitted (`charge_at`, in time order) into a fresh
//! limiter rebuilds the same state: the gateway relies on this after a restart.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use sluice_core::*;
use support::*;

fn limit_defs() -> impl Strategy<Value = LimitDef> {
    prop_oneof![
        (1u64..20, 1u64..120).prop_map(|(l, s)| LimitDef::new("requests", l, &format!("{s}s"))),
        (1u64..20, 1u64..120, 1u64..20).prop_map(|(l, s, b)| LimitDef::new(
            "requests",
            l,
            &format!("{s}s")
        )
        .algorithm("gcra")
        .burst(b)),
        (1u64..20).prop_map(|l| LimitDef::new("requests", l, "minute")),
    ]
}

proptest! {
    #[test]
    fn replaying_admitted_charges_rebuilds_the_same_state(
        def in limit_defs(),
        steps in prop::collection::vec((0u64..5_000, 1u64..4), 1..60),
    ) {
        let live_clock = ManualClock::new(Timestamp::from_nanos(T0));
        let live = limiter(&live_clock);
        let agent = subject("agent://o/e/replay");
        live.set_policy(&agent, policy(vec![def.clone()], None));
        let mut admitted = Vec::new();
        for (gap_ms, amount) in steps {
            live_clock.advance(Duration::from_millis(gap_ms));
            let request = Request::new([agent.clone()], Amounts::ZERO.with(Metric::Requests, amount));
            if live.check(&request).is_allowed() {
                admitted.push((live_clock.now(), request));
            }
        }
        let replay_clock = ManualClock::new(live_clock.now());
        let replayed = limiter(&replay_clock);
        replayed.set_policy(&agent, policy(vec![def], None));
        for (at, request) in &admitted {
            replayed.charge_at(request, *at);
        }
        prop_assert_eq!(live.usage(&agent), replayed.usage(&agent));
        for amount in 1..4 {
            let request = Request::new([agent.clone()], Amounts::ZERO.with(Metric::Requests, amount));
            prop_assert_eq!(live.peek(&request), replayed.peek(&request));
        }
    }
}

#[test]
fn a_forced_charge_goes_past_the_limit_and_later_requests_wait() {
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let limiter = limiter(&clock);
    let agent = subject("agent://o/e/force");
    limiter.set_policy(
        &agent,
        policy(vec![LimitDef::new("requests", 2, "1m")], None),
    );
    let five = Request::new([agent.clone()], Amounts::ZERO.with(Metric::Requests, 5));
    let statuses = limiter.charge_at(&five, clock.now());
    assert_eq!(statuses[0].used, 5);
    let one = Request::new([agent.clone()], Amounts::one_request());
    assert!(!limiter.check(&one).is_allowed());
}
