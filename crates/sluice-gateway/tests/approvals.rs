//! `require_approval` through the decision API and the AXME endpoints: a
//! refused request is held until a human decides; an approval from another
//! client releases it and grants an override; a timeout answers 429 naming
//! the approval; a denial leaves the agent blocked without asking again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const AGENT: &str = "agent://acme/prod/careful";

async fn start(dir: &TempDir) -> Server {
    Server::start_config(dir, "lease_check_ms = 20\n").await
}

fn policy(limit: u64, wait: &str) -> Value {
    json!({
        "limits": [{"metric": "requests", "limit": limit, "window": "24h"}],
        "action_on_breach": "require_approval",
        "approval_wait": wait,
    })
}

/// Wait (bounded) until `n` approvals are pending; them.
async fn pending(s: &Server, n: usize) -> Vec<Value> {
    for _ in 0..500 {
        let r = s
            .admin(Method::GET, "/v1/approvals?status=pending", None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let list = r.body["approvals"].as_array().unwrap().clone();
        if list.len() == n {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} pending approvals");
}

async fn metric(s: &Server, name: &str) -> f64 {
    let m = s.raw(Method::GET, "/metrics", &[], None).await;
    let text = m.body.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap()
        .parse()
        .unwrap()
}

async fn limit_now(s: &Server) -> Value {
    let u = s
        .admin(Method::GET, &format!("/v1/usage/{AGENT}"), None)
        .await;
    u.body["limits"][0]["limit"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_approval_holds_requests_until_a_human_decides() {
    let dir = TempDir::new("approvals");
    let s = start(&dir).await;
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(policy(2, "20s")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["approval_wait"], "20s");
    let k = s
        .admin(Method::POST, "/v1/keys", Some(json!({"subject": AGENT})))
        .await;
    let key = k.body["key"].as_str().unwrap().to_owned();
    let check = |s: &Server| {
        let s = s.handle();
        let key = key.clone();
        async move {
            s.call(
                Method::POST,
                "/v1/check",
                &key,
                Some(json!({"subjects": [AGENT]})),
            )
            .await
        }
    };
    for _ in 0..2 {
        assert_eq!(check(&s).await.status, StatusCode::OK);
    }

    // Two requests past the limit are held on one approval.
    let held_a = tokio::spawn(check(&s));
    let held_b = tokio::spawn(check(&s));
    let list = pending(&s, 1).await;
    let a = &list[0];
    let id = a["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{a}");
    assert_eq!(a["subject"], AGENT);
    assert_eq!(a["limit"]["metric"], "requests");
    assert_eq!(a["limit"]["window"], "1d");
    assert_eq!(a["limit"]["limit"], 2);
    assert_eq!(a["limit"]["used"], 2);
    assert_eq!(a["requested"]["requests"], 1);
    assert!(!held_a.is_finished() && !held_b.is_finished());
    // Both held (bounded wait: the second may still be on its way in).
    for _ in 0..500 {
        if metric(&s, "sluice_approvals_held_requests").await == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&s, "sluice_approvals_held_requests").await, 2.0);
    assert_eq!(metric(&s, "sluice_approvals_pending").await, 1.0);
    // Only the admin decides.
    let by_agent = s
        .call(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            &key,
            None,
        )
        .await;
    assert_eq!(by_agent.status, StatusCode::FORBIDDEN);

    // Approved from another client: both proceed; the override stands.
    let until = T0 / 1_000_000_000 + 3_600;
    let ok = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            Some(json!({"extra": {"requests": 3}, "until": until})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.body["status"], "approved");
    assert_eq!(ok.body["extra"]["requests"], 3);
    assert_eq!(ok.body["decided_by"], "admin");
    for h in [held_a, held_b] {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(limit_now(&s).await, 5);
    assert_eq!(metric(&s, "sluice_approvals_held_requests").await, 0.0);
    assert_eq!(metric(&s, "sluice_approvals_pending").await, 0.0);
    assert_eq!(metric(&s, "sluice_approval_overrides").await, 1.0);
    // The override survives a restart.
    let clock = s.stop().await;
    let s = Server::start_with(&dir, "lease_check_ms = 20\n", clock).await;
    assert_eq!(limit_now(&s).await, 5);
    // 2 + 3 allowed: one more passes at once, the next is held again.
    assert_eq!(check(&s).await.status, StatusCode::OK);
    let again = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            Some(json!({})),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);

    // Not decided in time: 429 naming the (still pending) approval.
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(policy(2, "1s")),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        limit_now(&s).await,
        5,
        "the override survives a policy change"
    );
    let timed_out = check(&s).await;
    assert_eq!(timed_out.status, StatusCode::TOO_MANY_REQUESTS);
    let second = timed_out.body["error"]["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second, id);
    assert_eq!(
        timed_out.header("x-sluice-approval-id"),
        Some(second.as_str())
    );
    assert_eq!(timed_out.body["error"]["approval_status"], "pending");
    assert!(timed_out.header("retry-after").is_some());
    assert_eq!(pending(&s, 1).await[0]["id"], second.as_str());

    // Denied: the agent stays blocked, answered at once, and nobody is asked again.
    let denied = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{second}/deny"),
            Some(json!({"reason": "runaway loop"})),
        )
        .await;
    assert_eq!(denied.status, StatusCode::OK, "{:?}", denied.body);
    assert_eq!(denied.body["status"], "denied");
    for _ in 0..3 {
        let r = check(&s).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.body["error"]["approval_id"], second.as_str());
        assert_eq!(r.body["error"]["approval_status"], "denied");
    }
    pending(&s, 0).await;
    let one = s
        .admin(Method::GET, &format!("/v1/approvals/{second}"), None)
        .await;
    assert_eq!(one.body["reason"], "runaway loop");

    // The override ends at its `until`: the limit is 2 again.
    s.advance(Duration::from_secs(3_601));
    let mut back = false;
    for _ in 0..500 {
        if limit_now(&s).await == 2 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "the override never ended");

    // The audit trail has each step, in order, with its actor.
    let audit = s
        .admin(
            Method::GET,
            &format!("/v1/audit?subject={AGENT}&kind=approval"),
            None,
        )
        .await;
    let steps: Vec<(String, String)> = audit.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let key_id = k.body["id"].as_str().unwrap();
    assert_eq!(
        steps,
        [
            ("approval.requested".to_owned(), key_id.to_owned()),
            ("approval.approved".to_owned(), "admin".to_owned()),
            ("approval.requested".to_owned(), key_id.to_owned()),
            ("approval.denied".to_owned(), "admin".to_owned()),
        ]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_reject_bad_input_by_field() {
    let dir = TempDir::new("approvals-bad");
    let s = start(&dir).await;
    for (body, field) in [
        (policy(2, "10m"), "approval_wait"),
        (policy(2, "soon"), "approval_wait"),
        (
            json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "action_on_breach": "block", "fallback_action": "alert"}),
            "fallback_action",
        ),
    ] {
        let r = s
            .admin(Method::PUT, &format!("/v1/policies/{AGENT}"), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
        assert_eq!(r.body["error"]["field"], field, "{:?}", r.body);
    }
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(policy(1, "0s")),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let check = || {
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": [AGENT]})),
        )
    };
    assert_eq!(check().await.status, StatusCode::OK);
    // approval_wait 0s: answered at once, the approval opened.
    let r = check().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let id = r.body["error"]["approval_id"].as_str().unwrap().to_owned();
    for (path, body, status, field) in [
        (
            "/v1/approvals/apr_nope/approve",
            json!({}),
            StatusCode::NOT_FOUND,
            "id",
        ),
        (
            &*format!("/v1/approvals/{id}/approve"),
            json!({"extra": {}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            &*format!("/v1/approvals/{id}/approve"),
            json!({"extra": {"requests": -1}}),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            &*format!("/v1/approvals/{id}/approve"),
            json!({"until": "2020-01-01T00:00:00Z"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "until",
        ),
        (
            &*format!("/v1/approvals/{id}/approve"),
            json!({"until": "tomorrow"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "until",
        ),
        (
            &*format!("/v1/approvals/{id}/approve"),
            json!({"bogus": 1}),
            StatusCode::BAD_REQUEST,
            "",
        ),
    ] {
        let r = s.admin(Method::POST, path, Some(body)).await;
        assert_eq!(r.status, status, "{path}: {:?}", r.body);
        if !field.is_empty() {
            assert_eq!(r.body["error"]["field"], field, "{:?}", r.body);
        }
    }
    let bad = s
        .admin(Method::GET, "/v1/approvals?status=maybe", None)
        .await;
    assert_eq!(bad.body["error"]["field"], "status");
    // Still pending after all that; approving with no body grants what was asked.
    let ok = s
        .admin(Method::POST, &format!("/v1/approvals/{id}/approve"), None)
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.body["extra"]["requests"], 1);
    assert_eq!(check().await.status, StatusCode::OK);
    s.stop().await;
}

/// The AXME endpoints: `action_on_breach: "require_approval"` holds an
/// intent past the hourly cap; approving releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axme_intents_wait_for_approval() {
    let dir = TempDir::new("approvals-axme");
    let s = start(&dir).await;
    let bot = "agent://myorg/production/order-processor";
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/mesh/agents/{bot}/policies/cost"),
            Some(json!({"max_intents_per_hour": 1, "action_on_breach": "require_approval"})),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let intent = json!({"intent_type": "x", "to_agent": bot});
    assert_eq!(
        s.admin(Method::POST, "/v1/intents", Some(intent.clone()))
            .await
            .status,
        StatusCode::OK
    );
    let held = {
        let s2 = s.handle();
        let intent = intent.clone();
        tokio::spawn(async move { s2.admin(Method::POST, "/v1/intents", Some(intent)).await })
    };
    let list = pending(&s, 1).await;
    let id = list[0]["id"].as_str().unwrap();
    let ok = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            Some(json!({"extra": {"requests": 10}})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let r = held.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    s.stop().await;
}

/// Actions per limit: a limit's own `action_on_breach` decides its
/// refusals (here: the minute limit blocks, the hour limit asks for
/// approval); `alert` cannot sit beside limits that must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_may_carry_its_own_action() {
    let dir = TempDir::new("approvals-per-limit");
    let s = start(&dir).await;
    let body = json!({
        "limits": [
            {"metric": "requests", "limit": 2, "window": "1m"},
            {"metric": "requests", "limit": 3, "window": "1h", "action_on_breach": "require_approval"},
        ],
        "approval_wait": "0s",
    });
    let r = s
        .admin(Method::PUT, &format!("/v1/policies/{AGENT}"), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["limits"][1]["action_on_breach"], "require_approval");
    assert!(r.body["limits"][0].get("action_on_breach").is_none());
    let check = || {
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": [AGENT]})),
        )
    };
    for _ in 0..2 {
        assert_eq!(check().await.status, StatusCode::OK);
    }
    // The minute limit blocks: no approval.
    let r = check().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["window"], "1m");
    assert!(r.body["error"].get("approval_id").is_none(), "{:?}", r.body);
    s.advance(Duration::from_secs(61));
    assert_eq!(check().await.status, StatusCode::OK);
    // The hour limit asks for approval.
    let r = check().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["window"], "1h");
    assert!(r.body["error"]["approval_id"].is_string(), "{:?}", r.body);
    assert_eq!(pending(&s, 1).await[0]["limit"]["window"], "1h");

    for (limits, field) in [
        (
            json!([{"metric": "requests", "limit": 1, "window": "1m", "action_on_breach": "alert"},
                   {"metric": "requests", "limit": 5, "window": "1h"}]),
            "limits[1].action_on_breach",
        ),
        (
            json!([{"metric": "requests", "limit": 1, "window": "1m", "action_on_breach": "degrade"}]),
            "limits[0].action_on_breach",
        ),
        (
            json!([{"metric": "requests", "limit": 1, "window": "1m", "action_on_breach": "shout"}]),
            "limits[0].action_on_breach",
        ),
    ] {
        let r = s
            .admin(
                Method::PUT,
                "/v1/policies/user:mixed",
                Some(json!({ "limits": limits })),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
        assert_eq!(r.body["error"]["field"], field, "{:?}", r.body);
    }
    s.stop().await;
}

/// A request one subject's `alert` lets through and another's
/// `require_approval` refuses is held for approval, not blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_after_an_alert_in_the_same_request() {
    let dir = TempDir::new("approvals-mixed");
    let s = start(&dir).await;
    let loud = json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "action_on_breach": "alert"});
    assert!(
        s.admin(Method::PUT, "/v1/policies/user:loud", Some(loud))
            .await
            .status
            .is_success()
    );
    assert!(
        s.admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(policy(1, "0s"))
        )
        .await
        .status
        .is_success()
    );
    let both = json!({"subjects": ["user:loud", AGENT]});
    let r = s.admin(Method::POST, "/v1/check", Some(both.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = s.admin(Method::POST, "/v1/check", Some(both.clone())).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.body["error"]["subject"], AGENT);
    let id = r.body["error"]["approval_id"].as_str().unwrap().to_owned();
    let ok = s
        .admin(Method::POST, &format!("/v1/approvals/{id}/approve"), None)
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let r = s.admin(Method::POST, "/v1/check", Some(both)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["let_through"][0], "user:loud");
    s.stop().await;
}
