//! Worst-case token estimates for proxied requests: what is held before the
//! upstream answers. The commit always charges the upstream's own count; an
//! estimate only decides what is reserved, so it aims to be an upper bound
//! that is not wastefully loose.
//!
//! - **OpenAI models** with a known tokenizer (o200k for GPT-4o/4.1/5 and the
//!   o-series, cl100k for GPT-4/3.5): exact tiktoken counts of every text,
//!   OpenAI's message framing (3 tokens a message, 3 to prime the reply), an
//!   image's maximum (1,105 tokens: a 2048 × 768 high-detail image) per
//!   image part, one token per two bytes for anything opaque.
//! - **Anthropic models**: Claude's tokenizer is not public, so each text
//!   counts `max(⌈bytes / 2⌉, ⌈cl100k × 7/4⌉)` tokens: the first bounds prose
//!   and code (Claude uses 2.5–3.5 bytes a token on them, Opus 4.7's tokenizer
//!   included), the second bounds dense text where Claude's tokens are short
//!   (base64, hex, UUIDs, digits, emoji, CJK). Plus 8 tokens a request and 4 a
//!   message of framing, 1,600 tokens an image (the most a standard-resolution
//!   image costs), base64 documents at one token per two bytes, tool
//!   definitions as their JSON text, and Anthropic's hidden tool-use system
//!   prompt (346 tokens on Claude 3.7 and later, up to 530 on Claude 3 Opus)
//!   when tools are given. Checked against published `count_tokens` answers
//!   and counts of Anthropic's public tokenizer
//!   (`tests/fixtures/anthropic_count_tokens.json`).
//! - **Other models**: one token per two bytes of the request's text fields.

use serde_json::Value;

mod ascii;

/// Tokens an OpenAI image part can cost at most (a high-detail 2048 × 768 image: 85 + 6 × 170).
pub const OPENAI_IMAGE_TOKENS: u64 = 1_105;

/// Tokens an Anthropic image costs at most at standard resolution (images
/// are scaled to about 1.15 megapixels; tokens ≈ pixels / 750).
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1_600;

/// Tokens held for a document Sluice cannot see into (a URL or file id): one PDF page.
pub const OPAQUE_DOCUMENT_TOKENS: u64 = 3_000;

/// The tiktoken encoding of an OpenAI model, by name; `None` for models
/// whose tokenizer Sluice does not know (other vendors on the OpenAI wire).
pub fn openai_encoding(model: &str) -> Option<&'static tiktoken_rs::CoreBPE> {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ];
    if o200k.iter().any(|p| m.starts_with(p)) {
        Some(tiktoken_rs::o200k_base_singleton())
    } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") || m.starts_with("text-embedding-")
    {
        // The embedding models (ada-002, 3-small, 3-large) use cl100k.
        Some(tiktoken_rs::cl100k_base_singleton())
    } else {
        None
    }
}

/// Whether a model is served with Anthropic's tokenizer family.
fn is_claude(model: &str) -> bool {
    model.contains("claude")
}

/// Load the tokenizers the configured models need (at start, not on the first request).
pub fn warm(models: &std::collections::BTreeMap<String, std::sync::Arc<crate::config::Model>>) {
    for m in models.values() {
        match Counter::for_model(&m.upstream_name) {
            // Looking an encoding's fast path up loads the encoding and builds its rank map.
            Counter::Exact(bpe) => {
                ascii::of(bpe);
            }
            Counter::Bytes => {}
            Counter::Claude => {
                ascii::of(tiktoken_rs::cl100k_base_singleton());
            }
        }
    }
}

/// One token per two bytes.
fn half_bytes(s: &str) -> u64 {
    (s.len() as u64).div_ceil(2)
}

/// The conservative fallback: one token per two bytes of JSON.
fn json_half_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => half_bytes(s),
        other => (other.to_string().len() as u64).div_ceil(2),
    }
}

/// How texts are counted.
#[derive(Clone, Copy)]
enum Counter {
    /// Exact, with an OpenAI tokenizer.
    Exact(&'static tiktoken_rs::CoreBPE),
    /// Claude's bound: `max(⌈bytes / 2⌉, ⌈cl100k × 7/4⌉)`.
    Claude,
    /// One token per two bytes.
    Bytes,
}

impl Counter {
    fn for_model(model: &str) -> Counter {
        match openai_encoding(model) {
            Some(bpe) => Counter::Exact(bpe),
            None if is_claude(model) => Counter::Claude,
            None => Counter::Bytes,
        }
    }

