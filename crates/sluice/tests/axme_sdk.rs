//! The seed's three AXME scripts, unchanged but for the base URL, against the
//! real binary, including the one that uses the official `axme` SDK from PyPI
//! (installed into a virtualenv under the target directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::*;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/axme");

fn script(python: &Path, name: &str, url: &str, key: &str) -> String {
    let out = Command::new(python)
        .arg(Path::new(SCRIPTS).join(name))
        .env("AXME_API_KEY", key)
        .env("AXME_BASE_URL", url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn the_seed_scripts_and_the_official_axme_sdk_work_against_sluice() {
    let Some(python) = venv("axme", &["axme==0.2.0", "httpx"]) else {
        return;
    };
    let dir = TempDir::new("axme-sdk");
    let key = "axme-sdk-test-admin-key-0123456789";
    let server = Serve::start(
        &dir.0,
        &["--data-dir", "data"],
        &[("SLUICE_ADMIN_KEY", key)],
    );

    let out = script(&python, "set_policy.py", &server.url, key);
    assert!(out.starts_with("Policy set: {"), "{out}");
    assert!(out.contains("'max_intents_per_hour': 200"), "{out}");

    let out = script(&python, "send_until_limited.py", &server.url, key);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 201, "{out}");
    for (i, line) in lines[..200].iter().enumerate() {
        assert!(line.starts_with(&format!("[{i}] Sent: int_")), "{line}");
    }
    assert!(
        lines[200].starts_with("[200] Blocked: HTTP 429"),
        "{}",
        lines[200]
    );

    let out = script(&python, "rate_limit_error.py", &server.url, key);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["raised"], "AxmeRateLimitError", "{v}");
    assert_eq!(v["status"], 429);
    assert_eq!(v["retry_after_is_int"], true);
    let retry = v["retry_after"].as_u64().unwrap();
    // The hour frees up one hour after the first intents: a little under 3600 s from now.
    assert!((3000..=3600).contains(&retry), "retry_after {retry}");

    let out = script(&python, "check_usage.py", &server.url, key);
    assert!(out.contains("'intents_per_hour': 200"), "{out}");
    assert!(out.contains("'intents_per_day': 200"), "{out}");

    // The kill switch through the SDK's mesh.kill / mesh.resume.
    let out = script(&python, "kill_switch.py", &server.url, key);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["before"], serde_json::json!(["sent", 200]), "{v}");
    assert_eq!(v["kill"]["status"], "killed", "{v}");
    assert_eq!(v["killed"], serde_json::json!([403, 403]), "{v}");
    let agents = v["agents"]["agents"].as_array().unwrap();
    assert!(
        agents
            .iter()
            .any(|a| a["address"] == "agent://myorg/production/runaway" && a["status"] == "killed"),
        "{v}"
    );
    assert_eq!(v["events"]["events"][0]["event_type"], "kill", "{v}");
    assert_eq!(v["resume"]["status"], "active", "{v}");
    assert_eq!(v["after"], serde_json::json!(["sent", 200]), "{v}");
    server.terminate();
}
