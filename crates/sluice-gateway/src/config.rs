//! Configuration, checked in two stages: the TOML file is parsed into
//! [`FileConfig`] (unknown keys and wrong types are errors naming the key),
//! then flags and environment are laid over it and [`Config::resolve`] checks
//! values and fills defaults. Precedence: flag > environment > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod alerts;
mod providers;
mod store;
#[cfg(test)]
mod tests;

pub use self::alerts::*;
pub use self::providers::*;
pub use self::store::*;

/// Where `sluice serve` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
/// Where state lives by default.
pub const DEFAULT_DATA_DIR: &str = "./sluice-data";

/// A configuration value that is wrong: the key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config `{key}`: {reason}")]
pub struct ConfigError {
    /// The key (`listen`, `ledger_sync`, or `file` for a file that cannot be read or parsed).
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    fn new(key: &str, reason: impl std::fmt::Display) -> ConfigError {
        ConfigError {
            key: key.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// `sluice.toml` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on (`SLUICE_LISTEN`, `--listen`).
    pub listen: Option<String>,
    /// Directory for the SQLite database and the generated admin key
    /// (`SLUICE_DATA_DIR`, `--data-dir`). Relative to the working directory.
    pub data_dir: Option<PathBuf>,
    /// URL of the server the CLI talks to (default: `http://` + `listen`).
    pub server: Option<String>,
    /// `"batch"` (default): commits are acknowledged before their ledger row
    /// is written (at most one write batch is lost on `kill -9`); `"always"`:
    /// every commit is durable before it is acknowledged.
    pub ledger_sync: Option<String>,
    /// In `batch` mode, how long the ledger writer gathers rows after the
    /// first one before writing them in one transaction, in ms (0..=50,
    /// default 10). What `kill -9` can lose is at most this plus one write.
    pub ledger_batch_ms: Option<u64>,
    /// Lease of a reservation when the caller names none, in seconds (default 300).
    pub default_lease_s: Option<f64>,
    /// Longest lease a caller may ask for, in seconds (default 3600).
    pub max_lease_s: Option<f64>,
    /// How often expired leases are settled, in ms (default 1000).
    pub lease_check_ms: Option<u64>,
    /// Keep the worker threads polling instead of sleeping until this long
    /// after the last request, in ms (0 to 60000; default 0: off). Cuts the
    /// wake-up latency of an idle CPU at the cost of a whole CPU per worker
    /// while traffic flows (see `busy_poll` in the gateway's docs).
    pub busy_poll_ms: Option<u64>,
    /// Upstream LLM providers for the proxy routes.
    #[serde(default)]
    pub providers: Vec<ProviderDef>,
    /// Models clients may ask for.
    #[serde(default)]
    pub models: Vec<ModelDef>,
    /// A LiteLLM-format price file (`model_prices_and_context_window.json`).
    pub pricing_file: Option<PathBuf>,
    /// Longest time one upstream call, retries included, may take, in seconds (default 600).
    pub upstream_timeout_s: Option<f64>,
    /// Attempts per model on 429, 5xx and transport errors (1..=10, default 3).
    pub upstream_attempts: Option<u32>,
    /// Base of the exponential back-off between attempts, in ms (default 250).
    pub upstream_backoff_ms: Option<u64>,
    /// Largest body a proxied LLM call may have, in bytes (1024 to
    /// 268435456; default 33554432, 32 MiB: Anthropic's own limit, room for
    /// images and long contexts). The other API routes take 1 MiB.
    pub max_request_bytes: Option<u64>,
    /// Where limit state lives: `[store]`.
    #[serde(default)]
    pub store: StoreDef,
    /// Where durable state lives: `[database]`.
    #[serde(default)]
    pub database: DatabaseDef,
    /// Early warnings: `[alerts]`.
    #[serde(default)]
    pub alerts: AlertsDef,
}

/// Values from flags and the environment, laid over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `SLUICE_LISTEN`.
    pub listen: Option<String>,
    /// `--data-dir` / `SLUICE_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `SLUICE_ADMIN_KEY`.
    pub admin_key: Option<String>,
    /// The environment, for providers' `api_key_env`.
    pub env: std::collections::BTreeMap<String, String>,
}

impl Overrides {
    /// Read `SLUICE_LISTEN`, `SLUICE_DATA_DIR` and `SLUICE_ADMIN_KEY` through `env`.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Overrides {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        Overrides {
            listen: get("SLUICE_LISTEN"),
            data_dir: get("SLUICE_DATA_DIR").map(PathBuf::from),
            admin_key: get("SLUICE_ADMIN_KEY"),
            env: std::collections::BTreeMap::new(),
        }
    }

    /// These values, with any set in `flags` taking precedence.
    #[must_use]
    pub fn overlaid_with(self, flags: Overrides) -> Overrides {
        Overrides {
            listen: flags.listen.or(self.listen),
            data_dir: flags.data_dir.or(self.data_dir),
            admin_key: flags.admin_key.or(self.admin_key),
            env: if flags.env.is_empty() {
                self.env
            } else {
                flags.env
            },
        }
    }
}

