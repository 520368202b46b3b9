//! The LLM proxy's `[[providers]]` and `[[models]]`, checked: wires, upstream
//! keys from the environment, prices (entry, price file, built-in table),
//! fallbacks, provider quotas, and the proxy's own limits.

use super::*;

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

pub(super) fn resolve_proxy(
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
