//! Scale-out: real `sluice serve` replicas sharing one Redis (limits) and
//! one PostgreSQL (policies, keys, ledger). Each test has its own Redis key
//! prefix and its own PostgreSQL database, so tests run in parallel. Skipped,
//! with a notice, unless SLUICE_TEST_REDIS_URL and SLUICE_TEST_DATABASE_URL
//! are set (`.ci/run` sets both and fails if the servers are unreachable).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Serve, TempDir};

const ADMIN: &str = "scaleout-admin-key-0123456789";

struct Services {
    redis: String,
    postgres: String,
}

fn services(test: &str) -> Option<Services> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("SLUICE_TEST_REDIS_URL"),
        get("SLUICE_TEST_DATABASE_URL"),
    ) {
        (Some(redis), Some(postgres)) => Some(Services { redis, postgres }),
        _ => {
            eprintln!(
                "NOTICE: SLUICE_TEST_REDIS_URL and SLUICE_TEST_DATABASE_URL are not both set; skipping {test}"
            );
            None
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A database of its own on the test server, dropped at the end.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique(test: &str) -> String {
    format!(
        "{test}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl Database {
    fn create(admin_url: &str, test: &str) -> Database {
        let name = format!("sluice_test_{}", unique(test));
        let rt = rt();
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(admin_url).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        });
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Database {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Run a query returning one i64.
    fn scalar(&self, sql: &str) -> i64 {
        rt().block_on(async {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let v: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            v
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        rt().block_on(async move {
            if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        });
    }
}

/// A replica's directory and config.
fn replica_dir(redis: &str, prefix: &str, db: &str, extra: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new("scaleout");
    let config = dir.0.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "lease_check_ms = 100\n{extra}\n[store]\nkind = \"redis\"\nurl = \"{redis}\"\nkey_prefix = \"{prefix}\"\n\n[database]\nurl = \"{db}\"\n"
        ),
    )
    .unwrap();
    (dir, config)
}

fn start(dir: &Path, config: &Path) -> Serve {
    Serve::start(
        dir,
        &["--data-dir", "data", "--config", config.to_str().unwrap()],
        &[("SLUICE_ADMIN_KEY", ADMIN)],
    )
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http.request(method, url).bearer_auth(ADMIN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

/// `POST /v1/check` for one subject, as the admin.
async fn check_subject(http: &reqwest::Client, url: &str, subject: &str) -> (u16, Value) {
    send(
        http,
        reqwest::Method::POST,
        &format!("{url}/v1/check"),
        Some(json!({ "subjects": [subject] })),
    )
    .await
}

/// Ask `f` every 25 ms, at most `tries` times, until it answers `Some`.
async fn poll<T, F, Fut>(tries: usize, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..tries {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Whether the replica at `url` has a policy for `subject`.
async fn has_policy(http: &reqwest::Client, url: &str, subject: &str) -> bool {
    send(
        http,
        reqwest::Method::GET,
        &format!("{url}/v1/policies/{subject}"),
        None,
    )
    .await
    .0 == 200
}

/// One value from a replica's `/metrics`.
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

fn cleanup_redis(redis: &str, prefix: &str) {
    let _ = Command::new("redis-cli")
        .args(["-u", redis, "--scan", "--pattern", &format!("{prefix}*")])
        .output()
        .map(|out| {
            let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            if !keys.is_empty() {
                let _ = Command::new("redis-cli")
                    .args(["-u", redis, "del"])
                    .args(&keys)
                    .output();
            }
        });
}

/// `job(i)` for every `i` below `n`, `conc` at a time.
async fn spread<F, Fut>(n: u64, conc: usize, job: F)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (job, next) = (job.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                job(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// `n` checks of `subjects`, `conc` at a time, round-robin over `urls`
/// (any answer but 200 or 429 fails the test); how many were admitted.
async fn checks(
    http: &reqwest::Client,
    urls: &[String],
    subjects: Value,
    n: u64,
    conc: usize,
) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let (http, urls, count) = (http.clone(), urls.to_vec(), admitted.clone());
    spread(n, conc, move |i| {
        let (http, subjects, count) = (http.clone(), subjects.clone(), count.clone());
        let url = urls[(i % urls.len() as u64) as usize].clone();
        async move {
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{url}/v1/check"),
                Some(json!({ "subjects": subjects })),
            )
            .await;
            match status {
                200 => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                429 => {}
                other => panic!("check answered {other}: {body}"),
            }
        }
    })
    .await;
    admitted.load(Ordering::Relaxed)
}

/// `n` reservations of $0.02 on `subjects`, `conc` at a time, round-robin
/// over `urls`, each committed through the next replica at what it "really"
/// cost (0 to the held amount); the µ$ committed.
async fn reservations(
    http: &reqwest::Client,
    urls: &[String],
    subjects: Value,
    n: u64,
    conc: usize,
) -> u64 {
    let committed = Arc::new(AtomicU64::new(0));
    let (http, urls, total) = (http.clone(), urls.to_vec(), committed.clone());
    spread(n, conc, move |i| {
        let (http, subjects, total) = (http.clone(), subjects.clone(), total.clone());
        let r = urls.len() as u64;
        let url = urls[(i % r) as usize].clone();
        // Settled through another replica than the one that reserved.
        let other = urls[((i + 1) % r) as usize].clone();
        async move {
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{url}/v1/reserve"),
                Some(json!({"subjects": subjects, "amounts": {"cost_usd": 0.02}})),
            )
            .await;
            if status == 429 {
                return;
            }
            assert_eq!(status, 200, "{body}");
            let id = body["reservation_id"].as_str().unwrap().to_owned();
            let actual_micros = (i * 7_919) % 20_001;
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{other}/v1/reservations/{id}/commit"),
                Some(json!({"amounts": {"cost_usd": actual_micros as f64 / 1e6}})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            total.fetch_add(actual_micros, Ordering::Relaxed);
        }
    })
    .await;
    committed.load(Ordering::Relaxed)
}

/// Stop the replicas (flushing their ledgers), then add the ledger up: the
/// checks admitted for `user:alice` and the µ$ committed on `team:budget`.
fn stop_and_add_up(replicas: Vec<Serve>, db: &Database, alice_checks: i64, committed_micros: u64) {
    for r in replicas {
        let (status, _) = r.terminate();
        assert!(status.success());
    }
    let ledger_requests = db.scalar(
        "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM ledger WHERE kind = 'check' AND subjects LIKE '%user:alice%'",
    );
    assert_eq!(ledger_requests, alice_checks);
    let ledger_cost = db.scalar(
        "SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM ledger WHERE kind = 'commit' AND subjects LIKE '%team:budget%'",
    );
    assert_eq!(ledger_cost as u64, committed_micros);
}

/// Three replicas, one Redis, one PostgreSQL: 2,000 concurrent checks spread
/// across them against 200 per hour admit exactly 200; concurrent
/// reservations against a $2 daily budget never overspend it; the ledger in
/// PostgreSQL adds up to the usage Redis reports.
#[test]
fn three_replicas_share_exact_limits() {
    let Some(svc) = services("three_replicas_share_exact_limits") else {
        return;
    };
    let db = Database::create(&svc.postgres, "three");
    let prefix = format!("sluice-test:{}:", unique("three"));
    let dirs: Vec<(TempDir, PathBuf)> = (0..3)
        .map(|_| replica_dir(&svc.redis, &prefix, &db.url, ""))
        .collect();
    let first = start(&dirs[0].0.0, &dirs[0].1);
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        for (subject, limit) in [
            (
                "user:alice",
                json!({"metric": "requests", "limit": 200, "window": "1h"}),
            ),
            (
                "team:budget",
                json!({"metric": "cost_usd", "limit": 2.0, "window": "day"}),
            ),
        ] {
            let (status, body) = send(
                &http,
                reqwest::Method::PUT,
                &format!("{}/v1/policies/{subject}", first.url),
                Some(json!({ "limits": [limit], "alert_at": [0.25, 0.5] })),
            )
            .await;
            assert!(status < 300, "{status} {body}");
        }
    });
    let replicas = vec![
        first,
        start(&dirs[1].0.0, &dirs[1].1),
        start(&dirs[2].0.0, &dirs[2].1),
    ];
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let (admitted, committed_micros) = rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        // 2,000 checks, 64 at a time, round-robin over the replicas.
        let admitted = checks(&http, &urls, json!(["user:alice"]), 2_000, 64).await;
        // 300 reservations of up to $0.02 each against $2/day.
        let committed = reservations(&http, &urls, json!(["team:budget"]), 300, 32).await;
        (admitted, committed)
    });
    assert_eq!(
        admitted, 200,
        "exactly the limit is admitted across replicas"
    );
    assert!(
        committed_micros <= 2_000_000,
        "the budget was overspent: {committed_micros} µ$"
    );
    // Usage as Redis reports it, through any replica.
    let (alice, budget) = rt.block_on(async {
        let http = reqwest::Client::new();
        let (_, a) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/usage/user:alice", urls[2]),
            None,
        )
        .await;
        let (_, b) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/usage/team:budget", urls[1]),
            None,
        )
        .await;
        (a, b)
    });
    assert_eq!(alice["limits"][0]["used"], json!(200), "{alice}");
    // Every replica saw the budget cross 25% and 50%: raised once each.
    let budget_alerts = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut n = 0;
        for _ in 0..100 {
            let (_, list) = send(
                &http,
                reqwest::Method::GET,
                &format!("{}/v1/alerts", urls[0]),
                None,
            )
            .await;
            n = list["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["subject"] == "team:budget")
                .count();
            if n >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    });
    assert_eq!(budget_alerts, 2, "one alert per threshold across replicas");
    let used_usd = budget["limits"][0]["used"].as_f64().unwrap();
    assert_eq!(
        (used_usd * 1e6).round() as u64,
        committed_micros,
        "{budget}"
    );
    stop_and_add_up(replicas, &db, 200, committed_micros);
    cleanup_redis(&svc.redis, &prefix);
}

/// A policy changed through one replica is enforced by another without a
/// restart (PostgreSQL NOTIFY); so are a new key and the kill switch. The
/// delay is printed, not asserted.
#[test]
fn policy_change_reaches_other_replicas() {
    let Some(svc) = services("policy_change_reaches_other_replicas") else {
        return;
    };
    let db = Database::create(&svc.postgres, "policy");
    let prefix = format!("sluice-test:{}:", unique("policy"));
    let (da, ca) = replica_dir(&svc.redis, &prefix, &db.url, "");
    let (dbb, cb) = replica_dir(&svc.redis, &prefix, &db.url, "");
    let a = start(&da.0, &ca);
    let b = start(&dbb.0, &cb);
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let check = |url: String| {
            let http = http.clone();
            async move { check_subject(&http, &url, "session:s1").await.0 }
        };
        // No policy yet: B admits freely.
        for _ in 0..3 {
            assert_eq!(check(b.url.clone()).await, 200);
        }
        let (status, _) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{}/v1/policies/session:s1", a.url),
            Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}]})),
        )
        .await;
        assert_eq!(status, 201);
        #[allow(
            clippy::disallowed_methods,
            reason = "reports the propagation delay; nothing asserts on it"
        )]
        let clock = std::time::Instant::now();
        // Bounded wait: B refuses once it knows the policy (3 used > 1).
        let refused = poll(200, || async { (check(b.url.clone()).await == 429).then_some(()) }).await;
        assert!(
            refused.is_some(),
            "replica B never enforced the policy set through A"
        );
        eprintln!(
            "policy in force on the other replica after {:?}",
            clock.elapsed()
        );
        // A new agent key made on A authenticates on B.
        let (status, key) = send(
            &http,
            reqwest::Method::POST,
            &format!("{}/v1/keys", a.url),
            Some(json!({"subject": "agent://acme/prod/x", "name": "x"})),
        )
        .await;
        assert_eq!(status, 201, "{key}");
        let secret = key["key"].as_str().unwrap().to_owned();
        let ok = poll(200, || async {
            let s = http
                .post(format!("{}/v1/check", b.url))
                .bearer_auth(&secret)
                .json(&json!({"subjects": ["agent://acme/prod/x"]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            (s == 200).then_some(())
        })
        .await;
        assert!(ok.is_some(), "a key made on A never authenticated on B");
        // The kill switch flipped on A stops the agent on B.
        let (status, body) = send(
            &http,
            reqwest::Method::POST,
            &format!("{}/v1/mesh/agents/agent://acme/prod/x/kill", a.url),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let stopped = poll(200, || async {
            let (status, _) = check_subject(&http, &b.url, "agent://acme/prod/x").await;
            (status == 403).then_some(())
        })
        .await;
        assert!(
            stopped.is_some(),
            "an agent killed through A still passed on B"
        );
        // One audit trail: B reads what was done through A, in order.
        let (status, trail) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/audit?kind=agent&limit=10", b.url),
            None,
        )
        .await;
        assert_eq!(status, 200, "{trail}");
        assert_eq!(trail["records"][0]["kind"], "agent.killed", "{trail}");
        let (_, trail) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/audit?subject=session:s1", b.url),
            None,
        )
        .await;
        assert_eq!(trail["records"][0]["kind"], "policy.created", "{trail}");
        // The alert action on Redis: past the limit, let through and counted;
        // a reservation made on A and committed on B charges the actual.
        let (status, _) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{}/v1/policies/user:loud", a.url),
            Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}], "action_on_breach": "alert"})),
        )
        .await;
        assert_eq!(status, 201);
        for _ in 0..3 {
            let (status, body) = check_subject(&http, &a.url, "user:loud").await;
            assert_eq!(status, 200, "{body}");
        }
        let (status, held) = send(
            &http,
            reqwest::Method::POST,
            &format!("{}/v1/reserve", a.url),
            Some(json!({"subjects": ["user:loud"], "amounts": {"requests": 5}})),
        )
        .await;
        assert_eq!(status, 200, "{held}");
        let id = held["reservation_id"].as_str().unwrap();
        // B charges by its own copy of the policy: wait (bounded) until it has it.
        poll(200, || async {
            has_policy(&http, &b.url, "user:loud").await.then_some(())
        })
        .await;
        let (status, body) = send(
            &http,
            reqwest::Method::POST,
            &format!("{}/v1/reservations/{id}/commit", b.url),
            Some(json!({"amounts": {"requests": 2}})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let (_, usage) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/usage/user:loud", b.url),
            None,
        )
        .await;
        assert_eq!(usage["limits"][0]["used"], 5, "3 checks and the actual 2: {usage}");

        // require_approval across replicas: a request held on B is released
        // by an approval given through A, and B enforces A's override.
        let (status, _) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{}/v1/policies/user:careful", a.url),
            Some(json!({"limits": [{"metric": "requests", "limit": 1, "window": "1h"}],
                        "action_on_breach": "require_approval", "approval_wait": "30s"})),
        )
        .await;
        assert_eq!(status, 201);
        let careful = |url: String| {
            let http = http.clone();
            async move {
                check_subject(&http, &url, "user:careful").await
            }
        };
        // Once B has the policy, it takes the first request.
        let known = poll(200, || async {
            has_policy(&http, &b.url, "user:careful").await.then_some(())
        })
        .await;
        let first_ok = known.is_some() && careful(b.url.clone()).await.0 == 200;
        assert!(first_ok, "B never took the first request under its policy");
        let held = tokio::spawn(careful(b.url.clone()));
        let id = poll(400, || async {
            let (_, list) = send(
                &http,
                reqwest::Method::GET,
                &format!("{}/v1/approvals?status=pending&subject=user:careful", a.url),
                None,
            )
            .await;
            list["approvals"][0]["id"].as_str().map(str::to_owned)
        })
        .await
        .unwrap_or_default();
        assert!(!id.is_empty(), "A never saw the approval opened on B");
        let (status, body) = send(
            &http,
            reqwest::Method::POST,
            &format!("{}/v1/approvals/{id}/approve", a.url),
            Some(json!({"extra": {"requests": 2}})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = held.await.unwrap();
        assert_eq!(status, 200, "the request held on B: {body}");
        // 1 + 2 extra: one more passes on B, then B holds again.
        assert_eq!(careful(b.url.clone()).await.0, 200);
        let (_, usage) = send(
            &http,
            reqwest::Method::GET,
            &format!("{}/v1/usage/user:careful", b.url),
            None,
        )
        .await;
        assert_eq!(usage["limits"][0]["limit"], 3, "{usage}");
        assert_eq!(usage["limits"][0]["used"], 3, "{usage}");
    });
    drop((a, b));
    cleanup_redis(&svc.redis, &prefix);
}

