//! Streams: events passed through as they arrive, the usage they carry read on
//! the way, the settlement in a guard that runs on every exit.

use super::*;

/// Settles a streamed reservation exactly once: with the upstream's usage
/// when the stream completes, or, when it is cut short (client gone, upstream
/// broke), with the input estimate and the output estimated from the text
/// streamed so far (one token per three bytes, at least one), capped at the hold.
pub(super) struct StreamSettle {
    pub(super) st: Arc<AppState>,
    pub(super) id: Option<String>,
    pub(super) model: Arc<Model>,
    pub(super) held: Amounts,
    pub(super) read: StreamRead,
    pub(super) started_ns: u64,
    pub(super) request_id: Option<String>,
}

/// What a stream's events have said so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct StreamRead {
    /// The worst-case input estimate, for a stream whose usage never came.
    pub(super) input_estimate: u64,
    /// Input (and its cached parts) reported before the stream's end (Anthropic's `message_start`).
    pub(super) known_input: Option<TokenUsage>,
    /// Bytes of text streamed.
    pub(super) text_bytes: u64,
    pub(super) usage: Option<TokenUsage>,
}

impl StreamSettle {
    fn settle(&mut self, completed: bool) {
        let Some(id) = self.id.take() else { return };
        let (usage, how) = self.read.charged();
        let mut actual = amounts(&self.model, usage);
        if self.read.usage.is_none() {
            // An estimate never exceeds what was held.
            for m in sluice_core::Metric::ALL {
                actual.set(m, actual.get(m).min(self.held.get(m)));
            }
        }
        let st = Arc::clone(&self.st);
        let latency_ms = st.now().as_nanos().saturating_sub(self.started_ns) / 1_000_000;
        let detail = serde_json::to_string(&StreamDetail {
            cached_input_tokens: usage.cached_input,
            charged_from: how,
            completed,
            latency_ms,
            model: &self.model.name,
            stream: true,
            upstream_model: &self.model.upstream_name,
        })
        .ok();
        // In memory settled now; the ledger row is queued from a task (Drop cannot wait).
        settle_soon(&st, id, Some(actual), detail, self.request_id.take());
    }
}

impl StreamRead {
    /// What the stream is charged for, and from what: the usage it
    /// reported, else an estimate from its text (and the input it reported,
    /// else the input estimate).
    fn charged(&self) -> (TokenUsage, &'static str) {
        match self.usage {
            Some(u) => (u, "usage"),
            None => (
                TokenUsage {
                    output: (self.text_bytes.div_ceil(3)).max(1),
                    ..self.known_input.unwrap_or(TokenUsage {
                        input: self.input_estimate,
                        ..TokenUsage::default()
                    })
                },
                "estimated",
            ),
        }
    }

    /// Read one stream event's usage and text; whether to pass it on (the
    /// usage-only chunk Sluice asked for is dropped unless the client asked too).
    pub(super) fn observe(
        &mut self,
        endpoint: Endpoint,
        v: &Value,
        client_wants_usage: bool,
    ) -> bool {
        let text_len = |t: &Value| t.as_str().map_or(0, str::len) as u64;
        match endpoint {
            Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    self.text_bytes +=
                        text_len(&choice["text"]) + text_len(&choice["delta"]["content"]);
                    for call in choice["delta"]["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        self.text_bytes += text_len(&call["function"]["arguments"]);
                    }
                }
                if let Some(u) = usage_of(endpoint, v) {
                    self.usage = Some(u);
                    // No choices (none, or not a list): nothing a client
                    // that did not ask for usage could read from it.
                    let usage_only = v["choices"].as_array().is_none_or(Vec::is_empty);
                    return client_wants_usage || !usage_only;
                }
            }
            Endpoint::Responses => match v["type"].as_str() {
                Some("response.output_text.delta")
                | Some("response.function_call_arguments.delta")
                | Some("response.reasoning_summary_text.delta") => {
                    self.text_bytes += text_len(&v["delta"]);
                }
                Some("response.completed")
                | Some("response.incomplete")
                | Some("response.failed") => {
                    if let Some(u) = usage_of(endpoint, &v["response"]) {
                        self.usage = Some(u);
                    }
                }
                _ => {}
            },
            Endpoint::Messages => match v["type"].as_str() {
                Some("message_start") => {
                    self.known_input = anthropic_input(&v["message"]["usage"]);
                }
                Some("message_delta") => {
                    // Cumulative output; input from message_start (or the estimate).
                    if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                        let input = anthropic_input(&v["usage"]).or(self.known_input).unwrap_or(
                            TokenUsage {
                                input: self.input_estimate,
                                ..TokenUsage::default()
                            },
                        );
                        self.usage = Some(TokenUsage {
                            output: out,
                            ..input
                        });
                    }
                }
                Some("content_block_delta") => {
                    let d = &v["delta"];
                    self.text_bytes += text_len(&d["text"])
                        + text_len(&d["partial_json"])
                        + text_len(&d["thinking"]);
                }
                _ => {}
            },
        }
        true
    }
}

impl Drop for StreamSettle {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// One SSE event's `data:` payload: borrowed when it is one line (as every
/// provider sends it), joined otherwise; `None` for none or `[DONE]`.
pub(super) fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let text = std::str::from_utf8(event).ok()?;
    let mut lines = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start);
    let first = lines.next()?;
    let data = match lines.next() {
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = format!("{first}\n{second}");
            for l in lines {
                joined.push('\n');
                joined.push_str(l);
            }
            std::borrow::Cow::Owned(joined)
        }
    };
    (!data.is_empty() && data != "[DONE]").then_some(data)
}

