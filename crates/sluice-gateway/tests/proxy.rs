//! The OpenAI-wire proxy against the fake upstream: exact accounting, refusals
//! that never reach the upstream, every exit path settled.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_test_support::upstream::{FakeUpstream, Script, Usage};
use support::*;

const AGENT: &str = "agent://acme/prod/bot";

async fn setup(budget_usd: f64) -> (Server, FakeUpstream, String, TempDir) {
    setup_with(budget_usd, "upstream_attempts = 1\n").await
}

async fn setup_with(budget_usd: f64, extra: &str) -> (Server, FakeUpstream, String, TempDir) {
    setup_edited(budget_usd, extra, |t| t).await
}

/// The standard setup with its config text edited first.
async fn setup_edited(
    budget_usd: f64,
    extra: &str,
    edit: impl Fn(String) -> String,
) -> (Server, FakeUpstream, String, TempDir) {
    let up = FakeUpstream::start().await;
    let dir = TempDir::new("proxy");
    let toml = edit(config_for(&up, extra));
    let s = Server::start_config(&dir, &toml).await;
    setup_agent(s, up, dir, budget_usd).await
}

/// The standard config, pointed at `up`.
fn config_for(up: &FakeUpstream, extra: &str) -> String {
    format!(
        "{extra}[[providers]]\nname = \"fake\"\nformat = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n\
         [[models]]\nname = \"gpt-test\"\nprovider = \"fake\"\nupstream_name = \"fake-model-1\"\n\
         input_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\ncached_input_usd_per_mtok = 0.5\nmax_output_tokens = 1000\n\
         fallbacks = [\"gpt-backup\"]\n\
         [[models]]\nname = \"gpt-backup\"\nprovider = \"fake\"\n\
         input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 4.0\nmax_output_tokens = 1000\n\
         [[providers]]\nname = \"fake-anthropic\"\nformat = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n\
         [[models]]\nname = \"claude-test\"\nprovider = \"fake-anthropic\"\n\
         input_usd_per_mtok = 3.0\noutput_usd_per_mtok = 15.0\ncached_input_usd_per_mtok = 0.3\nmax_output_tokens = 1000\n",
        up.base_url, up.base_url
    )
}

/// The agent's key and its budget on a started server.
async fn setup_agent(
    s: Server,
    up: FakeUpstream,
    dir: TempDir,
    budget_usd: f64,
) -> (Server, FakeUpstream, String, TempDir) {
    let k = s
        .admin(Method::POST, "/v1/keys", Some(json!({"subject": AGENT})))
        .await;
    let key = k.body["key"].as_str().unwrap().to_owned();
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(json!({"limits": [{"metric": "cost_usd", "limit": budget_usd, "window": "day"}]})),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    (s, up, key, dir)
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hello."}]})
}

async fn usage(s: &Server) -> Value {
    s.admin(Method::GET, &format!("/v1/usage/{AGENT}"), None)
        .await
        .body
}

