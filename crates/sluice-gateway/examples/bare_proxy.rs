//! The proxy benchmark's second yardstick: the least an HTTP proxy on the same
//! stack as Sluice does (axum server, Sluice's upstream connection pool
//! `sluice_gateway::upstream::Pool`, mimalloc, TCP_NODELAY):
//! forward `POST /v1/chat/completions` to the upstream and pass the answer
//! (streamed or not) back. No keys, limits, token counts or ledger. What it
//! costs over a direct call is the price of the extra hop itself on this
//! machine; what Sluice costs over it is Sluice's own work.
//!
//! `bare_proxy UPSTREAM_BASE_URL [BUSY_POLL_MS]` (e.g.
//! `http://127.0.0.1:9000/v1 200`) prints `listening on http://ADDR`. With
//! `BUSY_POLL_MS`, it busy-polls as `sluice serve` does with `busy_poll_ms`
//! (`sluice_gateway::busy_poll`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use sluice_gateway::busy_poll::BusyPoll;

#[derive(Clone)]
struct Upstream {
    http: sluice_gateway::upstream::Pool,
    to: sluice_gateway::upstream::Endpoint,
}

async fn forward(State(up): State<Upstream>, body: Bytes) -> Response {
    use http_body_util::BodyExt;
    let mut req = axum::http::Request::new(http_body_util::Full::new(body));
    *req.method_mut() = axum::http::Method::POST;
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    req.headers_mut().insert(
        header::AUTHORIZATION,
        axum::http::HeaderValue::from_static("Bearer sk-fake"),
    );
    match up.http.send(&up.to, req).await {
        Ok(r) => {
            let status = r.status();
            let streamed = r
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if streamed {
                (
                    status,
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    Body::new(r.into_body()),
                )
                    .into_response()
            } else {
                match r.into_body().collect().await {
                    Ok(b) => (
                        status,
                        [(header::CONTENT_TYPE, "application/json")],
                        b.to_bytes(),
                    )
                        .into_response(),
                    Err(_) => StatusCode::BAD_GATEWAY.into_response(),
                }
            }
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let base = std::env::args()
        .nth(1)
        .ok_or("usage: bare_proxy UPSTREAM_BASE_URL")?;
    let uri: axum::http::Uri = format!("{base}/chat/completions")
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| e.to_string())?;
    let http = sluice_gateway::upstream::Pool::new(sluice_gateway::upstream::connector(&[])?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "listening on http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(Upstream {
            http,
            to: sluice_gateway::upstream::Endpoint::new(uri)?,
        });
    let busy_ms: u64 = match std::env::args().nth(2) {
        Some(ms) => ms
            .parse()
            .map_err(|_| format!("BUSY_POLL_MS: not a number: {ms}"))?,
        None => 0,
    };
    if busy_ms > 0 {
        let busy = BusyPoll::new(std::time::Duration::from_millis(busy_ms));
        busy.spawn_per_worker();
        app = app.layer(busy.layer(&[]));
    }
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}
