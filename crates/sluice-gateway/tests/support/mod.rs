//! An in-process gateway on 127.0.0.1:0 with a manual clock and its own data directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::Value;
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
        Server::start_with(
            dir,
            "",
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
