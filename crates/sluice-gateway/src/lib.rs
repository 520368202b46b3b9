//! `sluice-gateway`: the `sluice serve` HTTP service over `sluice-core`.
//!
//! Policies, decisions (check, reserve, commit, release), usage, agent keys,
//! AXME-compatible cost-policy and intent endpoints, Prometheus metrics, and a
//! durable SQLite ledger from which window state is rebuilt at start.
//! The binary (`crates/sluice`) only parses flags and calls [`Gateway`].

pub mod alerts;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod busy_poll;
pub mod config;
pub mod db;
pub mod engine;
pub mod error;
pub mod estimate;
pub mod idempotency;
pub mod json;
pub mod killswitch;
pub mod ledger;
pub mod metrics;
pub mod pricing;
pub mod proxy;
pub mod ratelimit;
pub mod reservations;
mod routes;
pub mod server;
pub mod upstream;
pub mod wire;

pub use config::{Config, ConfigError, FileConfig, LedgerSync, Overrides};
pub use server::{AdminKeySource, AppState, Gateway, Recovery, StartError, admin_key_path};