/// What Sluice reads of an OpenAI chat or completions chunk, borrowed from
/// the event (every other field is skipped, never allocated). A usage the
/// struct cannot hold sends the chunk through the tree.
#[derive(serde::Deserialize)]
pub(super) struct ChatChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChatChoice<'a>>,
    #[serde(default)]
    pub(super) usage: Option<OpenAiUsage>,
}

#[derive(serde::Deserialize)]
struct ChatChoice<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<ChatDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct ChatDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ChatToolCall<'a>>>,
}

#[derive(serde::Deserialize)]
struct ChatToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<ChatFunction<'a>>,
}

#[derive(serde::Deserialize)]
struct ChatFunction<'a> {
    #[serde(default, borrow)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

impl ChatChunk<'_> {
    /// Bytes of text this chunk streams.
    pub(super) fn text_bytes(&self) -> u64 {
        let len = |t: Option<&std::borrow::Cow<'_, str>>| t.map_or(0, |s| s.len() as u64);
        let mut n = 0;
        for c in &self.choices {
            n += len(c.text.as_ref());
            if let Some(d) = &c.delta {
                n += len(d.content.as_ref());
                for call in d.tool_calls.iter().flatten() {
                    n += len(call.function.as_ref().and_then(|f| f.arguments.as_ref()));
                }
            }
        }
        n
    }
}

/// A chat or completions chunk read without a tree: the text it streams,
/// its usage, whether it has choices; `None` when it needs the tree.
pub(super) fn chat_chunk_fast(
    endpoint: Endpoint,
    data: &str,
) -> Option<(u64, Option<TokenUsage>, bool)> {
    let chunk = serde_json::from_str::<ChatChunk<'_>>(data).ok()?;
    let usage = match &chunk.usage {
        None => None,
        Some(u) => Some(u.token_usage(endpoint)?),
    };
    Some((chunk.text_bytes(), usage, !chunk.choices.is_empty()))
}

impl StreamRead {
    /// Read one event (see [`StreamRead::observe`]); whether to pass it on.
    pub(super) fn observe_event(
        &mut self,
        endpoint: Endpoint,
        event: &[u8],
        client_wants_usage: bool,
    ) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if matches!(endpoint, Endpoint::Chat | Endpoint::Completions) {
            // The common chunk, read without building a tree.
            if let Some((text, usage, has_choices)) = chat_chunk_fast(endpoint, &data) {
                self.text_bytes += text;
                let Some(u) = usage else { return true };
                self.usage = Some(u);
                return client_wants_usage || has_choices;
            }
        }
        match serde_json::from_str::<Value>(&data) {
            Ok(v) => self.observe(endpoint, &v, client_wants_usage),
            Err(_) => true,
        }
    }
}

/// Pass the upstream's SSE through event by event (nothing is buffered
/// beyond one event), reading usage and text on the way; drop the usage-only
/// chunk Sluice asked for when the client did not.
pub(super) fn stream_through(
    endpoint: Endpoint,
    resp: crate::upstream::Answer,
    settle: StreamSettle,
    client_wants_usage: bool,
) -> Response {
    use futures_util::StreamExt;
    struct State {
        upstream:
            futures_util::stream::BoxStream<'static, Result<Bytes, crate::upstream::UpstreamError>>,
        buf: bytes::BytesMut,
        /// Bytes of `buf` already searched for an event's end.
        scanned: usize,
        settle: StreamSettle,
        done: bool,
    }
    let state = State {
        upstream: resp.stream().boxed(),
        buf: bytes::BytesMut::new(),
        scanned: 0,
        settle,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            // Every complete event in the buffer goes out as it came (one
            // slice of the buffer, not a copy) unless it is dropped.
            // (`unsplit` moves the first piece in and copies only after a drop.)
            let mut out = bytes::BytesMut::new();
            let mut at = 0; // start of the next event in `buf`
            let mut from = s.scanned;
            while let Some(i) = memchr::memmem::find(&s.buf[from..], b"\n\n") {
                let end = from + i + 2;
                if s.settle
                    .read
                    .observe_event(endpoint, &s.buf[at..end], client_wants_usage)
                {
                    at = end;
                } else {
                    out.unsplit(s.buf.split_to(at));
                    let _dropped = s.buf.split_to(end - at);
                    at = 0;
                }
                from = at;
            }
            out.unsplit(s.buf.split_to(at));
            // Search only the new bytes next time (an end may straddle).
            s.scanned = s.buf.len().saturating_sub(1);
            if !out.is_empty() {
                return Some((Ok::<_, std::io::Error>(out.freeze()), s));
            }
            match s.upstream.next().await {
                Some(Ok(chunk)) => s.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    s.done = true;
                    s.settle.settle(false);
                    return Some((
                        Err(std::io::Error::other(format!("upstream stream broke: {e}"))),
                        s,
                    ));
                }
                None => {
                    s.done = true;
                    s.settle.settle(true);
                    if s.buf.is_empty() {
                        return None;
                    }
                    let rest = s.buf.split().freeze();
                    return Some((Ok(rest), s));
                }
            }
        }
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
