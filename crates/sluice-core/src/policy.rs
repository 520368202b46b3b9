//! Policies: a subject's set of limits, checked once when set.
//!
//! [`LimitDef`] / [`PolicyDef`] are what a caller writes (strings allowed);
//! [`Policy::new`] checks them and resolves each into a [`Limit`] with the
//! parameters its algorithm needs, or names the field that is wrong.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use jiff::tz::TimeZone;

use crate::metric::Metric;
use crate::window::{CalendarUnit, Window, time_zone};

/// The largest limit or amount a limit accepts: 2^53 − 1, so every count is
/// exact in the doubles of other stores' scripting languages as well.
pub const MAX_LIMIT: u64 = (1 << 53) - 1;
/// Sub-windows a `sliding` limit keeps unless told otherwise.
pub const DEFAULT_SLIDING_BUCKETS: u32 = 60;
/// The most sub-windows a `sliding` limit may keep.
pub const MAX_SLIDING_BUCKETS: u32 = 3_600;

/// How a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlgorithmKind {
    /// Rolling window cut into sub-windows; never admits past the limit in any window.
    Sliding,
    /// Generic cell rate algorithm: rate plus burst, O(1) state.
    Gcra,
    /// Fixed windows that reset at their boundary (calendar, or epoch-aligned rolling).
    Fixed,
}

impl AlgorithmKind {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            AlgorithmKind::Sliding => "sliding",
            AlgorithmKind::Gcra => "gcra",
            AlgorithmKind::Fixed => "fixed",
        }
    }
}

impl FromStr for AlgorithmKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "sliding" => Ok(AlgorithmKind::Sliding),
            "gcra" => Ok(AlgorithmKind::Gcra),
            "fixed" => Ok(AlgorithmKind::Fixed),
            _ => Err(()),
        }
    }
}

impl fmt::Display for AlgorithmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One limit as a caller writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitDef {
    /// What is counted.
    pub metric: String,
    /// How much per window (micro-dollars for `cost_usd`).
    pub limit: u64,
    /// `"1h"`, `"day"`, ...
    pub window: String,
    /// `sliding` (default for rolling), `gcra`, `fixed` (default and only choice for calendar).
    pub algorithm: Option<String>,
    /// GCRA burst (default: the limit).
    pub burst: Option<u64>,
    /// Sliding sub-windows (default 60).
    pub buckets: Option<u32>,
}

impl LimitDef {
    /// A limit with the default algorithm for its window.
    pub fn new(metric: &str, limit: u64, window: &str) -> LimitDef {
        LimitDef {
            metric: metric.to_owned(),
            limit,
            window: window.to_owned(),
            algorithm: None,
            burst: None,
            buckets: None,
        }
    }

    /// With an explicit algorithm.
    #[must_use]
    pub fn algorithm(mut self, algorithm: &str) -> LimitDef {
        self.algorithm = Some(algorithm.to_owned());
        self
    }

    /// With a GCRA burst.
    #[must_use]
    pub fn burst(mut self, burst: u64) -> LimitDef {
        self.burst = Some(burst);
        self
    }

    /// With a number of sliding sub-windows.
    #[must_use]
    pub fn buckets(mut self, buckets: u32) -> LimitDef {
        self.buckets = Some(buckets);
        self
    }
}

/// A policy as a caller writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDef {
    /// The limits; every one applies.
    pub limits: Vec<LimitDef>,
    /// IANA zone for calendar windows (default UTC).
    pub timezone: Option<String>,
}

