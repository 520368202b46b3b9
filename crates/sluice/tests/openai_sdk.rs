//! The official `openai` Python SDK (from PyPI, in a virtualenv) through the
//! real binary to the fake upstream: calls succeed, usage is exact, and a
//! breached budget raises the SDK's RateLimitError without an upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sluice_test_support::upstream::FakeUpstream;
use support::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai/chat.py");
const ADMIN: &str = "openai-sdk-test-admin-key-0123456789";
const AGENT: &str = "agent://acme/prod/sdk";

fn run_script(python: &Path, mode: &str, url: &str, key: &str) -> Value {
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg(mode)
        .env("SLUICE_URL", url)
        .env("SLUICE_KEY", key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{mode}: {}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

#[test]
fn the_official_openai_sdk_works_through_sluice() {
    let Some(python) = venv("openai", &["openai"]) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(FakeUpstream::start());
    let dir = TempDir::new("openai-sdk");
    let config = dir.0.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[providers]]\nname = \"fake\"\nformat = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n\
             [[models]]\nname = \"gpt-test\"\nprovider = \"fake\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\nmax_output_tokens = 1000\n",
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
    let url = server.url.clone();
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: String, body: Value| {
        let (http, url) = (http.clone(), url.clone());
        rt.block_on(async move {
            http.request(method, format!("{url}{path}"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let key = admin(
        reqwest::Method::POST,
        "/v1/keys".into(),
        json!({"subject": AGENT}),
    )["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy =
        |usd: f64| json!({"limits": [{"metric": "cost_usd", "limit": usd, "window": "day"}]});
    admin(
        reqwest::Method::PUT,
        format!("/v1/policies/{AGENT}"),
        policy(1.0),
    );

    let out = run_script(&python, "ok", &url, &key);
    assert_eq!(out["content"], "Hello from the fake");
    assert_eq!(out["streamed"], "Hello from the fake");
    assert_eq!(out["usage"], json!({"prompt": 12, "completion": 5}));
    assert_eq!(out["models"], json!(["gpt-test"]));
    assert_eq!(up.requests(), 2);
    assert_eq!(
        up.received()[0].headers["authorization"],
        "Bearer upstream-secret"
    );
    // Two calls of 12 in and 5 out at $2/$8 per million: 2 × 64 µ$.
    let usage = admin(
        reqwest::Method::GET,
        format!("/v1/usage/{AGENT}"),
        Value::Null,
    );
    assert_eq!(usage["limits"][0]["used"], 0.000128);

    // A budget the next worst case cannot fit: the SDK raises RateLimitError and nothing reaches the upstream.
    admin(
        reqwest::Method::PUT,
        format!("/v1/policies/{AGENT}"),
        policy(0.0002),
    );
    let out = run_script(&python, "limited", &url, &key);
    assert_eq!(out["raised"], "RateLimitError", "{out}");
    assert_eq!(out["status"], 429);
    assert_eq!(up.requests(), 2);
    server.terminate();
    drop(up);
}