async fn outstanding(s: &Server) -> u64 {
    let m = s.raw(Method::GET, "/metrics", &[], None).await;
    let text = m.body.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("sluice_reservations_outstanding "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_forwarded_with_the_upstream_key_and_charged_exactly() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_usage(Usage {
        input: 1_000,
        cached: 200,
        output: 300,
    });
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(500)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["choices"][0]["message"]["content"],
        "Hello from the fake"
    );
    assert_eq!(r.header("x-sluice-model"), Some("gpt-test"));
    assert!(r.header("ratelimit").is_some());
    // The provider's request id is passed on; its other headers are not.
    assert!(
        r.header("x-request-id")
            .is_some_and(|id| id.starts_with("req_fake_"))
    );
    let got = &up.received()[0];
    assert_eq!(got.headers["authorization"], "Bearer upstream-secret");
    assert_eq!(got.body["model"], "fake-model-1");
    // 800 × $2 + 200 × $0.5 + 300 × $8 per million = $0.0041.
    let u = usage(&s).await;
    assert_eq!(u["limits"][0]["used"], 0.0041);
    assert_eq!(outstanding(&s).await, 0);
    // The answer's rate-limit headers are the agent's own budget (in
    // micro-dollars) as it stood with this call's worst case held:
    // 2 µ$ an input token, 8 an output token, the day ending in 16 h.
    let input = sluice_gateway::proxy::estimate_input_tokens(
        sluice_gateway::proxy::Endpoint::Chat,
        "fake-model-1",
        &chat(500),
    );
    let worst = input * 2 + 500 * 8;
    let remaining = |r: &Reply| {
        r.header("x-ratelimit-remaining")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(r.header("x-ratelimit-limit"), Some("10000000"));
    assert_eq!(remaining(&r), 10_000_000 - worst);
    assert_eq!(r.header("x-ratelimit-reset"), Some("57600"));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"cost_usd-day\";q=10000000;w=86400")
    );
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"cost_usd-day\";r={};t=57600", 10_000_000 - worst).as_str())
    );
    // The next call's: the first settled at its actual 4,100 µ$, this one's worst case held.
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(500)))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(remaining(&r), 10_000_000 - 4_100 - worst);
    assert_eq!(outstanding(&s).await, 0);
    // The ledger has the tokens too (spend roll-up, after the batch is written).
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_is_refused_without_calling_the_upstream() {
    // One worst case: ~16+ input tokens × $2 + 1000 × $8 per million ≈ $0.008.
    let (s, up, key, _dir) = setup(0.01).await;
    up.set_usage(Usage {
        input: 1_000,
        cached: 0,
        output: 1_000,
    }); // $0.01: the whole budget
    assert_eq!(
        s.call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
            .await
            .status,
        StatusCode::OK
    );
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.body["error"]["type"], "rate_limit_exceeded");
    // The day ends in 16 h: longer than the SDK would wait, so it is told not to retry.
    assert_eq!(r.header("retry-after"), Some("57600"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(up.requests(), 1);
    // A worst case larger than the budget itself: refused as such.
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(20_000)}]})))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["code"], "budget_exceeded");
    assert_eq!(up.requests(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_and_charge_nothing() {
    let (s, up, key, _dir) = setup(10.0).await;
    // One attempt per model here; the primary and its fallback both fail, the last error is passed on.
    up.script([Script::ServerError, Script::ServerError]);
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let busy = Script::TooMany {
        retry_after_s: Some(1),
        retry_after_ms: None,
    };
    up.script([busy.clone(), busy]);
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.requests(), 4);
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.0);
    assert_eq!(outstanding(&s).await, 0);
    // A body cut short after a 200 is charged the held worst case (it may have been served).
    up.script([Script::Disconnect { after_chunks: 0 }]);
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(usage(&s).await["limits"][0]["used"].as_f64().unwrap() > 0.0);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors() {
    let (s, up, key, _dir) = setup(10.0).await;
    let r = s
        .call(
            Method::POST,
            "/v1/chat/completions",
            &key,
            Some(json!({"model": "nope", "messages": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["error"]["code"], "model_not_found");
    let r = s
        .call(
            Method::POST,
            "/v1/chat/completions",
            "sk-wrong",
            Some(chat(1)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
    let r = s
        .raw(
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}"))],
            Some(b"{".to_vec()),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let m = s.call(Method::GET, "/v1/models", &key, None).await;
    let ids: Vec<&str> = m.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["claude-test", "gpt-backup", "gpt-test"]);
    assert_eq!(up.requests(), 0);
    s.stop().await;
}

/// `x-sluice-user` and `x-sluice-session` add their subjects to every
/// check: each one's policy is enforced (refused without an upstream call,
/// naming it) and each is charged the call's exact cost; other users and
/// sessions are untouched; a malformed value is a 400 naming the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_session_headers_are_subjects_limited_and_charged() {
    let (s, up, key, _dir) = setup(10.0).await;
    for (subject, limit) in [
        (
            "user:alice",
            json!({"metric": "requests", "limit": 2, "window": "1h"}),
        ),
        (
            "session:s1",
            json!({"metric": "cost_usd", "limit": 1.0, "window": "day"}),
        ),
        (
            "user:ü用户",
            json!({"metric": "requests", "limit": 1, "window": "1h"}),
        ),
    ] {
        let r = s
            .admin(
                Method::PUT,
                &format!("/v1/policies/{subject}"),
                Some(json!({"limits": [limit]})),
            )
            .await;
        assert!(r.status.is_success(), "{subject}: {:?}", r.body);
    }
    let call = |user: &'static str, session: &'static str| {
        let (s, key) = (s.handle(), key.clone());
        async move {
            let auth = format!("Bearer {key}");
            let mut h = vec![
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            if !user.is_empty() {
                h.push(("x-sluice-user", user));
            }
            if !session.is_empty() {
                h.push(("x-sluice-session", session));
            }
            s.raw(
                Method::POST,
                "/v1/chat/completions",
                &h,
                Some(serde_json::to_vec(&chat(10)).unwrap()),
            )
            .await
        }
    };
    assert_eq!(call("alice", "s1").await.status, StatusCode::OK);
    assert_eq!(call("alice", "").await.status, StatusCode::OK);
    let r = call("alice", "s1").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("user:alice"),
        "{:?}",
        r.body
    );
    assert_eq!(up.requests(), 2, "the refusal was not forwarded");
    // Another user, and the session alone, still pass.
    assert_eq!(call("bob", "s1").await.status, StatusCode::OK);
    // A UTF-8 id is its own subject, with its own policy.
    assert_eq!(call("ü用户", "").await.status, StatusCode::OK);
    assert_eq!(
        call("ü用户", "").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(up.requests(), 4);
    // Each subject was charged exactly its calls: the fake upstream's 12 in,
    // 5 out at 2 and 8 $/Mtok is 64 micro-dollars a call.
    let used = |subject: &'static str| {
        let s = s.handle();
        async move {
            let u = s
                .admin(Method::GET, &format!("/v1/usage/{subject}"), None)
                .await;
            assert!(u.status.is_success(), "{subject}: {:?}", u.body);
            u.body["limits"][0]["used"].as_f64().unwrap()
        }
    };
    assert_eq!(used("user:alice").await, 2.0);
    assert!((used("session:s1").await - 2.0 * 64e-6).abs() < 1e-12);
    assert!((usage(&s).await["limits"][0]["used"].as_f64().unwrap() - 4.0 * 64e-6).abs() < 1e-12);
    // Malformed values: a 400 naming the header, nothing forwarded or held.
    for (user, session) in [("a b", ""), ("", "s\tx"), ("", " ")] {
        let r = call(user, session).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{user:?} {session:?}: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "invalid_subject");
        let header = if user.is_empty() {
            "x-sluice-session"
        } else {
            "x-sluice-user"
        };
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(header),
            "{:?}",
            r.body
        );
    }
    assert_eq!(up.requests(), 4);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

/// Every field that sizes the hold or decides how the answer is read is
/// checked for its type before anything is held: each bad value gets a 400
/// in the wire's shape naming the field (OpenAI's `param` too), the
/// upstream is not called, nothing is charged or left held. (A non-object
/// `stream_options` used to panic the handler after its reservation, which
/// charged the worst case for a call never sent and reset the connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistyped_fields_are_refused_naming_them_before_anything_is_held() {
    let (s, up, key, _dir) = setup(10.0).await;
    let msgs = json!([{"role": "user", "content": "Say hello."}]);
    let openai = [
        ("max_tokens", json!("100")),
        ("max_tokens", json!(-1)),
        ("max_completion_tokens", json!("5000")),
        ("max_completion_tokens", json!(1.5)),
        ("n", json!(2.5)),
        ("best_of", json!("2")),
        ("max_output_tokens", json!(-3)),
        ("stream", json!("true")),
        ("stream", json!(1)),
        ("stream_options", json!("include_usage")),
        ("stream_options", json!([true])),
        ("stream_options.include_usage", json!("yes")),
    ];
    for (path, stream) in [("/v1/chat/completions", true), ("/v1/completions", false)] {
        for (field, value) in &openai {
            let mut body = json!({"model": "gpt-test", "messages": msgs, "prompt": "Say hello."});
            if stream {
                body["stream"] = json!(true);
            }
            match field.split_once('.') {
                Some((outer, inner)) => body[outer] = json!({ inner: value }),
                None => body[*field] = value.clone(),
            }
            let r = s.call(Method::POST, path, &key, Some(body)).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{path} {field}={value}: {:?}",
                r.body
            );
            assert_eq!(r.body["error"]["code"], "invalid_value", "{field}");
            assert_eq!(r.body["error"]["param"], *field, "{field}");
            assert!(
                r.body["error"]["message"].as_str().unwrap().contains(field),
                "{:?}",
                r.body
            );
        }
    }
    for (field, value) in [
        ("max_tokens", json!("1024")),
        ("stream", json!("true")),
        ("stream_options", json!(7)),
    ] {
        let mut body = json!({"model": "claude-test", "max_tokens": 100, "messages": msgs});
        body[field] = value.clone();
        let r = s
            .raw(
                Method::POST,
                "/v1/messages",
                &[("x-api-key", &key), ("content-type", "application/json")],
                Some(serde_json::to_vec(&body).unwrap()),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{field}={value}: {:?}",
            r.body
        );
        assert_eq!(r.body["type"], "error");
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(field));
    }
    // Absent and null are the same; well-typed values pass.
    let mut ok = chat(10);
    ok["n"] = Value::Null;
    ok["stream"] = json!(false);
    ok["stream_options"] = Value::Null;
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(ok))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.requests(), 1);
    assert_eq!(outstanding(&s).await, 0);
    let spent = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    // The fake upstream's default usage (12 in, 5 out) at 2 and 8 $/Mtok: the good call alone.
    let one = (12.0 * 2.0 + 5.0 * 8.0) / 1e6;
    assert!(
        (spent - one).abs() < 1e-9,
        "only the good call is charged: {spent}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_requests_never_overspend_and_all_settle() {
    // Each worst case: (input estimate + 100 output) tokens; the budget fits about 10 of them.
    let worst = {
        let body = chat(100);
        let input = sluice_gateway::proxy::estimate_input_tokens(
            sluice_gateway::proxy::Endpoint::Chat,
            "fake-model-1",
            &body,
        );
        (input * 2 + 100 * 8) as f64 / 1e6
    };
    let (s, up, key2, _dir2) = setup(worst * 10.0).await;
    up.set_usage(Usage {
        input: 30,
        cached: 0,
        output: 100,
    });
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (s, key) = (Arc::clone(&s), key2.clone());
        tasks.push(tokio::spawn(async move {
            s.call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
                .await
                .status
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    let used = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    let limit = usage(&s).await["limits"][0]["limit"].as_f64().unwrap();
    assert!(used <= limit + 1e-9, "spent {used} of {limit}");
    assert!(ok >= 10, "only {ok} served");
    assert_eq!(up.requests(), ok);
    assert_eq!(outstanding(&s).await, 0);
}

/// The `data:` payloads of an SSE body.
fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

async fn stream_call(s: &Server, key: &str, body: Value) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A chat call that must fail with a 502 whose message mentions `why`.
async fn bad_gateway(s: &Server, key: &str, why: &str) {
    let r = s
        .call(Method::POST, "/v1/chat/completions", key, Some(chat(50)))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
}

/// Wait (bounded) until no reservation is outstanding.
async fn settled(s: &Server) {
    for _ in 0..200 {
        if outstanding(s).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("reservations still outstanding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_and_are_charged_the_reported_usage() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_usage(Usage {
        input: 400,
        cached: 0,
        output: 50,
    });
    let mut body = chat(500);
    body["stream"] = json!(true);
    let r = stream_call(&s, &key, body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sluice-model"], "gpt-test");
    let lines = data_lines(&r.text().await.unwrap());
    assert_eq!(lines.last().unwrap(), "[DONE]");
    // The client did not ask for usage: the extra chunk Sluice asked for is dropped.
    assert!(lines.iter().all(|l| !l.contains("\"usage\"")), "{lines:?}");
    assert_eq!(
        up.received()[0].body["stream_options"]["include_usage"],
        true
    );
    settled(&s).await;
    // 400 × $2 + 50 × $8 per million = $0.0012.
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.0012);
    // Asked for: passed through, charged again.
    body["stream_options"] = json!({"include_usage": true});
    let lines = data_lines(&stream_call(&s, &key, body).await.text().await.unwrap());
    assert!(lines.iter().any(|l| l.contains("\"usage\"")));
    settled(&s).await;
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.0024);
    s.stop().await;
}

/// Events are passed on as they arrive: with the upstream paused after two
/// events, the client already has both. Upstream connections are kept alive
/// across calls, streamed or not; one whose answer was abandoned half-read
/// is closed, and the next call opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_flow_as_they_arrive_on_kept_alive_upstream_connections() {
    let (s, up, key, _dir) = setup(10.0).await;
    let mut streamed = chat(50);
    streamed["stream"] = json!(true);
    for _ in 0..2 {
        let r = s
            .call(Method::POST, "/v1/chat/completions", &key, Some(chat(50)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let r = stream_call(&s, &key, streamed.clone()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            data_lines(&r.text().await.unwrap()).last().unwrap(),
            "[DONE]"
        );
    }
    assert_eq!(up.connections(), 1, "one kept-alive upstream connection");

    up.script([Script::Pause { after_events: 2 }]);
    let mut r = stream_call(&s, &key, streamed.clone()).await;
    let mut seen = String::new();
    while seen.matches("\n\n").count() < 2 {
        // Bounded, so a proxy that held events back fails instead of hanging.
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), r.chunk())
            .await
            .expect("the events sent before the pause never reached the client")
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    up.resume();
    while let Some(chunk) = r.chunk().await.unwrap() {
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let lines = data_lines(&seen);
    assert_eq!(lines.len(), 6, "{lines:?}"); // 4 content chunks, the stop chunk, [DONE]
    assert_eq!(lines.last().unwrap(), "[DONE]");
    assert_eq!(up.connections(), 1);

    // Abandoned half-read: its connection is not reused.
    up.script([Script::Pause { after_events: 1 }]);
    let mut r = stream_call(&s, &key, streamed).await;
    assert!(!r.chunk().await.unwrap().unwrap().is_empty());
    drop(r);
    settled(&s).await;
    up.resume();
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(50)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.connections(), 2);
    assert_eq!(outstanding(&s).await, 0);
    // /metrics agrees: two opened, the live one parked.
    let m = s.raw(Method::GET, "/metrics", &[], None).await;
    let text = m.body.as_str().unwrap();
    assert!(
        text.contains("\nsluice_upstream_connections_opened_total 2\n"),
        "{text}"
    );
    assert!(
        text.contains("\nsluice_upstream_connections_idle 1\n"),
        "{text}"
    );
    // Busy polling is off unless configured.
    assert!(text.contains("\nsluice_busy_poll_spinning 0\n"), "{text}");
    s.stop().await;
}

/// `busy_poll_ms`: while requests come, one spinner per worker thread keeps
/// the workers polling; calls, streamed or not, work and are charged as usual.
/// (When the spinners park is the unit test's in src/busy_poll.rs, on paused time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_keeps_both_workers_polling_and_calls_work() {
    let (s, up, key, _dir) =
        setup_with(10.0, "upstream_attempts = 1\nbusy_poll_ms = 60000\n").await;
    up.set_usage(Usage {
        input: 1_000,
        cached: 0,
        output: 250,
    });
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(500)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = stream_call(
        &s,
        &key,
        json!({"model": "gpt-test", "max_tokens": 500, "stream": true,
        "messages": [{"role": "user", "content": "Say hello."}]}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Two calls of 1,000 × $2 + 250 × $8 per million: $0.008.
    settled(&s).await;
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.008);
    let m = s.raw(Method::GET, "/metrics", &[], None).await;
    let text = m.body.as_str().unwrap();
    assert!(text.contains("\nsluice_busy_poll_spinning 2\n"), "{text}");
    s.stop().await;
}

/// Health checks and metrics scrapes do not start busy polling; any other
/// request does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_do_not_start_busy_polling() {
    let dir = TempDir::new("busy");
    let s = Server::start_config(&dir, "busy_poll_ms = 60000\n").await;
    let spinning = |s: &Server| {
        let s = s.handle();
        async move {
            let m = s.raw(Method::GET, "/metrics", &[], None).await;
            let text = m.body.as_str().unwrap().to_owned();
            let line = text
                .lines()
                .find(|l| l.starts_with("sluice_busy_poll_spinning "))
                .unwrap()
                .to_owned();
            line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        }
    };
    for _ in 0..5 {
        let r = s.raw(Method::GET, "/healthz", &[], None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(spinning(&s).await, 0);
    }
    let r = s.admin(Method::GET, "/v1/policies", None).await;
    assert_eq!(r.status, StatusCode::OK);
    // The spinners were woken; wait (bounded) for both to be scheduled.
    let mut seen = 0;
    for _ in 0..200 {
        seen = spinning(&s).await;
        if seen == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(seen, 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_abandoned_stream_is_charged_what_was_streamed() {
    let (s, up, key, _dir) = setup(10.0).await;
    let mut body = chat(500);
    body["stream"] = json!(true);
    let input = sluice_gateway::proxy::estimate_input_tokens(
        sluice_gateway::proxy::Endpoint::Chat,
        "fake-model-1",
        &body,
    );
    // The upstream breaks after two chunks ("Hello", " from": 10 bytes -> 4 tokens).
    up.script([Script::Disconnect { after_chunks: 2 }]);
    let mut r = stream_call(&s, &key, body.clone()).await;
    let broke = loop {
        match r.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(broke, "the client should see the stream break");
    settled(&s).await;
    let expected = (input * 2 + 4 * 8) as f64 / 1e6;
    let used = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    assert!(
        (used - expected).abs() < 1e-9,
        "charged {used}, expected {expected}"
    );

    // The client goes away after the first chunk of a slow stream.
    up.set_chunk_delay(std::time::Duration::from_millis(200));
    let mut r = stream_call(&s, &key, body).await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(r);
    settled(&s).await;
    let after = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    assert!(after > used, "the abandoned stream was charged something");
    assert!(
        after - used <= (input * 2 + 500 * 8) as f64 / 1e6 + 1e-9,
        "never more than the hold"
    );
    s.stop().await;
}

/// `upstream_timeout_s` bounds an attempt from its send to the last byte of
/// its body: an upstream too slow to answer is a 502 after the fallbacks, and
/// each model tried is charged its worst case (the provider may still serve
/// and bill a call it received; it is not retried); a stream too slow to
/// finish is cut, and charged what it streamed. Nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_timeout_covers_the_answer_and_the_stream() {
    let (s, up, key, _dir) =
        setup_with(10.0, "upstream_attempts = 1\nupstream_timeout_s = 0.5\n").await;
    // Four chunks 200 ms apart: the non-streaming answer would take 800 ms.
    up.set_chunk_delay(std::time::Duration::from_millis(200));
    bad_gateway(&s, &key, "upstream").await;
    assert_eq!(up.requests(), 2, "the model, then its fallback, each once");
    settled(&s).await;
    let estimate = |model| {
        sluice_gateway::proxy::estimate_input_tokens(
            sluice_gateway::proxy::Endpoint::Chat,
            model,
            &chat(50),
        )
    };
    let holds =
        (estimate("fake-model-1") * 2 + 50 * 8 + estimate("gpt-backup") + 50 * 4) as f64 / 1e6;
    let used = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    assert!((used - holds).abs() < 1e-9, "charged {used}, holds {holds}");

    let mut body = chat(50);
    body["stream"] = json!(true);
    let mut r = stream_call(&s, &key, body).await;
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    let broke = loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(broke, "the stream should be cut at the deadline");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("Hello"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    settled(&s).await;
    let streamed = usage(&s).await["limits"][0]["used"].as_f64().unwrap() - used;
    assert!(streamed > 0.0, "what was streamed is charged");
    assert!(
        streamed <= (estimate("fake-model-1") * 2 + 50 * 8) as f64 / 1e6 + 1e-9,
        "never more than the hold: {streamed}"
    );
    s.stop().await;
}

/// An upstream nobody listens on: each model is tried `upstream_attempts`
/// times, the answer is a 502, and nothing is charged (nothing was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_charges_nothing() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let (s, up, key, _dir) = setup_edited(
        10.0,
        "upstream_attempts = 2\nupstream_backoff_ms = 1\n",
        |t| {
            let start = t.find("base_url = \"").unwrap() + "base_url = \"".len();
            let end = start + t[start..].find('"').unwrap();
            format!("{}{dead}{}", &t[..start], &t[end..])
        },
    )
    .await;
    bad_gateway(&s, &key, "unreachable").await;
    assert_eq!(up.requests(), 0);
    settled(&s).await;
    assert_eq!(usage(&s).await["limits"][0]["used"].as_f64().unwrap(), 0.0);
    s.stop().await;
}

/// An `https://` provider: with its private CA in `tls_ca_file`, calls and
/// streams go through TLS and are charged exactly; without it, the
/// certificate is refused (a 502, nothing charged, nothing sent). Needs
/// `openssl` to make the CA; skipped with a notice without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_the_roots_and_tls_ca_file() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("NOTICE: openssl not found; skipping the https upstream test");
        return;
    }
    let certs = TempDir::new("upstream-tls");
    sluice_test_support::tls::certificates(&certs.0);
    let read = |f: &str| std::fs::read(certs.0.join(f)).unwrap();
    let ca = certs.0.join("ca.crt");
    for trusted in [true, false] {
        let up = FakeUpstream::start_tls(&read("server.crt"), &read("server.key")).await;
        assert!(up.base_url.starts_with("https://"));
        let dir = TempDir::new("proxy-tls");
        let mut toml = config_for(&up, "upstream_attempts = 1\n");
        if trusted {
            toml = toml.replace(
                "api_key_env = \"FAKE_UPSTREAM_KEY\"\n",
                &format!(
                    "api_key_env = \"FAKE_UPSTREAM_KEY\"\ntls_ca_file = \"{}\"\n",
                    ca.display()
                ),
            );
        }
        let s = Server::start_config(&dir, &toml).await;
        let (s, up, key, _dir) = setup_agent(s, up, dir, 10.0).await;
        if !trusted {
            bad_gateway(&s, &key, "certificate").await;
            assert_eq!(up.requests(), 0);
            settled(&s).await;
            assert_eq!(usage(&s).await["limits"][0]["used"].as_f64().unwrap(), 0.0);
            s.stop().await;
            continue;
        }
        let r = s
            .call(Method::POST, "/v1/chat/completions", &key, Some(chat(500)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(
            r.body["choices"][0]["message"]["content"],
            "Hello from the fake"
        );
        assert_eq!(
            up.received()[0].headers["authorization"],
            "Bearer upstream-secret"
        );
        // 12 in × $2 + 5 out × $8 per million.
        assert_eq!(usage(&s).await["limits"][0]["used"], 0.000064);
        let mut body = chat(500);
        body["stream"] = json!(true);
        let text = stream_call(&s, &key, body).await.text().await.unwrap();
        assert!(text.contains("[DONE]"), "{text}");
        settled(&s).await;
        assert_eq!(usage(&s).await["limits"][0]["used"], 0.000128);
        // Both calls on one TLS connection (one handshake).
        assert_eq!(up.connections(), 1);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pushback_is_retried_and_then_fails_over() {
    let (s, up, key, _dir) =
        setup_with(10.0, "upstream_attempts = 3\nupstream_backoff_ms = 5\n").await;
    // A 429 (retry-after-ms honoured) and a 500, then success: the client sees only the success.
    up.script([
        Script::TooMany {
            retry_after_s: None,
            retry_after_ms: Some(20),
        },
        Script::ServerError,
    ]);
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-sluice-model"), Some("gpt-test"));
    assert_eq!(up.requests(), 3);
    // Charged once: 12 × $2 + 5 × $8 per million.
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.000064);

    // The primary keeps answering 429: after its three attempts the fallback serves.
    let busy = Script::TooMany {
        retry_after_s: None,
        retry_after_ms: Some(1),
    };
    up.script([busy.clone(), busy.clone(), busy]);
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-sluice-model"), Some("gpt-backup"));
    assert_eq!(up.requests(), 7);
    assert_eq!(up.received()[6].body["model"], "gpt-backup");
    assert_eq!(outstanding(&s).await, 0);
    // The ledger names the model that served: spend on model:gpt-backup, none more on model:gpt-test.
    let mut spend = Value::Null;
    for _ in 0..200 {
        spend = s
            .admin(Method::GET, "/v1/usage/model:gpt-backup", None)
            .await
            .body["spend"]["total"]
            .clone();
        if spend["requests"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(spend["requests"], 1, "{spend}");
    assert_eq!(spend["cost_usd"], 0.000032); // 12 × $1 + 5 × $4 per million
    let primary = s
        .admin(Method::GET, "/v1/usage/model:gpt-test", None)
        .await
        .body["spend"]["total"]
        .clone();
    assert_eq!(primary["requests"], 1);

    // Everything keeps failing: the last upstream error is passed on, nothing is charged.
    let before = usage(&s).await["limits"][0]["used"].clone();
    up.script(std::iter::repeat_n(Script::ServerError, 6));
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(usage(&s).await["limits"][0]["used"], before);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

fn claude(max_tokens: u64) -> Value {
    json!({"model": "claude-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hello."}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_wire_is_charged_from_usage_and_from_stream_events() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_usage(Usage {
        input: 30,
        cached: 10,
        output: 9,
    });
    // The Anthropic SDK sends its key as x-api-key.
    let auth = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
    ];
    let r = s
        .raw(
            Method::POST,
            "/v1/messages",
            &auth,
            Some(claude(100).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["content"][0]["text"], "Hello from the fake");
    assert_eq!(r.header("x-sluice-model"), Some("claude-test"));
    let got = &up.received()[0];
    assert_eq!(got.wire, "anthropic");
    assert_eq!(got.headers["x-api-key"], "upstream-secret");
    assert_eq!(got.headers["anthropic-version"], "2023-06-01");
    // 20 uncached × $3 + 10 cache reads × $0.3 + 9 × $15 per million = 198 µ$.
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.000198);

    let mut body = claude(100);
    body["stream"] = json!(true);
    let r = s
        .http
        .post(format!("{}/v1/messages", s.url))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // Anthropic's request id, on a stream too.
    assert!(
        r.headers()["request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_fake_")
    );
    let text = r.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    settled(&s).await;
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.000396);

    // Cache writes at their own prices: of 1,000 input tokens, 100 read ($0.3),
    // 200 written for 5 minutes ($3.75), 300 for an hour ($6), 400 uncached ($3);
    // 10 out ($15): 30 + 750 + 1,800 + 1,200 + 150 = 3,930 µ$, streamed or not.
    up.set_usage(Usage {
        input: 1_000,
        cached: 100,
        output: 10,
    });
    up.set_cache_writes(200, 300);
    let r = s
        .raw(
            Method::POST,
            "/v1/messages",
            &auth,
            Some(claude(100).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.004326);
    let r = s
        .http
        .post(format!("{}/v1/messages", s.url))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("event: message_stop"));
    settled(&s).await;
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.008256);
    up.set_cache_writes(0, 0);

    // Refusals are Anthropic-shaped.
    s.admin(
        Method::PUT,
        &format!("/v1/policies/{AGENT}"),
        Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}]})),
    )
    .await;
    let r = s
        .raw(
            Method::POST,
            "/v1/messages",
            &auth,
            Some(claude(100).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = s
        .raw(
            Method::POST,
            "/v1/messages",
            &auth,
            Some(claude(100).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.body["type"], "error");
    assert_eq!(r.body["error"]["type"], "rate_limit_error");
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.requests(), 5);
    // A model on the other wire is refused with a pointer to the right route.
    let r = s
        .raw(
            Method::POST,
            "/v1/messages",
            &auth,
            Some(chat(10).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_answer_is_settled_at_once_at_the_hold() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_chunk_delay(std::time::Duration::from_millis(250)); // a 1 s answer
    let body = chat(100);
    let held = (sluice_gateway::proxy::estimate_input_tokens(
        sluice_gateway::proxy::Endpoint::Chat,
        "fake-model-1",
        &body,
    ) * 2
        + 100 * 8) as f64
        / 1e6;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(std::time::Duration::from_millis(100))
        .send()
        .await;
    assert!(r.is_err(), "the client should give up first");
    settled(&s).await;
    let used = usage(&s).await["limits"][0]["used"].as_f64().unwrap();
    assert!((used - held).abs() < 1e-9, "charged {used}, held {held}");
    s.stop().await;
}

/// Wait until the ledger has rolled the agent's spend up to `requests` calls.
async fn spend_settles(s: &Server, requests: u64) -> Value {
    let mut spend = Value::Null;
    for _ in 0..300 {
        spend = usage(s).await["spend"]["total"].clone();
        if spend["requests"] == requests {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    spend
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_embeddings_and_responses_are_forwarded_and_charged_exactly() {
    let (s, up, key, dir) = setup(10.0).await;
    up.set_usage(Usage {
        input: 40,
        cached: 8,
        output: 6,
    });
    // 32 × $2 + 8 × $0.5 + 6 × $8 per million = $0.000116 a call; embeddings
    // report neither cached input nor output: 40 × $2 = $0.000080.
    let calls = [
        (
            "/v1/completions",
            json!({"model": "gpt-test", "prompt": "Say hello.", "max_tokens": 50}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "gpt-test", "input": ["one", "two"]}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-test", "input": "Say hello.", "max_output_tokens": 50}),
        ),
    ];
    for (path, body) in &calls {
        let r = s.call(Method::POST, path, &key, Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        assert_eq!(r.header("x-sluice-model"), Some("gpt-test"));
        assert_eq!(up.received().last().unwrap().path, *path);
        assert_eq!(up.received().last().unwrap().body["model"], "fake-model-1");
    }
    let answers = up.received();
    assert_eq!(answers.len(), 3);
    // Streaming completions and responses: events pass through; usage read on the way.
    let r = stream_call_to(
        &s,
        &key,
        "/v1/completions",
        json!({"model": "gpt-test", "prompt": "Say hello.", "max_tokens": 50, "stream": true}),
    )
    .await;
    let text = r.text().await.unwrap();
    let events = data_lines(&text);
    assert!(
        events.iter().any(|e| e.contains("\"text\":\" fake\"")),
        "{text}"
    );
    // Sluice asked for usage; the client did not, so that chunk is not passed on.
    assert!(!text.contains("\"usage\""), "{text}");
    assert_eq!(
        up.received()[3].body["stream_options"]["include_usage"],
        true
    );
    let r = stream_call_to(&s, &key, "/v1/responses",
        json!({"model": "gpt-test", "input": "Say hello.", "max_output_tokens": 50, "stream": true})).await;
    let text = r.text().await.unwrap();
    assert!(
        text.contains("response.output_text.delta") && text.contains("response.completed"),
        "{text}"
    );
    let spend = spend_settles(&s, 5).await;
    assert_eq!(spend["requests"], 5, "{spend}");
    assert_eq!(spend["input_tokens"], 200);
    assert_eq!(spend["output_tokens"], 24);
    assert_eq!(spend["cost_usd"], 0.000544, "{spend}"); // 4 × 116 + 80 µ$
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
    // Each commit names the provider's request id.
    let db = sluice_gateway::db::Db::open(&dir.0, sluice_gateway::LedgerSync::Batch)
        .await
        .unwrap();
    let commits: Vec<_> = db
        .ledger_since(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == sluice_gateway::db::RowKind::Commit)
        .collect();
    assert_eq!(commits.len(), 5);
    assert!(
        commits.iter().all(|r| r
            .request_id
            .as_deref()
            .is_some_and(|id| id.starts_with("req_fake_"))),
        "{commits:?}"
    );
    assert!(commits.iter().any(|r| {
        r.detail
            .as_deref()
            .is_some_and(|d| d.contains("\"endpoint\":\"embeddings\""))
    }));
}

async fn stream_call_to(s: &Server, key: &str, path: &str, body: Value) -> reqwest::Response {
    let r = s
        .http
        .post(format!("{}{path}", s.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_is_forwarded_and_not_charged() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_usage(Usage {
        input: 77,
        cached: 0,
        output: 0,
    });
    let r = s
        .call(
            Method::POST,
            "/v1/messages/count_tokens",
            &key,
            Some(json!({"model": "claude-test", "messages": [{"role": "user", "content": "Hi"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["input_tokens"], 77);
    let got = up.received();
    assert_eq!(got[0].path, "/v1/messages/count_tokens");
    assert_eq!(got[0].headers["x-api-key"], "upstream-secret");
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.0);
    // A key is still required, and the model must be configured on the Anthropic wire.
    let r = s
        .call(
            Method::POST,
            "/v1/messages/count_tokens",
            "nope",
            Some(json!({"model": "claude-test", "messages": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["type"], "error");
    let r = s
        .call(
            Method::POST,
            "/v1/messages/count_tokens",
            &key,
            Some(json!({"model": "gpt-test", "messages": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(up.requests(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_quotas_keep_sluice_under_the_providers_limits() {
    // gpt-test: 2 requests a minute at the provider (then its fallback serves);
    // claude-test: 1 request a minute and no fallback (then a 429 for the agent).
    let (s, up, key, _dir) = setup_edited(10.0, "", |t| {
        t.replace(
            "fallbacks = [\"gpt-backup\"]\n",
            "fallbacks = [\"gpt-backup\"]\nrpm = 2\ntpm = 100000\n",
        )
        .replace(
            "cached_input_usd_per_mtok = 0.3\nmax_output_tokens = 1000\n",
            "cached_input_usd_per_mtok = 0.3\nmax_output_tokens = 1000\nrpm = 1\n",
        )
    })
    .await;
    for expected in ["gpt-test", "gpt-test", "gpt-backup"] {
        let r = s
            .call(Method::POST, "/v1/chat/completions", &key, Some(chat(100)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.header("x-sluice-model"), Some(expected));
    }
    let served: Vec<Value> = up
        .received()
        .iter()
        .map(|r| r.body["model"].clone())
        .collect();
    assert_eq!(
        served,
        vec![
            json!("fake-model-1"),
            json!("fake-model-1"),
            json!("gpt-backup")
        ]
    );
    let q = s
        .admin(Method::GET, "/v1/usage/provider:fake/fake-model-1", None)
        .await;
    assert_eq!(q.status, StatusCode::OK, "{:?}", q.body);
    let requests = q.body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == "requests")
        .unwrap()
        .clone();
    assert_eq!(
        (requests["limit"].clone(), requests["used"].clone()),
        (json!(2), json!(2))
    );

    let r = s
        .call(Method::POST, "/v1/messages", &key, Some(claude(100)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = s
        .call(Method::POST, "/v1/messages", &key, Some(claude(100)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["type"], "rate_limit_error");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("provider quota provider:fake-anthropic/claude-test"),
        "{message}"
    );
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(
        up.requests(),
        4,
        "the refused call never reached the provider"
    );
    // After the wait the provider's minute has room again.
    s.advance(std::time::Duration::from_secs(wait));
    let r = s
        .call(Method::POST, "/v1/messages", &key, Some(claude(100)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // The quotas belong to sluice.toml, not to the admin API.
    let r = s
        .admin(
            Method::PUT,
            "/v1/policies/provider:fake/fake-model-1",
            Some(json!({"limits": [{"metric": "requests", "limit": 1000, "window": "1m"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(r.body["error"]["field"], "subject");
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_reset_headers_are_honoured() {
    let (s, up, key, _dir) = setup_with(
        10.0,
        "upstream_attempts = 2\nupstream_backoff_ms = 1\nupstream_timeout_s = 30\n",
    )
    .await;
    let at = |secs_after_t0: f64| {
        let ns = T0 as i128 + (secs_after_t0 * 1e9) as i128;
        jiff::Timestamp::from_nanosecond(ns).unwrap().to_string()
    };
    // The provider's limit resets in an hour: past the deadline, so Sluice does not retry.
    up.script([Script::TooManyWith(vec![
        ("anthropic-ratelimit-requests-remaining".into(), "0".into()),
        ("anthropic-ratelimit-requests-reset".into(), at(3600.0)),
        ("anthropic-ratelimit-tokens-reset".into(), at(0.01)),
    ])]);
    let r = s
        .call(Method::POST, "/v1/messages", &key, Some(claude(100)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        up.requests(),
        1,
        "an hour's wait is past the deadline: not retried"
    );
    // It resets in 50 ms: Sluice waits, retries, and the client sees success.
    up.script([Script::TooManyWith(vec![
        ("anthropic-ratelimit-tokens-remaining".into(), "0".into()),
        ("anthropic-ratelimit-tokens-reset".into(), at(0.05)),
    ])]);
    let r = s
        .call(Method::POST, "/v1/messages", &key, Some(claude(100)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.requests(), 3);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

/// A proxied answer to a mutated `body`: not a 5xx, and an error in the
/// wire's own shape (Anthropic's `type: error`, OpenAI's `error.code`).
fn no_5xx_and_wire_shaped(path: &str, body: &Value, r: &Reply) {
    assert!(
        r.status.as_u16() < 500,
        "{path}: {} {:?} for {body}",
        r.status,
        r.body
    );
    if !r.status.is_success() {
        let shaped = if path.contains("messages") {
            r.body["type"] == "error"
        } else {
            r.body["error"]["code"].is_string()
        };
        assert!(shaped, "{path}: {:?} for {body}", r.body);
        assert!(
            r.body["error"]["message"].is_string(),
            "{path}: {:?}",
            r.body
        );
    }
}

/// The six proxy routes with mutated bodies (480 random mutations, then
/// every member of each template replaced by each odd value, streamed and
/// not): never a 5xx, errors in the wire's shape, nothing left held. The
/// one-field sweep found a panic the random rounds had missed: a
/// non-object `stream_options` on a stream reached a `serde_json` index
/// assignment after the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_proxy_requests_never_get_a_5xx_or_leak_a_reservation() {
    let (s, _up, key, _dir) = setup(1000.0).await;
    let templates: Vec<(&str, Value)> = vec![
        (
            "/v1/chat/completions",
            json!({"model": "gpt-test", "max_tokens": 10, "n": 1, "stream": false,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-test", "prompt": ["a", [1, 2]], "max_tokens": 5, "best_of": 1, "stream": false}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "gpt-test", "input": ["a", "b"], "encoding_format": "float"}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-test", "instructions": "x", "max_output_tokens": 5, "stream": false,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "input_file", "file_data": "AAAA"}]}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-test", "max_tokens": 10, "stream": false,
            "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                {"type": "document", "source": {"type": "url", "url": "https://x"}}]}],
            "tools": [{"name": "t", "input_schema": {}}]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    let mut rng = Rng(0x00DD_BA11_5EED);
    let mut sent = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..80 {
        for (path, template) in &templates {
            // Every other round streamed; the model kept three times in four,
            // so most mutations get past the model lookup to the hold, the
            // forwarding and the settling.
            let mut template = template.clone();
            if round % 2 == 1 && template.get("stream").is_some() {
                template["stream"] = json!(true);
            }
            let mut body = mutate(&template, &mut rng, 0);
            if rng.below(4) != 0 && body.is_object() {
                body["model"] = template["model"].clone();
            }
            let mut bytes = serde_json::to_vec(&body).unwrap();
            if rng.below(10) == 0 {
                bytes.truncate(bytes.len() / 2);
            }
            let r = s.post_json_bytes(path, &key, bytes).await;
            sent += 1;
            no_5xx_and_wire_shaped(path, &body, &r);
            *statuses.entry(r.status.as_u16()).or_insert(0u32) += 1;
        }
    }
    assert_eq!(sent, 480);
    // Then every member of every template, streamed and not, replaced by
    // each odd value in turn, the rest left valid: the type confusions of
    // one field, each tried (random mutations rarely hit one alone).
    for (path, template) in &templates {
        for stream in [false, true] {
            let mut template = template.clone();
            if stream {
                if template.get("stream").is_none() {
                    continue;
                }
                template["stream"] = json!(true);
            }
            for pointer in pointers(&template) {
                for odd in wild_values() {
                    let mut body = template.clone();
                    *body.pointer_mut(&pointer).unwrap() = odd;
                    let r = s
                        .post_json_bytes(path, &key, serde_json::to_vec(&body).unwrap())
                        .await;
                    sent += 1;
                    no_5xx_and_wire_shaped(path, &body, &r);
                    *statuses.entry(r.status.as_u16()).or_insert(0u32) += 1;
                }
            }
        }
    }
    assert!(sent > 2000, "{sent}");
    println!("statuses: {statuses:?}");
    // Both sides of the proxy were exercised: served calls and refused ones.
    assert!(statuses.get(&200).is_some_and(|n| *n >= 60), "{statuses:?}");
    assert!(statuses.keys().any(|s| *s >= 400), "{statuses:?}");
    settled(&s).await;
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

/// The kill switch through the proxy: a stream that started before the kill
/// runs to its end and is charged; after the kill both wires answer 403 in
/// their own error shape and the upstream is not called; after the resume
/// calls pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_refused_on_both_wires_and_its_open_stream_finishes() {
    let (s, up, key, _dir) = setup(10.0).await;
    up.set_chunk_delay(std::time::Duration::from_millis(30));
    let mut body = chat(100);
    body["stream"] = json!(true);
    let stream = stream_call(&s, &key, body).await;
    assert_eq!(stream.status(), StatusCode::OK);
    let killed = s
        .admin(
            Method::POST,
            &format!("/v1/mesh/agents/{AGENT}/kill"),
            Some(json!({"reason": "runaway"})),
        )
        .await;
    assert_eq!(killed.status, StatusCode::OK, "{:?}", killed.body);
    // The open stream is not cut: it runs to [DONE].
    let text = stream.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    settled(&s).await;
    let before = up.requests();
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(10)))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "agent_killed");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("runaway")
    );
    let r = s
        .call(
            Method::POST,
            "/v1/messages",
            &key,
            Some(json!({"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(r.body["type"], "error");
    assert_eq!(r.body["error"]["type"], "permission_error");
    assert_eq!(
        up.requests(),
        before,
        "nothing forwarded for a killed agent"
    );
    s.admin(
        Method::POST,
        &format!("/v1/mesh/agents/{AGENT}/resume"),
        None,
    )
    .await;
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(10)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.requests(), before + 1);
    s.stop().await;
}

/// `action_on_breach: "alert"` through the proxy: a call past the agent's
/// budget is forwarded (not refused) and charged exactly; the usage shows
/// the overshoot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_action_forwards_past_the_budget_and_charges_it() {
    let (s, up, key, _dir) = setup(0.01).await;
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(json!({"limits": [{"metric": "cost_usd", "limit": 0.01, "window": "day"}], "action_on_breach": "alert"})),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    up.set_usage(Usage {
        input: 1_000,
        cached: 0,
        output: 1_000,
    }); // $0.01 a call: the whole budget
    for _ in 0..3 {
        let r = s
            .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(up.requests(), 3, "every call forwarded");
    settled(&s).await;
    let u = usage(&s).await;
    assert_eq!(u["limits"][0]["used"], 0.03, "charged past the budget: {u}");
    s.stop().await;
}

/// `degrade` rules: from half the budget the fake upstream receives the
/// cheaper model, from 80% also the capped `max_tokens`; the cost charged is
/// the cheaper model's; responses say what changed; at 100% the fallback
/// action (block) refuses without calling the upstream. Bad rules are 422s
/// naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_rules_swap_the_model_and_cap_max_tokens_as_the_budget_fills() {
    let (s, up, key, _dir) = setup(0.10).await;
    let policy = json!({
        "limits": [{"metric": "cost_usd", "limit": 0.10, "window": "day"}],
        "action_on_breach": "degrade",
        "degrade": [{"at": 0.5, "model": "gpt-backup"}, {"at": 0.8, "max_tokens": 50}],
    });
    let r = s
        .admin(
            Method::PUT,
            &format!("/v1/policies/{AGENT}"),
            Some(policy.clone()),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    assert_eq!(r.body["fallback_action"], "block");
    assert_eq!(r.body["degrade"][1]["max_tokens"], 50);
    // $0.01 a call on gpt-test (1000 × $2 + 1000 × $8 per million), $0.005 on gpt-backup.
    up.set_usage(Usage {
        input: 1_000,
        cached: 0,
        output: 1_000,
    });
    let mut seen = Vec::new();
    let mut s = s;
    for i in 1..=15 {
        if i == 9 {
            // Degrade rules hold across a restart (relearnt from the stored policy).
            let clock = s.stop().await;
            s = Server::start_with(&_dir, &config_for(&up, "upstream_attempts = 1\n"), clock).await;
        }
        let r = s
            .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "call {i}: {:?}", r.body);
        let got = up.received().last().unwrap().body.clone();
        seen.push((
            r.header("x-sluice-degraded").map(str::to_owned),
            r.header("x-sluice-model").unwrap().to_owned(),
            got["model"].as_str().unwrap().to_owned(),
            got["max_tokens"].as_u64().unwrap(),
        ));
    }
    for (i, (degraded, served, upstream_model, max_tokens)) in seen.iter().enumerate() {
        let call = i + 1;
        let (want_degraded, want_served, want_upstream, want_max) = match call {
            1..=5 => (None, "gpt-test", "fake-model-1", 1000),
            6..=11 => (Some("model=gpt-backup"), "gpt-backup", "gpt-backup", 1000),
            _ => (
                Some("model=gpt-backup, max_tokens=50"),
                "gpt-backup",
                "gpt-backup",
                50,
            ),
        };
        assert_eq!(degraded.as_deref(), want_degraded, "call {call}");
        assert_eq!(served, want_served, "call {call}");
        assert_eq!(upstream_model, want_upstream, "call {call}");
        assert_eq!(*max_tokens, want_max, "call {call}");
    }
    // 5 × $0.01 + 10 × $0.005: the cheaper model's prices were charged.
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.1);
    let backup = s
        .admin(Method::GET, "/v1/usage/model:gpt-backup", None)
        .await;
    assert_eq!(backup.status, StatusCode::OK, "{:?}", backup.body);
    // At 100% the fallback action applies: refused, upstream not called.
    let before = up.requests();
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(up.requests(), before);
    assert_eq!(outstanding(&s).await, 0);
    // The decision API knows no model to swap: at 100% it gets the fallback (block).
    let r = s
        .call(
            Method::POST,
            "/v1/reserve",
            &key,
            Some(json!({"subjects": [AGENT], "amounts": {"cost_usd": 0.001}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);

    for (bad, field) in [
        (json!([{"at": 1.0, "model": "gpt-backup"}]), "degrade[0].at"),
        (json!([{"at": 0.0, "model": "gpt-backup"}]), "degrade[0].at"),
        (json!([{"at": 0.5}]), "degrade[0]"),
        (
            json!([{"at": 0.5, "max_tokens": 0}]),
            "degrade[0].max_tokens",
        ),
        (
            json!([{"at": 0.5, "model": "no-such-model"}]),
            "degrade[0].model",
        ),
        (json!([]), "degrade"),
    ] {
        let mut p = policy.clone();
        p["degrade"] = bad;
        let r = s
            .admin(Method::PUT, &format!("/v1/policies/{AGENT}"), Some(p))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["field"], field, "{:?}", r.body);
    }
    let mut p = policy.clone();
    p["fallback_action"] = json!("degrade");
    let r = s
        .admin(Method::PUT, &format!("/v1/policies/{AGENT}"), Some(p))
        .await;
    assert_eq!(r.body["error"]["field"], "fallback_action", "{:?}", r.body);
    s.stop().await;
}

/// `require_approval` through the proxy: a call past the budget is held
/// (the upstream not called) until an admin approves from another client,
/// then forwarded and charged; a timeout is a 429 naming the approval
/// (header and message); after a denial calls are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_approval_holds_a_proxied_call_until_approved() {
    let (s, up, key, _dir) = setup(0.01).await;
    let policy = |wait: &str| {
        json!({
            "limits": [{"metric": "cost_usd", "limit": 0.01, "window": "day"}],
            "action_on_breach": "require_approval",
            "approval_wait": wait,
        })
    };
    let path = format!("/v1/policies/{AGENT}");
    let put = |wait: &'static str| s.admin(Method::PUT, &path, Some(policy(wait)));
    assert!(put("20s").await.status.is_success());
    up.set_usage(Usage {
        input: 1_000,
        cached: 0,
        output: 1_000,
    }); // $0.01 a call: the whole budget
    let first = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);

    let held = {
        let s2 = s.handle();
        let key = key.clone();
        tokio::spawn(async move {
            s2.call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
                .await
        })
    };
    let mut approval = Value::Null;
    for _ in 0..500 {
        let r = s
            .admin(Method::GET, "/v1/approvals?status=pending", None)
            .await;
        if let Some(a) = r.body["approvals"].get(0) {
            approval = a.clone();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(approval["model"], "gpt-test", "{approval}");
    assert_eq!(approval["limit"]["metric"], "cost_usd");
    assert!(approval["estimated_cost_usd"].as_f64().unwrap() > 0.008);
    assert_eq!(up.requests(), 1, "nothing forwarded while held");
    let id = approval["id"].as_str().unwrap().to_owned();
    let until = T0 / 1_000_000_000 + 3_600;
    let ok = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            Some(json!({"extra": {"cost_usd": 0.01}, "until": until})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let r = held.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.requests(), 2);
    assert_eq!(usage(&s).await["limits"][0]["used"], 0.02);

    // Not approved in time: a 429 naming the approval; nothing forwarded.
    assert!(put("1s").await.status.is_success());
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    let second = r.header("x-sluice-approval-id").unwrap().to_owned();
    assert_ne!(second, id);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&second), "{message}");
    assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
    let denied = s
        .admin(
            Method::POST,
            &format!("/v1/approvals/{second}/deny"),
            Some(json!({"reason": "enough for today"})),
        )
        .await;
    assert_eq!(denied.status, StatusCode::OK, "{:?}", denied.body);
    // Denied: refused at once, naming the denial.
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(chat(1000)))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("x-sluice-approval-id"), Some(second.as_str()));
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("denied")
    );
    assert_eq!(up.requests(), 2);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}

/// A body sent with `Transfer-Encoding: chunked` (no `Content-Length`), in 1 KB chunks.
async fn chunked(s: &Server, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(1024).map(|c| Ok(c.to_vec())).collect();
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_forwarded_and_ones_over_max_request_bytes_refused_in_the_wire_shape() {
    // A 3 MB image inline: over axum's 2 MB default, well under the 32 MiB default.
    let (s, up, key, _dir) = setup(10.0).await;
    let image = format!("data:image/png;base64,{}", "A".repeat(3 << 20));
    let big = json!({"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image}}]}]});
    let r = s
        .call(Method::POST, "/v1/chat/completions", &key, Some(big))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(up.received().len(), 1);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;

    let (s, up, key, _dir) =
        setup_with(10.0, "upstream_attempts = 1\nmax_request_bytes = 4096\n").await;
    let text = |n: usize| "word ".repeat(n / 5);
    let openai = |n| {
        serde_json::to_vec(&json!({"model": "gpt-test", "max_tokens": 10,
        "messages": [{"role": "user", "content": text(n)}]}))
        .unwrap()
    };
    let anthropic = |n| {
        serde_json::to_vec(&json!({"model": "claude-test", "max_tokens": 10,
        "messages": [{"role": "user", "content": text(n)}]}))
        .unwrap()
    };
    let bearer = format!("Bearer {key}");
    let oa = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let an = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
    ];
    // Under the limit: served.
    let r = s
        .raw(
            Method::POST,
            "/v1/chat/completions",
            &oa,
            Some(openai(3_000)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let served = up.received().len();
    // Over it, with a Content-Length: refused before the body is read.
    for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"] {
        let r = s.raw(Method::POST, path, &oa, Some(openai(5_000))).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_eq!(r.body["error"]["code"], "request_too_large", "{path}");
        assert_eq!(r.body["error"]["type"], "invalid_request_error", "{path}");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_request_bytes")
        );
    }
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let r = s.raw(Method::POST, path, &an, Some(anthropic(5_000))).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_eq!(r.body["type"], "error", "{path}");
        assert_eq!(r.body["error"]["type"], "request_too_large", "{path}");
    }
    // Over it without a length (chunked): refused when the limit is passed.
    let (status, body) = chunked(&s, "/v1/chat/completions", &oa, openai(5_000)).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large");
    let (status, body) = chunked(&s, "/v1/messages", &an, anthropic(5_000)).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["type"], "request_too_large");
    // Chunked and under the limit: served.
    let (status, _) = chunked(&s, "/v1/chat/completions", &oa, openai(3_000)).await;
    assert_eq!(status, 200);
    // The refusals reached no upstream and held nothing.
    assert_eq!(up.received().len(), served + 1);
    assert_eq!(outstanding(&s).await, 0);
    s.stop().await;
}