/// A policy field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The field path, e.g. `limits[1].window`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, reason: impl fmt::Display) -> PolicyError {
        PolicyError {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// The parameters an algorithm runs on, resolved from a [`LimitDef`].
#[derive(Clone, Debug)]
pub(crate) enum Params {
    Sliding { window: u64, granularity: u64 },
    Gcra { window: u64, burst: u64 },
    FixedRolling { window: u64 },
    FixedCalendar { unit: CalendarUnit, tz: TimeZone },
}

/// What identifies a limit's counter state: two limits with the same identity
/// on one subject share usage, so changing only the amount (200/h → 300/h) or
/// a GCRA burst keeps the count.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StateIdentity {
    pub(crate) metric: Metric,
    pub(crate) window: Window,
    pub(crate) algorithm: AlgorithmKind,
    /// Sliding granularity in ns, 0 otherwise.
    pub(crate) granularity: u64,
    /// Zone name for calendar windows, empty otherwise.
    pub(crate) zone: String,
}

/// A checked limit.
#[derive(Clone, Debug)]
pub struct Limit {
    metric: Metric,
    window: Window,
    limit: u64,
    algorithm: AlgorithmKind,
    pub(crate) params: Params,
    pub(crate) identity: StateIdentity,
    /// The identity as a stable string, for stores shared between processes.
    state_name: Arc<str>,
}

/// A limit's algorithm and the parameters it runs on, for stores that
/// implement the algorithms themselves (times in ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Rolling window `window` cut into sub-windows of `granularity`, epoch-aligned.
    Sliding {
        /// W.
        window: u64,
        /// Sub-window length, ⌈W / buckets⌉.
        granularity: u64,
    },
    /// Rate `limit` per `window`, bucket depth `burst`.
    Gcra {
        /// W.
        window: u64,
        /// Most a request may take at once.
        burst: u64,
    },
    /// Fixed windows: see [`Limit::fixed_window_end`].
    Fixed,
}

impl Limit {
    /// What is counted.
    pub fn metric(&self) -> Metric {
        self.metric
    }
    /// The window.
    pub fn window(&self) -> Window {
        self.window
    }
    /// The amount per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// The algorithm.
    pub fn algorithm(&self) -> AlgorithmKind {
        self.algorithm
    }
    /// The most one request can ever take: the limit, or the burst for GCRA.
    pub fn capacity(&self) -> u64 {
        match self.params {
            Params::Gcra { burst, .. } => burst,
            _ => self.limit,
        }
    }
    /// The algorithm's parameters.
    pub fn shape(&self) -> Shape {
        match self.params {
            Params::Sliding {
                window,
                granularity,
            } => Shape::Sliding {
                window,
                granularity,
            },
            Params::Gcra { window, burst } => Shape::Gcra { window, burst },
            Params::FixedRolling { .. } | Params::FixedCalendar { .. } => Shape::Fixed,
        }
    }

    /// For a `fixed` limit, the end (ns, exclusive) of the window that
    /// contains instant `at` (calendar windows in the policy's zone).
    pub fn fixed_window_end(&self, at: u64) -> u64 {
        crate::algo::window_end(&self.params, at)
    }

    /// What identifies this limit's counter state (metric, window, algorithm
    /// and shape, not the amount), as a string stable across processes and
    /// versions: stores shared between replicas key state by it.
    pub fn state_name(&self) -> &str {
        &self.state_name
    }

    /// The GCRA burst, if this is a GCRA limit.
    pub fn burst(&self) -> Option<u64> {
        match self.params {
            Params::Gcra { burst, .. } => Some(burst),
            _ => None,
        }
    }