/// A replica killed with SIGKILL while holding reservations leaks nothing:
/// their leases run out in Redis, another replica settles them (one `expire`
/// ledger row each, at the held amounts) and the limit stays exact.
#[test]
fn killed_replica_leases_expire_and_settle() {
    let Some(svc) = services("killed_replica_leases_expire_and_settle") else {
        return;
    };
    let db = Database::create(&svc.postgres, "killed");
    let prefix = format!("sluice-test:{}:", unique("killed"));
    // Every row durable before its answer: what a SIGKILL can lose is then nothing.
    let (da, ca) = replica_dir(&svc.redis, &prefix, &db.url, "ledger_sync = \"always\"");
    let (dbb, cb) = replica_dir(&svc.redis, &prefix, &db.url, "");
    let a = start(&da.0, &ca);
    let b = start(&dbb.0, &cb);
    let rt = rt();
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (status, _) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{a_url}/v1/policies/key:shared"),
            Some(json!({"limits": [{"metric": "requests", "limit": 10, "window": "1h"}]})),
        )
        .await;
        assert_eq!(status, 201);
        for _ in 0..4 {
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{a_url}/v1/reserve"),
                Some(json!({"subjects": ["key:shared"], "lease_s": 1.5})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    });
    a.kill9();
    rt.block_on(async {
        let http = reqwest::Client::new();
        // Bounded wait for B's expiry pass to settle A's leases.
        let mut outstanding = u64::MAX;
        for _ in 0..100 {
            outstanding = metric(&http, &b_url, "sluice_reservations_outstanding")
                .await
                .map_or(u64::MAX, |v| v as u64);
            if outstanding == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            outstanding, 0,
            "the killed replica's leases were never settled"
        );
        // Held amounts count as spent: 6 of 10 left, exactly.
        let mut admitted = 0;
        for _ in 0..10 {
            let (status, _) = check_subject(&http, &b_url, "key:shared").await;
            if status == 200 {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 6);
    });
    let (status, _) = b.terminate();
    assert!(status.success());
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'expire'"),
        4
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'reserve'"),
        4
    );
    cleanup_redis(&svc.redis, &prefix);
}

