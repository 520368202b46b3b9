//! `[store]` (where limit state lives: memory, Redis, a Redis Cluster) and
//! `[database]` (SQLite or PostgreSQL), checked; URLs redacted for logs.

use super::*;

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

pub(super) fn resolve_store(
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

pub(super) fn resolve_database(
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
