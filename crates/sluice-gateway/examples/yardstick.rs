//! The benchmark's yardstick: a trivial axum handler on the same runtime
//! settings as `sluice serve`. It reads the JSON body and answers a small JSON
//! object; no limits, no ledger. Prints `listening on http://ADDR`.
//!
//! `cargo run --release -p sluice-gateway --example yardstick -- 127.0.0.1:0`

/// The same allocator as the `sluice` binary, so the comparison is of the handlers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::post;

async fn check(body: Bytes) -> ([(header::HeaderName, &'static str); 1], String) {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = v["subjects"].as_array().map_or(0, Vec::len);
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"allowed\":true,\"subjects\":{n}}}"),
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let app = Router::new().route("/v1/check", post(check));
    axum::serve(listener, app).await
}
