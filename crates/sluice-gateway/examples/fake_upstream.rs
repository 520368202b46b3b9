//! The test suite's fake LLM provider as a process, for the proxy benchmark
//! (bench/proxy.sh): both wires on 127.0.0.1, requests not recorded.
//!
//! `fake_upstream [--chunk-delay-ms N]` prints `listening on http://ADDR` and
//! serves until killed.

use std::time::Duration;

use sluice_test_support::upstream::FakeUpstream;

#[tokio::main]
async fn main() {
    let mut delay = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--chunk-delay-ms" {
            let ms = args.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            delay = Duration::from_millis(ms);
        }
    }
    let up = FakeUpstream::start().await;
    up.set_recording(false);
    up.set_chunk_delay(delay);
    let addr = up.base_url.trim_end_matches("/v1").to_owned();
    eprintln!("listening on {addr}");
    std::future::pending::<()>().await;
}
