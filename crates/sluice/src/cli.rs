//! CLI commands that talk to a running server over its HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};
use sluice_gateway::{Config, FileConfig, Overrides, admin_key_path};

use crate::ClientOpts;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set a subject's policy: `--limit requests=200/1h --limit cost_usd=10/day`.
    Set {
        /// The subject (`agent://org/env/name`, `user:42`, `user:*`, ...).
        subject: String,
        /// METRIC=LIMIT/WINDOW[,ALGORITHM][,burst=N]; repeat for more limits.
        #[arg(long = "limit")]
        limits: Vec<String>,
        /// IANA time zone for calendar windows.
        #[arg(long)]
        timezone: Option<String>,
        /// block, alert, require_approval or degrade.
        #[arg(long)]
        action: Option<String>,
        /// A JSON policy body instead of --limit flags.
        #[arg(long, conflicts_with = "limits")]
        file: Option<PathBuf>,
    },
    /// Show a subject's policy.
    Get {
        /// The subject.
        subject: String,
    },
    /// List policies.
    List,
    /// Remove a subject's policy.
    Rm {
        /// The subject.
        subject: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an agent key for a subject (the key is shown once).
    Create {
        /// The subject the key acts for.
        subject: String,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List agent keys.
    List,
    /// Revoke a key by id.
    Revoke {
        /// The key id (`key_...`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Stop an agent now, whatever its limits say (403 on every decision
    /// and proxied call naming it until resumed; in-flight calls finish).
    Kill {
        /// The agent's address, e.g. agent://acme/prod/bot.
        address: String,
        /// Why (kept in the event log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a stopped agent.
    Resume {
        /// The agent's address.
        address: String,
    },
    /// List agents with their status.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals (pending ones unless --status says otherwise).
    List {
        /// pending, approved, denied, expired, or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// Only this subject.
        #[arg(long)]
        subject: Option<String>,
    },
    /// Approve: the held requests proceed, and the subject's limits get the
    /// extra amounts until --until (default: what the request asked for,
    /// until the limit resets).
    Approve {
        /// The approval's id (apr_...).
        id: String,
        /// Extra requests.
        #[arg(long)]
        requests: Option<u64>,
        /// Extra tokens.
        #[arg(long)]
        tokens: Option<u64>,
        /// Extra input tokens.
        #[arg(long)]
        input_tokens: Option<u64>,
        /// Extra output tokens.
        #[arg(long)]
        output_tokens: Option<u64>,
        /// Extra US dollars.
        #[arg(long)]
        cost_usd: Option<f64>,
        /// Until when (RFC 3339 or seconds since the epoch).
        #[arg(long)]
        until: Option<String>,
    },
    /// Deny: the held requests get 429; the limit stands until it resets.
    Deny {
        /// The approval's id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `sluice audit`'s filters.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only this subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// Only this kind: policy, key, agent, breach, or an exact one (policy.changed, ...).
    #[arg(long)]
    pub kind: Option<String>,
    /// From this time (RFC 3339 or seconds since the epoch).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// After this record id (paging).
    #[arg(long)]
    pub after: Option<u64>,
    /// At most this many records (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

pub enum Op {
    Policy(PolicyCommand),
    Usage(String),
    Keys(KeysCommand),
    Agents(AgentsCommand),
    Approvals(ApprovalsCommand),
    Audit(AuditArgs),
}

/// One approval as a line.
fn approval_line(a: &Value) -> String {
    format!(
        "{} {}: {} {} limit {} per {} (used {}){}",
        s(&a["id"]),
        s(&a["status"]),
        s(&a["subject"]),
        s(&a["limit"]["metric"]),
        s(&a["limit"]["limit"]),
        s(&a["limit"]["window"]),
        s(&a["limit"]["used"]),
        if a["until"].is_null() {
            String::new()
        } else {
            format!(", override until {}", s(&a["until"]))
        }
    )
}

/// Percent-encode a subject for a path.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `requests=200/1h,gcra,burst=20` → a limit body.
pub fn parse_limit(spec: &str) -> Result<Value, String> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or("");
    let (metric, rest) = head
        .split_once('=')
        .ok_or_else(|| format!("--limit {spec:?}: expected METRIC=LIMIT/WINDOW"))?;
    let (limit, window) = rest
        .split_once('/')
        .ok_or_else(|| format!("--limit {spec:?}: expected METRIC=LIMIT/WINDOW"))?;
    let number = |s: &str| -> Result<Value, String> {
        serde_json::from_str::<serde_json::Number>(s)
            .map(Value::Number)
            .map_err(|_| format!("--limit {spec:?}: {s:?} is not a number"))
    };
    let mut body = json!({"metric": metric, "limit": number(limit)?, "window": window});
    for p in parts {
        match p.split_once('=') {
            Some(("burst", v)) => body["burst"] = number(v)?,
            Some(("buckets", v)) => body["buckets"] = number(v)?,
            Some((k, _)) => return Err(format!("--limit {spec:?}: unknown option {k:?}")),
            None => body["algorithm"] = Value::from(p),
        }
    }
    Ok(body)
}

/// Turns an answer into the human-readable output.
type Render = Box<dyn Fn(&Value) -> String>;

struct Client {
    http: reqwest::Client,
    server: String,
    key: Option<String>,
}

impl Client {
    fn new(opts: &ClientOpts) -> Result<Client, String> {
        let file = match &opts.config {
            Some(p) => FileConfig::load(p).map_err(|e| e.to_string())?,
            None => FileConfig::default(),
        };
        let env = crate::process_env();
        let flags = Overrides {
            data_dir: opts.data_dir.clone(),
            ..Overrides::default()
        };
        let config = Config::resolve(file, env.overlaid_with(flags)).map_err(|e| e.to_string())?;
        let server = opts
            .server
            .clone()
            .unwrap_or(config.server)
            .trim_end_matches('/')
            .to_owned();
        let key = config.admin_key.or_else(|| {
            std::fs::read_to_string(admin_key_path(&config.data_dir))
                .ok()
                .map(|k| k.trim().to_owned())
        });
        Ok(Client {
            http: reqwest::Client::new(),
            server,
            key,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.server));
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap_or_default());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.server))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            Ok(value)
        } else {
            let msg = value["error"]["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            let field = value["error"]["field"]
                .as_str()
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            let hint = if status.as_u16() == 401 && self.key.is_none() {
                "; no admin key found: set SLUICE_ADMIN_KEY or --data-dir"
            } else {
                ""
            };
            Err(format!("{status}: {msg}{field}{hint}"))
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn policy_rows(policies: &[Value]) -> String {
    let mut rows = Vec::new();
    for p in policies {
        for l in p["limits"].as_array().into_iter().flatten() {
            rows.push(vec![
                s(&p["subject"]),
                s(&l["metric"]),
                s(&l["limit"]),
                s(&l["window"]),
                s(&l["algorithm"]),
                s(&p["action_on_breach"]),
            ]);
        }
    }
    table(
        &[
            "SUBJECT",
            "METRIC",
            "LIMIT",
            "WINDOW",
            "ALGORITHM",
            "ACTION",
        ],
        rows,
    )
}

async fn execute(client: &Client, op: Op, as_json: bool) -> Result<String, String> {
    use reqwest::Method;
    let (value, human): (Value, Render) = match op {
        Op::Policy(PolicyCommand::Set {
            subject,
            limits,
            timezone,
            action,
            file,
        }) => {
            let body = match file {
                Some(f) => {
                    let text =
                        std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?
                }
                None => {
                    if limits.is_empty() {
                        return Err(
                            "give at least one --limit METRIC=LIMIT/WINDOW (or --file)".into()
                        );
                    }
                    let limits = limits
                        .iter()
                        .map(|l| parse_limit(l))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut b = json!({ "limits": limits });
                    if let Some(tz) = timezone {
                        b["timezone"] = Value::from(tz);
                    }
                    if let Some(a) = action {
                        b["action_on_breach"] = Value::from(a);
                    }
                    b
                }
            };
            let v = client
                .call(
                    Method::PUT,
                    &format!("/v1/policies/{}", encode(&subject)),
                    Some(&body),
                )
                .await?;
            (v, Box::new(|v| policy_rows(std::slice::from_ref(v))))
        }
        Op::Policy(PolicyCommand::Get { subject }) => {
            let v = client
                .call(
                    Method::GET,
                    &format!("/v1/policies/{}", encode(&subject)),
                    None,
                )
                .await?;
            (v, Box::new(|v| policy_rows(std::slice::from_ref(v))))
        }
        Op::Policy(PolicyCommand::List) => {
            let v = client.call(Method::GET, "/v1/policies", None).await?;
            (
                v,
                Box::new(|v| policy_rows(v["policies"].as_array().map_or(&[], Vec::as_slice))),
            )
        }
        Op::Policy(PolicyCommand::Rm { subject }) => {
            client
                .call(
                    Method::DELETE,
                    &format!("/v1/policies/{}", encode(&subject)),
                    None,
                )
                .await?;
            let msg = format!("removed the policy of {subject}");
            (json!({"removed": subject}), Box::new(move |_| msg.clone()))
        }
        Op::Usage(subject) => {
            let v = client
                .call(
                    Method::GET,
                    &format!("/v1/usage/{}", encode(&subject)),
                    None,
                )
                .await?;
            (
                v,
                Box::new(|v| {
                    let rows = v["limits"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            vec![
                                s(&l["metric"]),
                                s(&l["window"]),
                                s(&l["limit"]),
                                s(&l["used"]),
                                s(&l["remaining"]),
                                s(&l["reset_at"]),
                            ]
                        })
                        .collect();
                    let spend = &v["spend"];
                    format!(
                        "{}\npolicy: {}\n{}\nspend today: {} requests, {} tokens, ${}; this month: {} requests, {} tokens, ${}",
                        s(&v["subject"]),
                        s(&v["policy"]),
                        table(
                            &["METRIC", "WINDOW", "LIMIT", "USED", "REMAINING", "RESETS"],
                            rows
                        ),
                        s(&spend["today"]["requests"]),
                        s(&spend["today"]["tokens"]),
                        s(&spend["today"]["cost_usd"]),
                        s(&spend["month"]["requests"]),
                        s(&spend["month"]["tokens"]),
                        s(&spend["month"]["cost_usd"]),
                    )
                }),
            )
        }
        Op::Keys(KeysCommand::Create { subject, name }) => {
            let mut body = json!({ "subject": subject });
            if let Some(n) = name {
                body["name"] = Value::from(n);
            }
            let v = client.call(Method::POST, "/v1/keys", Some(&body)).await?;
            (
                v,
                Box::new(|v| {
                    format!(
                        "created {} for {}\nkey (shown once): {}",
                        s(&v["id"]),
                        s(&v["subject"]),
                        s(&v["key"])
                    )
                }),
            )
        }
        Op::Keys(KeysCommand::List) => {
            let v = client.call(Method::GET, "/v1/keys", None).await?;
            (
                v,
                Box::new(|v| {
                    let rows = v["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|k| {
                            vec![
                                s(&k["id"]),
                                s(&k["subject"]),
                                s(&k["name"]),
                                format!("{}…", s(&k["prefix"])),
                                s(&k["created_at"]),
                            ]
                        })
                        .collect();
                    table(&["ID", "SUBJECT", "NAME", "PREFIX", "CREATED"], rows)
                }),
            )
        }
        Op::Keys(KeysCommand::Revoke { id }) => {
            client
                .call(Method::DELETE, &format!("/v1/keys/{}", encode(&id)), None)
                .await?;
            let msg = format!("revoked {id}");
            (json!({"revoked": id}), Box::new(move |_| msg.clone()))
        }
        Op::Agents(AgentsCommand::Kill { address, reason }) => {
            let body = json!({ "reason": reason });
            let v = client
                .call(
                    Method::POST,
                    &format!("/v1/mesh/agents/{}/kill", encode(&address)),
                    Some(&body),
                )
                .await?;
            (
                v,
                Box::new(|v| {
                    let already = if v["changed"] == Value::Bool(false) {
                        " (it already was)"
                    } else {
                        ""
                    };
                    format!("stopped {}{already}", s(&v["address"]))
                }),
            )
        }
        Op::Agents(AgentsCommand::Resume { address }) => {
            let v = client
                .call(
                    Method::POST,
                    &format!("/v1/mesh/agents/{}/resume", encode(&address)),
                    None,
                )
                .await?;
            (
                v,
                Box::new(|v| {
                    let already = if v["changed"] == Value::Bool(false) {
                        " (it was not stopped)"
                    } else {
                        ""
                    };
                    format!("resumed {}{already}", s(&v["address"]))
                }),
            )
        }
        Op::Agents(AgentsCommand::List) => {
            let v = client.call(Method::GET, "/v1/mesh/agents", None).await?;
            (
                v,
                Box::new(|v| {
                    let rows = v["agents"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            vec![
                                s(&a["address"]),
                                s(&a["status"]),
                                s(&a["killed_at"]),
                                s(&a["reason"]),
                            ]
                        })
                        .collect();
                    table(&["ADDRESS", "STATUS", "SINCE", "REASON"], rows)
                }),
            )
        }
        Op::Approvals(ApprovalsCommand::List { status, subject }) => {
            let mut query = vec!["limit=1000".to_owned()];
            if status != "all" {
                query.push(format!("status={}", encode(&status)));
            }
            if let Some(sub) = subject {
                query.push(format!("subject={}", encode(&sub)));
            }
            let v = client
                .call(
                    Method::GET,
                    &format!("/v1/approvals?{}", query.join("&")),
                    None,
                )
                .await?;
            (
                v,
                Box::new(|v| {
                    let rows = v["approvals"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            vec![
                                s(&a["id"]),
                                s(&a["status"]),
                                s(&a["subject"]),
                                format!(
                                    "{} {}/{}",
                                    s(&a["limit"]["metric"]),
                                    s(&a["limit"]["limit"]),
                                    s(&a["limit"]["window"])
                                ),
                                s(&a["limit"]["used"]),
                                s(&a["model"]),
                                s(&a["estimated_cost_usd"]),
                                s(&a["created_at"]),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "ID", "STATUS", "SUBJECT", "LIMIT", "USED", "MODEL", "EST_USD",
                            "ASKED_AT",
                        ],
                        rows,
                    )
                }),
            )
        }
        Op::Approvals(ApprovalsCommand::Approve {
            id,
            requests,
            tokens,
            input_tokens,
            output_tokens,
            cost_usd,
            until,
        }) => {
            let mut extra = serde_json::Map::new();
            for (k, v) in [
                ("requests", requests.map(Value::from)),
                ("tokens", tokens.map(Value::from)),
                ("input_tokens", input_tokens.map(Value::from)),
                ("output_tokens", output_tokens.map(Value::from)),
                ("cost_usd", cost_usd.map(Value::from)),
            ] {
                if let Some(v) = v {
                    extra.insert(k.to_owned(), v);
                }
            }
            let mut body = serde_json::Map::new();
            if !extra.is_empty() {
                body.insert("extra".into(), Value::Object(extra));
            }
            if let Some(u) = until {
                body.insert("until".into(), Value::from(u));
            }
            let v = client
                .call(
                    Method::POST,
                    &format!("/v1/approvals/{}/approve", encode(&id)),
                    Some(&Value::Object(body)),
                )
                .await?;
            (v, Box::new(approval_line))
        }
        Op::Approvals(ApprovalsCommand::Deny { id, reason }) => {
            let body = json!({ "reason": reason });
            let v = client
                .call(
                    Method::POST,
                    &format!("/v1/approvals/{}/deny", encode(&id)),
                    Some(&body),
                )
                .await?;
            (v, Box::new(approval_line))
        }
        Op::Audit(a) => {
            let mut query = vec![format!("limit={}", a.limit)];
            for (k, v) in [
                ("subject", a.subject),
                ("kind", a.kind),
                ("since", a.since),
                ("until", a.until),
                ("after", a.after.map(|n| n.to_string())),
            ] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode(&v)));
                }
            }
            let v = client
                .call(Method::GET, &format!("/v1/audit?{}", query.join("&")), None)
                .await?;
            (
                v,
                Box::new(|v| {
                    let rows = v["records"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            vec![
                                s(&r["id"]),
                                s(&r["at"]),
                                s(&r["kind"]),
                                s(&r["subject"]),
                                s(&r["actor"]),
                                s(&r["detail"]),
                            ]
                        })
                        .collect();
                    let mut out = table(&["ID", "AT", "KIND", "SUBJECT", "ACTOR", "DETAIL"], rows);
                    if !v["next_after"].is_null() {
                        out.push_str(&format!("\nmore: --after {}", s(&v["next_after"])));
                    }
                    out
                }),
            )
        }
    };
    Ok(if as_json {
        serde_json::to_string_pretty(&value).unwrap_or_default()
    } else {
        human(&value)
    })
}

pub async fn run(opts: &ClientOpts, op: Op) -> ExitCode {
    let client = match Client::new(opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    match execute(&client, op, opts.json).await {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_specs() {
        assert_eq!(
            parse_limit("requests=200/1h").unwrap(),
            json!({"metric": "requests", "limit": 200, "window": "1h"})
        );
        assert_eq!(
            parse_limit("cost_usd=10.5/day").unwrap(),
            json!({"metric": "cost_usd", "limit": 10.5, "window": "day"})
        );
        assert_eq!(
            parse_limit("tokens=1000/1m,gcra,burst=100").unwrap(),
            json!({"metric": "tokens", "limit": 1000, "window": "1m", "algorithm": "gcra", "burst": 100})
        );
        assert!(parse_limit("requests").is_err());
        assert!(parse_limit("requests=x/1h").is_err());
        assert!(parse_limit("requests=1/1h,color=red").is_err());
        assert_eq!(encode("agent://a/b/c"), "agent%3A%2F%2Fa%2Fb%2Fc");
    }
}
