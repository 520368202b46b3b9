//! Configuration, checked in two stages: the TOML file is parsed into
//! [`FileConfig`] (unknown keys and wrong types are errors naming the key),
//! then flags and environment are laid over it and [`Config::resolve`] checks
//! values and fills defaults. Precedence: flag > environment > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// `[alerts]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsDef {
    /// `[[alerts.webhooks]]`.
    #[serde(default)]
    pub webhooks: Vec<WebhookDef>,
}

/// One `[[alerts.webhooks]]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDef {
    /// Where to POST.
    pub url: String,
    /// `"json"` (default) or `"slack"` (a Slack-compatible `{"text"}` body).
    pub format: Option<String>,
    /// The shared secret for the `x-sluice-signature` HMAC-SHA256 header.
    pub secret: Option<String>,
    /// Or the environment variable holding it.
    pub secret_env: Option<String>,
}

/// A checked webhook.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Where to POST.
    pub url: String,
    /// A Slack-compatible body.
    pub slack: bool,
    /// HMAC-SHA256 key for `x-sluice-signature`.
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &redact(&self.url))
            .field("slack", &self.slack)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

fn resolve_webhooks(
    def: &AlertsDef,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Webhook>, ConfigError> {
    def.webhooks
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let key = |k: &str| format!("alerts.webhooks[{i}].{k}");
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || reqwest::Url::parse(&w.url).is_err()
            {
                return Err(ConfigError::new(
                    &key("url"),
                    format!(
                        "expected an http:// or https:// URL, got {:?}",
                        redact(&w.url)
                    ),
                ));
            }
            let slack = match w.format.as_deref() {
                None | Some("json") => false,
                Some("slack") => true,
                Some(other) => {
                    return Err(ConfigError::new(
                        &key("format"),
                        format!("expected \"json\" or \"slack\", got {other:?}"),
                    ));
                }
            };
            let secret = match (&w.secret, &w.secret_env) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        &key("secret"),
                        "set secret or secret_env, not both",
                    ));
                }
                (Some(s), None) => Some(s.clone()),
                (None, Some(var)) => Some(env(var).ok_or_else(|| {
                    ConfigError::new(&key("secret_env"), format!("{var} is not set"))
                })?),
                (None, None) => None,
            };
            if secret.as_ref().is_some_and(|s| s.len() < 16) {
                return Err(ConfigError::new(
                    &key("secret"),
                    "must be at least 16 characters",
                ));
            }
            Ok(Webhook {
                url: w.url.clone(),
                slack,
                secret: secret.map(String::into_bytes),
            })
        })
        .collect()
}

/// `[store]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDef {
    /// `"memory"` (default) or `"redis"`.
    pub kind: Option<String>,
    /// `redis://` or `rediss://` URL (`SLUICE_REDIS_URL`), or the nodes of
    /// a Redis Cluster: a list, or URLs separated by commas.
    pub url: Option<UrlDef>,
    /// The URL is one node of a Redis Cluster (implied by a list).
    pub cluster: Option<bool>,
    /// TLS: a PEM file of the CA certificates to trust (a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every key (default `"sluice:"`).
    pub key_prefix: Option<String>,
    /// `"deny"` (default), `"allow"` or `"local"`.
    pub on_store_error: Option<String>,
    /// A Redis call slower than this fails, in ms (default 250).
    pub timeout_ms: Option<u64>,
    /// Replicas sharing the store: `local` mode divides each limit by it (default 1).
    pub replicas: Option<u32>,
}