    fn from_def(
        def: &LimitDef,
        index: usize,
        tz: &TimeZone,
        zone: &str,
    ) -> Result<Limit, PolicyError> {
        let field = |name: &str| format!("limits[{index}].{name}");
        let metric: Metric = def
            .metric
            .parse()
            .map_err(|e| PolicyError::new(field("metric"), e))?;
        let window: Window = def
            .window
            .parse()
            .map_err(|e| PolicyError::new(field("window"), e))?;
        if def.limit == 0 {
            return Err(PolicyError::new(
                field("limit"),
                "must be greater than zero",
            ));
        }
        if def.limit > MAX_LIMIT {
            return Err(PolicyError::new(
                field("limit"),
                format!("must be at most {MAX_LIMIT}"),
            ));
        }
        let algorithm = match def.algorithm.as_deref() {
            None => match window {
                Window::Rolling(_) => AlgorithmKind::Sliding,
                Window::Calendar(_) => AlgorithmKind::Fixed,
            },
            Some(name) => name.parse().map_err(|()| {
                PolicyError::new(
                    field("algorithm"),
                    format!("unknown algorithm {name:?}: expected sliding, gcra or fixed"),
                )
            })?,
        };
        if def.burst.is_some() && algorithm != AlgorithmKind::Gcra {
            return Err(PolicyError::new(
                field("burst"),
                "only a gcra limit takes a burst",
            ));
        }
        if def.buckets.is_some() && algorithm != AlgorithmKind::Sliding {
            return Err(PolicyError::new(
                field("buckets"),
                "only a sliding limit takes buckets",
            ));
        }
        let mut granularity = 0;
        let params = match (window, algorithm) {
            (Window::Calendar(unit), AlgorithmKind::Fixed) => Params::FixedCalendar {
                unit,
                tz: tz.clone(),
            },
            (Window::Calendar(_), other) => {
                return Err(PolicyError::new(
                    field("algorithm"),
                    format!(
                        "{other} needs a rolling window such as \"1h\"; calendar windows are fixed"
                    ),
                ));
            }
            (Window::Rolling(w), AlgorithmKind::Fixed) => Params::FixedRolling { window: w },
            (Window::Rolling(w), AlgorithmKind::Gcra) => {
                let burst = def.burst.unwrap_or(def.limit);
                if burst == 0 || burst > MAX_LIMIT {
                    return Err(PolicyError::new(
                        field("burst"),
                        format!("must be 1 to {MAX_LIMIT}"),
                    ));
                }
                Params::Gcra { window: w, burst }
            }
            (Window::Rolling(w), AlgorithmKind::Sliding) => {
                let buckets = def.buckets.unwrap_or(DEFAULT_SLIDING_BUCKETS);
                if buckets == 0 || buckets > MAX_SLIDING_BUCKETS {
                    return Err(PolicyError::new(
                        field("buckets"),
                        format!("must be 1 to {MAX_SLIDING_BUCKETS}"),
                    ));
                }
                granularity = w.div_ceil(u64::from(buckets));
                Params::Sliding {
                    window: w,
                    granularity,
                }
            }
        };
        let zone = if matches!(window, Window::Calendar(_)) {
            zone.to_owned()
        } else {
            String::new()
        };
        let window_ns = match window {
            Window::Rolling(ns) => ns.to_string(),
            Window::Calendar(unit) => unit.name().to_owned(),
        };
        let state_name: Arc<str> = format!(
            "{}/{}/{}/{}/{}",
            metric.name(),
            algorithm.name(),
            window_ns,
            granularity,
            zone
        )
        .into();
        Ok(Limit {
            metric,
            window,
            limit: def.limit,
            algorithm,
            params,
            identity: StateIdentity {
                metric,
                window,
                algorithm,
                granularity,
                zone,
            },
            state_name,
        })
    }
}

/// A checked policy: every limit applies to its subject.
#[derive(Clone, Debug)]
pub struct Policy {
    limits: Vec<Arc<Limit>>,
    timezone: String,
}

/// The most limits one policy may hold.
pub const MAX_LIMITS_PER_POLICY: usize = 32;

