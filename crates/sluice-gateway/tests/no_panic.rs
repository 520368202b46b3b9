//! Mutated bodies, paths and headers against every endpoint (random, then
//! each field of each template through each odd value): never a 5xx,
//! always a JSON error naming what was wrong, and the server stays healthy.
//! Deterministic (fixed seed), bounded (a fixed number of requests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

/// An answer to a mutated `body` sent to `what`: not a 5xx, and an error
/// with its type and message.
fn no_5xx_and_a_json_error(what: &str, body: &Value, r: &Reply) {
    assert!(
        r.status.as_u16() < 500,
        "{what}: {} {:?} for {body}",
        r.status,
        r.body
    );
    if !r.status.is_success() {
        assert!(r.body["error"]["type"].is_string(), "{what}: {:?}", r.body);
        assert!(r.body["error"]["message"].is_string());
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
            let (body, bytes) = mutated_body(template, &mut rng);
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
            no_5xx_and_a_json_error(&format!("{method} {path}"), &body, &r);
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
    // Then every member of every template replaced by each odd value in
    // turn, the rest left valid: one field's type confusions, each tried.
    for (method, path, template) in &templates {
        for pointer in pointers(template) {
            for odd in wild_values() {
                let mut body = template.clone();
                *body.pointer_mut(&pointer).unwrap() = odd;
                let r = s
                    .call(method.clone(), path, ADMIN, Some(body.clone()))
                    .await;
                sent += 1;
                no_5xx_and_a_json_error(&format!("{method} {path} {pointer}"), &body, &r);
            }
        }
    }
    assert!(sent > 1000, "{sent}");
    assert_eq!(
        s.raw(Method::GET, "/healthz", &[], None).await.status,
        StatusCode::OK
    );
    s.stop().await;
}
