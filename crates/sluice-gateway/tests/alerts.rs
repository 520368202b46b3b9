//! Early warnings: `alert_at` thresholds raise one alert per threshold per
//! window, delivered to webhooks (JSON with an HMAC-SHA256 signature, and
//! Slack-compatible text) off the request path; a slow receiver never holds
//! a decision.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const SECRET: &str = "alert-secret-0123456789";

/// A webhook receiver: records what arrives; while `gate` has no permits,
/// requests arrive and wait (a slow receiver).
/// (signature header, body) of each delivery.
type Deliveries = Arc<Mutex<Vec<(Option<String>, String)>>>;

#[derive(Clone)]
struct Hook {
    got: Deliveries,
    arrived: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn receive(State(h): State<Hook>, headers: HeaderMap, body: String) -> AxumStatus {
    h.arrived.fetch_add(1, Ordering::SeqCst);
    let _permit = h.gate.acquire().await.unwrap();
    let sig = headers
        .get("x-sluice-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    h.got.lock().unwrap().push((sig, body));
    AxumStatus::OK
}

async fn hook(open: bool) -> (String, Hook) {
    let h = Hook {
        got: Arc::default(),
        arrived: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(if open { 1 << 20 } else { 0 })),
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(h.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, h)
}

/// Bounded wait until `f()` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

fn verify(sig: &str, body: &str) -> bool {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sig == format!("sha256={want}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_once_per_window_to_every_webhook() {
    let (json_url, json_hook) = hook(true).await;
    let (slack_url, slack_hook) = hook(true).await;
    let dir = TempDir::new("alerts");
    let toml = format!(
        "[[alerts.webhooks]]\nurl = \"{json_url}\"\nsecret = \"{SECRET}\"\n\
         [[alerts.webhooks]]\nurl = \"{slack_url}\"\nformat = \"slack\"\n"
    );
    let s = Server::start_config(&dir, &toml).await;
    let r = s
        .admin(
            Method::PUT,
            "/v1/policies/user:9",
            Some(json!({"limits": [{"metric": "requests", "limit": 10, "window": "day"}], "alert_at": [0.5, 0.8, 1.0]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["alert_at"], json!([0.5, 0.8, 1.0]));
    let check = || {
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:9"]})),
        )
    };
    for i in 1..=15 {
        let want = if i <= 10 {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(check().await.status, want, "check {i}");
    }
    until("three alerts at each webhook", || {
        json_hook.got.lock().unwrap().len() == 3 && slack_hook.got.lock().unwrap().len() == 3
    })
    .await;
    let got = json_hook.got.lock().unwrap().clone();
    let thresholds: Vec<f64> = got
        .iter()
        .map(|(sig, body)| {
            assert!(
                verify(sig.as_deref().unwrap(), body),
                "bad signature on {body}"
            );
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["subject"], "user:9");
            assert_eq!(v["metric"], "requests");
            assert_eq!(v["window"], "day");
            assert_eq!(v["limit"], 10);
            v["threshold"].as_f64().unwrap()
        })
        .collect();
    let mut sorted = thresholds.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(sorted, [0.5, 0.8, 1.0]);
    for (sig, body) in slack_hook.got.lock().unwrap().iter() {
        assert!(sig.is_none(), "no secret, no signature");
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(
            v["text"].as_str().unwrap().contains("user:9 crossed"),
            "{v}"
        );
    }
    let list = s.admin(Method::GET, "/v1/alerts", None).await;
    let alerts = list.body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 3, "{alerts:?}");

    // The next day is a new window: the first threshold fires again, once.
    s.advance(Duration::from_secs(86_400));
    for _ in 0..6 {
        assert_eq!(check().await.status, StatusCode::OK);
    }
    until("the next day's 50% alert", || {
        json_hook.got.lock().unwrap().len() == 4
    })
    .await;
    let mut delivered = Vec::new();
    for _ in 0..200 {
        let list = s
            .admin(Method::GET, "/v1/alerts?status=delivered", None)
            .await;
        delivered = list.body["alerts"].as_array().unwrap().clone();
        if delivered.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(delivered.len(), 4, "{delivered:?}");
    assert_eq!(delivered[0]["threshold"], 0.5);
    assert_eq!(delivered[0]["attempts"], 2, "one per webhook");
    let trail = s
        .admin(Method::GET, "/v1/audit?kind=alert.sent", None)
        .await;
    assert_eq!(trail.body["records"].as_array().unwrap().len(), 4);
    assert_eq!(json_hook.got.lock().unwrap().len(), 4);
    assert_eq!(slack_hook.got.lock().unwrap().len(), 4);
    s.stop().await;
}

/// A receiver that does not answer: every decision still returns at once
/// (all 100 come back while no delivery has completed), and the alerts go
/// out when the receiver recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_never_holds_a_decision() {
    let (url, slow) = hook(false).await;
    let dir = TempDir::new("alerts-slow");
    let toml = format!("[[alerts.webhooks]]\nurl = \"{url}\"\n");
    let s = Server::start_config(&dir, &toml).await;
    let thresholds: Vec<f64> = (1..=10).map(|i| f64::from(i) / 10.0).collect();
    s.admin(
        Method::PUT,
        "/v1/policies/user:slow",
        Some(json!({"limits": [{"metric": "requests", "limit": 100, "window": "day"}], "alert_at": thresholds})),
    )
    .await;
    let mut answered = 0;
    for _ in 0..100 {
        let r = s
            .admin(
                Method::POST,
                "/v1/check",
                Some(json!({"subjects": ["user:slow"]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        answered += 1;
    }
    assert_eq!(answered, 100);
    until("deliveries reach the receiver", || {
        slow.arrived.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(
        slow.got.lock().unwrap().len(),
        0,
        "every decision answered while no delivery had completed"
    );
    // Alerts are recorded off the request path, one after another: wait
    // (bounded) until all ten are listed, still pending behind the gate.
    let mut pending = 0;
    for _ in 0..200 {
        let list = s
            .admin(Method::GET, "/v1/alerts?status=pending", None)
            .await;
        pending = list.body["alerts"].as_array().unwrap().len();
        if pending == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(pending, 10);
    assert_eq!(slow.got.lock().unwrap().len(), 0, "the gate is still shut");
    slow.gate.add_permits(1 << 20);
    until("all ten delivered", || slow.got.lock().unwrap().len() == 10).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_thresholds_and_webhooks_are_refused_naming_the_field() {
    let dir = TempDir::new("alerts-bad");
    let s = Server::start(&dir).await;
    for (alert_at, field) in [
        (json!([0.0]), "alert_at[0]"),
        (json!([0.5, 1.5]), "alert_at[1]"),
        (json!([0.5, 0.5]), "alert_at[1]"),
        (json!("half"), "alert_at"),
    ] {
        let r = s
            .admin(
                Method::PUT,
                "/v1/policies/user:1",
                Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "alert_at": alert_at})),
            )
            .await;
        assert!(r.status.is_client_error(), "{alert_at}");
        assert_eq!(r.body["error"]["field"], field, "{alert_at}: {:?}", r.body);
    }
    let bad = s.admin(Method::GET, "/v1/alerts?status=lost", None).await;
    assert_eq!(bad.body["error"]["field"], "status");
    s.stop().await;
    for (toml, key) in [
        (
            "[[alerts.webhooks]]\nurl = \"ftp://x\"\n",
            "alerts.webhooks[0].url",
        ),
        (
            "[[alerts.webhooks]]\nurl = \"http://x\"\nformat = \"teams\"\n",
            "alerts.webhooks[0].format",
        ),
        (
            "[[alerts.webhooks]]\nurl = \"http://x\"\nsecret = \"short\"\n",
            "alerts.webhooks[0].secret",
        ),
        (
            "[[alerts.webhooks]]\nurl = \"http://x\"\nsecret_env = \"SLUICE_TEST_UNSET_SECRET\"\n",
            "alerts.webhooks[0].secret_env",
        ),
    ] {
        let file = sluice_gateway::config::FileConfig::parse(toml, std::path::Path::new("t.toml"))
            .unwrap();
        let e = sluice_gateway::config::Config::resolve(
            file,
            sluice_gateway::config::Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(e.key, key, "{toml}");
    }
}

/// `action_on_breach: "alert"`: requests past the limit pass and are
/// counted; each breach is recorded (action `alert`) and raises one breach
/// alert per window, beside the early warnings; a `block` subject in the
/// same request still refuses; a reservation past the limit holds on the
/// others and charges the alerting subject its actual amounts at commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_action_lets_requests_through_counts_them_and_alerts_once() {
    let (url, h) = hook(true).await;
    let dir = TempDir::new("alert-action");
    let toml = format!("[[alerts.webhooks]]\nurl = \"{url}\"\n");
    let s = Server::start_config(&dir, &toml).await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:loud",
        Some(
            json!({"limits": [{"metric": "requests", "limit": 2, "window": "day"}],
                    "action_on_breach": "alert", "alert_at": [1.0]}),
        ),
    )
    .await;
    s.admin(
        Method::PUT,
        "/v1/policies/team:strict",
        Some(json!({"limits": [{"metric": "requests", "limit": 4, "window": "day"}]})),
    )
    .await;
    let both = json!({"subjects": ["user:loud", "team:strict"]});
    let mut passed = 0;
    let mut let_through = 0;
    for _ in 0..6 {
        let r = s.admin(Method::POST, "/v1/check", Some(both.clone())).await;
        if r.status == StatusCode::OK {
            passed += 1;
            if r.body["let_through"] == json!(["user:loud"]) {
                let_through += 1;
            }
        } else {
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(r.body["error"]["subject"], "team:strict", "{:?}", r.body);
        }
    }
    assert_eq!(passed, 4, "team:strict (block) still holds at 4");
    assert_eq!(let_through, 2, "user:loud let 2 through past its 2");
    let usage = s.admin(Method::GET, "/v1/usage/user:loud", None).await;
    assert_eq!(usage.body["limits"][0]["used"], 4, "counted past the limit");

    // A reservation past the limit: held on the others, charged at commit.
    let r = s
        .admin(
            Method::POST,
            "/v1/reserve",
            Some(json!({"subjects": ["user:loud"], "amounts": {"requests": 3}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["let_through"], json!(["user:loud"]));
    let id = r.body["reservation_id"].as_str().unwrap().to_owned();
    let r = s
        .admin(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some(json!({"amounts": {"requests": 1}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let usage = s.admin(Method::GET, "/v1/usage/user:loud", None).await;
    assert_eq!(
        usage.body["limits"][0]["used"], 5,
        "the actual 1, not the 3 held"
    );

    // Webhooks: the 100% warning once and the breach once, for the whole day.
    until("two alerts delivered", || h.got.lock().unwrap().len() == 2).await;
    let kinds: Vec<String> = h
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        kinds.contains(&"sluice.alert".to_owned()) && kinds.contains(&"sluice.breach".to_owned()),
        "{kinds:?}"
    );
    // Breach records are written once a second (bounded wait).
    let mut actions = (Value::Null, Value::Null);
    for _ in 0..100 {
        let loud = s
            .admin(Method::GET, "/v1/audit?kind=breach&subject=user:loud", None)
            .await;
        let strict = s
            .admin(
                Method::GET,
                "/v1/audit?kind=breach&subject=team:strict",
                None,
            )
            .await;
        actions = (
            loud.body["records"][0]["detail"]["action"].clone(),
            strict.body["records"][0]["detail"]["action"].clone(),
        );
        if !actions.0.is_null() && !actions.1.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(actions, (json!("alert"), json!("block")));
    // More breaches the same day: still two webhooks.
    for _ in 0..3 {
        let r = s
            .admin(
                Method::POST,
                "/v1/check",
                Some(json!({"subjects": ["user:loud"]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let alerts = s.admin(Method::GET, "/v1/alerts", None).await;
    assert_eq!(
        alerts.body["alerts"].as_array().unwrap().len(),
        2,
        "{:?}",
        alerts.body
    );
    s.stop().await;
}

/// A request held for approval is announced to the webhooks once per
/// approval, naming it (a held request is not "let through").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_announces_its_approval() {
    let (url, h) = hook(true).await;
    let dir = TempDir::new("alert-approval");
    let toml = format!(
        "[[alerts.webhooks]]\nurl = \"{url}\"\nformat = \"slack\"\n[[alerts.webhooks]]\nurl = \"{url}\"\n"
    );
    let s = Server::start_config(&dir, &toml).await;
    let r = s
        .admin(
            Method::PUT,
            "/v1/policies/user:careful",
            Some(
                json!({"limits": [{"metric": "requests", "limit": 1, "window": "day"}],
                        "action_on_breach": "require_approval", "approval_wait": "0s"}),
            ),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let check = json!({"subjects": ["user:careful"]});
    assert_eq!(
        s.admin(Method::POST, "/v1/check", Some(check.clone()))
            .await
            .status,
        StatusCode::OK
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = s
            .admin(Method::POST, "/v1/check", Some(check.clone()))
            .await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        ids.push(r.body["error"]["approval_id"].as_str().unwrap().to_owned());
    }
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one pending approval: {ids:?}"
    );
    until("the approval announced to both webhooks", || {
        h.got.lock().unwrap().len() == 2
    })
    .await;
    let got = h.got.lock().unwrap().clone();
    let bodies: Vec<Value> = got
        .iter()
        .map(|(_, b)| serde_json::from_str(b).unwrap())
        .collect();
    let json = bodies.iter().find(|b| b.get("type").is_some()).unwrap();
    assert_eq!(json["type"], "sluice.approval_requested");
    assert_eq!(json["approval_id"], ids[0].as_str());
    assert_eq!(json["subject"], "user:careful");
    let slack = bodies.iter().find(|b| b.get("text").is_some()).unwrap();
    assert!(slack["text"].as_str().unwrap().contains(&ids[0]), "{slack}");
    let listed = s.admin(Method::GET, "/v1/alerts", None).await;
    assert_eq!(listed.body["alerts"][0]["approval_id"], ids[0].as_str());
    s.stop().await;
}
