//! An in-process gateway on 127.0.0.1:0 with a manual clock and its own data directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use sluice_core::{ManualClock, Timestamp};
use sluice_gateway::{Config, FileConfig, Gateway, Overrides};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "test-admin-key-0123456789abcdef";
/// 2027-01-15T08:00:00Z.
pub const T0: u64 = 1_800_000_000 * 1_000_000_000;

pub use sluice_test_support::TempDir;

pub struct Server {
    pub url: String,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn config(dir: &TempDir, toml: &str) -> Config {
    let file = FileConfig::parse(toml, std::path::Path::new("test.toml")).unwrap();
    Config::resolve(
        file,
        Overrides {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.0.clone()),
            admin_key: Some(ADMIN.into()),
            env: [("FAKE_UPSTREAM_KEY".to_owned(), "upstream-secret".to_owned())].into(),
        },
    )
    .unwrap()
}

impl Server {
    pub async fn start(dir: &TempDir) -> Server {
        Server::start_config(dir, "").await
    }

    /// With this config, on a fresh clock at `T0`.
    pub async fn start_config(dir: &TempDir, toml: &str) -> Server {
        Server::start_with(
            dir,
            toml,
            Arc::new(ManualClock::new(Timestamp::from_nanos(T0))),
        )
        .await
    }

    pub async fn start_with(dir: &TempDir, toml: &str, clock: Arc<ManualClock>) -> Server {
        let gateway = Gateway::start(config(dir, toml), clock.clone())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            gateway
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Server {
            url,
            clock,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown: in-flight requests finish, the ledger is flushed.
    pub async fn stop(mut self) -> Arc<ManualClock> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        self.clock.clone()
    }

    /// Another client of the same server (for requests from spawned tasks);
    /// stopping or dropping it leaves the server running.
    pub fn handle(&self) -> Server {
        Server {
            url: self.url.clone(),
            clock: self.clock.clone(),
            http: self.http.clone(),
            stop: None,
            task: None,
        }
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A JSON call with a key (`Authorization: Bearer`).
    pub async fn call(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        self.raw(
            method,
            path,
            &headers,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call(method, path, ADMIN, body).await
    }
}

/// A fixed-seed xorshift generator for the mutation tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The odd JSON values the mutations use.
pub fn wild_values() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(u64::MAX),
        json!(-0.000001),
        json!("NaN"),
        json!(""),
        json!("agent://a/b/c"),
        json!("ü🦀\u{0}x"),
        json!([1, "x", null]),
        json!({"nested": {"deep": [1, 2, 3]}}),
        json!("x".repeat(300)),
    ]
}

/// An odd JSON value.
pub fn wild(rng: &mut Rng) -> Value {
    let mut all = wild_values();
    let i = rng.below(all.len());
    all.swap_remove(i)
}

/// Every member and element of `v` (at any depth), as a JSON pointer.
pub fn pointers(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let walk = |base: &str, child: &Value, out: &mut Vec<String>| {
        out.push(base.to_owned());
        for p in pointers(child) {
            out.push(format!("{base}{p}"));
        }
    };
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                walk(&format!("/{k}"), child, &mut out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(&format!("/{i}"), child, &mut out);
            }
        }
        _ => {}
    }
    out
}

/// Mutate a JSON value: replace, delete or add members, recursively.
pub fn mutate(v: &Value, rng: &mut Rng, depth: usize) -> Value {
    if depth > 3 || rng.below(5) == 0 {
        return wild(rng);
    }
    match v {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, val) in map {
                match rng.below(6) {
                    0 => {} // drop it
                    1 => {
                        out.insert(k.clone(), wild(rng));
                    }
                    _ => {
                        out.insert(k.clone(), mutate(val, rng, depth + 1));
                    }
                }
            }
            if rng.below(4) == 0 {
                out.insert(format!("extra{}", rng.below(9)), wild(rng));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| mutate(i, rng, depth + 1)).collect())
        }
        _ if rng.below(2) == 0 => wild(rng),
        other => other.clone(),
    }
}

/// A mutation of `template` and the bytes to send for it: its JSON, or one
/// time in ten the first half of it (truncated, not JSON).
pub fn mutated_body(template: &Value, rng: &mut Rng) -> (Value, Vec<u8>) {
    let body = mutate(template, rng, 0);
    let bytes = if rng.below(10) == 0 {
        let text = body.to_string();
        text.as_bytes()[..text.len() / 2].to_vec()
    } else {
        serde_json::to_vec(&body).unwrap_or_default()
    };
    (body, bytes)
}

impl Server {
    /// POST raw bytes as JSON with a bearer key.
    pub async fn post_json_bytes(&self, path: &str, key: &str, bytes: Vec<u8>) -> Reply {
        let auth = format!("Bearer {key}");
        self.raw(
            Method::POST,
            path,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(bytes),
        )
        .await
    }
}
