use super::*;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().unwrap());
    }
    h
}

/// The size of what `f` returns (here: an async fn's future), without calling it.
fn returned_size<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
    std::mem::size_of::<R>()
}

#[test]
fn the_proxy_handler_future_stays_small() {
    // axum moves a handler's future whole twice a call. With its phases
    // boxed it is about 1 KB; any one of them inline makes it 3-6 KB in
    // a debug build (27 KB in release before this was done).
    let size = returned_size(route);
    assert!(size <= 2048, "the proxy route's future is {size} bytes");
}

#[test]
fn upstream_waits_from_every_header_family() {
    let now = sluice_core::Timestamp::from_nanos(1_700_000_000_000_000_000);
    let w = |pairs: &[(&'static str, &str)]| upstream_wait(&headers(pairs), now);
    assert_eq!(
        w(&[("retry-after-ms", "250")]),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        w(&[("retry-after", "3"), ("retry-after-ms", "10")]),
        Some(Duration::from_millis(10))
    );
    assert_eq!(w(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
    // OpenAI: the exhausted limit's reset, not the earliest.
    assert_eq!(
        w(&[
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-remaining-tokens", "0")
        ]),
        Some(Duration::from_secs(360))
    );
    assert_eq!(
        w(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "1m")
        ]),
        Some(Duration::from_secs(1))
    );
    // Anthropic: RFC 3339 instants, measured from now.
    assert_eq!(
        w(&[
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:22Z"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:13:21Z")
        ]),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        w(&[(
            "anthropic-ratelimit-output-tokens-reset",
            "2023-11-14T22:13:20.5Z"
        )]),
        Some(Duration::from_millis(500))
    );
    // A reset in the past waits nothing; junk is ignored.
    assert_eq!(
        w(&[("anthropic-ratelimit-tokens-reset", "2000-01-01T00:00:00Z")]),
        Some(Duration::ZERO)
    );
    assert_eq!(
        w(&[
            ("retry-after", "soon"),
            ("x-ratelimit-reset-tokens", "later")
        ]),
        None
    );
}

#[test]
fn output_bounds_per_endpoint() {
    let model = Model {
        name: "m".into(),
        provider: 0,
        upstream_name: "m".into(),
        price: crate::pricing::Price::from_usd_per_mtok(1.0, 1.0, None).unwrap(),
        max_output_tokens: 1000,
        fallbacks: vec![],
        subject: Subject::parse("model:m").unwrap(),
        quota_subject: None,
    };
    let b = |e, v: Value| output_bound(e, &v, &model);
    assert_eq!(b(Endpoint::Chat, json!({})), 1000);
    assert_eq!(b(Endpoint::Chat, json!({"max_tokens": 10, "n": 3})), 30);
    assert_eq!(
        b(Endpoint::Chat, json!({"max_completion_tokens": 5000})),
        1000
    );
    assert_eq!(
        b(
            Endpoint::Completions,
            json!({"max_tokens": 10, "n": 2, "best_of": 4})
        ),
        40
    );
    assert_eq!(b(Endpoint::Embeddings, json!({"max_tokens": 10})), 0);
    assert_eq!(b(Endpoint::Responses, json!({"max_output_tokens": 7})), 7);
    assert_eq!(b(Endpoint::Messages, json!({"max_tokens": 70})), 70);
}

#[test]
fn chat_chunks_are_read_as_the_tree_reads_them() {
    // The text a chunk streams, read from a `Value` as before.
    let by_tree = |v: &Value| -> u64 {
        let len = |t: &Value| t.as_str().map_or(0, str::len) as u64;
        let mut n = 0;
        for c in v["choices"].as_array().into_iter().flatten() {
            n += len(&c["text"]) + len(&c["delta"]["content"]);
            for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                n += len(&call["function"]["arguments"]);
            }
        }
        n
    };
    for v in [
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}], "usage": null}),
        json!({"choices": [{"delta": {"content": "héllo \"quoted\" \n wörld"}}]}),
        json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\": 1}"}}, {"function": {"arguments": "xy"}}]}}]}),
        json!({"choices": [{"text": "completion text", "index": 0}]}),
        json!({"choices": [{"delta": {"content": null}}, {"delta": {"content": "ab"}}]}),
        json!({"choices": [], "extra": {"nested": [1, 2, {"x": "y"}]}}),
    ] {
        let text = v.to_string();
        let chunk: ChatChunk<'_> = serde_json::from_str(&text).unwrap();
        assert!(chunk.usage.is_none(), "{v}");
        assert_eq!(chunk.text_bytes(), by_tree(&v), "{v}");
    }
    let with_usage = json!({"choices": [], "usage": {"prompt_tokens": 3}}).to_string();
    let chunk: ChatChunk<'_> = serde_json::from_str(&with_usage).unwrap();
    assert!(chunk.usage.is_some(), "a usage chunk is read in full");
    // A shape the fast path does not know falls back to the tree.
    assert!(
        serde_json::from_str::<ChatChunk<'_>>(r#"{"choices": [{"delta": {"content": [1]}}]}"#)
            .is_err()
    );
}

