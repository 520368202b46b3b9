//! A fake LLM provider on 127.0.0.1:0 that speaks both wires: OpenAI
//! (`POST /v1/chat/completions`, `/v1/completions` and `/v1/responses`,
//! streaming or not, and `/v1/embeddings`) and Anthropic (`POST /v1/messages`,
//! streaming or not, and `/v1/messages/count_tokens`). Usage is fixed per server and can
//! be changed; each request's behaviour can be scripted (429 with retry
//! headers, 500, a stream that breaks after N chunks); chunks can be delayed.
//! It counts and keeps every request it receives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What one request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// A normal answer.
    Ok,
    /// 429 with these retry hints (`retry-after` seconds, `retry-after-ms`).
    TooMany {
        /// `retry-after`, seconds.
        retry_after_s: Option<u64>,
        /// `retry-after-ms`.
        retry_after_ms: Option<u64>,
    },
    /// 429 with exactly these headers (e.g. `anthropic-ratelimit-*-reset`).
    TooManyWith(Vec<(String, String)>),
    /// 500.
    ServerError,
    /// A stream that stops (connection dropped) after this many content chunks;
    /// a non-streaming request gets its body cut short.
    Disconnect {
        /// Content chunks sent before the break.
        after_chunks: usize,
    },
    /// A stream that sends this many events (every SSE event counts, an
    /// Anthropic `message_start` too), then waits for
    /// [`FakeUpstream::resume`] before the rest.
    Pause {
        /// Events sent before the pause.
        after_events: usize,
    },
}

/// Token counts the fake reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cached ones included.
    pub input: u64,
    /// Of which read from the prompt cache.
    pub cached: u64,
    /// Output (completion) tokens.
    pub output: u64,
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `openai` or `anthropic`.
    pub wire: &'static str,
    /// The path, e.g. `/v1/embeddings`.
    pub path: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its JSON body.
    pub body: Value,
}

#[derive(Debug)]
struct Inner {
    usage: Usage,
    /// Anthropic cache writes (5-minute, 1-hour), parts of `usage.input`.
    cache_writes: (u64, u64),
    /// Whether requests are kept (a benchmark turns this off).
    recording: bool,
    chunks: Vec<String>,
    delay: Duration,
    /// Paused streams wait on it.
    gate: Arc<tokio::sync::Notify>,
    script: VecDeque<Script>,
    received: Vec<Received>,
}

