//! Model prices as integers: micro-dollars per million tokens, so a cost is
//! exact integer arithmetic (rounded up to the micro-dollar: never under-counted).
//!
//! Three sources, highest first: `[[models]]` entries in sluice.toml, a
//! LiteLLM-format price file (`model_prices_and_context_window.json`), and the
//! built-in table below. A model found in none of them is a config error, never
//! a silent $0. (The LLM proxy of issue 4 reads prices from here.)

use std::collections::HashMap;

use serde_json::Value;

/// Micro-dollars per million tokens (= dollars per token × 10^12).
pub type MicrosPerMtok = u64;

/// What one model costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Input (prompt) tokens not read from a cache.
    pub input: MicrosPerMtok,
    /// Output (completion) tokens.
    pub output: MicrosPerMtok,
    /// Input tokens read from the prompt cache (default: the input price).
    pub cached_input: MicrosPerMtok,
    /// Input tokens written to a 5-minute prompt cache (Anthropic; default 1.25 × input).
    pub cache_write: MicrosPerMtok,
    /// Input tokens written to a 1-hour prompt cache (Anthropic; default 2 × input).
    pub cache_write_1h: MicrosPerMtok,
    /// The most output tokens one request can produce, when known.
    pub max_output_tokens: Option<u64>,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Input tokens, cached ones included.
    pub input: u64,
    /// Of the input, read from the prompt cache.
    pub cached_input: u64,
    /// Of the input, written to a 5-minute prompt cache.
    pub cache_write: u64,
    /// Of the input, written to a 1-hour prompt cache.
    pub cache_write_1h: u64,
    /// Output tokens.
    pub output: u64,
}

fn times(tokens: u64, price: MicrosPerMtok) -> u128 {
    u128::from(tokens) * u128::from(price)
}

