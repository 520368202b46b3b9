//! `rediss://`: a Redis speaking only TLS, with a certificate from a private
//! CA made for the test (openssl). Trusting that CA, decisions work; with
//! the default roots the connection is refused (the certificate is
//! verified). Needs `redis-server` (built with TLS) and `openssl`; skipped,
//! with a notice, when SLUICE_TEST_REDIS_URL is not set (`.ci/run` sets it
//! where both exist).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Amounts, Decision, LimitDef, Policy, PolicyDef, Request, Subject};
use sluice_redis::{RedisConfig, RedisLimiter, RedisStore};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn rediss_with_a_private_ca() {
    if std::env::var("SLUICE_TEST_REDIS_URL").map_or(true, |u| u.is_empty()) {
        eprintln!("NOTICE: SLUICE_TEST_REDIS_URL is not set; skipping rediss_with_a_private_ca");
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    sluice_test_support::tls::certificates(&dir.0);
    let port = free_port();
    let _server = Server(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (needed for this test) did not start"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agent = Subject::parse("agent://tls/prod/bot").unwrap();
    let policy = Policy::new(&PolicyDef {
        limits: vec![LimitDef::new("requests", 3, "1h")],
        timezone: None,
    })
    .unwrap();
    let limiter = |tls_ca: Option<Vec<u8>>| {
        let store = RedisStore::open(
            &RedisConfig {
                url: format!("rediss://127.0.0.1:{port}"),
                cluster: false,
                tls_ca,
                key_prefix: "sluice-test:tls:".to_owned(),
                timeout: Duration::from_secs(5),
            },
            Arc::new(sluice_core::SystemClock),
        )
        .unwrap();
        let limiter = RedisLimiter::new(store, Duration::from_secs(60), Duration::from_secs(60));
        limiter.table().set_policy(&agent, policy.clone());
        limiter
    };
    let one = Request::new([agent.clone()], Amounts::one_request());
    rt.block_on(async {
        let ca = std::fs::read(dir.0.join("ca.crt")).unwrap();
        let trusted = limiter(Some(ca));
        let mut allowed = 0;
        for _ in 0..5 {
            if let Decision::Allowed(_) = trusted.check(&one).await.unwrap().value {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3, "decisions over TLS");
        // The default roots do not know the private CA: refused, not trusted blindly.
        let untrusted = limiter(None);
        let err = untrusted.check(&one).await.unwrap_err();
        assert!(
            err.to_string().to_lowercase().contains("certificate")
                || err.to_string().to_lowercase().contains("issuer"),
            "{err}"
        );
    });
}
