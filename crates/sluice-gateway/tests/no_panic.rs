//! Mutated bodies, paths and headers against every endpoint: never a 5xx,
//! always a JSON error naming what was wrong, and the server stays healthy.
//! Deterministic (fixed seed), bounded (a fixed number of requests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn wild(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1e308),
        5 => json!(u64::MAX),
        6 => json!(-0.000001),
        7 => json!("NaN"),
        8 => json!(""),
        9 => json!("agent://a/b/c"),
        10 => json!("ü🦀\u{0}x"),
        11 => json!([1, "x", null]),
        12 => json!({"nested": {"deep": [1, 2, 3]}}),
        _ => json!("x".repeat(300)),
    }
}

/// Mutate a JSON value: replace, delete or add members, recursively.
fn mutate(v: &Value, rng: &mut Rng, depth: usize) -> Value {
    if depth > 3 || rng.below(5) == 0 {
        return wild(rng);
    }
    match v {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, val) in map {
                match rng.below(6) {
                    0 => {} // drop it
                    1 => {
                        out.insert(k.clone(), wild(rng));
                    }
                    _ => {
                        out.insert(k.clone(), mutate(val, rng, depth + 1));
                    }
                }
            }
            if rng.below(4) == 0 {
                out.insert(format!("extra{}", rng.below(9)), wild(rng));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| mutate(i, rng, depth + 1)).collect())
        }
        _ if rng.below(2) == 0 => wild(rng),
        other => other.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_get_a_5xx() {
    let dir = TempDir::new("nopanic");
    let s = Server::start(&dir).await;
    let templates: Vec<(Method, &str, Value)> = vec![
        (
            Method::PUT,
            "/v1/policies/user:1",
            json!({"limits": [{"metric": "requests", "limit": 5, "window": "1h", "algorithm": "gcra", "burst": 2}], "timezone": "UTC", "action_on_breach": "block"}),
        ),
        (
            Method::POST,
            "/v1/check",
            json!({"subjects": ["user:1", "model:m"], "amounts": {"requests": 1, "tokens": 10, "cost_usd": 0.5}}),
        ),
        (
            Method::POST,
            "/v1/reserve",
            json!({"subjects": ["user:1"], "amounts": {"input_tokens": 3, "output_tokens": 4}, "lease_s": 5}),
        ),
        (
            Method::POST,
            "/v1/reservations/rsv_00000000_1/commit",
            json!({"amounts": {"requests": 1}}),
        ),
        (
            Method::POST,
            "/v1/keys",
            json!({"subject": "agent://a/b/c", "name": "n"}),
        ),
        (
            Method::PUT,
            "/v1/mesh/agents/agent://a/b/c/policies/cost",
            json!({"max_intents_per_hour": 3, "max_intents_per_day": 4, "max_cost_per_day_usd": 1.5, "action_on_breach": "alert"}),
        ),
        (
            Method::POST,
            "/v1/intents",
            json!({"intent_type": "t", "to_agent": "agent://a/b/c", "payload": {}, "cost_usd": 0.1}),
        ),
    ];
    let paths = [
        "/v1/policies/%ff%fe",
        "/v1/policies/agent:%2F%2F",
        "/v1/usage/user:",
        "/v1/usage/ip:999.1.1.1",
        "/v1/mesh/agents/%00/policies/cost",
        "/v1/reservations/rsv_zzzzzzzz_1/release",
        "/v1/reservations/rsv_00000000_99999999999999999999999/commit",
        "/v1/keys/%20",
    ];
    let mut rng = Rng(0x5EED_1234_ABCD_9876);
    let mut sent = 0;
    for round in 0..60 {
        for (method, path, template) in &templates {
            let body = mutate(template, &mut rng, 0);
            let bytes = if rng.below(10) == 0 {
                // Truncated or non-JSON bytes.
                let text = body.to_string();
                text.as_bytes()[..text.len() / 2].to_vec()
            } else {
                serde_json::to_vec(&body).unwrap()
            };
            let auth = format!("Bearer {ADMIN}");
            let r = s
                .raw(
                    method.clone(),
                    path,
                    &[
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                    ],
                    Some(bytes),
                )
                .await;
            sent += 1;
            assert!(
                r.status.as_u16() < 500,
                "{method} {path}: {} {:?} for {body}",
                r.status,
                r.body
            );
            if !r.status.is_success() {
                assert!(
                    r.body["error"]["type"].is_string(),
                    "{method} {path}: {:?}",
                    r.body
                );
                assert!(r.body["error"]["message"].is_string());
            }
        }
        let path = paths[round % paths.len()];
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            let r = s.admin(method.clone(), path, Some(json!({}))).await;
            sent += 1;
            assert!(
                r.status.as_u16() < 500,
                "{method} {path}: {} {:?}",
                r.status,
                r.body
            );
            assert!(
                r.body["error"]["type"].is_string() || r.status.is_success(),
                "{method} {path}: {:?}",
                r.body
            );
        }
    }
    assert!(sent > 600);
    assert_eq!(
        s.raw(Method::GET, "/healthz", &[], None).await.status,
        StatusCode::OK
    );
    s.stop().await;
}
