//! A table of bad requests: each gets the right 4xx with a JSON error naming
//! the field, nothing is counted, and the server stays healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::*;

struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    /// `None`: the admin key; `Some("")`: no key; otherwise this key.
    key: Option<&'static str>,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    kind: &'static str,
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    method: Method,
    path: &'static str,
    body: &str,
    status: u16,
    kind: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        method,
        path,
        key: None,
        body: (!body.is_empty()).then(|| body.as_bytes().to_vec()),
        headers: vec![],
        status,
        kind,
        field,
    }
}

const P: &str = "/v1/policies/user:1";

fn policy(limit: &str) -> String {
    format!(r#"{{"limits": [{limit}]}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx_errors_and_change_nothing() {
    let dir = TempDir::new("bad");
    let s = Server::start(&dir).await;
    s.admin(
        Method::PUT,
        "/v1/policies/user:7",
        Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}]})),
    )
    .await;
    let l = |s: &str| policy(s);
    let mut cases = vec![
        // JSON shape: 400
        case(
            "malformed JSON",
            Method::PUT,
            P,
            "{\"limits\": [",
            400,
            "invalid_json",
            None,
        ),
        case(
            "trailing garbage",
            Method::PUT,
            P,
            "{\"limits\": []} x",
            400,
            "invalid_json",
            None,
        ),
        case(
            "empty body",
            Method::PUT,
            P,
            "",
            400,
            "invalid_request",
            None,
        ),
        case(
            "not an object",
            Method::PUT,
            P,
            "[1,2]",
            400,
            "invalid_request",
            None,
        ),
        case(
            "unknown top-level field",
            Method::PUT,
            P,
            r#"{"limits": [], "colour": 1}"#,
            400,
            "invalid_request",
            Some("colour"),
        ),
        case(
            "unknown limit field",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1, "window": "1h", "per": 2}"#),
            400,
            "invalid_request",
            Some("limits[0].per"),
        ),
        case(
            "missing limits",
            Method::PUT,
            P,
            "{}",
            400,
            "invalid_request",
            Some("limits"),
        ),
        case(
            "missing window",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1}"#),
            400,
            "invalid_request",
            Some("limits[0].window"),
        ),
        case(
            "limit is a string",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": "100", "window": "1h"}"#),
            400,
            "invalid_request",
            Some("limits[0].limit"),
        ),
        case(
            "metric is a number",
            Method::PUT,
            P,
            &l(r#"{"metric": 5, "limit": 1, "window": "1h"}"#),
            400,
            "invalid_request",
            Some("limits[0].metric"),
        ),
        // Values: 422
        case(
            "zero limit",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 0, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("limits[0].limit"),
        ),
        case(
            "negative limit",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": -5, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("limits[0].limit"),
        ),
        case(
            "fractional request limit",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1.5, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("limits[0].limit"),
        ),
        case(
            "negative dollars",
            Method::PUT,
            P,
            &l(r#"{"metric": "cost_usd", "limit": -1.0, "window": "day"}"#),
            422,
            "invalid_value",
            Some("limits[0].limit"),
        ),
        case(
            "huge limit",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1e300, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("limits[0].limit"),
        ),
        case(
            "unknown metric",
            Method::PUT,
            P,
            &l(r#"{"metric": "calls", "limit": 1, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("limits[0].metric"),
        ),
        case(
            "unknown window",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1, "window": "fortnight"}"#),
            422,
            "invalid_value",
            Some("limits[0].window"),
        ),
        case(
            "window too long",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1, "window": "90d"}"#),
            422,
            "invalid_value",
            Some("limits[0].window"),
        ),
        case(
            "unknown algorithm",
            Method::PUT,
            P,
            &l(r#"{"metric": "requests", "limit": 1, "window": "1h", "algorithm": "leaky"}"#),
            422,
            "invalid_value",
            Some("limits[0].algorithm"),
        ),
        case(
            "unknown timezone",
            Method::PUT,
            P,
            r#"{"limits": [{"metric": "requests", "limit": 1, "window": "day"}], "timezone": "Mars/Olympus"}"#,
            422,
            "invalid_value",
            Some("timezone"),
        ),
        case(
            "unknown action",
            Method::PUT,
            P,
            r#"{"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "action_on_breach": "explode"}"#,
            422,
            "invalid_value",
            Some("action_on_breach"),
        ),
        case(
            "no limits",
            Method::PUT,
            P,
            r#"{"limits": []}"#,
            422,
            "invalid_value",
            Some("limits"),
        ),
        case(
            "duplicate limits",
            Method::PUT,
            P,
            &l(
                r#"{"metric": "requests", "limit": 1, "window": "1h"}, {"metric": "requests", "limit": 2, "window": "1h"}"#,
            ),
            422,
            "invalid_value",
            Some("limits[1]"),
        ),
        case(
            "bad subject in path",
            Method::PUT,
            "/v1/policies/bob",
            &l(r#"{"metric": "requests", "limit": 1, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("subject"),
        ),
        case(
            "bad agent address",
            Method::PUT,
            "/v1/policies/agent://only-one-part",
            &l(r#"{"metric": "requests", "limit": 1, "window": "1h"}"#),
            422,
            "invalid_value",
            Some("subject"),
        ),
        case(
            "bad percent-encoding",
            Method::GET,
            "/v1/policies/user%zz",
            "",
            400,
            "invalid_request",
            None,
        ),
        // Decisions
        case(
            "no subjects",
            Method::POST,
            "/v1/check",
            r#"{"subjects": []}"#,
            422,
            "invalid_value",
            Some("subjects"),
        ),
        case(
            "bad subject",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:1", "nobody"]}"#,
            422,
            "invalid_value",
            Some("subjects[1]"),
        ),
        case(
            "wildcard subject in a decision",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:*"]}"#,
            422,
            "invalid_value",
            Some("subjects[0]"),
        ),
        case(
            "negative amount",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:7"], "amounts": {"requests": -1}}"#,
            400,
            "invalid_request",
            Some("amounts.requests"),
        ),
        case(
            "NaN-like cost",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:7"], "amounts": {"cost_usd": "NaN"}}"#,
            400,
            "invalid_request",
            Some("amounts.cost_usd"),
        ),
        case(
            "negative cost",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:7"], "amounts": {"cost_usd": -0.5}}"#,
            422,
            "invalid_value",
            Some("amounts.cost_usd"),
        ),
        case(
            "unknown amount",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:7"], "amounts": {"calls": 1}}"#,
            400,
            "invalid_request",
            Some("amounts.calls"),
        ),
        case(
            "lease_s on check",
            Method::POST,
            "/v1/check",
            r#"{"subjects": ["user:7"], "lease_s": 5}"#,
            400,
            "invalid_request",
            Some("lease_s"),
        ),
        case(
            "zero lease",
            Method::POST,
            "/v1/reserve",
            r#"{"subjects": ["user:7"], "lease_s": 0}"#,
            422,
            "invalid_value",
            Some("lease_s"),
        ),
        case(
            "lease too long",
            Method::POST,
            "/v1/reserve",
            r#"{"subjects": ["user:7"], "lease_s": 999999}"#,
            422,
            "invalid_value",
            Some("lease_s"),
        ),
        case(
            "unknown reservation",
            Method::POST,
            "/v1/reservations/rsv_00000000_1/commit",
            r#"{"amounts": {}}"#,
            404,
            "not_found",
            Some("reservation_id"),
        ),
        case(
            "garbage reservation id",
            Method::POST,
            "/v1/reservations/xyz/release",
            "",
            404,
            "not_found",
            Some("reservation_id"),
        ),
        case(
            "commit without amounts",
            Method::POST,
            "/v1/reservations/rsv_00000000_1/commit",
            "{}",
            400,
            "invalid_request",
            Some("amounts"),
        ),
        case(
            "intent without to_agent",
            Method::POST,
            "/v1/intents",
            r#"{"intent_type": "x"}"#,
            400,
            "invalid_request",
            Some("to_agent"),
        ),
        case(
            "intent to a non-agent",
            Method::POST,
            "/v1/intents",
            r#"{"intent_type": "x", "to_agent": "user:1"}"#,
            422,
            "invalid_value",
            Some("to_agent"),
        ),
        case(
            "AXME policy with nothing set",
            Method::PUT,
            "/v1/mesh/agents/agent://a/b/c/policies/cost",
            "{}",
            422,
            "invalid_value",
            Some("max_intents_per_hour"),
        ),
        case(
            "AXME negative count",
            Method::PUT,
            "/v1/mesh/agents/agent://a/b/c/policies/cost",
            r#"{"max_intents_per_hour": -3}"#,
            400,
            "invalid_request",
            Some("max_intents_per_hour"),
        ),
        case(
            "AXME unknown path",
            Method::GET,
            "/v1/mesh/agents/agent://a/b/c/policies/speed",
            "",
            404,
            "not_found",
            None,
        ),
        case(
            "key for a wildcard",
            Method::POST,
            "/v1/keys",
            r#"{"subject": "user:*"}"#,
            422,
            "invalid_value",
            Some("subject"),
        ),
        case(
            "unknown key id",
            Method::DELETE,
            "/v1/keys/key_nope",
            "",
            404,
            "not_found",
            Some("id"),
        ),
        // Approvals
        case(
            "unknown approval",
            Method::POST,
            "/v1/approvals/apr_nope/approve",
            "",
            404,
            "not_found",
            Some("id"),
        ),
        case(
            "approve with an unknown field",
            Method::POST,
            "/v1/approvals/apr_nope/approve",
            r#"{"extras": {"requests": 1}}"#,
            400,
            "invalid_request",
            Some("extras"),
        ),
        case(
            "deny with a reason that is not text",
            Method::POST,
            "/v1/approvals/apr_nope/deny",
            r#"{"reason": 5}"#,
            400,
            "invalid_request",
            Some("reason"),
        ),
        case(
            "approvals with a bad status",
            Method::GET,
            "/v1/approvals?status=sometimes",
            "",
            422,
            "invalid_value",
            Some("status"),
        ),
        case(
            "policy with a bad approval_wait",
            Method::PUT,
            P,
            r#"{"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "action_on_breach": "require_approval", "approval_wait": "30 seconds"}"#,
            422,
            "invalid_value",
            Some("approval_wait"),
        ),
        // Routing
        case(
            "unknown route",
            Method::GET,
            "/v1/nothing",
            "",
            404,
            "not_found",
            None,
        ),
        case(
            "wrong method",
            Method::DELETE,
            "/v1/check",
            "",
            405,
            "method_not_allowed",
            None,
        ),
    ];
    let mut extra = vec![
        Case {
            key: Some(""),
            ..case(
                "no key",
                Method::GET,
                "/v1/policies",
                "",
                401,
                "unauthenticated",
                None,
            )
        },
        Case {
            key: Some("sk-sluice-wrong"),
            ..case(
                "wrong key",
                Method::POST,
                "/v1/check",
                r#"{"subjects": ["user:7"]}"#,
                401,
                "unauthenticated",
                None,
            )
        },
        Case {
            headers: vec![("authorization", "Basic dXNlcjpwYXNz")],
            key: Some(""),
            ..case(
                "basic auth",
                Method::GET,
                "/v1/policies",
                "",
                401,
                "unauthenticated",
                Some("Authorization"),
            )
        },
        Case {
            headers: vec![("content-type", "text/xml")],
            ..case(
                "xml",
                Method::POST,
                "/v1/check",
                "<x/>",
                415,
                "unsupported_media_type",
                Some("Content-Type"),
            )
        },
        Case {
            headers: vec![("idempotency-key", "")],
            ..case(
                "empty idempotency key",
                Method::POST,
                "/v1/check",
                r#"{"subjects": ["user:7"]}"#,
                400,
                "invalid_request",
                Some("Idempotency-Key"),
            )
        },
    ];
    cases.append(&mut extra);
    assert!(cases.len() >= 30, "{} cases", cases.len());

    let auth = format!("Bearer {ADMIN}");
    for c in cases {
        let mut headers: Vec<(&str, String)> = Vec::new();
        match c.key {
            None => headers.push(("authorization", auth.clone())),
            Some("") => {}
            Some(k) => headers.push(("authorization", format!("Bearer {k}"))),
        }
        for (k, v) in &c.headers {
            headers.push((k, (*v).to_owned()));
        }
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = s.raw(c.method.clone(), c.path, &hs, c.body.clone()).await;
        assert_eq!(r.status.as_u16(), c.status, "{}: {:?}", c.name, r.body);
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{}",
            c.name
        );
        assert_eq!(r.body["error"]["type"], c.kind, "{}: {:?}", c.name, r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            c.name
        );
        assert_eq!(
            r.body["error"]["field"].as_str(),
            c.field,
            "{}: {:?}",
            c.name,
            r.body
        );
    }

    // Over 1 MiB: refused from the Content-Length, before the body is read
    // (sent by hand: a client still writing the body may see the connection close first).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = s.url.trim_start_matches("http://").to_owned();
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/check HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            (1 << 20) + 1
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("\"payload_too_large\""), "{answer}");
    }

    // Nothing was counted, and the server is healthy.
    let u = s.admin(Method::GET, "/v1/usage/user:7", None).await;
    assert_eq!(u.body["limits"][0]["used"], 0);
    assert_eq!(
        s.raw(Method::GET, "/healthz", &[], None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.admin(
            Method::POST,
            "/v1/check",
            Some(json!({"subjects": ["user:7"]}))
        )
        .await
        .status,
        StatusCode::OK
    );
    s.stop().await;
}