/// How commits reach the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerSync {
    /// Acknowledge, then write in batches.
    Batch,
    /// Write (and fsync), then acknowledge.
    Always,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The admin key given in the environment, if any.
    pub admin_key: Option<String>,
    /// CLI's server URL.
    pub server: String,
    /// Ledger durability.
    pub ledger_sync: LedgerSync,
    /// Gathering time of a ledger batch (batch mode).
    pub ledger_batch: Duration,
    /// Default reservation lease.
    pub default_lease: Duration,
    /// Longest reservation lease.
    pub max_lease: Duration,
    /// How often leases are checked for expiry.
    pub lease_check: Duration,
    /// Busy polling: how long after the last request the workers keep
    /// polling; `None`: off.
    pub busy_poll: Option<Duration>,
    /// LLM providers and models.
    pub proxy: Proxy,
    /// Where limit state lives.
    pub store: StoreConfig,
    /// PostgreSQL URL; `None`: SQLite in the data directory.
    pub database_url: Option<String>,
    /// Where early warnings are sent.
    pub webhooks: Vec<Webhook>,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are valid by construction.
        Config::resolve(FileConfig::default(), Overrides::default()).unwrap_or_else(|_| Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_key: None,
            server: format!("http://{DEFAULT_LISTEN}"),
            ledger_sync: LedgerSync::Batch,
            ledger_batch: Duration::from_millis(10),
            default_lease: Duration::from_secs(300),
            max_lease: Duration::from_secs(3600),
            lease_check: Duration::from_secs(1),
            busy_poll: None,
            proxy: Proxy::default(),
            store: StoreConfig::Memory,
            database_url: None,
            webhooks: Vec::new(),
        })
    }
}

fn seconds(key: &str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || v <= 0.0 || v > 31.0 * 86_400.0 {
        return Err(ConfigError::new(
            key,
            format!("must be a number of seconds above 0 and at most 31 days, got {v}"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl FileConfig {
    /// Parse TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml names the key and the line; keep its message, say which file.
            let msg = e.message().to_owned();
            // The key is what precedes `=` on the line the error points at.
            let key = e
                .span()
                .map(|span| {
                    let start = span.start.min(text.len());
                    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
                    let line = text[line_start..].lines().next().unwrap_or("");
                    line.split('=').next().unwrap_or("").trim().to_owned()
                })
                .filter(|s| !s.is_empty() && s.len() < 64 && !s.starts_with('['))
                .unwrap_or_else(|| "file".to_owned());
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            ConfigError::new(
                &key,
                match line {
                    Some(line) => format!("{msg} ({}:{line})", origin.display()),
                    None => format!("{msg} ({})", origin.display()),
                },
            )
        })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("file", format!("cannot read {}: {e}", path.display()))
        })?;
        FileConfig::parse(&text, path)
    }
}

impl Config {
    /// Check the file's values with the overrides laid over them.
    pub fn resolve(file: FileConfig, over: Overrides) -> Result<Config, ConfigError> {
        let proxy = resolve_proxy(&file, &over.env)?;
        let listen_text = over
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("expected an address such as 127.0.0.1:8787, got {listen_text:?}"),
            )
        })?;
        let data_dir = over
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        let ledger_sync = match file.ledger_sync.as_deref() {
            None | Some("batch") => LedgerSync::Batch,
            Some("always") => LedgerSync::Always,
            Some(other) => {
                return Err(ConfigError::new(
                    "ledger_sync",
                    format!("expected \"batch\" or \"always\", got {other:?}"),
                ));
            }
        };
        let batch_ms = file.ledger_batch_ms.unwrap_or(10);
        if batch_ms > 50 {
            return Err(ConfigError::new(
                "ledger_batch_ms",
                format!("must be 0 to 50, got {batch_ms}"),
            ));
        }
        let default_lease = seconds("default_lease_s", file.default_lease_s, 300.0)?;
        let max_lease = seconds("max_lease_s", file.max_lease_s, 3600.0)?;
        if default_lease > max_lease {
            return Err(ConfigError::new(
                "default_lease_s",
                "must not be longer than max_lease_s",
            ));
        }
        let lease_check_ms = file.lease_check_ms.unwrap_or(1000);
        if !(10..=60_000).contains(&lease_check_ms) {
            return Err(ConfigError::new(
                "lease_check_ms",
                format!("must be 10 to 60000, got {lease_check_ms}"),
            ));
        }
        let busy_poll_ms = file.busy_poll_ms.unwrap_or(0);
        if busy_poll_ms > 60_000 {
            return Err(ConfigError::new(
                "busy_poll_ms",
                format!("must be 0 (off) to 60000, got {busy_poll_ms}"),
            ));
        }
        let server = match file.server {
            Some(s) if s.starts_with("http://") || s.starts_with("https://") => {
                s.trim_end_matches('/').to_owned()
            }
            Some(s) => {
                return Err(ConfigError::new(
                    "server",
                    format!("expected an http:// or https:// URL, got {s:?}"),
                ));
            }
            None => format!("http://{listen}"),
        };
        let env = |k: &str| over.env.get(k).filter(|v| !v.is_empty()).cloned();
        let store = resolve_store(&file.store, &env)?;
        let database_url = resolve_database(&file.database, &env)?;
        let webhooks = resolve_webhooks(&file.alerts, &env)?;
        let admin_key = over.admin_key;
        if let Some(k) = &admin_key {
            if k.len() < 16 || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::new(
                    "SLUICE_ADMIN_KEY",
                    "must be at least 16 characters without spaces",
                ));
            }
        }
        Ok(Config {
            listen,
            data_dir,
            admin_key,
            server,
            ledger_sync,
            ledger_batch: Duration::from_millis(batch_ms),
            default_lease,
            max_lease,
            lease_check: Duration::from_millis(lease_check_ms),
            busy_poll: (busy_poll_ms > 0).then(|| Duration::from_millis(busy_poll_ms)),
            proxy,
            store,
            database_url,
            webhooks,
        })
    }

    /// Load `path` (if any), lay `over` on it, check it.
    pub fn load(path: Option<&Path>, over: Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Config::resolve(file, over)
    }
}
