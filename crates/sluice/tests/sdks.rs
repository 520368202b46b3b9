//! The official `openai` and `anthropic` Python SDKs (from PyPI, in
//! virtualenvs) through the real binary to the fake upstream: plain and
//! streamed calls succeed, usage is exact, and a breached budget raises the
//! SDK's RateLimitError without an upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sluice_test_support::upstream::{FakeUpstream, Script};
use support::*;

const ADMIN: &str = "sdk-test-admin-key-0123456789";
const AGENT: &str = "agent://acme/prod/sdk";

fn run_script(python: &Path, script: &str, mode: &str, url: &str, key: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new(python)
        .arg(path)
        .arg(mode)
        .env("SLUICE_URL", url)
        .env("SLUICE_KEY", key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {mode}: {}",
        text(&out.stderr)
    );
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

/// The binary, configured with one model on the fake upstream, an agent key
/// and a $1/day budget on it.
struct Setup {
    rt: tokio::runtime::Runtime,
    up: FakeUpstream,
    server: Serve,
    key: String,
    _dir: TempDir,
}

impl Setup {
    fn start(format: &str, model: &str) -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let up = rt.block_on(FakeUpstream::start());
        let dir = TempDir::new("sdk");
        let config = dir.0.join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                "[[providers]]\nname = \"fake\"\nformat = \"{format}\"\nbase_url = \"{}\"\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n\
                 [[models]]\nname = \"{model}\"\nprovider = \"fake\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\nmax_output_tokens = 1000\n",
                up.base_url
            ),
        )
        .unwrap();
        let server = Serve::start(
            &dir.0,
            &["--data-dir", "data", "--config", config.to_str().unwrap()],
            &[
                ("SLUICE_ADMIN_KEY", ADMIN),
                ("FAKE_UPSTREAM_KEY", "upstream-secret"),
            ],
        );
        let mut s = Setup {
            rt,
            up,
            server,
            key: String::new(),
            _dir: dir,
        };
        s.key = s.admin(reqwest::Method::POST, "/v1/keys", json!({"subject": AGENT}))["key"]
            .as_str()
            .unwrap()
            .to_owned();
        s.budget(1.0);
        s
    }

    fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.server.url);
        self.rt.block_on(async move {
            reqwest::Client::new()
                .request(method, url)
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    }

    fn budget(&self, usd: f64) {
        let policy = json!({"limits": [{"metric": "cost_usd", "limit": usd, "window": "day"}]});
        self.admin(
            reqwest::Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            policy,
        );
    }

    fn used(&self) -> Value {
        self.admin(
            reqwest::Method::GET,
            &format!("/v1/usage/{AGENT}"),
            Value::Null,
        )["limits"][0]["used"]
            .clone()
    }
}

#[test]
fn the_official_openai_sdk_works_through_sluice() {
    let Some(python) = venv("openai", &["openai"]) else {
        return;
    };
    let s = Setup::start("openai", "gpt-test");
    // The upstream pushes back once: Sluice retries, the SDK (max_retries=0) only sees success.
    s.up.script([Script::TooMany {
        retry_after_s: None,
        retry_after_ms: Some(10),
    }]);
    let out = run_script(&python, "openai/chat.py", "ok", &s.server.url, &s.key);
    assert_eq!(out["content"], "Hello from the fake");
    assert_eq!(out["streamed"], "Hello from the fake");
    assert_eq!(out["usage"], json!({"prompt": 12, "completion": 5}));
    // The provider's request id reaches the SDK (`_request_id`), for its support.
    assert!(
        out["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_fake_")),
        "{out}"
    );
    assert_eq!(out["models"], json!(["gpt-test"]));
    assert_eq!(s.up.requests(), 3);
    assert_eq!(
        s.up.received()[0].headers["authorization"],
        "Bearer upstream-secret"
    );
    // Two calls of 12 in and 5 out at $2/$8 per million: 2 × 64 µ$.
    assert_eq!(s.used(), 0.000128);
    // Completions, embeddings and responses, plain and streamed, through the same SDK.
    let out = run_script(&python, "openai/chat.py", "routes", &s.server.url, &s.key);
    assert_eq!(out["completion"], "Hello from the fake");
    assert_eq!(out["completion_usage"], json!([12, 5]));
    assert_eq!(out["completion_streamed"], "Hello from the fake");
    assert_eq!(
        out["embeddings"],
        json!([[0.25, -0.5, 0.125], [0.25, -0.5, 0.125]])
    );
    assert_eq!(out["embedding_usage"], 12);
    assert_eq!(out["response"], "Hello from the fake");
    assert_eq!(out["response_usage"], json!([12, 5]));
    assert_eq!(out["response_streamed"], "Hello from the fake");
    assert_eq!(out["response_streamed_usage"], json!([12, 5]));
    let paths: Vec<String> = s.up.received()[3..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/responses"
        ]
    );
    // Four more calls at 64 µ$ and an embedding of 12 in at 24 µ$.
    assert_eq!(s.used(), 0.000408);
    // A budget the next worst case cannot fit: RateLimitError, and nothing reaches the upstream.
    s.budget(0.0002);
    let out = run_script(&python, "openai/chat.py", "limited", &s.server.url, &s.key);
    assert_eq!(out["raised"], "RateLimitError", "{out}");
    assert_eq!(out["status"], 429);
    assert_eq!(s.up.requests(), 8);
}

#[test]
fn the_official_anthropic_sdk_works_through_sluice() {
    let Some(python) = venv("anthropic", &["anthropic"]) else {
        return;
    };
    let s = Setup::start("anthropic", "claude-test");
    let out = run_script(
        &python,
        "anthropic/messages.py",
        "ok",
        &s.server.url,
        &s.key,
    );
    assert_eq!(out["content"], "Hello from the fake");
    assert_eq!(out["streamed"], "Hello from the fake");
    assert_eq!(out["usage"], json!({"input": 12, "output": 5}));
    assert!(
        out["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_fake_")),
        "{out}"
    );
    assert_eq!(s.up.requests(), 2);
    assert_eq!(s.up.received()[0].headers["x-api-key"], "upstream-secret");
    assert_eq!(s.used(), 0.000128);
    // count_tokens is answered by the provider and costs nothing.
    let out = run_script(
        &python,
        "anthropic/messages.py",
        "count",
        &s.server.url,
        &s.key,
    );
    assert_eq!(out["input_tokens"], 12);
    assert_eq!(s.up.received()[2].path, "/v1/messages/count_tokens");
    assert_eq!(s.used(), 0.000128);
    s.budget(0.0002);
    let out = run_script(
        &python,
        "anthropic/messages.py",
        "limited",
        &s.server.url,
        &s.key,
    );
    assert_eq!(out["raised"], "RateLimitError", "{out}");
    assert_eq!(out["status"], 429);
    assert_eq!(s.up.requests(), 3);
}
