//! The fake upstream behaves as the two wires do, and as scripted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use sluice_test_support::upstream::{FakeUpstream, Script, Usage};

async fn post(url: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("authorization", "Bearer upstream-key")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body.
fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn openai_non_streaming_reports_usage_and_counts_requests() {
    let up = FakeUpstream::start().await;
    up.set_usage(Usage {
        input: 100,
        cached: 40,
        output: 7,
    });
    let r = post(
        &format!("{}/chat/completions", up.base_url),
        json!({"model": "m", "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 100);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 40);
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from the fake");
    assert_eq!(up.requests(), 1);
    let got = &up.received()[0];
    assert_eq!(got.wire, "openai");
    assert_eq!(got.headers["authorization"], "Bearer upstream-key");
    assert_eq!(got.body["model"], "m");
}

#[tokio::test]
async fn openai_streaming_sends_usage_only_when_asked() {
    let up = FakeUpstream::start().await;
    let url = format!("{}/chat/completions", up.base_url);
    let with = post(
        &url,
        json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(with.headers()["content-type"], "text/event-stream");
    let lines = data_lines(&with.text().await.unwrap());
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["choices"], json!([]));
    let without = data_lines(
        &post(&url, json!({"model": "m", "stream": true}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert!(without.iter().all(|l| !l.contains("\"usage\"")));
    assert_eq!(without.len(), lines.len() - 1);
}

#[tokio::test]
async fn scripted_429_then_500_then_ok() {
    let up = FakeUpstream::start().await;
    up.script([
        Script::TooMany {
            retry_after_s: Some(2),
            retry_after_ms: Some(1500),
        },
        Script::ServerError,
    ]);
    let url = format!("{}/chat/completions", up.base_url);
    let a = post(&url, json!({"model": "m"})).await;
    assert_eq!(a.status(), 429);
    assert_eq!(a.headers()["retry-after"], "2");
    assert_eq!(a.headers()["retry-after-ms"], "1500");
    assert_eq!(post(&url, json!({"model": "m"})).await.status(), 500);
    assert_eq!(post(&url, json!({"model": "m"})).await.status(), 200);
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn a_stream_can_break_midway_and_chunks_can_be_slow() {
    let up = FakeUpstream::start().await;
    up.set_chunk_delay(Duration::from_millis(5));
    up.script([Script::Disconnect { after_chunks: 2 }]);
    let mut r = post(
        &format!("{}/chat/completions", up.base_url),
        json!({"model": "m", "stream": true}),
    )
    .await;
    let mut received = String::new();
    let broke = loop {
        match r.chunk().await {
            Ok(Some(b)) => received.push_str(&String::from_utf8_lossy(&b)),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        broke,
        "the stream should end with an error, got {received:?}"
    );
    assert_eq!(data_lines(&received).len(), 2);
}

#[tokio::test]
async fn a_paused_stream_waits_for_resume_and_connections_are_counted() {
    let up = FakeUpstream::start().await;
    up.script([Script::Pause { after_events: 1 }]);
    let client = reqwest::Client::new();
    let mut r = client
        .post(format!("{}/chat/completions", up.base_url))
        .json(&json!({"model": "m", "stream": true}))
        .send()
        .await
        .unwrap();
    let first = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).into_owned();
    assert_eq!(data_lines(&first).len(), 1, "{first:?}");
    up.resume();
    let mut rest = String::new();
    while let Some(b) = r.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&b));
    }
    // 3 more content chunks, the stop chunk, [DONE].
    assert_eq!(data_lines(&rest).len(), 5, "{rest:?}");
    // The same client's next call reuses its connection.
    let r = client
        .post(format!("{}/chat/completions", up.base_url))
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn anthropic_reports_usage_in_the_message_and_in_stream_events() {
    let up = FakeUpstream::start().await;
    up.set_usage(Usage {
        input: 30,
        cached: 10,
        output: 9,
    });
    let url = format!("{}/messages", up.base_url);
    let v: Value = post(
        &url,
        json!({"model": "claude", "max_tokens": 50, "messages": []}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["input_tokens"], 20);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 10);
    assert_eq!(v["usage"]["output_tokens"], 9);
    let text = post(&url, json!({"model": "claude", "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    let data = data_lines(&text);
    let start: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(start["message"]["usage"]["input_tokens"], 20);
    let delta: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 9);
    assert_eq!(up.received()[1].wire, "anthropic");
}
