//! The proxy benchmark's second yardstick: the least an HTTP proxy on the same
//! stack as Sluice does (axum server, reqwest client, mimalloc, TCP_NODELAY):
//! forward `POST /v1/chat/completions` to the upstream and pass the answer
//! (streamed or not) back. No keys, limits, token counts or ledger. What it
//! costs over a direct call is the price of the extra hop itself on this
//! machine; what Sluice costs over it is Sluice's own work.
//!
//! `bare_proxy UPSTREAM_BASE_URL` (e.g. `http://127.0.0.1:9000/v1`) prints
//! `listening on http://ADDR`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;

#[derive(Clone)]
struct Upstream {
    http: reqwest::Client,
    url: reqwest::Url,
}

async fn forward(State(up): State<Upstream>, body: Bytes) -> Response {
    let sent = up
        .http
        .post(up.url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .bearer_auth("sk-fake")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let streamed = r
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if streamed {
                (
                    status,
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    Body::from_stream(r.bytes_stream()),
                )
                    .into_response()
            } else {
                match r.bytes().await {
                    Ok(b) => {
                        (status, [(header::CONTENT_TYPE, "application/json")], b).into_response()
                    }
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
    let url =
        reqwest::Url::parse(&format!("{base}/chat/completions")).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
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
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(Upstream { http, url });
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}