/// `store.url`: one URL or a list of cluster nodes.
#[derive(Debug, Clone)]
pub enum UrlDef {
    /// One URL (several separated by commas make a cluster).
    One(String),
    /// Cluster nodes.
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for UrlDef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UrlDef, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UrlDef;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a redis:// URL or a list of cluster node URLs")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UrlDef, E> {
                Ok(UrlDef::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UrlDef, A::Error> {
                let mut nodes = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    nodes.push(n);
                }
                Ok(UrlDef::Many(nodes))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[database]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseDef {
    /// `postgres://...` (`SLUICE_DATABASE_URL`); default: SQLite in the data directory.
    pub url: Option<String>,
}

/// What the gateway does when the shared store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Refuse with 503 (fail closed).
    Deny,
    /// Let requests through (their spend still reaches the ledger).
    Allow,
    /// Decide on this replica alone, each limit divided by the replica count.
    Local,
}

/// Checked `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process.
    Memory,
    /// In Redis.
    Redis {
        /// URL (with `cluster`, the nodes separated by commas).
        url: String,
        /// A Redis Cluster.
        cluster: bool,
        /// Key prefix.
        key_prefix: String,
        /// On failure.
        on_error: OnStoreError,
        /// Call timeout.
        timeout: Duration,
        /// Replicas (for `local`).
        replicas: u32,
        /// TLS: PEM certificates to trust instead of the default roots.
        tls_ca: Option<Vec<u8>>,
    },
}

impl StoreConfig {
    /// Where limit state lives, for logs (credentials redacted).
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Memory => "in memory (this process)".to_owned(),
            StoreConfig::Redis {
                url,
                cluster: false,
                key_prefix,
                ..
            } => format!("redis {} (prefix {key_prefix:?})", redact(url)),
            StoreConfig::Redis {
                url, key_prefix, ..
            } => {
                let nodes: Vec<String> = url.split(',').map(redact).collect();
                format!(
                    "redis cluster, seed nodes {} (prefix {key_prefix:?})",
                    nodes.join(" ")
                )
            }
        }
    }
}

fn resolve_store(
    def: &StoreDef,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StoreConfig, ConfigError> {
    let kind = def.kind.as_deref().unwrap_or("memory");
    match kind {
        "memory" => Ok(StoreConfig::Memory),
        "redis" => {
            let (nodes, listed): (Vec<String>, bool) = match env("SLUICE_REDIS_URL")
                .map(UrlDef::One)
                .or_else(|| def.url.clone())
            {
                None => {
                    return Err(ConfigError::new(
                        "store.url",
                        "kind = \"redis\" needs a url (or SLUICE_REDIS_URL)",
                    ));
                }
                Some(UrlDef::One(u)) => {
                    let nodes: Vec<String> = u.split(',').map(|n| n.trim().to_owned()).collect();
                    let listed = nodes.len() > 1;
                    (nodes, listed)
                }
                Some(UrlDef::Many(nodes)) => (nodes, true),
            };
            let cluster = listed || def.cluster.unwrap_or(false);
            if nodes.is_empty() {
                return Err(ConfigError::new(
                    "store.url",
                    "a cluster needs at least one node URL",
                ));
            }
            let is_tls = |u: &str| u.starts_with("rediss://") || u.starts_with("valkeys://");
            let tls = nodes.first().is_some_and(|u| is_tls(u));
            for u in &nodes {
                if !(is_tls(u) || u.starts_with("redis://") || u.starts_with("valkey://"))
                    || u.contains(char::is_whitespace)
                {
                    return Err(ConfigError::new(
                        "store.url",
                        format!(
                            "expected a redis:// or rediss:// URL (or a list of cluster nodes), got {:?}",
                            redact(u)
                        ),
                    ));
                }
                if is_tls(u) != tls {
                    return Err(ConfigError::new(
                        "store.url",
                        "cluster nodes must all use TLS (rediss://) or none",
                    ));
                }
            }
            let url = nodes.join(",");
            let tls_ca = match &def.tls_ca_file {
                None => None,
                Some(_) if !tls => {
                    return Err(ConfigError::new(
                        "store.tls_ca_file",
                        "only applies to a rediss:// (TLS) url",
                    ));
                }
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        ConfigError::new(
                            "store.tls_ca_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                        return Err(ConfigError::new(
                            "store.tls_ca_file",
                            format!("{} holds no PEM certificate", path.display()),
                        ));
                    }
                    Some(pem)
                }
            };
            let key_prefix = def
                .key_prefix
                .clone()
                .unwrap_or_else(|| "sluice:".to_owned());
            if key_prefix.len() > 64
                || key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c == '{' || c == '}')
            {
                return Err(ConfigError::new(
                    "store.key_prefix",
                    "must be at most 64 characters, without spaces or braces",
                ));
            }
            let on_error = match def.on_store_error.as_deref() {
                None | Some("deny") => OnStoreError::Deny,
                Some("allow") => OnStoreError::Allow,
                Some("local") => OnStoreError::Local,
                Some(other) => {
                    return Err(ConfigError::new(
                        "store.on_store_error",
                        format!("expected \"deny\", \"allow\" or \"local\", got {other:?}"),
                    ));
                }
            };
            let timeout_ms = def.timeout_ms.unwrap_or(250);
            if !(1..=60_000).contains(&timeout_ms) {
                return Err(ConfigError::new(
                    "store.timeout_ms",
                    format!("must be 1 to 60000, got {timeout_ms}"),
                ));
            }
            let replicas = def.replicas.unwrap_or(1);
            if !(1..=1_000).contains(&replicas) {
                return Err(ConfigError::new(
                    "store.replicas",
                    format!("must be 1 to 1000, got {replicas}"),
                ));
            }
            Ok(StoreConfig::Redis {
                url,
                cluster,
                key_prefix,
                on_error,
                timeout: Duration::from_millis(timeout_ms),
                replicas,
                tls_ca,
            })
        }
        other => Err(ConfigError::new(
            "store.kind",
            format!("expected \"memory\" or \"redis\", got {other:?}"),
        )),
    }
}