    fn text(self, s: &str) -> u64 {
        if s.is_empty() {
            return 0;
        }
        match self {
            Counter::Exact(bpe) => cached_count(bpe, s),
            Counter::Claude => {
                let cl = cached_count(tiktoken_rs::cl100k_base_singleton(), s);
                half_bytes(s).max((cl * 7).div_ceil(4))
            }
            Counter::Bytes => half_bytes(s),
        }
    }

    /// Every string in a JSON value (its keys too), as text.
    fn json(self, v: &Value) -> u64 {
        match v {
            Value::String(s) => self.text(s),
            Value::Array(items) => items.iter().map(|i| self.json(i)).sum(),
            Value::Object(map) => map.iter().map(|(k, v)| self.text(k) + self.json(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 1,
        }
    }
}

/// Token counts of texts seen recently, by (encoding, text) hash: agents
/// resend their system prompt and history every turn, so most texts are
/// counted once. Bounded: emptied when it reaches [`COUNT_CACHE_ENTRIES`].
/// A 64-bit hash collision could only mis-size a hold, never a charge.
static COUNT_CACHE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u64, u64>>> =
    std::sync::LazyLock::new(Default::default);

/// Entries the count cache holds at most (about 2 MB).
pub const COUNT_CACHE_ENTRIES: usize = 65_536;

/// Texts longer than this are counted each time (hashing them is no longer
/// cheap next to counting, and they are rarely repeated verbatim).
const COUNT_CACHE_MAX_TEXT: usize = 1 << 20;

/// tiktoken's count of `s` (as `encode_with_special_tokens` counts it),
/// not cached: ASCII text without tiktoken's regex (`estimate/ascii.rs`: the same
/// counts, faster), anything else through tiktoken.
pub fn count_tokens(bpe: &'static tiktoken_rs::CoreBPE, s: &str) -> u64 {
    ascii::of(bpe)
        .and_then(|fast| fast.count(s))
        .unwrap_or_else(|| bpe.encode_with_special_tokens(s).len() as u64)
}

fn cached_count(bpe: &'static tiktoken_rs::CoreBPE, s: &str) -> u64 {
    use std::hash::BuildHasher;
    if s.len() > COUNT_CACHE_MAX_TEXT {
        return count_tokens(bpe, s);
    }
    static SEED: std::sync::LazyLock<foldhash::quality::RandomState> =
        std::sync::LazyLock::new(Default::default);
    let key = SEED.hash_one((std::ptr::from_ref(bpe) as usize, s));
    let lock = || {
        COUNT_CACHE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(n) = lock().get(&key) {
        return *n;
    }
    let n = count_tokens(bpe, s);
    let mut cache = lock();
    if cache.len() >= COUNT_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(key, n);
    n
}

/// `data:` URLs and other opaque payloads are estimated by size, never tokenized.
fn is_data_url(s: &str) -> bool {
    s.starts_with("data:")
}

/// An OpenAI content part or Responses input item, walked for text.
fn openai_part(c: Counter, part: &Value) -> u64 {
    match part {
        Value::String(s) => c.text(s),
        Value::Array(items) => items.iter().map(|p| openai_part(c, p)).sum(),
        Value::Object(map) => {
            let kind = map.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "image_url" | "input_image" => OPENAI_IMAGE_TOKENS,
                "input_file" | "file" => match map.get("file_data").and_then(Value::as_str) {
                    Some(data) => half_bytes(data),
                    None => match map.get("file").and_then(|f| f.get("file_data")) {
                        Some(Value::String(data)) => half_bytes(data),
                        _ => OPAQUE_DOCUMENT_TOKENS,
                    },
                },
                "input_audio" => json_half_bytes(part),
                _ => map
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "type" | "id" | "call_id" | "status"))
                    .map(|(k, v)| match v {
                        Value::String(s) if is_data_url(s) => half_bytes(s),
                        Value::String(s) if k == "role" => c.text(s),
                        other => openai_part(c, other),
                    })
                    .sum(),
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 1,
    }
}

/// The tools, functions and response format of an OpenAI request.
fn openai_extras(c: Counter, body: &Value) -> u64 {
    ["tools", "functions", "response_format", "text"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(|v| match c {
            Counter::Bytes => json_half_bytes(v),
            _ => c.json(v),
        })
        .sum()
}

/// `POST /v1/chat/completions`.
pub fn openai_chat(model: &str, body: &Value) -> u64 {
    let c = Counter::for_model(model);
    let Counter::Exact(_) = c else {
        return json_half_bytes(&body["messages"]) + openai_extras(c, body) + 16;
    };
    let mut total = 3 + openai_extras(c, body);
    for m in body["messages"].as_array().into_iter().flatten() {
        total += 3 + m["role"].as_str().map_or(1, |r| c.text(r));
        if let Some(name) = m["name"].as_str() {
            total += 1 + c.text(name);
        }
        match &m["content"] {
            Value::Null => {}
            content => total += openai_part(c, content),
        }
        if let Some(calls) = m.get("tool_calls") {
            total += c.json(calls);
        }
    }
    total
}

/// A `prompt` (completions) or `input` (embeddings): a string, strings, or token arrays.
pub fn openai_prompt(model: &str, prompt: &Value) -> u64 {
    let c = Counter::for_model(model);
    match prompt {
        Value::String(s) => c.text(s),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Number(_) => 1,
                Value::Array(tokens) => tokens.len() as u64,
                other => openai_prompt(model, other),
            })
            .sum(),
        Value::Null => 0,
        other => json_half_bytes(other),
    }
}

/// `POST /v1/responses`: instructions, input (a string or items), tools.
pub fn openai_responses(model: &str, body: &Value) -> u64 {
    let c = Counter::for_model(model);
    let instructions = body["instructions"].as_str().map_or(0, |s| c.text(s));
    let input = match &body["input"] {
        Value::Array(items) => items.iter().map(|i| 4 + openai_part(c, i)).sum(),
        other => openai_part(c, other),
    };
    8 + instructions + input + openai_extras(c, body)
}

/// Anthropic's hidden tool-use system prompt for a model, at its larger
/// (`auto`/`none` or `any`/`tool`) size.
fn anthropic_tool_prompt(model: &str) -> u64 {
    if model.contains("claude-3-opus") {
        530
    } else if model.contains("claude-3-haiku") || model.contains("claude-3-5-haiku") {
        340
    } else if model.contains("claude-3-5-sonnet") {
        294
    } else {
        346
    }
}

/// An Anthropic content block (or a string, or a list of blocks).
fn anthropic_content(c: Counter, content: &Value) -> u64 {
    match content {
        Value::String(s) => c.text(s),
        Value::Array(blocks) => blocks.iter().map(|b| anthropic_content(c, b)).sum(),
        Value::Object(block) => {
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "text" => block
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, |t| c.text(t)),
                "image" => ANTHROPIC_IMAGE_TOKENS,
                "document" => match block.get("source") {
                    Some(src) => match src.get("type").and_then(Value::as_str) {
                        Some("base64") => src["data"].as_str().map_or(0, half_bytes),
                        Some("text") => src["data"].as_str().map_or(0, |t| c.text(t)),
                        Some("content") => anthropic_content(c, &src["content"]),
                        _ => OPAQUE_DOCUMENT_TOKENS,
                    },
                    None => OPAQUE_DOCUMENT_TOKENS,
                },
                "tool_use" | "server_tool_use" => {
                    4 + block
                        .get("name")
                        .and_then(Value::as_str)
                        .map_or(0, |t| c.text(t))
                        + block.get("input").map_or(0, |i| c.json(i))
                }
                "tool_result" => 4 + block.get("content").map_or(0, |x| anthropic_content(c, x)),
                "thinking" => block
                    .get("thinking")
                    .and_then(Value::as_str)
                    .map_or(0, |t| c.text(t)),
                "redacted_thinking" => block.get("data").map_or(0, json_half_bytes),
                _ => c.json(content),
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 1,
    }
}

/// `POST /v1/messages` (and `count_tokens`).
pub fn anthropic_messages(model: &str, body: &Value) -> u64 {
    let c = match Counter::for_model(model) {
        Counter::Exact(_) | Counter::Claude => Counter::Claude,
        Counter::Bytes => Counter::Bytes,
    };
    let system = body.get("system").map_or(0, |s| anthropic_content(c, s));
    let messages: u64 = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| 4 + anthropic_content(c, &m["content"]))
        .sum();
    let tools = match body["tools"].as_array() {
        Some(tools) if !tools.is_empty() => {
            anthropic_tool_prompt(model) + tools.iter().map(|t| c.text(&t.to_string())).sum::<u64>()
        }
        _ => 0,
    };
    8 + system + messages + tools
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_estimates_count_tokens_exactly_with_the_framing() {
        let body = json!({"messages": [{"role": "user", "content": "Say hello."}]});
        // 3 (reply priming) + 3 (message) + 1 ("user") + 3 ("Say", " hello", ".").
        assert_eq!(openai_chat("gpt-4o-mini", &body), 10);
        assert_eq!(openai_chat("gpt-4o-2024-08-06", &body), 10);
        assert_eq!(openai_chat("openai/gpt-4.1", &body), 10);
        // cl100k for gpt-4 and gpt-3.5.
        assert_eq!(openai_chat("gpt-3.5-turbo", &body), 10);
        // Unknown tokenizer: the byte estimate, larger.
        assert!(openai_chat("llama-3", &body) > 10);
        // Far tighter than the byte estimate on long English text, and never below the exact count.
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
        let long = json!({"messages": [{"role": "user", "content": text}]});
        let exact = tiktoken_rs::o200k_base_singleton()
            .encode_with_special_tokens(&text)
            .len() as u64;
        let est = openai_chat("gpt-4o", &long);
        assert!(est >= exact && est <= exact + 10, "{est} vs {exact}");
        assert!(est * 2 < openai_chat("llama-3", &long));
        // Parts: text counted, images at their maximum.
        let parts = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Say hello."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}]});
        assert_eq!(openai_chat("gpt-4o", &parts), 10 + OPENAI_IMAGE_TOKENS);
    }

