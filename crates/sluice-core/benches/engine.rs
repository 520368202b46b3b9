//! Engine benchmarks with governor 0.10 as the yardstick, in the same run.
//!
//! `cargo bench -p sluice-core --bench engine`
//!
//! Both sides use a manual clock that does not move (governor's
//! `FakeRelativeClock`, our `ManualClock`) and quotas large enough that every
//! check is allowed, so both measure the same allowed path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    missing_debug_implementations,
    reason = "benchmark harness: wall-clock timing of threads is the point"
)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use sluice_core::*;

const BIG: u64 = 1 << 52;

fn gov_quota() -> Quota {
    Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX)
}

fn ours(limits: Vec<LimitDef>, subject: &Subject) -> Limiter<ManualClock> {
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

fn gcra(window: &str) -> LimitDef {
    LimitDef::new("requests", BIG, window).algorithm("gcra")
}

/// 1. One GCRA limit, one key, `check`.
fn one_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("1_one_key_check");
    let gov = RateLimiter::direct_with_clock(gov_quota(), FakeRelativeClock::default());
    g.bench_function("governor_direct", |b| {
        b.iter(|| black_box(gov.check().is_ok()))
    });
    let who = Subject::parse("agent://acme/prod/one").unwrap();
    let limiter = ours(vec![gcra("1s")], &who);
    let request = Request::new([who], Amounts::one_request());
    g.bench_function("sluice_check", |b| {
        b.iter(|| black_box(limiter.check(&request).is_allowed()))
    });
    g.finish();
}

/// 2. One limit, 100,000 keys, random access.
fn many_keys(c: &mut Criterion) {
    const KEYS: usize = 100_000;
    let mut g = c.benchmark_group("2_100k_keys_random");
    let names: Vec<String> = (0..KEYS).map(|i| format!("user:{i:08}")).collect();
    // A fixed pseudo-random visiting order (LCG), the same for both.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let order: Vec<usize> = (0..1 << 20)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) as usize % KEYS
        })
        .collect();

    let gov: RateLimiter<String, _, _, governor::middleware::NoOpMiddleware<_>> = RateLimiter::new(
        gov_quota(),
        governor::state::keyed::DashMapStateStore::<String>::default(),
        FakeRelativeClock::default(),
    );
    for n in &names {
        gov.check_key(n).unwrap();
    }
    let mut i = 0;
    g.bench_function("governor_keyed_dashmap", |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            black_box(gov.check_key(&names[order[i]]).is_ok())
        })
    });

    let tier = Subject::wildcard(SubjectKind::User);
    let limiter = ours(vec![gcra("1s")], &tier);
    let requests: Vec<Request> = names
        .iter()
        .map(|n| Request::new([Subject::parse(n).unwrap()], Amounts::one_request()))
        .collect();
    for r in &requests {
        assert!(limiter.check(r).is_allowed());
    }
    let mut i = 0;
    g.bench_function("sluice_check_parsed_subject", |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            black_box(limiter.check(&requests[order[i]]).is_allowed())
        })
    });
    // As the gateway sees it: the subject arrives as text and is parsed per request.
    let mut i = 0;
    g.bench_function("sluice_parse_and_check", |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            let request = Request::new(
                [Subject::parse(&names[order[i]]).unwrap()],
                Amounts::one_request(),
            );
            black_box(limiter.check(&request).is_allowed())
        })
    });
    g.finish();
}

/// 3. A four-limit reserve + commit on one subject.
fn four_limit_reserve_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("3_four_limit_reserve_commit");
    let gov = RateLimiter::direct_with_clock(gov_quota(), FakeRelativeClock::default());
    g.bench_function("governor_direct", |b| {
        b.iter(|| black_box(gov.check().is_ok()))
    });
    let who = Subject::parse("agent://acme/prod/four").unwrap();
    let limiter = ours(
        vec![
            LimitDef::new("requests", BIG, "1m"),
            LimitDef::new("requests", BIG, "1h"),
            LimitDef::new("tokens", BIG, "day"),
            LimitDef::new("cost_usd", BIG, "day"),
        ],
        &who,
    );
    let request = Request::new(
        [who],
        Amounts::one_request()
            .with_tokens(1_000, 500)
            .with_cost_micros(2_000),
    );
    let actual = Amounts::one_request()
        .with_tokens(1_000, 120)
        .with_cost_micros(800);
    g.bench_function("sluice_reserve_commit", |b| {
        b.iter(|| {
            let r = limiter.reserve(&request, None).unwrap();
            black_box(limiter.commit(r.id, &actual).unwrap());
        })
    });
    g.bench_function("sluice_check_four_limits", |b| {
        b.iter(|| black_box(limiter.check(&request).is_allowed()))
    });
    g.finish();
}

/// Per-op time of `op` run by `threads` threads splitting `iters` between them.
fn contended(iters: u64, threads: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let per = iters.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

/// 4. Two threads contending on one key (time per check, both threads' checks counted).
fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("4_two_threads_one_key");
    let gov = RateLimiter::direct_with_clock(gov_quota(), FakeRelativeClock::default());
    g.bench_function("governor_direct", |b| {
        b.iter_custom(|iters| {
            contended(iters, 2, &|| {
                black_box(gov.check().is_ok());
            })
        })
    });
    let who = Subject::parse("agent://acme/prod/hot").unwrap();
    let limiter = ours(vec![gcra("1s")], &who);
    let request = Request::new([who], Amounts::one_request());
    g.bench_function("sluice_check", |b| {
        b.iter_custom(|iters| {
            contended(iters, 2, &|| {
                black_box(limiter.check(&request).is_allowed());
            })
        })
    });
    // Not a target: two threads on two subjects of one tier share no counter,
    // so this shows what the engine's shared structures (the policy table)
    // cost when threads meet only there.
    let tier = Subject::wildcard(SubjectKind::User);
    let limiter = ours(vec![gcra("1s")], &tier);
    let requests = [
        Request::new([Subject::parse("user:a").unwrap()], Amounts::one_request()),
        Request::new([Subject::parse("user:b").unwrap()], Amounts::one_request()),
    ];
    let next = std::sync::atomic::AtomicUsize::new(0);
    g.bench_function("sluice_check_two_subjects", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(2);
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let mine =
                        &requests[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2];
                    let limiter = &limiter;
                    s.spawn(move || {
                        for _ in 0..per {
                            black_box(limiter.check(mine).is_allowed());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = one_key, many_keys, four_limit_reserve_commit, two_threads
}
criterion_main!(benches);