/// A URL with its password (if any) replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn resolve_database(
    def: &DatabaseDef,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    match env("SLUICE_DATABASE_URL").or_else(|| def.url.clone()) {
        None => Ok(None),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Some(url))
        }
        Some(url) => Err(ConfigError::new(
            "database.url",
            format!(
                "expected a postgres:// URL (the default database is SQLite in the data directory), got {:?}",
                redact(&url)
            ),
        )),
    }
}

/// `[[providers]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDef {
    /// Its name, referenced by models.
    pub name: String,
    /// Wire format: `openai` or `anthropic`.
    pub format: String,
    /// E.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the upstream key.
    pub api_key_env: Option<String>,
    /// Extra CA certificates (PEM) to trust for this provider's `https://`
    /// URL, besides the public roots (a self-hosted model server, a
    /// corporate gateway).
    pub tls_ca_file: Option<PathBuf>,
}

/// `[[models]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDef {
    /// What clients ask for.
    pub name: String,
    /// A provider's name.
    pub provider: String,
    /// The provider's name for it (default: `name`).
    pub upstream_name: Option<String>,
    /// $ per million input tokens (overrides the price file and the built-in table).
    pub input_usd_per_mtok: Option<f64>,
    /// $ per million output tokens.
    pub output_usd_per_mtok: Option<f64>,
    /// $ per million cached input tokens.
    pub cached_input_usd_per_mtok: Option<f64>,
    /// $ per million input tokens written to a 5-minute prompt cache (Anthropic;
    /// default 1.25 × input; 1-hour writes are 2 × input).
    pub cache_write_usd_per_mtok: Option<f64>,
    /// The most output tokens one request may produce.
    pub max_output_tokens: Option<u64>,
    /// Models tried in order when this one's provider keeps failing.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// The provider's requests-per-minute quota on this model, enforced locally.
    pub rpm: Option<u64>,
    /// The provider's tokens-per-minute quota (input + worst-case output), enforced locally.
    pub tpm: Option<u64>,
}

/// A provider's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI's.
    OpenAi,
    /// Anthropic's.
    Anthropic,
}

/// A checked provider.
#[derive(Clone)]
pub struct Provider {
    /// Its name.
    pub name: String,
    /// Its wire.
    pub wire: Wire,
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// The upstream key (never logged or sent to clients).
    pub api_key: Option<String>,
    /// Extra CA certificates (PEM, checked to hold at least one) to trust.
    pub tls_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("wire", &self.wire)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("tls_ca", &self.tls_ca.is_some())
            .finish()
    }
}