impl Price {
    /// From dollars per million tokens (as written in sluice.toml).
    pub fn from_usd_per_mtok(
        input: f64,
        output: f64,
        cached_input: Option<f64>,
    ) -> Result<Price, String> {
        let conv = |name: &str, v: f64| -> Result<MicrosPerMtok, String> {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err(format!(
                    "{name} must be a price in dollars per million tokens, 0 to 1000000, got {v}"
                ));
            }
            Ok((v * 1e6).round() as u64)
        };
        let input = conv("input_usd_per_mtok", input)?;
        Ok(Price {
            input,
            output: conv("output_usd_per_mtok", output)?,
            cached_input: cached_input
                .map(|c| conv("cached_input_usd_per_mtok", c))
                .transpose()?
                .unwrap_or(input),
            cache_write: (input * 5).div_ceil(4),
            cache_write_1h: input * 2,
            max_output_tokens: None,
        })
    }

    /// With an explicit price for 5-minute cache writes.
    pub fn with_cache_write(mut self, usd_per_mtok: f64) -> Result<Price, String> {
        if !usd_per_mtok.is_finite() || !(0.0..=1e6).contains(&usd_per_mtok) {
            return Err(format!(
                "cache_write_usd_per_mtok must be a price in dollars per million tokens, 0 to 1000000, got {usd_per_mtok}"
            ));
        }
        self.cache_write = (usd_per_mtok * 1e6).round() as u64;
        Ok(self)
    }

    /// Micro-dollars for this usage, rounded up. Cache reads and writes are
    /// parts of the input (capped at it), each at its own price.
    pub fn cost_micros(&self, usage: TokenUsage) -> u64 {
        let cached = usage.cached_input.min(usage.input);
        let written = usage.cache_write.min(usage.input - cached);
        let written_1h = usage.cache_write_1h.min(usage.input - cached - written);
        let total = times(usage.input - cached - written - written_1h, self.input)
            + times(cached, self.cached_input)
            + times(written, self.cache_write)
            + times(written_1h, self.cache_write_1h)
            + times(usage.output, self.output);
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// Prices by model name.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

/// The built-in table: (name, input, output, cached input $/Mtok, max output tokens).
/// Public list prices for standard (non-batch) requests, short contexts.
const BUILTIN: &[(&str, f64, f64, f64, u64)] = &[
    // OpenAI
    ("gpt-5", 1.25, 10.0, 0.125, 128_000),
    ("gpt-5-mini", 0.25, 2.0, 0.025, 128_000),
    ("gpt-5-nano", 0.05, 0.40, 0.005, 128_000),
    ("gpt-4.1", 2.0, 8.0, 0.50, 32_768),
    ("gpt-4.1-mini", 0.40, 1.60, 0.10, 32_768),
    ("gpt-4.1-nano", 0.10, 0.40, 0.025, 32_768),
    ("gpt-4o", 2.50, 10.0, 1.25, 16_384),
    ("gpt-4o-mini", 0.15, 0.60, 0.075, 16_384),
    ("o3", 2.0, 8.0, 0.50, 100_000),
    ("o4-mini", 1.10, 4.40, 0.275, 100_000),
    ("text-embedding-3-small", 0.02, 0.0, 0.02, 0),
    ("text-embedding-3-large", 0.13, 0.0, 0.13, 0),
    // Anthropic (cached = cache read)
    ("claude-opus-4-1", 15.0, 75.0, 1.50, 32_000),
    ("claude-opus-4", 15.0, 75.0, 1.50, 32_000),
    ("claude-sonnet-4-5", 3.0, 15.0, 0.30, 64_000),
    ("claude-sonnet-4", 3.0, 15.0, 0.30, 64_000),
    ("claude-haiku-4-5", 1.0, 5.0, 0.10, 64_000),
    ("claude-3-5-haiku", 0.80, 4.0, 0.08, 8_192),
    // Google
    ("gemini-2.5-pro", 1.25, 10.0, 0.31, 65_536),
    ("gemini-2.5-flash", 0.30, 2.50, 0.075, 65_536),
    ("gemini-2.0-flash", 0.10, 0.40, 0.025, 8_192),
];

impl PriceTable {
    /// The built-in prices.
    pub fn builtin() -> PriceTable {
        let mut t = PriceTable::default();
        for &(name, input, output, cached, max_out) in BUILTIN {
            if let Ok(mut p) = Price::from_usd_per_mtok(input, output, Some(cached)) {
                p.max_output_tokens = (max_out > 0).then_some(max_out);
                t.prices.insert(name.to_owned(), p);
            }
        }
        t
    }

    /// Parse a LiteLLM price file: `{"model": {"input_cost_per_token": 1.5e-07,
    /// "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08,
    /// "max_output_tokens": 16384, ...}, ...}`. Entries without both token prices
    /// (images, audio, the `sample_spec` entry) are skipped.
    pub fn from_litellm_json(text: &str) -> Result<PriceTable, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("not a LiteLLM price file: {e}"))?;
        let map = v
            .as_object()
            .ok_or("not a LiteLLM price file: expected a JSON object of models")?;
        let mut t = PriceTable::default();
        for (name, entry) in map {
            let per_token = |k: &str| entry.get(k).and_then(Value::as_f64);
            let (Some(input), Some(output)) = (
                per_token("input_cost_per_token"),
                per_token("output_cost_per_token"),
            ) else {
                continue;
            };
            let cached = per_token("cache_read_input_token_cost");
            let Ok(mut p) =
                Price::from_usd_per_mtok(input * 1e6, output * 1e6, cached.map(|c| c * 1e6))
            else {
                continue;
            };
            if let Some(w) = per_token("cache_creation_input_token_cost") {
                p = p.with_cache_write(w * 1e6).unwrap_or(p);
            }
            p.max_output_tokens = entry
                .get("max_output_tokens")
                .and_then(Value::as_u64)
                .or_else(|| entry.get("max_tokens").and_then(Value::as_u64));
            t.prices.insert(name.clone(), p);
        }
        Ok(t)
    }

    /// The price of a model: by exact name, else by the name without a
    /// provider prefix (`openai/gpt-4o`), else by the longest known name the
    /// model's starts with followed by `-` (dated versions: `gpt-4o-2024-08-06`).
    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.prices.get(model) {
            return Some(*p);
        }
        if let Some((_, bare)) = model.split_once('/') {
            if let Some(p) = self.prices.get(bare) {
                return Some(*p);
            }
        }
        self.prices
            .iter()
            .filter(|(name, _)| {
                model.len() > name.len()
                    && model.starts_with(name.as_str())
                    && model.as_bytes()[name.len()] == b'-'
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
    }

    /// How many models.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_exact_integers_rounded_up() {
        let p = Price::from_usd_per_mtok(0.15, 0.60, Some(0.075)).unwrap();
        assert_eq!(
            (p.input, p.output, p.cached_input),
            (150_000, 600_000, 75_000)
        );
        // 1M input + 1M output = $0.75.
        assert_eq!(
            p.cost_micros(TokenUsage {
                input: 1_000_000,
                cached_input: 0,
                output: 1_000_000,
                ..TokenUsage::default()
            }),
            750_000
        );
        // 1 token costs 0.15 µ$: rounded up to 1 µ$, never to 0.
        assert_eq!(
            p.cost_micros(TokenUsage {
                input: 1,
                cached_input: 0,
                output: 0,
                ..TokenUsage::default()
            }),
            1
        );
        // Cached input at its own price; cached beyond input is capped.
        assert_eq!(
            p.cost_micros(TokenUsage {
                input: 2_000_000,
                cached_input: 1_000_000,
                output: 0,
                ..TokenUsage::default()
            }),
            225_000
        );
        assert_eq!(
            p.cost_micros(TokenUsage {
                input: 10,
                cached_input: 50,
                output: 0,
                ..TokenUsage::default()
            }),
            1
        );
        assert_eq!(p.cost_micros(TokenUsage::default()), 0);
        assert!(Price::from_usd_per_mtok(-1.0, 1.0, None).is_err());
        assert!(Price::from_usd_per_mtok(f64::NAN, 1.0, None).is_err());
        // Cache writes: 5-minute at 1.25 × input, 1-hour at 2 × input.
        let c = Price::from_usd_per_mtok(3.0, 15.0, Some(0.3)).unwrap();
        assert_eq!(
            c.cost_micros(TokenUsage {
                input: 1_000_000 + 1_000_000 + 1_000_000 + 1_000_000,
                cached_input: 1_000_000,
                cache_write: 1_000_000,
                cache_write_1h: 1_000_000,
                output: 0
            }),
            3_000_000 + 300_000 + 3_750_000 + 6_000_000
        );
        assert_eq!(c.with_cache_write(4.0).unwrap().cache_write, 4_000_000);
        // No cached price: cached tokens cost the input price.
        let q = Price::from_usd_per_mtok(3.0, 15.0, None).unwrap();
        assert_eq!(q.cached_input, q.input);
    }

    #[test]
    fn builtin_covers_the_three_providers_and_dated_names() {
        let t = PriceTable::builtin();
        for m in ["gpt-4o-mini", "claude-sonnet-4", "gemini-2.5-flash"] {
            assert!(t.get(m).is_some(), "{m}");
        }
        let dated = t.get("gpt-4o-2024-08-06").unwrap();
        assert_eq!(dated, t.get("gpt-4o").unwrap());
        // The longest prefix wins: gpt-4o-mini-2024-07-18 is mini, not gpt-4o.
        assert_eq!(
            t.get("gpt-4o-mini-2024-07-18").unwrap(),
            t.get("gpt-4o-mini").unwrap()
        );
        assert_eq!(t.get("openai/gpt-4.1").unwrap(), t.get("gpt-4.1").unwrap());
        assert!(t.get("gpt-4").is_none());
        assert!(t.get("made-up-model").is_none());
        assert_eq!(
            t.get("claude-3-5-haiku-20241022")
                .unwrap()
                .max_output_tokens,
            Some(8_192)
        );
    }

    #[test]
    fn litellm_price_files_import() {
        let text = r#"{
            "sample_spec": {"max_tokens": "set to max_output_tokens if provider specifies it"},
            "gpt-4o-mini": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
                "cache_read_input_token_cost": 7.5e-08, "max_output_tokens": 16384, "litellm_provider": "openai", "mode": "chat"},
            "dall-e-3": {"output_cost_per_image": 0.04},
            "my-local-model": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "max_tokens": 4096}
        }"#;
        let t = PriceTable::from_litellm_json(text).unwrap();
        assert_eq!(t.len(), 2);
        let p = t.get("gpt-4o-mini").unwrap();
        assert_eq!(
            (p.input, p.output, p.cached_input, p.max_output_tokens),
            (150_000, 600_000, 75_000, Some(16_384))
        );
        assert_eq!(
            t.get("my-local-model").unwrap().max_output_tokens,
            Some(4096)
        );
        assert!(PriceTable::from_litellm_json("[1]").is_err());
        assert!(PriceTable::from_litellm_json("{").is_err());
    }
}
