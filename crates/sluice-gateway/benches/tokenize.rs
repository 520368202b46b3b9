//! Counting a prompt's tokens: Sluice's count (`estimate::count_tokens`,
//! the ASCII fast path where it applies) against tiktoken-rs's own
//! `encode_with_special_tokens`, the yardstick, in the same run, on the same
//! texts, for both encodings the proxy counts with (o200k_base: GPT-4o, 4.1,
//! 5, o-series; cl100k_base: GPT-4, 3.5, embeddings, and Claude's bound).
//!
//! `cargo bench -p sluice-gateway --bench tokenize`
//!
//! The texts are about 4 KB each, cut from this repository: prose (README),
//! code (a Rust source), JSON (the OpenAPI document, as a tool result might
//! look), the same prose with 60 accented letters (the words around each go
//! to tiktoken) and Japanese (no ASCII: all of it goes to tiktoken, so this
//! is the fast path's overhead).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations,
    reason = "benchmark harness"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_gateway::estimate::count_tokens;

const LEN: usize = 4_096;

/// `LEN` bytes of ASCII from a file of this repository, from `from`.
fn cut(path: &str, from: usize) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join(path)).expect("a file of the repository");
    let ascii: String = text.chars().filter(char::is_ascii).skip(from).collect();
    let mut end = LEN.min(ascii.len());
    while !ascii.is_char_boundary(end) {
        end -= 1;
    }
    ascii[..end].to_owned()
}

fn texts() -> Vec<(&'static str, String)> {
    let prose = cut("README.md", 20_000);
    let accented = prose.replacen("the", "thé", 40).replacen("a ", "à ", 20);
    vec![
        ("prose", prose),
        ("code", cut("crates/sluice-gateway/src/estimate.rs", 8_000)),
        ("json", cut("docs/openapi.json", 2_000)),
        ("non-ascii", accented),
        ("cjk", "日本語のテキストを数えます。".repeat(LEN / 42)),
    ]
}

fn bench(c: &mut Criterion) {
    let encodings = [
        ("o200k", tiktoken_rs::o200k_base_singleton()),
        ("cl100k", tiktoken_rs::cl100k_base_singleton()),
    ];
    for (kind, text) in texts() {
        let mut g = c.benchmark_group(format!("tokenize/{kind}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        for (name, bpe) in encodings {
            // Same counts, or the comparison means nothing.
            assert_eq!(
                count_tokens(bpe, &text),
                bpe.encode_with_special_tokens(&text).len() as u64
            );
            g.bench_function(format!("{name}/tiktoken"), |b| {
                b.iter(|| bpe.encode_with_special_tokens(black_box(&text)).len())
            });
            g.bench_function(format!("{name}/sluice"), |b| {
                b.iter(|| count_tokens(bpe, black_box(&text)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