/// A checked model.
#[derive(Debug, Clone)]
pub struct Model {
    /// What clients ask for.
    pub name: String,
    /// Index into [`Proxy::providers`].
    pub provider: usize,
    /// The provider's name for it.
    pub upstream_name: String,
    /// Its price.
    pub price: crate::pricing::Price,
    /// The most output tokens one request may produce.
    pub max_output_tokens: u64,
    /// Fallback models, in order.
    pub fallbacks: Vec<String>,
    /// `model:NAME`, parsed once.
    pub subject: sluice_core::Subject,
    /// `provider:PROVIDER/UPSTREAM_NAME` when the provider's quota on this
    /// upstream model is configured (shared by every alias of it).
    pub quota_subject: Option<sluice_core::Subject>,
}

/// A provider's per-minute quota on one upstream model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per rolling minute.
    pub rpm: Option<u64>,
    /// Tokens per rolling minute.
    pub tpm: Option<u64>,
}

/// The proxy's providers and models.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Providers.
    pub providers: Vec<Provider>,
    /// Models by name (shared: a request holds its model without copying it).
    pub models: std::collections::BTreeMap<String, std::sync::Arc<Model>>,
    /// Longest upstream call, retries included.
    pub timeout: Duration,
    /// Attempts per model.
    pub attempts: u32,
    /// Back-off base.
    pub backoff: Duration,
    /// Provider quotas by subject (`provider:PROVIDER/UPSTREAM_NAME`).
    pub quotas: std::collections::BTreeMap<String, Quota>,
    /// Largest body of a proxied call, in bytes.
    pub max_body: usize,
}

/// The default `max_request_bytes`: 32 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 << 20;

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            providers: Vec::new(),
            models: std::collections::BTreeMap::new(),
            timeout: Duration::from_secs(600),
            attempts: 3,
            backoff: Duration::from_millis(250),
            quotas: std::collections::BTreeMap::new(),
            max_body: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