#[test]
fn openai_usage_is_read_as_the_tree_reads_it() {
    let usages = [
        json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}),
        json!({"prompt_tokens": 1000, "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 64}}),
        json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": null}),
        json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": "x"}}),
        json!({"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2.5}}),
        json!({"prompt_tokens": 7}),
        json!({"prompt_tokens": -1, "completion_tokens": 1}),
        json!({"completion_tokens": 1}),
        json!({"prompt_tokens": "7", "completion_tokens": 1}),
        json!(null),
        json!("usage"),
    ];
    for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
        for u in &usages {
            let answer =
                json!({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": u});
            let tree = usage_fields(endpoint, u);
            assert_eq!(
                usage_in(endpoint, answer.to_string().as_bytes()),
                tree,
                "{endpoint:?} {u}"
            );
            for choices in [json!([]), json!([{"delta": {"content": "abc"}}])] {
                let chunk = json!({"choices": choices, "usage": u});
                if let Some((text, usage, has_choices)) =
                    chat_chunk_fast(endpoint, &chunk.to_string())
                {
                    assert_eq!(usage, usage_of(endpoint, &chunk), "{endpoint:?} {chunk}");
                    assert_eq!(text, if has_choices { 3 } else { 0 }, "{chunk}");
                    assert_eq!(
                        has_choices,
                        !chunk["choices"].as_array().unwrap().is_empty()
                    );
                } else {
                    // Only a usage the struct cannot read goes to the tree.
                    assert!(!u.is_null(), "{chunk}");
                }
            }
        }
    }
    assert_eq!(usage_in(Endpoint::Chat, b"{\"choices\": []}"), None);
}

#[test]
fn include_usage_is_spliced_as_the_tree_would_set_it() {
    for body in [
        r#"{"model":"m","stream":true,"messages":[]}"#,
        "  {\n \"model\" : \"m\", \"stream\": true }  ",
        "{}",
        " { } ",
    ] {
        let spliced: Value = serde_json::from_slice(&with_include_usage(body.as_bytes()))
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        let mut tree: Value = serde_json::from_str(body).unwrap();
        tree["stream_options"]["include_usage"] = Value::from(true);
        assert_eq!(spliced, tree, "{body}");
    }
}

#[test]
fn the_model_is_spliced_as_the_tree_would_set_it() {
    for body in [
        r#"{"model":"m","stream":true,"messages":[]}"#,
        "  {\n \"model\" : \"m\" , \"n\": 1 }  ",
        r#"{"messages":[{"role":"user","content":"model"}],"model":"a\"b\u00e9"}"#,
        r#"{"tools":[{"model":"inner"}],"x":{"model":"deep"},"model":"m"}"#,
        r#"{"model":"m","stream_options":{"model":"x"}}"#,
    ] {
        for name in ["gpt-4o-mini", "quote\"and\\slash", "ünï/中"] {
            let spliced = with_model(body.as_bytes(), name).unwrap_or_else(|| panic!("{body}"));
            let spliced: Value =
                serde_json::from_slice(&spliced).unwrap_or_else(|e| panic!("{body}: {e}"));
            let mut tree: Value = serde_json::from_str(body).unwrap();
            tree["model"] = Value::from(name);
            assert_eq!(spliced, tree, "{body} {name}");
        }
    }
    // A duplicate `model` member is left to the tree (which keeps the last).
    assert!(with_model(br#"{"model":"a","model":"b"}"#, "x").is_none());
    // Then the usage request on top, as on a renamed stream.
    let body = br#"{"model":"m","stream":true}"#;
    let both: Value =
        serde_json::from_slice(&with_include_usage(&with_model(body, "up").unwrap())).unwrap();
    assert_eq!(
        both,
        json!({"model": "up", "stream": true, "stream_options": {"include_usage": true}})
    );
}

/// Request bodies: objects with a string `model` somewhere among other
/// members (nested objects with their own `model`, strings with escapes).
fn request_body() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z é\"\\\\\n\u{1}😀{}:,]{0,12}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::vec(("(model|[a-z]{1,6})", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    (
        proptest::collection::vec(("[a-z]{1,6}", value), 0..5),
        "[a-z0-9é\"\\\\/-]{1,12}",
        any::<prop::sample::Index>(),
    )
        .prop_map(|(members, model, at)| {
            let mut members: Vec<(String, Value)> =
                members.into_iter().filter(|(k, _)| k != "model").collect();
            let i = at.index(members.len() + 1);
            members.insert(i, ("model".to_owned(), Value::from(model)));
            Value::Object(members.into_iter().collect())
        })
}

/// Stream events of every wire's shapes, with the fields Sluice reads
/// present or not, of the right type or not.
fn stream_event() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let text = || {
        prop_oneof![
            Just(Value::Null),
            "[a-z é\"\\\\\n\u{1}😀]{0,8}".prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            Just(json!(["x"])),
        ]
    };
    let usage = prop_oneof![
        Just(Value::Null),
        Just(json!({"prompt_tokens": 5, "completion_tokens": 2})),
        Just(json!({"prompt_tokens": 5})),
        Just(json!({"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2})),
        Just(json!({"output_tokens": 9})),
        Just(json!(3)),
    ];
    let kind = prop::sample::select(vec![
        "content_block_delta",
        "message_start",
        "message_delta",
        "ping",
        "response.output_text.delta",
        "response.reasoning_summary_text.delta",
        "response.completed",
        "response.failed",
        "other",
    ]);
    (text(), text(), text(), usage, kind, any::<u16>()).prop_map(
        |(t1, t2, t3, usage, kind, shape)| {
            let bit = |i: u16| shape & (1 << i) != 0;
            let mut v = json!({"id": "x", "created": 1});
            if bit(0) {
                let mut choice = json!({"index": 0, "delta": {"content": t1}});
                if bit(1) {
                    choice["text"] = t2.clone();
                }
                if bit(2) {
                    choice["delta"]["tool_calls"] =
                        json!([{"index": 0, "function": {"name": "f", "arguments": t3}}]);
                }
                v["choices"] = if bit(3) {
                    json!([])
                } else {
                    json!([choice, choice])
                };
            }
            if bit(4) {
                v["usage"] = usage.clone();
            }
            if bit(5) {
                v["type"] = Value::from(kind);
            }
            if bit(6) {
                v["delta"] = if bit(7) {
                    t1.clone()
                } else {
                    json!({"type": "text_delta", "text": t1, "partial_json": t2, "thinking": t3})
                };
            }
            if bit(8) {
                v["message"] = json!({"usage": usage});
            }
            if bit(9) {
                v["response"] = json!({"usage": usage});
            }
            v
        },
    )
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(1024))]

    /// A body with its model spliced in reads back as the tree with the
    /// model set, compact or pretty-printed.
    #[test]
    fn a_spliced_model_reads_as_the_tree_with_it_set(
        v in request_body(),
        name in "[a-z0-9é\"\\\\/-]{1,12}",
        pretty in proptest::prelude::any::<bool>(),
    ) {
        let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
        let spliced = with_model(text.as_bytes(), &name);
        proptest::prop_assert!(spliced.is_some(), "{}", text);
        let spliced: Value = serde_json::from_slice(&spliced.unwrap()).unwrap();
        let mut tree = v.clone();
        tree["model"] = Value::from(name);
        proptest::prop_assert_eq!(spliced, tree);
    }

    /// An event read from its bytes (a chat chunk into a borrowed
    /// struct, anything else into a tree) leaves the same usage, text
    /// and pass-on verdict as the tree read of it.
    #[test]
    fn stream_events_are_read_as_the_tree_reads_them(
        v in stream_event(),
        wants in proptest::prelude::any::<bool>(),
        pretty in proptest::prelude::any::<bool>(),
    ) {
        let data = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
        let event = format!("data: {}\n\n", data.replace('\n', "\ndata: "));
        for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses, Endpoint::Messages] {
            let start = StreamRead { input_estimate: 100, ..StreamRead::default() };
            let mut tree = start.clone();
            let pass = tree.observe(endpoint, &v, wants);
            let mut fast = start;
            proptest::prop_assert_eq!(fast.observe_event(endpoint, event.as_bytes(), wants), pass);
            proptest::prop_assert_eq!(&fast, &tree, "{:?} {}", endpoint, v);
        }
    }
}

#[test]
fn a_chunk_of_usage_and_no_choices_reaches_only_a_client_that_asked() {
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 1});
    let want = TokenUsage {
        input: 3,
        output: 1,
        ..TokenUsage::default()
    };
    for (chunk, usage_only) in [
        (json!({"choices": [], "usage": usage}), true),
        (json!({"usage": usage}), true),
        (json!({"choices": null, "usage": usage}), true),
        (
            json!({"choices": [{"delta": {"content": "ab"}}], "usage": usage}),
            false,
        ),
    ] {
        for wants in [false, true] {
            let mut read = StreamRead::default();
            let event = format!("data: {chunk}\n\n");
            let passed = read.observe_event(Endpoint::Chat, event.as_bytes(), wants);
            assert_eq!(passed, wants || !usage_only, "{chunk} {wants}");
            assert_eq!(read.usage, Some(want), "{chunk}");
        }
    }
}

#[test]
fn event_data_borrows_one_line_and_joins_several() {
    assert_eq!(
        event_data(b"data: {\"a\":1}\n\n").as_deref(),
        Some("{\"a\":1}")
    );
    assert!(matches!(
        event_data(b"data: {}\n\n"),
        Some(std::borrow::Cow::Borrowed(_))
    ));
    assert_eq!(
        event_data(b"event: x\ndata: {\"a\":\ndata: 1}\n\n").as_deref(),
        Some("{\"a\":\n1}")
    );
    assert_eq!(event_data(b"data: [DONE]\n\n"), None);
    assert_eq!(event_data(b": keep-alive\n\n"), None);
    assert_eq!(event_data(b"data:\n\n"), None);
}