impl Policy {
    /// Check a policy definition.
    pub fn new(def: &PolicyDef) -> Result<Policy, PolicyError> {
        let zone = def.timezone.clone().unwrap_or_else(|| "UTC".to_owned());
        let tz = time_zone(&zone).map_err(|e| PolicyError::new("timezone", e))?;
        if def.limits.is_empty() {
            return Err(PolicyError::new(
                "limits",
                "a policy needs at least one limit",
            ));
        }
        if def.limits.len() > MAX_LIMITS_PER_POLICY {
            return Err(PolicyError::new(
                "limits",
                format!("at most {MAX_LIMITS_PER_POLICY} limits"),
            ));
        }
        let mut limits: Vec<Arc<Limit>> = Vec::with_capacity(def.limits.len());
        for (i, d) in def.limits.iter().enumerate() {
            let limit = Limit::from_def(d, i, &tz, &zone)?;
            if limits.iter().any(|l| l.identity == limit.identity) {
                return Err(PolicyError::new(
                    format!("limits[{i}]"),
                    format!(
                        "duplicates another {} limit on the same window",
                        limit.metric
                    ),
                ));
            }
            limits.push(Arc::new(limit));
        }
        Ok(Policy {
            limits,
            timezone: zone,
        })
    }

    /// The limits.
    pub fn limits(&self) -> &[Arc<Limit>] {
        &self.limits
    }

    /// The same policy with every limit (and GCRA burst) divided by `n`,
    /// rounded down but at least 1: `n` replicas deciding alone with it admit
    /// at most the original limit between them (unless a limit is below `n`).
    /// State names are kept.
    #[must_use]
    pub fn divided(&self, n: u64) -> Policy {
        let n = n.max(1);
        let limits = self
            .limits
            .iter()
            .map(|l| {
                let mut l = Limit::clone(l);
                l.limit = (l.limit / n).max(1);
                if let Params::Gcra { burst, .. } = &mut l.params {
                    *burst = (*burst / n).max(1);
                }
                Arc::new(l)
            })
            .collect();
        Policy {
            limits,
            timezone: self.timezone.clone(),
        }
    }

    /// The IANA zone of calendar windows.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(def: PolicyDef) -> PolicyError {
        Policy::new(&def).unwrap_err()
    }

    fn one(limit: LimitDef) -> PolicyDef {
        PolicyDef {
            limits: vec![limit],
            timezone: None,
        }
    }

    #[test]
    fn defaults_follow_the_window() {
        let p = Policy::new(&PolicyDef {
            limits: vec![
                LimitDef::new("requests", 200, "1h"),
                LimitDef::new("cost_usd", 10_000_000, "day"),
            ],
            timezone: Some("Europe/Berlin".into()),
        })
        .unwrap();
        assert_eq!(p.limits()[0].algorithm(), AlgorithmKind::Sliding);
        assert_eq!(p.limits()[1].algorithm(), AlgorithmKind::Fixed);
        assert_eq!(p.timezone(), "Europe/Berlin");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err(one(LimitDef::new("bytes", 1, "1h"))).field,
            "limits[0].metric"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 0, "1h"))).field,
            "limits[0].limit"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", MAX_LIMIT + 1, "1h"))).field,
            "limits[0].limit"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "fortnight"))).field,
            "limits[0].window"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "1h").algorithm("leaky"))).field,
            "limits[0].algorithm"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "day").algorithm("gcra"))).field,
            "limits[0].algorithm"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "1h").burst(5))).field,
            "limits[0].burst"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "1h")
                .algorithm("gcra")
                .burst(0)))
            .field,
            "limits[0].burst"
        );
        assert_eq!(
            err(one(LimitDef::new("requests", 1, "1h").buckets(0))).field,
            "limits[0].buckets"
        );
        assert_eq!(err(PolicyDef::default()).field, "limits");
        let mut bad_zone = one(LimitDef::new("requests", 1, "day"));
        bad_zone.timezone = Some("Mars/Base".into());
        assert_eq!(err(bad_zone).field, "timezone");
        let dup = PolicyDef {
            limits: vec![
                LimitDef::new("requests", 1, "1h"),
                LimitDef::new("requests", 2, "60m"),
            ],
            timezone: None,
        };
        assert_eq!(err(dup).field, "limits[1]");
    }
}
