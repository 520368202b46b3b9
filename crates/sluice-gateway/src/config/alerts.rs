//! `[alerts]`: early-warning webhooks, checked (URL, format, secret).

use super::*;

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

pub(super) fn resolve_webhooks(
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