/// The fake provider.
#[derive(Debug)]
pub struct FakeUpstream {
    /// `http://127.0.0.1:PORT/v1`: what a provider's `base_url` is set to.
    pub base_url: String,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeUpstream {
    /// Start one; usage defaults to 12 in (0 cached), 5 out; the answer is
    /// "Hello from the fake" in 4 chunks.
    pub async fn start() -> FakeUpstream {
        Self::start_with(None).await
    }

    /// The same, speaking only TLS with this certificate chain and key
    /// (PEM); its `base_url` is `https://127.0.0.1:PORT/v1`.
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> FakeUpstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeUpstream {
        let inner = Arc::new(Mutex::new(Inner {
            usage: Usage {
                input: 12,
                cached: 0,
                output: 5,
            },
            chunks: ["Hello", " from", " the", " fake"]
                .map(String::from)
                .to_vec(),
            cache_writes: (0, 0),
            recording: true,
            delay: Duration::ZERO,
            gate: Arc::new(tokio::sync::Notify::new()),
            script: VecDeque::new(),
            received: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(openai_chat))
            .route("/v1/completions", post(openai_completions))
            .route("/v1/embeddings", post(openai_embeddings))
            .route("/v1/responses", post(openai_responses))
            .route("/v1/messages", post(anthropic_messages))
            .route("/v1/messages/count_tokens", post(anthropic_count_tokens))
            .with_state(Arc::clone(&inner))
            // Providers take large bodies (images, long contexts): Anthropic 32 MB.
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .layer(axum::middleware::from_fn(with_request_id));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let task = match tls {
            None => tokio::spawn(async move {
                use axum::serve::ListenerExt;
                let listener = listener.tap_io(move |tcp| {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tcp.set_nodelay(true);
                });
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    tokio::spawn(async move {
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }),
        };
        FakeUpstream {
            base_url,
            inner,
            task,
            connections,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Let a stream paused by [`Script::Pause`] go on (or the next one, if
    /// none is paused yet).
    pub fn resume(&self) {
        lock(&self.inner).gate.notify_one();
    }

    /// Usage reported from now on.
    pub fn set_usage(&self, usage: Usage) {
        lock(&self.inner).usage = usage;
    }

    /// Anthropic cache writes reported from now on (5-minute, 1-hour), as
    /// parts of the usage's input.
    pub fn set_cache_writes(&self, five_minute: u64, one_hour: u64) {
        lock(&self.inner).cache_writes = (five_minute, one_hour);
    }

    /// Delay before each streamed chunk (a non-streaming OpenAI answer waits for all of them).
    pub fn set_chunk_delay(&self, delay: Duration) {
        lock(&self.inner).delay = delay;
    }

    /// Behaviours for the next requests, in order (then `Ok`).
    pub fn script(&self, steps: impl IntoIterator<Item = Script>) {
        lock(&self.inner).script.extend(steps);
    }

    /// Stop keeping requests (for benchmarks: no lock-held growth per request).
    pub fn set_recording(&self, on: bool) {
        lock(&self.inner).recording = on;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        lock(&self.inner).received.len()
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner).received.clone()
    }
}

type Shared = State<Arc<Mutex<Inner>>>;

/// Every answer carries a provider request id, as real providers' do:
/// OpenAI's `x-request-id`, Anthropic's `request-id` on its routes.
async fn with_request_id(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let header = if req.uri().path().starts_with("/v1/messages") {
        "request-id"
    } else {
        "x-request-id"
    };
    let mut r = next.run(req).await;
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r.headers_mut()
        .insert(header, format!("req_fake_{n}").parse().unwrap());
    r
}

/// Record the request and pick its behaviour.
fn begin(
    inner: &Mutex<Inner>,
    wire: &'static str,
    path: &str,
    headers: HeaderMap,
    body: &Bytes,
) -> (Script, Usage, Vec<String>, Pace, Value) {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut g = lock(inner);
    if g.recording {
        g.received.push(Received {
            wire,
            path: path.to_owned(),
            headers,
            body: body.clone(),
        });
    }
    let script = g.script.pop_front().unwrap_or(Script::Ok);
    let pace = Pace {
        delay: g.delay,
        pause: match script {
            Script::Pause { after_events } => Some((after_events, Arc::clone(&g.gate))),
            _ => None,
        },
    };
    (script, g.usage, g.chunks.clone(), pace, body)
}

fn error_response(script: &Script, wire: &str) -> Option<Response> {
    let (status, message) = match script {
        Script::TooMany { .. } | Script::TooManyWith(_) => {
            (StatusCode::TOO_MANY_REQUESTS, "rate limited by the fake")
        }
        Script::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "the fake failed"),
        _ => return None,
    };
    let body = if wire == "openai" {
        json!({"error": {"message": message, "type": "fake_error", "code": null}})
    } else {
        json!({"type": "error", "error": {"type": "fake_error", "message": message}})
    };
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Script::TooManyWith(pairs) = script {
        for (k, v) in pairs {
            r.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
    }
    if let Script::TooMany {
        retry_after_s,
        retry_after_ms,
    } = script
    {
        if let Some(s) = retry_after_s {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().unwrap());
        }
        if let Some(ms) = retry_after_ms {
            r.headers_mut()
                .insert("retry-after-ms", ms.to_string().parse().unwrap());
        }
    }
    Some(r)
}

/// One named server-sent event.
fn ev(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// How a stream's events are spaced.
struct Pace {
    /// Before each event.
    delay: Duration,
    /// After this many events, wait for the gate once.
    pause: Option<(usize, Arc<tokio::sync::Notify>)>,
}

/// Server-sent events, each after `delay`; `cut` stops the stream with an error after that many events.
fn sse(events: Vec<String>, pace: Pace, cut: Option<usize>) -> Response {
    let Pace { delay, pause } = pace;
    // State: the events left, how many were sent, whether the stream has ended.
    let stream = futures_util::stream::unfold(
        (events.into_iter(), 0usize, false),
        move |(mut it, n, ended)| {
            let pause = pause.clone();
            async move {
                if ended {
                    return None;
                }
                if let Some((_, gate)) = pause.filter(|(after, _)| *after == n) {
                    // Once: what was sent goes out first (the server flushes while this waits).
                    gate.notified().await;
                }
                if cut.is_some_and(|c| n >= c) {
                    // Pause first, so the server flushes what was sent before the break.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let broken = std::io::Error::other("fake upstream dropped the stream");
                    return Some((Err(broken), (it, n, true)));
                }
                let event = it.next()?;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((
                    Ok::<_, std::io::Error>(Bytes::from(event)),
                    (it, n + 1, false),
                ))
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A JSON answer, or (scripted to break) its first half and then a dropped connection.
fn json_or_cut(answer: &Value, cut: Option<usize>) -> Response {
    let text = answer.to_string();
    match cut {
        Some(_) => sse(
            vec![text[..text.len() / 2].to_owned()],
            Pace {
                delay: Duration::ZERO,
                pause: None,
            },
            Some(1),
        ),
        None => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
    }
}

async fn openai_chat(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, chunks, delay, req) =
        begin(&inner, "openai", "/v1/chat/completions", headers, &body);
    if let Some(r) = error_response(&script, "openai") {
        return r;
    }
    let model = req["model"].as_str().unwrap_or("fake-model").to_owned();
    let usage_json = json!({
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.input + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cached},
    });
    let cut = match script {
        Script::Disconnect { after_chunks } => Some(after_chunks),
        _ => None,
    };
    if req["stream"].as_bool() == Some(true) {
        let mut events: Vec<String> = chunks
            .iter()
            .map(|c| {
                let chunk = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": null}]});
                format!("data: {chunk}\n\n")
            })
            .collect();
        let done = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        events.push(format!("data: {done}\n\n"));
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [], "usage": usage_json});
            events.push(format!("data: {u}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        return sse(events, delay, cut);
    }
    if !delay.delay.is_zero() {
        // A slow answer: as long as streaming all the chunks would take.
        tokio::time::sleep(delay.delay * u32::try_from(chunks.len()).unwrap_or(1)).await;
    }
    let answer = json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": chunks.concat()}, "finish_reason": "stop"}],
        "usage": usage_json,
    });
    json_or_cut(&answer, cut)
}

async fn anthropic_messages(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, chunks, delay, req) =
        begin(&inner, "anthropic", "/v1/messages", headers, &body);
    if let Some(r) = error_response(&script, "anthropic") {
        return r;
    }
    let (w5, w1) = lock(&inner).cache_writes;
    let model = req["model"].as_str().unwrap_or("fake-model").to_owned();
    let uncached = usage.input.saturating_sub(usage.cached + w5 + w1);
    let input_usage = json!({"input_tokens": uncached, "cache_read_input_tokens": usage.cached,
        "cache_creation_input_tokens": w5 + w1,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}});
    let with_output = |n: u64| {
        let mut u = input_usage.clone();
        u["output_tokens"] = json!(n);
        u
    };
    let cut = match script {
        Script::Disconnect { after_chunks } => Some(after_chunks + 2), // after message_start and content_block_start
        _ => None,
    };
    if req["stream"].as_bool() == Some(true) {
        let mut events = vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null,
                "usage": with_output(1)}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        for c in &chunks {
            events.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": c}})));
        }
        events.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": usage.output}})));
        events.push(ev("message_stop", json!({"type": "message_stop"})));
        return sse(events, delay, cut);
    }
    let answer = json!({
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": chunks.concat()}],
        "stop_reason": "end_turn",
        "usage": with_output(usage.output),
    });
    json_or_cut(&answer, cut)
}

fn cut_of(script: &Script) -> Option<usize> {
    match script {
        Script::Disconnect { after_chunks } => Some(*after_chunks),
        _ => None,
    }
}

fn openai_usage(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.input + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cached},
    })
}

async fn openai_completions(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, chunks, delay, req) =
        begin(&inner, "openai", "/v1/completions", headers, &body);
    if let Some(r) = error_response(&script, "openai") {
        return r;
    }
    let model = req["model"].as_str().unwrap_or("fake-model").to_owned();
    let base = |choices: Value| json!({"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model, "choices": choices});
    if req["stream"].as_bool() == Some(true) {
        let mut events: Vec<String> = chunks
            .iter()
            .map(|c| {
                format!(
                    "data: {}\n\n",
                    base(json!([{"index": 0, "text": c, "logprobs": null, "finish_reason": null}]))
                )
            })
            .collect();
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let mut u = base(json!([]));
            u["usage"] = openai_usage(usage);
            events.push(format!("data: {u}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        return sse(events, delay, cut_of(&script));
    }
    let mut answer = base(
        json!([{"index": 0, "text": chunks.concat(), "logprobs": null, "finish_reason": "stop"}]),
    );
    answer["usage"] = openai_usage(usage);
    json_or_cut(&answer, cut_of(&script))
}

/// Standard base64 (for `encoding_format: "base64"`, the openai SDK's default).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn openai_embeddings(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, _, _, req) = begin(&inner, "openai", "/v1/embeddings", headers, &body);
    if let Some(r) = error_response(&script, "openai") {
        return r;
    }
    let inputs = match &req["input"] {
        Value::Array(items) if items.iter().all(|i| !i.is_number()) => items.len(),
        _ => 1,
    };
    let vector = [0.25f32, -0.5, 0.125];
    let embedding = if req["encoding_format"] == "base64" {
        let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
        json!(base64(&bytes))
    } else {
        json!(vector)
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": embedding}))
        .collect();
    let answer = json!({"object": "list", "data": data, "model": req["model"],
        "usage": {"prompt_tokens": usage.input, "total_tokens": usage.input}});
    json_or_cut(&answer, cut_of(&script))
}

async fn openai_responses(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, chunks, delay, req) =
        begin(&inner, "openai", "/v1/responses", headers, &body);
    if let Some(r) = error_response(&script, "openai") {
        return r;
    }
    let model = req["model"].as_str().unwrap_or("fake-model").to_owned();
    let response = |status: &str, text: &str, with_usage: bool| {
        let output = if text.is_empty() {
            json!([])
        } else {
            json!([{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}])
        };
        let mut r = json!({"id": "resp_fake", "object": "response", "created_at": 0, "status": status,
            "model": model, "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "error": null, "incomplete_details": null, "instructions": null, "metadata": {},
            "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}, "usage": null});
        if with_usage {
            r["usage"] = json!({"input_tokens": usage.input, "input_tokens_details": {"cached_tokens": usage.cached},
                "output_tokens": usage.output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.input + usage.output});
        }
        r
    };
    if req["stream"].as_bool() == Some(true) {
        let mut seq = 0u64;
        let mut next = || {
            seq += 1;
            seq
        };
        let text = chunks.concat();
        let item = |status: &str, text: Option<&str>| {
            let content = match text {
                Some(t) => json!([{"type": "output_text", "text": t, "annotations": []}]),
                None => json!([]),
            };
            json!({"type": "message", "id": "msg_fake", "status": status, "role": "assistant", "content": content})
        };
        let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
        let mut events = vec![
            ev(
                "response.created",
                json!({"type": "response.created", "sequence_number": next(), "response": response("in_progress", "", false)}),
            ),
            ev(
                "response.output_item.added",
                json!({"type": "response.output_item.added", "sequence_number": next(), "output_index": 0, "item": item("in_progress", None)}),
            ),
            ev(
                "response.content_part.added",
                json!({"type": "response.content_part.added", "sequence_number": next(), "item_id": "msg_fake",
                    "output_index": 0, "content_index": 0, "part": part("")}),
            ),
        ];
        for c in &chunks {
            events.push(ev("response.output_text.delta", json!({"type": "response.output_text.delta",
                "sequence_number": next(), "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": c, "logprobs": []})));
        }
        events.push(ev("response.output_text.done", json!({"type": "response.output_text.done", "sequence_number": next(),
            "item_id": "msg_fake", "output_index": 0, "content_index": 0, "text": text, "logprobs": []})));
        events.push(ev(
            "response.content_part.done",
            json!({"type": "response.content_part.done", "sequence_number": next(),
            "item_id": "msg_fake", "output_index": 0, "content_index": 0, "part": part(&text)}),
        ));
        events.push(ev(
            "response.output_item.done",
            json!({"type": "response.output_item.done", "sequence_number": next(),
            "output_index": 0, "item": item("completed", Some(&text))}),
        ));
        events.push(ev(
            "response.completed",
            json!({"type": "response.completed", "sequence_number": next(), "response": response("completed", &text, true)}),
        ));
        return sse(events, delay, cut_of(&script).map(|c| c + 3));
    }
    json_or_cut(
        &response("completed", &chunks.concat(), true),
        cut_of(&script),
    )
}

async fn anthropic_count_tokens(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let (script, usage, _, _, _) = begin(
        &inner,
        "anthropic",
        "/v1/messages/count_tokens",
        headers,
        &body,
    );
    if let Some(r) = error_response(&script, "anthropic") {
        return r;
    }
    json_or_cut(&json!({"input_tokens": usage.input}), cut_of(&script))
}