    #[test]
    fn cached_counts_are_the_counts() {
        let bpe = tiktoken_rs::o200k_base_singleton();
        for text in [
            "Say hello.",
            "Say hello!",
            "日本語",
            "a",
            &"x y ".repeat(500),
        ] {
            let exact = bpe.encode_with_special_tokens(text).len() as u64;
            assert_eq!(cached_count(bpe, text), exact, "{text}");
            assert_eq!(cached_count(bpe, text), exact, "{text} (cached)");
        }
        // The same text under another encoding is its own entry.
        let cl = tiktoken_rs::cl100k_base_singleton();
        let t = "ü🦀 tokenizers differ on this";
        assert_eq!(
            cached_count(cl, t),
            cl.encode_with_special_tokens(t).len() as u64
        );
        assert_eq!(
            cached_count(bpe, t),
            bpe.encode_with_special_tokens(t).len() as u64
        );
    }

    #[test]
    fn prompts_and_inputs_in_every_shape() {
        let bpe = tiktoken_rs::cl100k_base_singleton();
        let n = |s: &str| bpe.encode_with_special_tokens(s).len() as u64;
        let m = "text-embedding-3-small";
        assert_eq!(openai_prompt(m, &json!("hello world")), n("hello world"));
        assert_eq!(
            openai_prompt(m, &json!(["hello world", "bye"])),
            n("hello world") + n("bye")
        );
        assert_eq!(openai_prompt(m, &json!([1, 2, 3])), 3);
        assert_eq!(openai_prompt(m, &json!([[1, 2], [3, 4, 5]])), 5);
        // Responses: instructions + input text + framing; images at their maximum.
        let r = json!({"instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Say hello."},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]});
        let o = tiktoken_rs::o200k_base_singleton();
        let t = |s: &str| o.encode_with_special_tokens(s).len() as u64;
        let est = openai_responses("gpt-4.1-mini", &r);
        let floor = t("Be brief.") + t("Say hello.") + OPENAI_IMAGE_TOKENS;
        assert!(est >= floor && est <= floor + 16, "{est} vs {floor}");
        assert_eq!(
            openai_responses("gpt-4.1-mini", &json!({"input": "Say hello."})),
            8 + t("Say hello.")
        );
    }
}
