//! A budgeted agent in a few lines: `cargo run -p sluice-core --example quickstart`.
#![allow(clippy::unwrap_used, reason = "example")]

use std::time::Duration;

use sluice_core::*;

fn main() {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let limiter = Limiter::new(&clock, MemoryStore::new(), LimiterConfig::default());
    let agent = Subject::parse("agent://acme/prod/order-processor").unwrap();
    let policy = Policy::new(&PolicyDef {
        limits: vec![
            LimitDef::new("requests", 200, "1h"),
            LimitDef::new("cost_usd", usd_to_micros(10.0).unwrap(), "day"),
        ],
        timezone: Some("Europe/Berlin".into()),
    })
    .unwrap();
    limiter.set_policy(&agent, policy);

    // Reserve the worst case of an LLM call, then settle what it really cost.
    let worst = Amounts::one_request().with_cost_micros(usd_to_micros(0.02).unwrap());
    let reservation = limiter
        .reserve(&Request::new([agent.clone()], worst), None)
        .unwrap();
    let actual = Amounts::one_request().with_cost_micros(usd_to_micros(0.004).unwrap());
    limiter.commit(reservation.id, &actual).unwrap();

    let mut sent = 1;
    let one = Request::new([agent.clone()], Amounts::one_request());
    while limiter.check(&one).is_allowed() {
        sent += 1;
    }
    let Decision::Denied(denial) = limiter.check(&one) else {
        unreachable!()
    };
    println!(
        "sent {sent} requests; refused by {} per {}",
        denial.metric, denial.window
    );
    println!("retry after {:?}", denial.retry_after().unwrap());
    clock.advance(Duration::from_secs(3_600));
    for status in limiter.usage(&agent) {
        println!(
            "{} per {}: used {} of {}, remaining {}",
            status.metric, status.window, status.used, status.limit, status.remaining
        );
    }
}
