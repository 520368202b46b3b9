//! What is counted: requests, tokens and money.

use std::fmt;
use std::str::FromStr;

/// A counted quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Requests (one per call).
    Requests,
    /// Input plus output tokens.
    Tokens,
    /// Input (prompt) tokens.
    InputTokens,
    /// Output (completion) tokens.
    OutputTokens,
    /// US dollars, counted inside the engine as integer micro-dollars.
    CostUsd,
}

impl Metric {
    /// Every metric, in index order.
    pub const ALL: [Metric; 5] = [
        Metric::Requests,
        Metric::Tokens,
        Metric::InputTokens,
        Metric::OutputTokens,
        Metric::CostUsd,
    ];

    /// The wire name (`"cost_usd"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::Tokens => "tokens",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::CostUsd => "cost_usd",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// An unknown metric name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric {0:?}: expected requests, tokens, input_tokens, output_tokens or cost_usd")]
pub struct UnknownMetric(pub String);

impl FromStr for Metric {
    type Err = UnknownMetric;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMetric(s.to_owned()))
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Amounts of every metric for one request. Money is in micro-dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Amounts([u64; 5]);

impl Amounts {
    /// Nothing at all.
    pub const ZERO: Amounts = Amounts([0; 5]);

    /// One request and nothing else.
    pub fn one_request() -> Amounts {
        Amounts::ZERO.with(Metric::Requests, 1)
    }

    /// The amount of `metric`.
    pub fn get(&self, metric: Metric) -> u64 {
        self.0[metric.index()]
    }

    /// Set one metric's amount.
    pub fn set(&mut self, metric: Metric, amount: u64) {
        self.0[metric.index()] = amount;
    }

    /// With one metric's amount set.
    #[must_use]
    pub fn with(mut self, metric: Metric, amount: u64) -> Amounts {
        self.set(metric, amount);
        self
    }

    /// With input and output tokens set, and `tokens` as their sum.
    #[must_use]
    pub fn with_tokens(self, input: u64, output: u64) -> Amounts {
        self.with(Metric::InputTokens, input)
            .with(Metric::OutputTokens, output)
            .with(Metric::Tokens, input.saturating_add(output))
    }

    /// With a cost in micro-dollars.
    #[must_use]
    pub fn with_cost_micros(self, micros: u64) -> Amounts {
        self.with(Metric::CostUsd, micros)
    }
}

/// Micro-dollars per US dollar.
pub const MICROS_PER_USD: u64 = 1_000_000;

/// Why a dollar amount cannot be turned into micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsdError {
    /// NaN or infinite.
    #[error("amount is not a finite number")]
    NotFinite,
    /// Below zero.
    #[error("amount is negative")]
    Negative,
    /// More than the engine counts (about 9 billion dollars).
    #[error("amount is too large")]
    TooLarge,
}

/// Convert a dollar amount from the API edge to integer micro-dollars, rounded
/// to the nearest micro-dollar (`10.0` → `10_000_000`, `0.1` → `100_000`).
pub fn usd_to_micros(usd: f64) -> Result<u64, UsdError> {
    if !usd.is_finite() {
        return Err(UsdError::NotFinite);
    }
    if usd < 0.0 {
        return Err(UsdError::Negative);
    }
    let micros = (usd * MICROS_PER_USD as f64).round();
    if micros > crate::policy::MAX_LIMIT as f64 {
        return Err(UsdError::TooLarge);
    }
    // In range and non-negative, checked above.
    Ok(micros as u64)
}

/// Micro-dollars as dollars, for display at the API edge.
pub fn micros_to_usd(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_USD as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
        }
        assert!("bytes".parse::<Metric>().is_err());
    }

    #[test]
    fn dollars_to_micros() {
        assert_eq!(usd_to_micros(10.0), Ok(10_000_000));
        assert_eq!(usd_to_micros(0.1), Ok(100_000));
        assert_eq!(usd_to_micros(0.000_000_4), Ok(0));
        assert_eq!(usd_to_micros(1e-6), Ok(1));
        assert_eq!(usd_to_micros(f64::NAN), Err(UsdError::NotFinite));
        assert_eq!(usd_to_micros(-1.0), Err(UsdError::Negative));
        assert_eq!(usd_to_micros(1e300), Err(UsdError::TooLarge));
    }

    #[test]
    fn tokens_are_the_sum() {
        let a = Amounts::one_request().with_tokens(10, 5);
        assert_eq!(a.get(Metric::Tokens), 15);
        assert_eq!(a.get(Metric::Requests), 1);
    }
}