/// A private Redis on a free port, for tests that stop it.
struct PrivateRedis {
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (needed for this test) did not start");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis { child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Redis stopped and restarted under load: `deny` answers 503 while it is
/// down, `local` decides on the replica alone at limit ÷ replicas; both
/// resume shared decisions by themselves when it is back; nothing panics.
#[test]
fn redis_outage_follows_on_store_error() {
    let Some(svc) = services("redis_outage_follows_on_store_error") else {
        return;
    };
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "NOTICE: redis-server not installed; skipping redis_outage_follows_on_store_error"
        );
        return;
    }
    let db = Database::create(&svc.postgres, "outage");
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = "sluice-test:outage:";
    let (dd, cd) = replica_dir(&url, prefix, &db.url, "");
    let (dl, cl) = {
        let dir = TempDir::new("scaleout");
        let config = dir.0.join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\non_store_error = \"local\"\nreplicas = 2\ntimeout_ms = 200\n\n[database]\nurl = \"{}\"\n",
                db.url
            ),
        )
        .unwrap();
        (dir, config)
    };
    let deny = start(&dd.0, &cd);
    let local = start(&dl.0, &cl);
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (status, _) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{}/v1/policies/user:bob", deny.url),
            Some(json!({"limits": [{"metric": "requests", "limit": 10, "window": "1h"}]})),
        )
        .await;
        assert_eq!(status, 201);
        // Let the local replica learn the policy.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let check = |url: String| {
            let http = http.clone();
            async move { check_subject(&http, &url, "user:bob").await }
        };
        assert_eq!(check(deny.url.clone()).await.0, 200);
        assert_eq!(check(local.url.clone()).await.0, 200);
        redis.stop();
        let (status, body) = check(deny.url.clone()).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["type"], "store_unavailable");
        // local: 10 ÷ 2 replicas = 5 on this replica alone, then refused.
        let mut local_ok = 0;
        for _ in 0..8 {
            let (status, body) = check(local.url.clone()).await;
            match status {
                200 => local_ok += 1,
                429 => {}
                other => panic!("local fallback answered {other}: {body}"),
            }
        }
        assert_eq!(local_ok, 5);
        let denied = metric(&http, &deny.url, "sluice_store_denied_total").await;
        assert!(denied.is_some_and(|n| n > 0.0), "{denied:?}");
        // Back (empty: this Redis keeps nothing on disk): shared decisions
        // resume without a restart.
        let _redis = PrivateRedis::start(port);
        let mut resumed = false;
        for _ in 0..100 {
            if check(deny.url.clone()).await.0 == 200 {
                resumed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(resumed, "decisions never resumed after Redis came back");
        std::mem::forget(_redis); // stopped below, after the replicas
    });
    for r in [deny, local] {
        let (status, _) = r.terminate();
        assert!(status.success(), "a replica exited badly after the outage");
    }
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .output();
}

