//! The gateway's HTTP API, in process, on a manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const BOT: &str = "agent://myorg/production/order-processor";

async fn set_axme_policy(s: &Server, per_hour: u64) {
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/mesh/agents/{BOT}/policies/cost"),
            Some(json!({
                "max_intents_per_hour": per_hour,
                "max_intents_per_day": 2000,
                "max_cost_per_day_usd": 10.00,
                "action_on_breach": "block",
            })),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
}

fn intent(i: usize) -> Value {
    json!({
        "intent_type": "intent.orders.process.v1",
        "to_agent": BOT,
        "payload": {"order_id": format!("ORD-{i:04}")},
        "correlation_id": format!("c-{i}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axme_flow_admits_exactly_200_then_429_with_the_exact_retry_after() {
    let dir = TempDir::new("axme");
    let s = Server::start(&dir).await;
    set_axme_policy(&s, 200).await;
    let mut accepted = 0;
    let mut first_refusal = None;
    for i in 0..250 {
        let r = s.admin(Method::POST, "/v1/intents", Some(intent(i))).await;
        match r.status {
            StatusCode::OK => {
                assert!(r.body["intent_id"].is_string());
                accepted += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                first_refusal.get_or_insert(r);
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert_eq!(accepted, 200);
    let r = first_refusal.unwrap();
    // Every intent came at one instant: the hour frees up exactly 3600 s later.
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert_eq!(r.body["error"]["type"], "rate_limited");
    assert_eq!(r.body["error"]["retry_after_s"], 3600);
    assert_eq!(r.body["error"]["subject"], BOT);
    assert_eq!(r.body["error"]["metric"], "requests");
    assert_eq!(r.body["error"]["window"], "1h");
    assert_eq!(r.body["error"]["limit"], 200);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"requests-1h\";q=200;w=3600")
    );
    assert_eq!(r.header("ratelimit"), Some("\"requests-1h\";r=0;t=3600"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

    let g = s
        .admin(
            Method::GET,
            &format!("/v1/mesh/agents/{BOT}/policies/cost"),
            None,
        )
        .await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.body["max_intents_per_hour"], 200);
    assert_eq!(g.body["max_intents_per_day"], 2000);
    assert_eq!(g.body["max_cost_per_day_usd"], 10.0);
    assert_eq!(g.body["action_on_breach"], "block");
    assert_eq!(g.body["usage"]["intents_per_hour"], 200);
    assert_eq!(g.body["usage"]["intents_per_day"], 200);

    // Retry-After is the real wait: 1 s early is still refused, on time passes.
    s.advance(Duration::from_secs(3599));
    let r = s
        .admin(Method::POST, "/v1/intents", Some(intent(999)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("1"));
    s.advance(Duration::from_secs(1));
    let r = s
        .admin(Method::POST, "/v1/intents", Some(intent(1000)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_count_cost_and_the_daily_dollar_cap() {
    let dir = TempDir::new("axme-cost");
    let s = Server::start(&dir).await;
    set_axme_policy(&s, 1000).await;
    let mut body = intent(1);
    body["cost_usd"] = json!(4.0);
    for _ in 0..2 {
        assert_eq!(
            s.admin(Method::POST, "/v1/intents", Some(body.clone()))
                .await
                .status,
            StatusCode::OK
        );
    }
    let r = s
        .admin(Method::POST, "/v1/intents", Some(body.clone()))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["metric"], "cost_usd");
    assert_eq!(r.body["error"]["window"], "day");
    // 2027-01-15T08:00Z: the UTC day ends in 16 h.
    assert_eq!(r.header("retry-after"), Some("57600"));
    let g = s
        .admin(
            Method::GET,
            &format!("/v1/mesh/agents/{BOT}/policies/cost"),
            None,
        )
        .await;
    assert_eq!(g.body["usage"]["cost_per_day_usd"], 8.0);
    // More than the cap itself can never fit: 422, not a retry.
    body["cost_usd"] = json!(11.0);
    let r = s.admin(Method::POST, "/v1/intents", Some(body)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["type"], "exceeds_limit");
    assert!(r.header("retry-after").is_none());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axme_put_keeps_native_limits_and_native_put_is_visible_to_axme_get() {
    let dir = TempDir::new("axme-merge");
    let s = Server::start(&dir).await;
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{BOT}"),
            Some(json!({"limits": [{"metric": "tokens", "limit": 5000, "window": "1m"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    set_axme_policy(&s, 200).await;
    let p = s
        .admin(Method::GET, &format!("/v1/policies/{BOT}"), None)
        .await;
    let metrics: Vec<_> = p.body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            format!(
                "{}/{}",
                l["metric"].as_str().unwrap(),
                l["window"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        metrics,
        ["tokens/1m", "requests/1h", "requests/day", "cost_usd/day"]
    );
    // A bad AXME value names the AXME field.
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/mesh/agents/{BOT}/policies/cost"),
            Some(json!({"max_cost_per_day_usd": -1})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["field"], "max_cost_per_day_usd");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_crud_with_raw_and_encoded_subjects_and_tiers() {
    let dir = TempDir::new("policies");
    let s = Server::start(&dir).await;
    let body = json!({
        "limits": [
            {"metric": "requests", "limit": 2, "window": "1h"},
            {"metric": "cost_usd", "limit": 10.0, "window": "day"},
            {"metric": "tokens", "limit": 100, "window": "1m", "algorithm": "gcra", "burst": 10},
        ],
        "timezone": "Europe/Paris",
        "action_on_breach": "alert",
    });
    let r = s
        .admin(
            Method::PUT,
            "/v1/policies/agent://acme/prod/a",
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["subject"], "agent://acme/prod/a");
    assert_eq!(r.body["timezone"], "Europe/Paris");
    assert_eq!(r.body["action_on_breach"], "alert");
    assert_eq!(r.body["limits"][1]["limit"], 10.0);
    assert_eq!(r.body["limits"][1]["algorithm"], "fixed");
    assert_eq!(r.body["limits"][2]["burst"], 10);
    // The same subject, percent-encoded, is the same policy; a second PUT replaces it.
    let r = s
        .admin(
            Method::PUT,
            "/v1/policies/agent%3A%2F%2Facme%2Fprod%2Fa",
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s
        .admin(
            Method::GET,
            "/v1/policies/agent%3A%2F%2Facme%2Fprod%2Fa",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["subject"], "agent://acme/prod/a");

    // Tier: user:* applies to every user without a policy of its own, each counted apart.
    let tier = json!({"limits": [{"metric": "requests", "limit": 1, "window": "1m"}]});
    assert_eq!(
        s.admin(Method::PUT, "/v1/policies/user:*", Some(tier))
            .await
            .status,
        StatusCode::CREATED
    );
    let check = |who: &str| json!({"subjects": [who], "amounts": {"requests": 1}});
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(check("user:1")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(check("user:2")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(check("user:1")))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let u = s.admin(Method::GET, "/v1/usage/user:2", None).await;
    assert_eq!(u.body["policy"], "user:*");
    assert_eq!(u.body["limits"][0]["used"], 1);

    let list = s.admin(Method::GET, "/v1/policies", None).await;
    let subjects: Vec<_> = list.body["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["subject"].clone())
        .collect();
    assert_eq!(subjects, [json!("agent://acme/prod/a"), json!("user:*")]);
    assert_eq!(
        s.admin(Method::DELETE, "/v1/policies/user:*", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.admin(Method::DELETE, "/v1/policies/user:*", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Without the tier, user:1 has no limits.
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(check("user:1")))
            .await
            .status,
        StatusCode::OK
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_a_limit_keeps_its_usage() {
    let dir = TempDir::new("raise");
    let s = Server::start(&dir).await;
    let put =
        |limit: u64| json!({"limits": [{"metric": "requests", "limit": limit, "window": "1h"}]});
    s.admin(Method::PUT, "/v1/policies/user:9", Some(put(2)))
        .await;
    let one = json!({"subjects": ["user:9"]});
    for _ in 0..2 {
        assert_eq!(
            s.admin(Method::POST, "/v1/check", Some(one.clone()))
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(one.clone()))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    s.admin(Method::PUT, "/v1/policies/user:9", Some(put(3)))
        .await;
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(one.clone()))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(one)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_all_or_nothing_and_carries_headers_for_the_tightest_limit() {
    let dir = TempDir::new("check");
    let s = Server::start(&dir).await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:1",
        Some(json!({"limits": [
            {"metric": "requests", "limit": 10, "window": "1m"},
            {"metric": "tokens", "limit": 100, "window": "1h"},
        ]})),
    )
    .await;
    s.admin(
        Method::PUT,
        "/v1/policies/team:t",
        Some(json!({"limits": [
            {"metric": "tokens", "limit": 150, "window": "1h"},
        ]})),
    )
    .await;
    let req = |tokens: u64| json!({"subjects": ["user:1", "team:t"], "amounts": {"requests": 1, "input_tokens": tokens / 2, "output_tokens": tokens - tokens / 2}});
    let r = s.admin(Method::POST, "/v1/check", Some(req(90))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["allowed"], true);
    // Tightest: user:1 tokens 10 of 100 left.
    assert_eq!(r.header("x-ratelimit-remaining"), Some("10"));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"tokens-1h\";q=100;w=3600")
    );
    // team:t has 60 left but user:1 has 10: refused, and team:t is untouched.
    let r = s.admin(Method::POST, "/v1/check", Some(req(20))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["subject"], "user:1");
    let u = s.admin(Method::GET, "/v1/usage/team:t", None).await;
    assert_eq!(u.body["limits"][0]["used"], 90);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_commit_release_and_expiry() {
    let dir = TempDir::new("reserve");
    let s = Server::start(&dir).await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:1",
        Some(json!({"limits": [
            {"metric": "cost_usd", "limit": 10.0, "window": "day"},
        ]})),
    )
    .await;
    let reserve =
        |usd: f64| json!({"subjects": ["user:1"], "amounts": {"cost_usd": usd}, "lease_s": 60});
    let r = s
        .admin(Method::POST, "/v1/reserve", Some(reserve(6.0)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["expires_at"], "2027-01-15T08:01:00Z");
    assert_eq!(r.body["limits"][0]["remaining"], 4.0);
    // Held: a second 6.0 does not fit.
    assert_eq!(
        s.admin(Method::POST, "/v1/reserve", Some(reserve(6.0)))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Commit less than held: the rest comes back.
    let c = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some(json!({"amounts": {"cost_usd": 2.5}})),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    assert_eq!(c.body["status"], "committed");
    let u = s.admin(Method::GET, "/v1/usage/user:1", None).await;
    assert_eq!(u.body["limits"][0]["used"], 2.5);
    // Settling twice: 404.
    let again = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some(json!({"amounts": {"cost_usd": 1}})),
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.body["error"]["field"], "reservation_id");

    // Commit more than held: charged past the limit and reported.
    let r = s
        .admin(Method::POST, "/v1/reserve", Some(reserve(5.0)))
        .await;
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    let c = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some(json!({"amounts": {"cost_usd": 9.0}})),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.body["overshoot"][0]["used"], 11.5);

    // Release gives everything back.
    s.admin(
        Method::PUT,
        "/v1/policies/user:2",
        Some(json!({"limits": [
            {"metric": "requests", "limit": 1, "window": "1h"},
        ]})),
    )
    .await;
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:2"]})),
        )
        .await;
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.admin(
            Method::POST,
            &format!("/v1/reservations/{id}/release"),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:2"], "lease_s": 30})),
        )
        .await;
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    // The lease runs out: spent at its held amount; a late commit is a 409.
    s.advance(Duration::from_secs(31));
    let late = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some(json!({"amounts": {"requests": 0}})),
        )
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{:?}", late.body);
    assert_eq!(late.body["error"]["type"], "reservation_expired");
    let u = s.admin(Method::GET, "/v1/usage/user:2", None).await;
    assert_eq!(u.body["limits"][0]["used"], 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_admin_agent_keys_and_their_subjects() {
    let dir = TempDir::new("auth");
    let s = Server::start(&dir).await;
    let none = s.raw(Method::GET, "/v1/policies", &[], None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = s
        .call(Method::GET, "/v1/policies", "sk-sluice-nope", None)
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let via_header = s
        .raw(Method::GET, "/v1/policies", &[("x-api-key", ADMIN)], None)
        .await;
    assert_eq!(via_header.status, StatusCode::OK);

    let k = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"subject": "agent://acme/prod/a", "name": "a"})),
        )
        .await;
    assert_eq!(k.status, StatusCode::CREATED, "{:?}", k.body);
    let key = k.body["key"].as_str().unwrap().to_owned();
    let id = k.body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-sluice-"));
    // Listed without the key; the key is stored only as a hash.
    let list = s.admin(Method::GET, "/v1/keys", None).await;
    assert_eq!(list.body["keys"][0]["id"], id.as_str());
    assert!(list.body["keys"][0].get("key").is_none());
    let db = std::fs::read(dir.0.join("sluice.db")).unwrap();
    let wal = std::fs::read(dir.0.join("sluice.db-wal")).unwrap_or_default();
    let needle = key.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle)
            && !wal.windows(needle.len()).any(|w| w == needle)
    );

    s.admin(
        Method::PUT,
        "/v1/policies/agent://acme/prod/a",
        Some(json!({"limits": [{"metric": "requests", "limit": 5, "window": "1h"}]})),
    )
    .await;
    // Its own subject: fine (and counted even if not named).
    let own = s
        .call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": ["agent://acme/prod/a"]})),
        )
        .await;
    assert_eq!(own.status, StatusCode::OK);
    let shared = s
        .call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": ["model:gpt-4o"]})),
        )
        .await;
    assert_eq!(shared.status, StatusCode::OK);
    assert_eq!(shared.body["limits"][0]["subject"], "agent://acme/prod/a");
    // Another agent's subject: 403, naming it.
    let other = s
        .call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": ["agent://acme/prod/b"]})),
        )
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert_eq!(other.body["error"]["field"], "subjects[0]");
    assert_eq!(
        s.call(Method::GET, "/v1/usage/agent://acme/prod/b", &key, None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.call(Method::GET, "/v1/usage/agent://acme/prod/a", &key, None)
            .await
            .status,
        StatusCode::OK
    );
    // Admin endpoints: 403 for an agent key.
    assert_eq!(
        s.call(Method::GET, "/v1/policies", &key, None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.call(
            Method::PUT,
            "/v1/policies/agent://acme/prod/a",
            &key,
            Some(json!({"limits": []}))
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.call(
            Method::POST,
            "/v1/keys",
            &key,
            Some(json!({"subject": "global"}))
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    // Another key's reservation: 403.
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:1"]})),
        )
        .await;
    let rid = r.body["reservation_id"].as_str().unwrap().to_owned();
    let steal = s
        .call(
            Method::POST,
            &format!("/v1/reservations/{rid}/release"),
            &key,
            None,
        )
        .await;
    assert_eq!(steal.status, StatusCode::FORBIDDEN);
    // Revoked: 401.
    assert_eq!(
        s.admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": ["agent://acme/prod/a"]}))
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_count_once_and_replay_the_first_answer() {
    let dir = TempDir::new("idem");
    let s = Server::start(&dir).await;
    set_axme_policy(&s, 2).await;
    let auth = format!("Bearer {ADMIN}");
    let send = |key: &'static str, i: usize| {
        let body = serde_json::to_vec(&intent(i)).unwrap();
        let auth = auth.clone();
        let s = &s;
        async move {
            s.raw(
                Method::POST,
                "/v1/intents",
                &[("authorization", auth.as_str()), ("idempotency-key", key)],
                Some(body),
            )
            .await
        }
    };
    let a = send("k1", 1).await;
    let b = send("k1", 1).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["intent_id"], b.body["intent_id"]);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    let g = s
        .admin(
            Method::GET,
            &format!("/v1/mesh/agents/{BOT}/policies/cost"),
            None,
        )
        .await;
    assert_eq!(g.body["usage"]["intents_per_hour"], 1);
    // Same key, different body: refused.
    let c = send("k1", 2).await;
    assert_eq!(c.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(c.body["error"]["type"], "idempotency_key_reused");
    // Concurrent retries of one key: one decision.
    let (x, y, z) = tokio::join!(send("k2", 2), send("k2", 2), send("k2", 2));
    assert_eq!(x.body["intent_id"], y.body["intent_id"]);
    assert_eq!(y.body["intent_id"], z.body["intent_id"]);
    // A refusal is not stored: after the wait, the same key is decided afresh.
    let refused = send("k3", 3).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    s.advance(Duration::from_secs(3600));
    let later = send("k3", 3).await;
    assert_eq!(later.status, StatusCode::OK);
    // Stored answers survive a restart.
    let clock = s.stop().await;
    let s = Server::start_with(&dir, "", clock).await;
    let again = s
        .raw(
            Method::POST,
            "/v1/intents",
            &[("authorization", auth.as_str()), ("idempotency-key", "k1")],
            Some(serde_json::to_vec(&intent(1)).unwrap()),
        )
        .await;
    assert_eq!(again.body["intent_id"], a.body["intent_id"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_windows_from_the_ledger() {
    let dir = TempDir::new("restart");
    let clock = Arc::new(sluice_core::ManualClock::new(
        sluice_core::Timestamp::from_nanos(T0),
    ));
    let s = Server::start_with(&dir, "", clock.clone()).await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:1",
        Some(json!({"limits": [
            {"metric": "requests", "limit": 5, "window": "1h"},
            {"metric": "cost_usd", "limit": 3.0, "window": "month"},
            {"metric": "tokens", "limit": 1000, "window": "1m", "algorithm": "gcra"},
        ]})),
    )
    .await;
    for _ in 0..3 {
        let r = s.admin(Method::POST, "/v1/check", Some(json!({"subjects": ["user:1"], "amounts": {"requests": 1, "cost_usd": 0.5, "tokens": 100}}))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:1"], "amounts": {"requests": 1, "cost_usd": 1.0}})),
        )
        .await;
    let committed = r.body["reservation_id"].as_str().unwrap().to_owned();
    s.admin(
        Method::POST,
        &format!("/v1/reservations/{committed}/commit"),
        Some(json!({"amounts": {"requests": 1, "cost_usd": 0.25}})),
    )
    .await;
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:1"], "amounts": {"requests": 1, "cost_usd": 0.5}})),
        )
        .await;
    let open = r.body["reservation_id"].as_str().unwrap().to_owned();
    let before = s.admin(Method::GET, "/v1/usage/user:1", None).await.body["limits"].clone();
    s.stop().await;
    clock.advance(Duration::from_secs(10));
    let s = Server::start_with(&dir, "", clock.clone()).await;
    let after = s.admin(Method::GET, "/v1/usage/user:1", None).await.body["limits"].clone();
    for i in 0..2 {
        assert_eq!(
            before[i]["used"], after[i]["used"],
            "limit {i}: {before} vs {after}"
        );
    }
    assert_eq!(after[0]["used"], 5);
    assert_eq!(after[1]["used"], 2.25);
    // The reservation left open by the old process counts at its held amount; its commit is a 409.
    let c = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{open}/commit"),
            Some(json!({"amounts": {"requests": 1}})),
        )
        .await;
    assert_eq!(c.status, StatusCode::CONFLICT);
    assert_eq!(
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:1"]}))
        )
        .await
        .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let u = s.admin(Method::GET, "/v1/usage/user:1", None).await;
    assert_eq!(u.body["spend"]["month"]["cost_usd"], 2.25);
    assert_eq!(u.body["spend"]["total"]["requests"], 5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_sync_always_and_metrics() {
    let dir = TempDir::new("sync");
    let s = Server::start_with(
        &dir,
        "ledger_sync = \"always\"",
        Arc::new(sluice_core::ManualClock::new(
            sluice_core::Timestamp::from_nanos(T0),
        )),
    )
    .await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:1",
        Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}]})),
    )
    .await;
    assert_eq!(
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:1"]}))
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:1"]}))
        )
        .await
        .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let m = s.raw(Method::GET, "/metrics", &[], None).await;
    assert_eq!(m.status, StatusCode::OK);
    let text = m.body.as_str().unwrap().to_owned();
    for line in [
        "sluice_decisions_total{endpoint=\"check\",outcome=\"allowed\"} 1",
        "sluice_decisions_total{endpoint=\"check\",outcome=\"denied\"} 1",
        "sluice_decision_duration_seconds_count 2",
        "sluice_reservations_outstanding 0",
        "sluice_ledger_pending_rows 0",
        "sluice_ledger_rows_written_total 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("sluice_ledger_lag_seconds"));
    s.stop().await;
}

/// The kill switch: a stopped agent gets 403 on check, reserve and intents
/// (its key's and the admin's), whatever its limits say; a reservation made
/// before the kill still settles; kills and resumes are listed as events,
/// once each; only the admin may flip it; resuming restores service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_stops_an_agent_at_once_and_resume_restores_it() {
    let dir = TempDir::new("kill");
    let s = Server::start(&dir).await;
    let agent = "agent://acme/prod/runaway";
    let k = s
        .admin(Method::POST, "/v1/keys", Some(json!({"subject": agent})))
        .await;
    let key = k.body["key"].as_str().unwrap().to_owned();
    let check = || {
        s.call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": [agent]})),
        )
    };
    assert_eq!(check().await.status, StatusCode::OK);
    let held = s
        .call(
            Method::POST,
            "/v1/reserve",
            &key,
            Some(json!({"subjects": [agent]})),
        )
        .await;
    assert_eq!(held.status, StatusCode::OK, "{:?}", held.body);
    let held = held.body["reservation_id"].as_str().unwrap().to_owned();

    // Only the admin flips the switch.
    let by_agent = s
        .call(
            Method::POST,
            &format!("/v1/mesh/agents/{agent}/kill"),
            &key,
            None,
        )
        .await;
    assert_eq!(by_agent.status, StatusCode::FORBIDDEN);
    let killed = s
        .admin(
            Method::POST,
            &format!("/v1/mesh/agents/{agent}/kill"),
            Some(json!({"reason": "retry loop"})),
        )
        .await;
    assert_eq!(killed.status, StatusCode::OK, "{:?}", killed.body);
    assert_eq!(killed.body["status"], "killed");
    assert_eq!(killed.body["changed"], true);
    assert_eq!(killed.body["reason"], "retry loop");
    let again = s
        .admin(Method::POST, &format!("/v1/mesh/agents/{agent}/kill"), None)
        .await;
    assert_eq!(again.body["changed"], false);

    let refused = check().await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.body["error"]["type"], "agent_killed");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry loop"),
        "{:?}",
        refused.body
    );
    let reserve = s
        .call(
            Method::POST,
            "/v1/reserve",
            &key,
            Some(json!({"subjects": [agent]})),
        )
        .await;
    assert_eq!(reserve.status, StatusCode::FORBIDDEN);
    // The admin naming it is refused too, and so is an intent to it.
    let by_admin = s
        .admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:1", agent]})),
        )
        .await;
    assert_eq!(by_admin.status, StatusCode::FORBIDDEN);
    let intent = s
        .admin(
            Method::POST,
            "/v1/intents",
            Some(json!({"intent_type": "x", "to_agent": agent})),
        )
        .await;
    assert_eq!(intent.status, StatusCode::FORBIDDEN);
    // Other agents are untouched.
    let other = s
        .admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["agent://acme/prod/fine"]})),
        )
        .await;
    assert_eq!(other.status, StatusCode::OK);
    // In flight before the kill: it settles.
    let commit = s
        .call(
            Method::POST,
            &format!("/v1/reservations/{held}/commit"),
            &key,
            Some(json!({"amounts": {"requests": 1}})),
        )
        .await;
    assert_eq!(commit.status, StatusCode::OK, "{:?}", commit.body);

    let list = s
        .admin(Method::GET, "/v1/mesh/agents?status=killed", None)
        .await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    let agents = list.body["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["address"], agent);
    let one = s
        .call(Method::GET, &format!("/v1/mesh/agents/{agent}"), &key, None)
        .await;
    assert_eq!(one.status, StatusCode::OK, "{:?}", one.body);
    assert_eq!(one.body["status"], "killed");

    let resumed = s
        .admin(
            Method::POST,
            &format!("/v1/mesh/agents/{agent}/resume"),
            None,
        )
        .await;
    assert_eq!(resumed.body["status"], "active");
    assert_eq!(check().await.status, StatusCode::OK);

    let events = s.admin(Method::GET, "/v1/mesh/events", None).await;
    let kinds: Vec<&str> = events.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["resume", "kill"], "newest first, one each");
    assert_eq!(events.body["events"][1]["actor"], "admin");
    assert_eq!(events.body["events"][1]["detail"]["reason"], "retry loop");
    let only = s
        .admin(Method::GET, "/v1/mesh/events?event_type=kill&limit=5", None)
        .await;
    assert_eq!(only.body["events"].as_array().unwrap().len(), 1);
    for (path, field) in [
        ("/v1/mesh/events?limit=0", "limit"),
        ("/v1/mesh/events?event_type=boom", "event_type"),
        ("/v1/mesh/agents?status=zombie", "status"),
    ] {
        let bad = s.admin(Method::GET, path, None).await;
        assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        assert_eq!(bad.body["error"]["field"], field, "{path}");
    }
    let not_agent = s
        .admin(Method::POST, "/v1/mesh/agents/user:1/kill", None)
        .await;
    assert_eq!(not_agent.status, StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = s
        .admin(
            Method::POST,
            &format!("/v1/mesh/agents/{agent}/explode"),
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // The switch survives a restart.
    let again = s
        .admin(Method::POST, &format!("/v1/mesh/agents/{agent}/kill"), None)
        .await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["status"], "killed");
    let clock = s.stop().await;
    let s = Server::start_with(&dir, "", clock).await;
    let after = s
        .call(
            Method::POST,
            "/v1/check",
            &key,
            Some(json!({"subjects": [agent]})),
        )
        .await;
    assert_eq!(after.status, StatusCode::FORBIDDEN);
}

/// The audit trail of a scripted session: every change appears, in order,
/// with its actor and (for policies) the old and new bodies; refusals are
/// breach records counting the refusals they stand for; filters and paging;
/// the API cannot change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_records_every_change_in_order_with_its_actor() {
    let dir = TempDir::new("audit");
    let s = Server::start(&dir).await;
    let agent = "agent://acme/prod/audited";
    let limit = |n: u64| json!({"limits": [{"metric": "requests", "limit": n, "window": "1h"}]});
    s.admin(Method::PUT, "/v1/policies/user:7", Some(limit(5)))
        .await;
    s.admin(Method::PUT, "/v1/policies/user:7", Some(limit(6)))
        .await;
    let k = s
        .admin(Method::POST, "/v1/keys", Some(json!({"subject": agent})))
        .await;
    let key = k.body["key"].as_str().unwrap().to_owned();
    let key_id = k.body["id"].as_str().unwrap().to_owned();
    s.admin(
        Method::PUT,
        &format!("/v1/policies/{agent}"),
        Some(limit(1)),
    )
    .await;
    let check = json!({"subjects": [agent]});
    for want in [
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let r = s
            .call(Method::POST, "/v1/check", &key, Some(check.clone()))
            .await;
        assert_eq!(r.status, want);
    }
    // Breach records are written off the request path, once a second (bounded wait).
    let mut breach = Value::Null;
    for _ in 0..100 {
        let r = s.admin(Method::GET, "/v1/audit?kind=breach", None).await;
        if let Some(b) = r.body["records"].as_array().and_then(|a| a.first()) {
            breach = b.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(breach["subject"], agent, "{breach}");
    assert_eq!(breach["actor"], key_id.as_str());
    assert_eq!(breach["detail"]["refusals"], 2, "{breach}");
    assert_eq!(breach["detail"]["metric"], "requests");
    assert_eq!(breach["detail"]["window"], "1h");
    assert_eq!(breach["detail"]["limit"], 1);
    assert_eq!(breach["detail"]["action"], "block");
    // The mesh event log lists the breach too (beside kills and resumes).
    let events = s
        .admin(Method::GET, "/v1/mesh/events?event_type=breach", None)
        .await;
    assert_eq!(events.status, StatusCode::OK, "{:?}", events.body);
    let e = &events.body["events"][0];
    assert_eq!(e["event_type"], "breach", "{e}");
    assert_eq!(e["source"], "audit");
    assert_eq!(e["address"], agent);
    assert_eq!(e["detail"]["refusals"], 2);
    s.admin(
        Method::POST,
        &format!("/v1/mesh/agents/{agent}/kill"),
        Some(json!({"reason": "audit"})),
    )
    .await;
    s.admin(
        Method::POST,
        &format!("/v1/mesh/agents/{agent}/resume"),
        None,
    )
    .await;
    let r = s
        .admin(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = s.admin(Method::DELETE, "/v1/policies/user:7", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // Not changes: nothing recorded.
    s.admin(Method::DELETE, "/v1/policies/user:7", None).await;
    s.admin(Method::GET, "/v1/policies", None).await;

    let all = s.admin(Method::GET, "/v1/audit", None).await;
    assert_eq!(all.status, StatusCode::OK, "{:?}", all.body);
    let records = all.body["records"].as_array().unwrap();
    let got: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["subject"].as_str().unwrap(),
                r["actor"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("policy.created", "user:7", "admin"),
            ("policy.changed", "user:7", "admin"),
            ("key.created", agent, "admin"),
            ("policy.created", agent, "admin"),
            ("breach", agent, key_id.as_str()),
            ("agent.killed", agent, "admin"),
            ("agent.resumed", agent, "admin"),
            ("key.revoked", agent, "admin"),
            ("policy.deleted", "user:7", "admin"),
        ]
    );
    assert_eq!(records[1]["detail"]["old"]["limits"][0]["limit"], 5);
    assert_eq!(records[1]["detail"]["new"]["limits"][0]["limit"], 6);
    assert_eq!(records[8]["detail"]["old"]["limits"][0]["limit"], 6);
    assert_eq!(records[2]["detail"]["id"], key_id.as_str());
    assert!(
        records[2]["detail"].get("key").is_none(),
        "no secret in the trail"
    );
    assert_eq!(records[5]["detail"]["reason"], "audit");
    assert!(records[0]["at"].as_str().unwrap().ends_with('Z'));
    assert!(all.body["next_after"].is_null());

    // Filters and paging.
    let by_subject = s.admin(Method::GET, "/v1/audit?subject=user:7", None).await;
    assert_eq!(by_subject.body["records"].as_array().unwrap().len(), 3);
    let policies = s.admin(Method::GET, "/v1/audit?kind=policy", None).await;
    assert_eq!(policies.body["records"].as_array().unwrap().len(), 4);
    let page = s.admin(Method::GET, "/v1/audit?limit=4", None).await;
    assert_eq!(page.body["records"].as_array().unwrap().len(), 4);
    let next = page.body["next_after"].as_i64().unwrap();
    let rest = s
        .admin(
            Method::GET,
            &format!("/v1/audit?after={next}&limit=100"),
            None,
        )
        .await;
    assert_eq!(rest.body["records"].as_array().unwrap().len(), 5);
    assert_eq!(rest.body["records"][0]["kind"], "breach");
    let later = s
        .admin(Method::GET, "/v1/audit?since=2100-01-01T00:00:00Z", None)
        .await;
    assert_eq!(later.body["records"].as_array().unwrap().len(), 0);
    let until = s.admin(Method::GET, "/v1/audit?until=1", None).await;
    assert_eq!(until.body["records"].as_array().unwrap().len(), 0);
    for (path, field) in [
        ("/v1/audit?kind=everything", "kind"),
        ("/v1/audit?since=yesterday", "since"),
        ("/v1/audit?after=-1", "after"),
        ("/v1/audit?limit=5000", "limit"),
        ("/v1/audit?subject=nobody", "subject"),
        ("/v1/audit?colour=red", "colour"),
    ] {
        let bad = s.admin(Method::GET, path, None).await;
        assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        assert_eq!(bad.body["error"]["field"], field, "{path}");
    }
    // Agents may not read it; nothing in the API writes it.
    let k2 = s
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"subject": "agent://acme/prod/b"})),
        )
        .await;
    let agent_read = s
        .call(
            Method::GET,
            "/v1/audit",
            k2.body["key"].as_str().unwrap(),
            None,
        )
        .await;
    assert_eq!(agent_read.status, StatusCode::FORBIDDEN);
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let r = s.admin(method.clone(), "/v1/audit", Some(json!({}))).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    s.stop().await;
}
