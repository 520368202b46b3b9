//! Memory per (subject, limit) at 1,000,000 subjects, measured as resident set
//! growth (allocator overhead included), beyond the subject strings themselves.
//!
//! `cargo bench -p sluice-core --bench memory`
//!
//! Each algorithm runs in a child process of its own, so freed memory from one
//! measurement cannot hide the next one's.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::process::Command;

use sluice_core::*;

const SUBJECTS: usize = 1_000_000;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn measure(algorithm: &str) {
    let subjects: Vec<Subject> = (0..SUBJECTS)
        .map(|i| {
            Subject::parse(&format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)).unwrap()
        })
        .collect();
    let window = if algorithm == "fixed" { "day" } else { "1h" };
    let limiter = Limiter::new(
        ManualClock::new(Timestamp::from_secs(1_800_000_000)),
        MemoryStore::new(),
        LimiterConfig::default(),
    );
    let policy = Policy::new(&PolicyDef {
        limits: vec![LimitDef::new("requests", 100, window).algorithm(algorithm)],
        timezone: None,
    })
    .unwrap();
    limiter.set_policy(&Subject::wildcard(SubjectKind::Ip), policy);
    let before = rss_bytes();
    for s in &subjects {
        let request = Request::new([s.clone()], Amounts::one_request());
        assert!(limiter.check(&request).is_allowed());
    }
    let after = rss_bytes();
    assert_eq!(limiter.store().subjects(), SUBJECTS);
    println!(
        "{algorithm:>8}: {:.1} bytes per (subject, limit) at {SUBJECTS} subjects (RSS {} → {} MiB)",
        (after - before) as f64 / SUBJECTS as f64,
        before >> 20,
        after >> 20
    );
}

fn main() {
    if let Some(algorithm) = std::env::args().nth(1).filter(|a| !a.starts_with('-')) {
        measure(&algorithm);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    for algorithm in ["gcra", "fixed", "sliding"] {
        let status = Command::new(&exe)
            .arg(algorithm)
            .status()
            .expect("child runs");
        assert!(status.success());
    }
}
