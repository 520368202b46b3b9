//! The usage an upstream reports (answers, stream events), read into
//! [`TokenUsage`]: a struct read for the common shapes, the JSON tree for the rest.

use super::*;

/// The usage an answer (or a stream event carrying a whole answer) reports.
pub(super) fn usage_of(endpoint: Endpoint, v: &Value) -> Option<TokenUsage> {
    usage_fields(endpoint, v.get("usage")?)
}

/// An answer's `usage`, the rest of it skipped without being built.
#[derive(serde::Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Value,
}

/// The usage in an answer's bytes: OpenAI's chat, completions and
/// embeddings read into a struct; anything else, or a usage the struct
/// cannot hold, through the tree ([`usage_fields`]).
pub(super) fn usage_in(endpoint: Endpoint, bytes: &[u8]) -> Option<TokenUsage> {
    if matches!(
        endpoint,
        Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings
    ) {
        if let Ok(OpenAiAnswer { usage: Some(u) }) = serde_json::from_slice(bytes) {
            if let Some(t) = u.token_usage(endpoint) {
                return Some(t);
            }
        }
    }
    let answer: UsageOnly = serde_json::from_slice(bytes).ok()?;
    usage_fields(endpoint, &answer.usage)
}

/// An OpenAI answer's `usage`, the rest skipped.
#[derive(serde::Deserialize)]
struct OpenAiAnswer {
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

/// OpenAI's usage (chat, completions, embeddings), as [`usage_fields`] reads it.
#[derive(serde::Deserialize)]
pub(super) struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedTokens>,
}

#[derive(serde::Deserialize)]
struct CachedTokens {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl OpenAiUsage {
    pub(super) fn token_usage(&self, endpoint: Endpoint) -> Option<TokenUsage> {
        Some(TokenUsage {
            input: self.prompt_tokens?,
            cached_input: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            output: match endpoint {
                Endpoint::Embeddings => 0,
                _ => self.completion_tokens?,
            },
            ..TokenUsage::default()
        })
    }
}

pub(super) fn usage_fields(endpoint: Endpoint, u: &Value) -> Option<TokenUsage> {
    if !u.is_object() {
        return None;
    }
    match endpoint {
        // The same rule as the struct read; a field of the wrong type reads as absent.
        Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => OpenAiUsage {
            prompt_tokens: u["prompt_tokens"].as_u64(),
            completion_tokens: u["completion_tokens"].as_u64(),
            prompt_tokens_details: Some(CachedTokens {
                cached_tokens: u["prompt_tokens_details"]["cached_tokens"].as_u64(),
            }),
        }
        .token_usage(endpoint),
        Endpoint::Responses => Some(TokenUsage {
            input: u.get("input_tokens")?.as_u64()?,
            cached_input: u["input_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            output: u.get("output_tokens")?.as_u64()?,
            ..TokenUsage::default()
        }),
        Endpoint::Messages => Some(TokenUsage {
            output: u.get("output_tokens")?.as_u64()?,
            ..anthropic_input(u)?
        }),
    }
}

/// Anthropic's input (output left 0): uncached + cache reads + cache writes,
/// with the reads and the writes (5-minute and 1-hour, from `cache_creation`
/// when given, else all 5-minute) priced apart.
pub(super) fn anthropic_input(u: &Value) -> Option<TokenUsage> {
    let uncached = u.get("input_tokens")?.as_u64()?;
    let read = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let written = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    let written_1h = u["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(written);
    Some(TokenUsage {
        input: uncached + read + written,
        cached_input: read,
        cache_write: written - written_1h,
        cache_write_1h: written_1h,
        output: 0,
    })
}

pub(super) fn amounts(model: &Model, usage: TokenUsage) -> Amounts {
    Amounts::one_request()
        .with_tokens(usage.input, usage.output)
        .with_cost_micros(model.price.cost_micros(usage))
}
