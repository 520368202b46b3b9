//! A fixed number of engine operations, for instruction counts and profiles
//! (`perf stat -e instructions`, `valgrind --tool=callgrind`), which are
//! steadier than wall time on a shared machine.
//!
//! `cargo run --release -p sluice-core --example hot_loop -- check1 1000000`
//! Scenarios: `check1` (one GCRA limit, one subject), `check4` (four limits),
//! `reserve4` (four-limit reserve + commit), `keyed` (one limit, 100,000
//! subjects in a pseudo-random order, each given state first), `gov_keyed`
//! (governor's keyed limiter over the same names: the yardstick), and `policies` (prints the time to
//! load N policies with `set_policies`, and with `set_policy` one by one).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "example")]

use std::hint::black_box;

use sluice_core::*;

const BIG: u64 = 1 << 52;

fn limiter(limits: Vec<LimitDef>, subject: &Subject) -> Limiter<ManualClock> {
    let limiter = Limiter::new(
        ManualClock::new(Timestamp::from_secs(1_800_000_000)),
        MemoryStore::new(),
        LimiterConfig::default(),
    );
    let policy = Policy::new(&PolicyDef {
        limits,
        timezone: None,
    })
    .unwrap();
    limiter.set_policy(subject, policy);
    limiter
}

fn four() -> Vec<LimitDef> {
    vec![
        LimitDef::new("requests", BIG, "1m"),
        LimitDef::new("requests", BIG, "1h"),
        LimitDef::new("tokens", BIG, "day"),
        LimitDef::new("cost_usd", BIG, "day"),
    ]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| "check1".into());
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let who = Subject::parse("agent://acme/prod/one").unwrap();
    let amounts = Amounts::one_request()
        .with_tokens(1_000, 500)
        .with_cost_micros(2_000);
    match scenario.as_str() {
        "check1" => {
            let l = limiter(
                vec![LimitDef::new("requests", BIG, "1s").algorithm("gcra")],
                &who,
            );
            let r = Request::new([who], Amounts::one_request());
            for _ in 0..n {
                black_box(l.check(&r).is_allowed());
            }
        }
        "check4" => {
            let l = limiter(four(), &who);
            let r = Request::new([who], amounts);
            for _ in 0..n {
                black_box(l.check(&r).is_allowed());
            }
        }
        "reserve4" => {
            let l = limiter(four(), &who);
            let r = Request::new([who], amounts);
            let actual = Amounts::one_request().with_tokens(1_000, 120);
            for _ in 0..n {
                let res = l.reserve(&r, None).unwrap();
                black_box(l.commit(res.id, &actual).unwrap());
            }
        }
        "keyed" => {
            let tier = Subject::wildcard(SubjectKind::User);
            let l = limiter(
                vec![LimitDef::new("requests", BIG, "1s").algorithm("gcra")],
                &tier,
            );
            let requests: Vec<Request> = (0..100_000)
                .map(|i| {
                    Request::new(
                        [Subject::parse(&format!("user:{i:08}")).unwrap()],
                        Amounts::one_request(),
                    )
                })
                .collect();
            // Every subject has state before the counted loop, as in the bench.
            for r in &requests {
                black_box(l.check(r).is_allowed());
            }
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..n {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                black_box(
                    l.check(&requests[(x >> 33) as usize % 100_000])
                        .is_allowed(),
                );
            }
        }
        "gov_keyed" => {
            // The yardstick of `keyed`: governor's keyed (DashMap) limiter
            // over the same names in the same order.
            use governor::clock::FakeRelativeClock;
            use std::num::NonZeroU32;
            let quota = governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX);
            let gov: governor::RateLimiter<String, _, _, governor::middleware::NoOpMiddleware<_>> =
                governor::RateLimiter::new(
                    quota,
                    governor::state::keyed::DashMapStateStore::<String>::default(),
                    FakeRelativeClock::default(),
                );
            let names: Vec<String> = (0..100_000).map(|i| format!("user:{i:08}")).collect();
            for name in &names {
                black_box(gov.check_key(name).is_ok());
            }
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..n {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                black_box(gov.check_key(&names[(x >> 33) as usize % 100_000]).is_ok());
            }
        }
        "policies" => {
            let policy = Policy::new(&PolicyDef {
                limits: vec![LimitDef::new("requests", 100, "1h")],
                timezone: None,
            })
            .unwrap();
            let all = || {
                (0..n).map(|i| {
                    (
                        Subject::parse(&format!("agent://o/e/a{i}")).unwrap(),
                        policy.clone(),
                    )
                })
            };
            let l = Limiter::in_memory();
            let batch: Vec<_> = all().collect();
            #[allow(clippy::disallowed_methods, reason = "timing a load, not a decision")]
            let start = std::time::Instant::now();
            l.set_policies(batch);
            println!("set_policies: {n} policies in {:?}", start.elapsed());
            let l = Limiter::in_memory();
            let batch: Vec<_> = all().collect();
            #[allow(clippy::disallowed_methods, reason = "timing a load, not a decision")]
            let start = std::time::Instant::now();
            for (s, p) in batch {
                l.set_policy(&s, p);
            }
            println!(
                "set_policy one by one: {n} policies in {:?}",
                start.elapsed()
            );
        }
        other => eprintln!("unknown scenario {other}"),
    }
}
