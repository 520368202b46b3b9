//! The engine's conformance suite (its property tests against brute-force
//! reference models) against the Redis store, on a real Redis: the same
//! tests the in-memory store passes, each case on its own key prefix.
//! Skipped, with a notice, when `SLUICE_TEST_REDIS_URL` is not set.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_core::conformance;
use sluice_redis::{BlockingRedisStore, RedisConfig};

const CASES: u32 = 48;

fn url() -> Option<String> {
    match std::env::var("SLUICE_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("SLUICE_TEST_REDIS_URL is not set: Redis conformance tests skipped");
            None
        }
    }
}

/// Deletes every key under `pattern` when dropped (the lease bookkeeping
/// keys have no TTL; subject state expires by itself).
struct Cleanup(String, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(self.0.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&self.1)
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// A fresh store on a prefix no other test or case uses.
fn store_factory(url: String, test: &'static str) -> impl Fn() -> BlockingRedisStore {
    let run = std::process::id();
    let seq = AtomicU64::new(0);
    move || {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        BlockingRedisStore::open(&RedisConfig {
            url: url.clone(),
            cluster: false,
            tls_ca: None,
            key_prefix: format!("sluice-test:conf:{run}:{test}:{n}:"),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }
}

#[test]
fn sliding_never_exceeds_and_retry_is_exact() {
    let Some(url) = url() else { return };
    let _cleanup = Cleanup(
        url.clone(),
        format!("sluice-test:conf:{}:sliding:*", std::process::id()),
    );
    conformance::sliding_never_exceeds_and_retry_is_exact(CASES, &store_factory(url, "sliding"));
}

#[test]
fn gcra_matches_reference() {
    let Some(url) = url() else { return };
    let _cleanup = Cleanup(
        url.clone(),
        format!("sluice-test:conf:{}:gcra:*", std::process::id()),
    );
    conformance::gcra_matches_reference(CASES, &store_factory(url, "gcra"));
}

#[test]
fn calendar_windows_reset_exactly_at_boundaries() {
    let Some(url) = url() else { return };
    let _cleanup = Cleanup(
        url.clone(),
        format!("sluice-test:conf:{}:calendar:*", std::process::id()),
    );
    conformance::calendar_windows_reset_exactly_at_boundaries(
        CASES,
        &store_factory(url, "calendar"),
    );
}

#[test]
fn multi_limit_requests_are_all_or_nothing() {
    let Some(url) = url() else { return };
    let _cleanup = Cleanup(
        url.clone(),
        format!("sluice-test:conf:{}:multi:*", std::process::id()),
    );
    conformance::multi_limit_requests_are_all_or_nothing(CASES, &store_factory(url, "multi"));
}

#[test]
fn reservations_conserve_amounts() {
    let Some(url) = url() else { return };
    let _cleanup = Cleanup(
        url.clone(),
        format!("sluice-test:conf:{}:reservations:*", std::process::id()),
    );
    conformance::reservations_conserve_amounts(CASES, &store_factory(url, "reservations"));
}
