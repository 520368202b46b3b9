//! The engine against brute-force reference models: the conformance suite
//! (`sluice_core::conformance`, shared with the Redis store) on the in-memory store.

use sluice_core::MemoryStore;
use sluice_core::conformance;

const CASES: u32 = 192;

#[test]
fn sliding_never_exceeds_and_retry_is_exact() {
    conformance::sliding_never_exceeds_and_retry_is_exact(CASES, &MemoryStore::new);
}

#[test]
fn gcra_matches_reference() {
    conformance::gcra_matches_reference(CASES, &MemoryStore::new);
}

#[test]
fn calendar_windows_reset_exactly_at_boundaries() {
    conformance::calendar_windows_reset_exactly_at_boundaries(CASES, &MemoryStore::new);
}

#[test]
fn multi_limit_requests_are_all_or_nothing() {
    conformance::multi_limit_requests_are_all_or_nothing(CASES, &MemoryStore::new);
}

#[test]
fn reservations_conserve_amounts() {
    conformance::reservations_conserve_amounts(CASES, &MemoryStore::new);
}