fn resolve_proxy(
    file: &FileConfig,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Proxy, ConfigError> {
    let mut providers: Vec<Provider> = Vec::new();
    for (i, p) in file.providers.iter().enumerate() {
        let key = |f: &str| format!("providers[{i}].{f}");
        if p.name.is_empty() || providers.iter().any(|q| q.name == p.name) {
            return Err(ConfigError::new(
                &key("name"),
                format!("must be a unique, non-empty name, got {:?}", p.name),
            ));
        }
        let wire = match p.format.as_str() {
            "openai" => Wire::OpenAi,
            "anthropic" => Wire::Anthropic,
            other => {
                return Err(ConfigError::new(
                    &key("format"),
                    format!("expected \"openai\" or \"anthropic\", got {other:?}"),
                ));
            }
        };
        if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
            return Err(ConfigError::new(
                &key("base_url"),
                format!("expected an http:// or https:// URL, got {:?}", p.base_url),
            ));
        }
        let api_key = match &p.api_key_env {
            Some(var) => Some(env.get(var).filter(|v| !v.is_empty()).cloned().ok_or_else(
                || {
                    ConfigError::new(
                        &key("api_key_env"),
                        format!("the environment variable {var} is not set"),
                    )
                },
            )?),
            None => None,
        };
        let tls_ca = match &p.tls_ca_file {
            None => None,
            Some(_) if !p.base_url.starts_with("https://") => {
                return Err(ConfigError::new(
                    &key("tls_ca_file"),
                    "only applies to an https:// base_url",
                ));
            }
            Some(path) => {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        &key("tls_ca_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
                match certs {
                    Ok(c) if !c.is_empty() => Some(pem),
                    Ok(_) => {
                        return Err(ConfigError::new(
                            &key("tls_ca_file"),
                            format!("{} holds no PEM certificate", path.display()),
                        ));
                    }
                    Err(e) => {
                        return Err(ConfigError::new(
                            &key("tls_ca_file"),
                            format!("{}: {e}", path.display()),
                        ));
                    }
                }
            }
        };
        providers.push(Provider {
            name: p.name.clone(),
            wire,
            base_url: p.base_url.trim_end_matches('/').to_owned(),
            api_key,
            tls_ca,
        });
    }
    let file_prices = match &file.pricing_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "pricing_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            crate::pricing::PriceTable::from_litellm_json(&text)
                .map_err(|e| ConfigError::new("pricing_file", e))?
        }
        None => crate::pricing::PriceTable::default(),
    };
    let builtin = crate::pricing::PriceTable::builtin();
    let mut models = std::collections::BTreeMap::new();
    let mut quotas: std::collections::BTreeMap<String, (Quota, usize)> =
        std::collections::BTreeMap::new();
    for (i, m) in file.models.iter().enumerate() {
        let key = |f: &str| format!("models[{i}].{f}");
        if m.name.is_empty() || models.contains_key(&m.name) {
            return Err(ConfigError::new(
                &key("name"),
                format!("must be a unique, non-empty name, got {:?}", m.name),
            ));
        }
        let provider = providers
            .iter()
            .position(|p| p.name == m.provider)
            .ok_or_else(|| {
                ConfigError::new(
                    &key("provider"),
                    format!("no provider named {:?}", m.provider),
                )
            })?;
        let upstream_name = m.upstream_name.clone().unwrap_or_else(|| m.name.clone());
        let known = file_prices
            .get(&upstream_name)
            .or_else(|| builtin.get(&upstream_name));
        let price = match (m.input_usd_per_mtok, m.output_usd_per_mtok) {
            (Some(i), Some(o)) => {
                let mut p = crate::pricing::Price::from_usd_per_mtok(i, o, m.cached_input_usd_per_mtok)
                    .map_err(|e| ConfigError::new(&key("input_usd_per_mtok"), e))?;
                p.max_output_tokens = known.and_then(|k| k.max_output_tokens);
                p
            }
            (None, None) => known.ok_or_else(|| {
                ConfigError::new(
                    &key("input_usd_per_mtok"),
                    format!("no price for {upstream_name:?}: set input_usd_per_mtok and output_usd_per_mtok, or add it to pricing_file"),
                )
            })?,
            _ => {
                return Err(ConfigError::new(&key("output_usd_per_mtok"), "set both input_usd_per_mtok and output_usd_per_mtok, or neither"));
            }
        };
        let price = match m.cache_write_usd_per_mtok {
            Some(w) => price
                .with_cache_write(w)
                .map_err(|e| ConfigError::new(&key("cache_write_usd_per_mtok"), e))?,
            None => price,
        };
        let max_output_tokens = m.max_output_tokens.or(price.max_output_tokens).filter(|n| *n > 0).ok_or_else(|| {
            ConfigError::new(&key("max_output_tokens"), format!("unknown for {upstream_name:?}: set it (the worst case of a request needs it)"))
        })?;
        for (field, v) in [("rpm", m.rpm), ("tpm", m.tpm)] {
            if v == Some(0) {
                return Err(ConfigError::new(
                    &key(field),
                    "must be at least 1 (leave it out for no quota)",
                ));
            }
        }
        let subject = sluice_core::Subject::parse(&format!("model:{}", m.name))
            .map_err(|e| ConfigError::new(&key("name"), format!("cannot be a subject: {e}")))?;
        let quota_subject = format!("provider:{}/{upstream_name}", providers[provider].name);
        let parsed_quota = sluice_core::Subject::parse(&quota_subject).map_err(|e| {
            ConfigError::new(&key("upstream_name"), format!("cannot name its quota: {e}"))
        })?;
        if m.rpm.is_some() || m.tpm.is_some() {
            let quota = Quota {
                rpm: m.rpm,
                tpm: m.tpm,
            };
            match quotas.get(&quota_subject) {
                Some((q, j)) if *q != quota => {
                    return Err(ConfigError::new(
                        &key("rpm"),
                        format!(
                            "models[{j}] serves the same upstream model with a different rpm/tpm; one provider quota needs one value"
                        ),
                    ));
                }
                _ => {
                    quotas.insert(quota_subject.clone(), (quota, i));
                }
            }
        }
        models.insert(
            m.name.clone(),
            Model {
                name: m.name.clone(),
                provider,
                upstream_name,
                price,
                max_output_tokens,
                fallbacks: m.fallbacks.clone(),
                subject,
                quota_subject: Some(parsed_quota),
            },
        );
    }
    for (i, m) in file.models.iter().enumerate() {
        for f in &m.fallbacks {
            let Some(fb) = models.get(f) else {
                return Err(ConfigError::new(
                    &format!("models[{i}].fallbacks"),
                    format!("no model named {f:?}"),
                ));
            };
            let wire = |name: &str| models.get(name).map(|x| providers[x.provider].wire);
            if f == &m.name || wire(&fb.name) != wire(&m.name) {
                return Err(ConfigError::new(
                    &format!("models[{i}].fallbacks"),
                    format!("{f:?} must be another model on the same wire format"),
                ));
            }
        }
    }
    // Only upstream models with a quota carry its subject.
    for m in models.values_mut() {
        if m.quota_subject
            .as_ref()
            .is_some_and(|q| !quotas.contains_key(q.as_str()))
        {
            m.quota_subject = None;
        }
    }
    let timeout = seconds("upstream_timeout_s", file.upstream_timeout_s, 600.0)?;
    let attempts = file.upstream_attempts.unwrap_or(3);
    if !(1..=10).contains(&attempts) {
        return Err(ConfigError::new(
            "upstream_attempts",
            format!("must be 1 to 10, got {attempts}"),
        ));
    }
    let backoff_ms = file.upstream_backoff_ms.unwrap_or(250);
    if backoff_ms > 60_000 {
        return Err(ConfigError::new(
            "upstream_backoff_ms",
            format!("must be at most 60000, got {backoff_ms}"),
        ));
    }
    let max_body = file
        .max_request_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BYTES as u64);
    if !(1024..=1 << 28).contains(&max_body) {
        return Err(ConfigError::new(
            "max_request_bytes",
            format!("must be 1024 to 268435456, got {max_body}"),
        ));
    }
    Ok(Proxy {
        providers,
        models: models
            .into_iter()
            .map(|(name, m)| (name, std::sync::Arc::new(m)))
            .collect(),
        timeout,
        attempts,
        backoff: Duration::from_millis(backoff_ms),
        quotas: quotas.into_iter().map(|(s, (q, _))| (s, q)).collect(),
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(
            FileConfig::parse(text, Path::new("sluice.toml"))?,
            Overrides::default(),
        )
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.ledger_sync, LedgerSync::Batch);
        assert_eq!(c.server, "http://127.0.0.1:8787");
        assert_eq!(c.busy_poll, None);
        assert_eq!(
            parse("busy_poll_ms = 250").unwrap().busy_poll,
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse("busy_poll_ms = 0").unwrap().busy_poll, None);
        assert_eq!(c.proxy.max_body, 32 << 20);
        assert_eq!(
            parse("max_request_bytes = 4096").unwrap().proxy.max_body,
            4096
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("listen = \"nope\"", "listen"),
            ("ledger_sync = \"sometimes\"", "ledger_sync"),
            ("lease_check_ms = 0", "lease_check_ms"),
            ("ledger_batch_ms = 51", "ledger_batch_ms"),
            ("busy_poll_ms = 60001", "busy_poll_ms"),
            ("busy_poll_ms = -1", "busy_poll_ms"),
            ("max_request_bytes = 1023", "max_request_bytes"),
            ("max_request_bytes = 268435457", "max_request_bytes"),
            ("default_lease_s = -1.0", "default_lease_s"),
            ("server = \"ftp://x\"", "server"),
            ("lisen = \"127.0.0.1:1\"", "lisen"),
            ("lease_check_ms = \"fast\"", "lease_check_ms"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    const PROVIDER: &str = "[[providers]]\nname = \"openai\"\nformat = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\n";

    #[test]
    fn providers_and_models_resolve_with_builtin_or_configured_prices() {
        let text = format!(
            "{PROVIDER}[[models]]\nname = \"gpt-4o-mini\"\nprovider = \"openai\"\nfallbacks = [\"cheap\"]\n\
             [[models]]\nname = \"cheap\"\nprovider = \"openai\"\nupstream_name = \"my-model\"\n\
             input_usd_per_mtok = 0.5\noutput_usd_per_mtok = 1.5\nmax_output_tokens = 1000\n"
        );
        let c = parse(&text).unwrap();
        let m = &c.proxy.models["gpt-4o-mini"];
        assert_eq!(
            (m.price.input, m.price.output, m.max_output_tokens),
            (150_000, 600_000, 16_384)
        );
        let cheap = &c.proxy.models["cheap"];
        assert_eq!(
            (
                cheap.upstream_name.as_str(),
                cheap.price.input,
                cheap.price.cached_input
            ),
            ("my-model", 500_000, 500_000)
        );
        assert_eq!(c.proxy.providers[0].wire, Wire::OpenAi);
        assert!(!format!("{:?}", c.proxy.providers[0]).contains("sk-"));
        // Quotas: one subject per upstream model, shared by its names; none without rpm/tpm.
        let text = format!(
            "{PROVIDER}[[models]]\nname = \"a\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 10\ntpm = 5000\n\
             [[models]]\nname = \"b\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\n\
             [[models]]\nname = \"c\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o-mini\"\n"
        );
        let c = parse(&text).unwrap();
        let q = |m: &str| {
            c.proxy.models[m]
                .quota_subject
                .as_ref()
                .map(|s| s.as_str().to_owned())
        };
        assert_eq!(q("a").as_deref(), Some("provider:openai/gpt-4o"));
        assert_eq!(q("b"), q("a"));
        assert_eq!(q("c"), None);
        assert_eq!(
            c.proxy.quotas["provider:openai/gpt-4o"],
            Quota {
                rpm: Some(10),
                tpm: Some(5000)
            }
        );
    }

    #[test]
    fn proxy_errors_name_the_key() {
        let model = |extra: &str| {
            format!("{PROVIDER}[[models]]\nname = \"m\"\nprovider = \"openai\"\n{extra}")
        };
        for (text, key) in [
            (
                PROVIDER.replace("\"openai\"\nbase", "\"grpc\"\nbase"),
                "providers[0].format",
            ),
            (
                PROVIDER.replace("https://", "ftp://"),
                "providers[0].base_url",
            ),
            (
                format!("{PROVIDER}api_key_env = \"SLUICE_TEST_UNSET_KEY\"\n"),
                "providers[0].api_key_env",
            ),
            (format!("{PROVIDER}{PROVIDER}"), "providers[1].name"),
            (
                format!("{PROVIDER}tls_ca_file = \"/nonexistent/ca.pem\"\n"),
                "providers[0].tls_ca_file",
            ),
            (
                // A file that is no certificate (this source file).
                format!(
                    "{PROVIDER}tls_ca_file = \"{}\"\n",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs")
                ),
                "providers[0].tls_ca_file",
            ),
            (
                format!("{PROVIDER}tls_ca_file = \"/nonexistent/ca.pem\"\n")
                    .replace("https://", "http://"),
                "providers[0].tls_ca_file",
            ),
            (
                model("provider = \"x\"\n").replace("provider = \"openai\"\nprovider", "provider"),
                "models[0].provider",
            ),
            (model(""), "models[0].input_usd_per_mtok"),
            (
                model("input_usd_per_mtok = 1.0\n"),
                "models[0].output_usd_per_mtok",
            ),
            (
                model("input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n"),
                "models[0].max_output_tokens",
            ),
            (
                model(
                    "input_usd_per_mtok = -1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\n",
                ),
                "models[0].input_usd_per_mtok",
            ),
            (
                model(
                    "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\nfallbacks = [\"nope\"]\n",
                ),
                "models[0].fallbacks",
            ),
            (
                "pricing_file = \"/nonexistent/prices.json\"".to_owned(),
                "pricing_file",
            ),
            (
                model(
                    "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\nrpm = 0\n",
                ),
                "models[0].rpm",
            ),
            (
                model(
                    "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\ncache_write_usd_per_mtok = -2.0\n",
                ),
                "models[0].cache_write_usd_per_mtok",
            ),
            (
                // Two names for one upstream model with different quotas.
                format!(
                    "{PROVIDER}[[models]]\nname = \"a\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 10\n\
                     [[models]]\nname = \"b\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 20\n"
                ),
                "models[1].rpm",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn store_and_database_errors_name_their_keys() {
        let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
        for (text, key) in [
            ("[store]\nkind = \"etcd\"".to_owned(), "store.kind"),
            (redis(""), "store.url"),
            (redis("url = \"http://127.0.0.1:6379\""), "store.url"),
            (redis("url = \"redis://a:1,http://b:2\""), "store.url"),
            (redis("url = []"), "store.url"),
            (
                redis("url = [\"redis://a:1\", \"rediss://b:2\"]"),
                "store.url",
            ),
            (
                redis("url = \"redis://h\"\ntls_ca_file = \"/etc/hosts\""),
                "store.tls_ca_file",
            ),
            (
                redis("url = \"rediss://h\"\ntls_ca_file = \"/nonexistent/ca.pem\""),
                "store.tls_ca_file",
            ),
            (
                redis(&format!(
                    "url = \"rediss://h\"\ntls_ca_file = {:?}",
                    not_pem.display().to_string()
                )),
                "store.tls_ca_file",
            ),
            (
                redis("url = \"redis://h\"\nkey_prefix = \"a{b}\""),
                "store.key_prefix",
            ),
            (
                redis("url = \"redis://h\"\non_store_error = \"panic\""),
                "store.on_store_error",
            ),
            (
                redis("url = \"redis://h\"\ntimeout_ms = 0"),
                "store.timeout_ms",
            ),
            (redis("url = \"redis://h\"\nreplicas = 0"), "store.replicas"),
            (
                "[database]\nurl = \"mysql://h/db\"".to_owned(),
                "database.url",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        let ok = parse(&redis(
            "url = \"rediss://h:6380\"\ntls_ca_file = \"/etc/hosts\"",
        ))
        .unwrap_err();
        assert_eq!(ok.key, "store.tls_ca_file", "no PEM in /etc/hosts");
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let c = parse(&redis(&format!(
            "url = \"rediss://h:6380\"\ntls_ca_file = {:?}",
            pem.display().to_string()
        )))
        .unwrap();
        match c.store {
            StoreConfig::Redis { url, tls_ca, .. } => {
                assert_eq!(url, "rediss://h:6380");
                assert!(tls_ca.is_some());
            }
            StoreConfig::Memory => panic!("not redis"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn store_descriptions_redact_credentials() {
        let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
        let d = parse(&redis("url = [\"redis://u:secret@a:1\", \"redis://b:2\"]"))
            .unwrap()
            .store
            .describe();
        assert_eq!(
            d,
            "redis cluster, seed nodes redis://u:***@a:1 redis://b:2 (prefix \"sluice:\")"
        );
        let d = parse(&redis("url = \"redis://:pw@h:6379/0\""))
            .unwrap()
            .store
            .describe();
        assert!(!d.contains("pw"), "{d}");
    }

    #[test]
    fn a_list_of_nodes_is_a_redis_cluster() {
        let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
        for (text, want_url, want_cluster) in [
            ("url = \"redis://h:1\"", "redis://h:1", false),
            ("url = \"redis://h:1\"\ncluster = true", "redis://h:1", true),
            ("url = [\"redis://h:1\"]", "redis://h:1", true),
            (
                "url = [\"redis://a:1\", \"redis://b:2\"]",
                "redis://a:1,redis://b:2",
                true,
            ),
            (
                "url = \"redis://a:1, redis://b:2\"",
                "redis://a:1,redis://b:2",
                true,
            ),
        ] {
            match parse(&redis(text)).unwrap().store {
                StoreConfig::Redis { url, cluster, .. } => {
                    assert_eq!((url.as_str(), cluster), (want_url, want_cluster), "{text}");
                }
                StoreConfig::Memory => panic!("not redis"),
            }
        }
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let file = FileConfig::parse("listen = \"127.0.0.1:1\"", Path::new("f")).unwrap();
        let env = Overrides::from_env(|k| (k == "SLUICE_LISTEN").then(|| "127.0.0.1:2".into()));
        let c = Config::resolve(file.clone(), env.clone()).unwrap();
        assert_eq!(c.listen.port(), 2);
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(file, env.overlaid_with(flags)).unwrap();
        assert_eq!(c.listen.port(), 3);
    }
}