/// A TCP relay to a server that the test can cut and restore: while cut,
/// open connections are dropped and new ones closed at once (what a replica
/// sees when the database's host goes away).
struct Relay {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
    _rt: tokio::runtime::Runtime,
}

impl Relay {
    fn start(target: String) -> Relay {
        let rt = rt();
        let (up, rx) = tokio::sync::watch::channel(true);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !*rx.borrow() {
                    continue; // dropped: closed at once
                }
                let (mut rx, target) = (rx.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { port, up, _rt: rt }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// `postgres://USER@HOST:PORT/DB?...` -> (`HOST:PORT`, the URL through 127.0.0.1:`port`).
fn through_relay(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let target = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    (target, format!("{scheme}://{auth}127.0.0.1:{port}/{path}"))
}

/// PostgreSQL unreachable: decisions go on from Redis; ledger rows wait in
/// memory and are all written, exactly once, when it is back; admin writes
/// answer a JSON 5xx meanwhile; nothing panics.
#[test]
fn postgres_outage_queues_the_ledger() {
    let Some(svc) = services("postgres_outage_queues_the_ledger") else {
        return;
    };
    let db = Database::create(&svc.postgres, "pgdown");
    let prefix = format!("sluice-test:{}:", unique("pgdown"));
    let (target, _) = through_relay(&db.url, 0);
    let relay = Relay::start(target);
    let (_, relayed) = through_relay(&db.url, relay.port);
    let (dir, config) = replica_dir(&svc.redis, &prefix, &relayed, "");
    let replica = start(&dir.0, &config);
    let url = replica.url.clone();
    let rt = rt();
    let http = reqwest::Client::new();
    let check = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            for _ in 0..n {
                let (status, body) = check_subject(&http, &url, "key:pgdown").await;
                assert_eq!(status, 200, "{body}");
            }
        }
    };
    let ledger_rows = || db.scalar("SELECT COUNT(*) FROM ledger");
    let wait_rows = |n: i64| {
        // Bounded: the writer retries at most 5 s apart.
        for _ in 0..300 {
            if ledger_rows() >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ledger_rows()
    };
    rt.block_on(async {
        let (status, body) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{url}/v1/policies/key:pgdown"),
            Some(json!({"limits": [{"metric": "requests", "limit": 1000, "window": "1h"}]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        check(10).await;
    });
    assert_eq!(wait_rows(10), 10);

    relay.cut();
    let pending = rt.block_on(async {
        check(20).await;
        for _ in 0..2 {
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{url}/v1/reserve"),
                Some(json!({"subjects": ["key:pgdown"], "amounts": {"requests": 3}})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let id = body["reservation_id"].as_str().unwrap().to_owned();
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{url}/v1/reservations/{id}/commit"),
                Some(json!({"amounts": {"requests": 2}})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        // A policy write needs the database: a clear JSON error, in bounded time.
        let (status, body) = send(
            &http,
            reqwest::Method::PUT,
            &format!("{url}/v1/policies/key:other"),
            Some(json!({"limits": [{"metric": "requests", "limit": 5, "window": "1h"}]})),
        )
        .await;
        assert!(status >= 500, "{status} {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        metric(&http, &url, "sluice_ledger_pending_rows")
            .await
            .unwrap()
    });
    assert!(
        pending >= 24.0,
        "the rows made while PostgreSQL was away wait in memory: {pending}"
    );
    assert_eq!(ledger_rows(), 10, "nothing reached PostgreSQL while cut");

    relay.restore();
    // 20 checks, 2 reserves, 2 commits: each written once.
    assert_eq!(wait_rows(34), 34);
    let used = rt.block_on(async {
        let (_, usage) = send(
            &http,
            reqwest::Method::GET,
            &format!("{url}/v1/usage/key:pgdown"),
            None,
        )
        .await;
        usage["limits"][0]["used"].as_u64().unwrap()
    });
    assert_eq!(used, 34, "10 + 20 checks and 2 commits of 2");
    let (status, _) = replica.terminate();
    assert!(status.success());
    assert_eq!(ledger_rows(), 34);
    assert_eq!(
        db.scalar(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM ledger WHERE kind IN ('check', 'commit')"
        ),
        34
    );
    cleanup_redis(&svc.redis, &prefix);
}

/// Three replicas on a Redis Cluster (three nodes the test starts): checks
/// naming two subjects on different nodes admit exactly the tighter limit
/// and leave the other's count exact (its holds rolled back slot by slot);
/// reservations across slots, settled through other replicas, never
/// overspend; leases held by a replica killed with SIGKILL expire and are
/// written to the ledger once; the ledger adds up to what the cluster counts.
#[test]
fn three_replicas_on_a_redis_cluster_share_exact_limits() {
    let test = "three_replicas_on_a_redis_cluster_share_exact_limits";
    let Some(svc) = services(test) else { return };
    if !sluice_test_support::redis_cluster::cluster_tests_enabled(test) {
        return;
    }
    let cluster = sluice_test_support::redis_cluster::RedisCluster::start(3);
    let db = Database::create(&svc.postgres, "cluster");
    let prefix = format!("sluice-test:{}:", unique("cluster"));
    let node = |s: &str| cluster.keyslot(&format!("{prefix}{{{s}}}")) / 5462;
    let other_node = |of: &str, kind: &str| {
        (0..200)
            .map(|i| format!("{kind}:c{i}"))
            .find(|s| node(s) != node(of))
            .unwrap()
    };
    let team = other_node("user:alice", "team");
    let bob = other_node("team:budget", "user");
    let dirs: Vec<(TempDir, PathBuf)> = (0..3)
        .map(|i| {
            let extra = if i == 0 {
                "ledger_sync = \"always\""
            } else {
                ""
            };
            replica_dir(&cluster.urls(), &prefix, &db.url, extra)
        })
        .collect();
    let replicas: Vec<Serve> = dirs.iter().map(|(d, c)| start(&d.0, c)).collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let rt = rt();
    let (admitted, committed_micros) = rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        for (subject, limit) in [
            (
                "user:alice",
                json!({"metric": "requests", "limit": 200, "window": "1h"}),
            ),
            (
                team.as_str(),
                json!({"metric": "requests", "limit": 150, "window": "1h"}),
            ),
            (
                "team:budget",
                json!({"metric": "cost_usd", "limit": 2.0, "window": "day"}),
            ),
            (
                bob.as_str(),
                json!({"metric": "cost_usd", "limit": 100.0, "window": "day"}),
            ),
        ] {
            let (status, body) = send(
                &http,
                reqwest::Method::PUT,
                &format!("{}/v1/policies/{subject}", urls[0]),
                Some(json!({ "limits": [limit] })),
            )
            .await;
            assert!(status < 300, "{status} {body}");
        }
        for (url, subject) in urls.iter().zip(["team:budget", "user:alice", bob.as_str()]) {
            let (url, subject, http) = (url.clone(), subject.to_owned(), http.clone());
            let seen = poll(200, || {
                let (url, subject, http) = (url.clone(), subject.clone(), http.clone());
                async move { has_policy(&http, &url, &subject).await.then_some(()) }
            })
            .await;
            assert!(seen.is_some(), "{subject} never reached {url}");
        }
        // 1,000 checks of [alice, team], 64 at a time, over the replicas.
        let admitted = checks(&http, &urls, json!(["user:alice", team]), 1_000, 64).await;
        // 200 reservations of $0.02 on [team:budget, bob] against $2/day.
        let committed = reservations(&http, &urls, json!(["team:budget", bob]), 200, 32).await;
        (admitted, committed)
    });
    assert_eq!(admitted, 150, "exactly the tighter limit is admitted");
    assert!(
        committed_micros <= 2_000_000,
        "overspent: {committed_micros} µ$"
    );
    let usage = |url: &str, subject: &str| {
        rt.block_on(async {
            let http = reqwest::Client::new();
            let (_, v) = send(
                &http,
                reqwest::Method::GET,
                &format!("{url}/v1/usage/{subject}"),
                None,
            )
            .await;
            v["limits"][0]["used"].clone()
        })
    };
    assert_eq!(
        usage(&urls[1], "user:alice"),
        json!(150),
        "alice's refused holds rolled back"
    );
    assert_eq!(usage(&urls[2], &team), json!(150));
    let budget = usage(&urls[0], "team:budget").as_f64().unwrap();
    assert_eq!((budget * 1e6).round() as u64, committed_micros);
    let bob_used = usage(&urls[0], &bob).as_f64().unwrap();
    assert_eq!((bob_used * 1e6).round() as u64, committed_micros);
    // A replica killed holding two reservations across slots: the others'
    // expiry pass settles them at their held amounts.
    let mut replicas = replicas;
    let killed = replicas.remove(0);
    rt.block_on(async {
        let http = reqwest::Client::new();
        for _ in 0..2 {
            let (status, body) = send(
                &http,
                reqwest::Method::POST,
                &format!("{}/v1/reserve", killed.url),
                Some(json!({"subjects": [bob, "user:alice"], "amounts": {"cost_usd": 0.5}, "lease_s": 1.0})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    });
    killed.kill9();
    let outstanding = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut outstanding = u64::MAX;
        for _ in 0..150 {
            outstanding = metric(&http, &urls[1], "sluice_reservations_outstanding")
                .await
                .map_or(u64::MAX, |v| v as u64);
            if outstanding == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        outstanding
    });
    assert_eq!(
        outstanding, 0,
        "the killed replica's leases were never settled"
    );
    let bob_used = usage(&urls[1], &bob).as_f64().unwrap();
    assert_eq!(
        (bob_used * 1e6).round() as u64,
        committed_micros + 1_000_000
    );
    stop_and_add_up(replicas, &db, 150, committed_micros);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'expire'"),
        2,
        "each expired lease written once"
    );
}
