//! The Anthropic input-token approximation against `count_tokens`-style
//! fixtures (tests/fixtures/anthropic_count_tokens.json): it never holds
//! less than the documented counts, nor less than 1.35× the public Claude
//! tokenizer's count of any text, and it stays within 2.5× on prose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use sluice_gateway::estimate::anthropic_messages;

fn fixtures() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/anthropic_count_tokens.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn never_below_a_documented_count_tokens_answer() {
    for f in fixtures()["documented"].as_array().unwrap() {
        let model = f["model"].as_str().unwrap();
        let actual = f["input_tokens"].as_u64().unwrap();
        let est = anthropic_messages(model, &f["request"]);
        println!("{}: estimate {est}, count_tokens {actual}", f["name"]);
        assert!(est >= actual, "{}: {est} < {actual}", f["name"]);
        assert!(
            est <= actual * 3,
            "{}: {est} is more than 3x {actual}",
            f["name"]
        );
    }
}

#[test]
fn at_least_the_opus_4_7_inflation_over_the_public_tokenizer_on_every_kind_of_text() {
    let mut prose = Vec::new();
    for f in fixtures()["tokenizer"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let text = f["text"].as_str().unwrap();
        let count = f["claude_tokens"].as_u64().unwrap();
        let body = json!({"messages": [{"role": "user", "content": text}]});
        // The framing of one user turn (8 + 4) is not part of the text's count.
        let est = anthropic_messages("claude-sonnet-4-5", &body) - 12;
        let floor = (count * 135).div_ceil(100);
        println!(
            "{name:16} bytes {:5} public tokenizer {count:5} estimate {est:5} ({:.2}x)",
            text.len(),
            est as f64 / count as f64
        );
        assert!(est >= floor, "{name}: estimate {est} < 1.35 x {count}");
        if name.starts_with("english") || name.ends_with("_code") {
            prose.push((name.to_owned(), est, count));
        }
    }
    for (name, est, count) in prose {
        assert!(est * 10 <= count * 25, "{name}: {est} is over 2.5x {count}");
    }
}

#[test]
fn images_documents_and_tools_have_their_own_bounds() {
    let m = "claude-sonnet-4-5";
    let one = |content: Value| {
        anthropic_messages(
            m,
            &json!({"messages": [{"role": "user", "content": content}]}),
        )
    };
    let text_only = one(json!([{"type": "text", "text": "What is this?"}]));
    let with_image = one(json!([
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(400_000)}},
        {"type": "text", "text": "What is this?"}
    ]));
    // An image costs its pixel bound, whatever its encoded size.
    assert_eq!(
        with_image - text_only,
        sluice_gateway::estimate::ANTHROPIC_IMAGE_TOKENS
    );
    let pdf = one(
        json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "A".repeat(10_000)}}]),
    );
    assert_eq!(pdf, 12 + 5_000);
    // Tools add the hidden tool-use prompt, larger on Claude 3 Opus.
    let tools =
        json!({"tools": [{"name": "t", "input_schema": {"type": "object"}}], "messages": []});
    assert!(anthropic_messages("claude-3-opus-20240229", &tools) > anthropic_messages(m, &tools));
    assert!(anthropic_messages(m, &tools) > 346);
}
