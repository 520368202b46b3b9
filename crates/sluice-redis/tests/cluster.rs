//! The Redis store on a Redis Cluster: a local 3-node cluster started by the
//! test (redis-server and redis-cli from PATH), the engine's conformance
//! suite against it (its multi-subject requests span slots on different
//! nodes), and the cases the slot-by-slot protocol adds: a refusal in a
//! later slot rolling back the earlier ones, leases across slots, a replica
//! that dies after recording a lease or half-way through a settle, and
//! settles racing the expiry pass. Skipped, with a notice, where
//! `SLUICE_TEST_REDIS_URL` is not set (no Redis on this machine).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sluice_core::{
    Amounts, Clock, Decision, LimitDef, Limiter, LimiterConfig, ManualClock, Metric, Policy,
    PolicyDef, Request, ReservationError, Subject, Timestamp, conformance,
};
use sluice_redis::{BlockingRedisStore, RedisConfig, RedisLimiter, RedisStore, Settled};
use sluice_test_support::redis_cluster::{RedisCluster, cluster_tests_enabled};

const CASES: u32 = 24;
const T0: u64 = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z

/// One cluster for every test of this binary (its servers stop when the
/// test process ends); each test uses its own key prefix.
fn cluster(test: &str) -> Option<&'static RedisCluster> {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    cluster_tests_enabled(test).then(|| CLUSTER.get_or_init(|| RedisCluster::start(3)))
}

fn config(c: &RedisCluster, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: c.urls(),
        cluster: true,
        tls_ca: None,
        key_prefix: prefix.to_owned(),
        timeout: Duration::from_secs(1),
    }
}

fn prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "sluice-test:cluster:{}:{test}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn factory(c: &'static RedisCluster, test: &'static str) -> impl Fn() -> BlockingRedisStore {
    move || BlockingRedisStore::open(&config(c, &prefix(test))).unwrap()
}

#[test]
fn conformance_sliding() {
    let Some(c) = cluster("conformance_sliding") else {
        return;
    };
    conformance::sliding_never_exceeds_and_retry_is_exact(CASES, &factory(c, "sliding"));
}

#[test]
fn conformance_gcra() {
    let Some(c) = cluster("conformance_gcra") else {
        return;
    };
    conformance::gcra_matches_reference(CASES, &factory(c, "gcra"));
}

#[test]
fn conformance_calendar() {
    let Some(c) = cluster("conformance_calendar") else {
        return;
    };
    conformance::calendar_windows_reset_exactly_at_boundaries(CASES, &factory(c, "calendar"));
}

#[test]
fn conformance_multi_limit_across_slots() {
    let Some(c) = cluster("conformance_multi_limit_across_slots") else {
        return;
    };
    // The suite's three subjects live on three different nodes.
    let nodes: std::collections::BTreeSet<u16> = ["agent://acme/prod/a", "user:u", "model:*"]
        .iter()
        .map(|s| c.keyslot(&format!("p{{{s}}}")) / 5462)
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "the suite's subjects should span the three nodes"
    );
    conformance::multi_limit_requests_are_all_or_nothing(CASES, &factory(c, "multi"));
}

#[test]
fn conformance_reservations() {
    let Some(c) = cluster("conformance_reservations") else {
        return;
    };
    conformance::reservations_conserve_amounts(CASES, &factory(c, "reservations"));
}

/// Three subjects whose keys live on the three different nodes.
fn spread_subjects(c: &RedisCluster, prefix: &str) -> Vec<Subject> {
    let mut by_node: HashMap<u16, Subject> = HashMap::new();
    for i in 0..200 {
        let s = Subject::parse(&format!("user:u{i}")).unwrap();
        let node = c.keyslot(&format!("{prefix}{{{s}}}")) / 5462;
        by_node.entry(node).or_insert(s);
        if by_node.len() == 3 {
            break;
        }
    }
    let mut v: Vec<(u16, Subject)> = by_node.into_iter().collect();
    v.sort_by_key(|(n, _)| *n);
    v.into_iter().map(|(_, s)| s).collect()
}

fn policy(limits: Vec<LimitDef>) -> Policy {
    Policy::new(&PolicyDef {
        limits,
        timezone: None,
    })
    .unwrap()
}

/// Marker keys (`...h:ID`) left anywhere in the cluster under `prefix`.
fn markers(c: &RedisCluster, prefix: &str) -> usize {
    c.ports
        .iter()
        .map(|p| {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .unwrap()
                .get_connection()
                .unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*h:*"))
                .query(&mut conn)
                .unwrap();
            keys.len()
        })
        .sum()
}

type Lim<'a> = Limiter<&'a ManualClock, BlockingRedisStore>;

fn limiter<'a>(clock: &'a ManualClock, c: &RedisCluster, prefix: &str) -> Lim<'a> {
    Limiter::new(
        clock,
        BlockingRedisStore::open(&config(c, prefix)).unwrap(),
        LimiterConfig {
            default_lease: Duration::from_secs(30),
            max_lease: Duration::from_secs(600),
        },
    )
}

fn used(l: &Lim<'_>, s: &Subject) -> Vec<u64> {
    l.usage(s).iter().map(|st| st.used).collect()
}

#[test]
fn a_refusal_in_a_later_slot_rolls_back_the_earlier_ones() {
    let Some(c) = cluster("rollback") else { return };
    let p = prefix("rollback");
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let l = limiter(&clock, c, &p);
    let s = spread_subjects(c, &p);
    for (i, subject) in s.iter().enumerate() {
        l.set_policy(
            subject,
            policy(vec![
                LimitDef::new("requests", 10, "1h"),
                LimitDef::new("tokens", 1_000 - 300 * i as u64, "1m").algorithm("gcra"),
                LimitDef::new("cost_usd", 5_000, "day"),
            ]),
        );
    }
    let amounts = |t: u64| {
        Amounts::ZERO
            .with(Metric::Requests, 1)
            .with_tokens(t, 0)
            .with_cost_micros(100)
    };
    // 500 tokens fit the first two subjects' buckets, not the third's (400):
    // both spends and reservations leave no trace.
    let request = Request::new(s.clone(), amounts(500));
    let Decision::Denied(d) = l.check(&request) else {
        panic!("the third subject should refuse")
    };
    assert_eq!(d.subject, 2, "the third subject refuses");
    assert!(l.reserve(&request, None).is_err());
    for subject in &s {
        assert_eq!(used(&l, subject), vec![0, 0, 0], "{subject}");
    }
    assert_eq!(l.outstanding(), 0);
    assert_eq!(markers(c, &p), 0);
    // What fits is taken on every slot, and a spend leaves no marker.
    assert!(l.check(&Request::new(s.clone(), amounts(100))).is_allowed());
    let r = l
        .reserve(&Request::new(s.clone(), amounts(300)), None)
        .unwrap();
    for subject in &s {
        assert_eq!(used(&l, subject), vec![2, 400, 200], "{subject}");
    }
    assert_eq!(l.outstanding(), 1);
    assert_eq!(markers(c, &p), 3);
    // Commit refunds on every slot; charging past a limit is reported in plan order.
    let settlement = l.commit(r.id, &amounts(50)).unwrap();
    assert!(settlement.overshoot.is_empty());
    for subject in &s {
        assert_eq!(used(&l, subject), vec![2, 150, 200], "{subject}");
    }
    let r = l
        .reserve(&Request::new(s.clone(), amounts(10)), None)
        .unwrap();
    let big = Amounts::ZERO
        .with(Metric::Requests, 1)
        .with_tokens(10, 0)
        .with_cost_micros(6_000_000_000);
    let settlement = l.commit(r.id, &big).unwrap();
    let over: Vec<&Subject> = settlement.overshoot.iter().map(|o| &o.subject).collect();
    assert_eq!(over, s.iter().collect::<Vec<_>>());
    assert_eq!(l.commit(r.id, &big), Err(ReservationError::Unknown(r.id)));
    assert_eq!(l.outstanding(), 0);
    assert_eq!(markers(c, &p), 0);
}

#[test]
fn leases_across_slots_expire_at_their_held_amounts() {
    let Some(c) = cluster("expiry") else { return };
    let p = prefix("expiry");
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let l = limiter(&clock, c, &p);
    let s = spread_subjects(c, &p);
    for subject in &s {
        l.set_policy(subject, policy(vec![LimitDef::new("tokens", 1_000, "1h")]));
    }
    let r = l
        .reserve(
            &Request::new(s.clone(), Amounts::ZERO.with_tokens(70, 0)),
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    clock.advance(Duration::from_secs(9));
    assert!(l.expire_leases().is_empty(), "not yet due");
    clock.advance(Duration::from_secs(2));
    let expired = l.expire_leases();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, r.id);
    let held: Vec<(&Subject, u64)> = expired[0]
        .held
        .iter()
        .map(|h| (&h.subject, h.amount))
        .collect();
    assert_eq!(held, s.iter().map(|x| (x, 70)).collect::<Vec<_>>());
    assert!(l.expire_leases().is_empty(), "reported once");
    for subject in &s {
        assert_eq!(used(&l, subject), vec![70], "expired at its held amount");
    }
    assert_eq!(
        l.commit(r.id, &Amounts::ZERO),
        Err(ReservationError::Unknown(r.id)),
        "the engine forgets a reservation settled by expiry"
    );
    assert_eq!(markers(c, &p), 0);
    // Settled late by its owner (before any pass): Expired, not counted twice.
    let r = l
        .reserve(
            &Request::new(s.clone(), Amounts::ZERO.with_tokens(5, 0)),
            Some(Duration::from_secs(1)),
        )
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(l.release(r.id), Err(ReservationError::Expired(r.id)));
    assert!(l.expire_leases().is_empty());
    for subject in &s {
        assert_eq!(used(&l, subject), vec![75]);
    }
    assert_eq!(l.outstanding(), 0);
    assert_eq!(markers(c, &p), 0);
    // A reservation naming no limited subject is still a reservation, as in
    // memory: committed, or expired and reported (holding nothing).
    let free = Request::new(
        [Subject::parse("user:no-policy").unwrap()],
        Amounts::ZERO.with_tokens(5, 0),
    );
    let r = l.reserve(&free, Some(Duration::from_secs(1))).unwrap();
    assert!(l.commit(r.id, &Amounts::ZERO).is_ok());
    let r = l.reserve(&free, Some(Duration::from_secs(1))).unwrap();
    clock.advance(Duration::from_secs(2));
    let expired = l.expire_leases();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, r.id);
    assert!(expired[0].held.is_empty());
    assert_eq!(l.outstanding(), 0);
}

/// The script, called directly: what a replica that dies half-way leaves.
fn raw(
    c: &RedisCluster,
    p: &str,
    shard: u64,
    op: &str,
    clock: &ManualClock,
    args: &[String],
) -> redis::Value {
    let client =
        redis::cluster::ClusterClient::new(vec![c.urls().split(',').next().unwrap().to_owned()])
            .unwrap();
    let mut conn = client.get_connection().unwrap();
    let script = redis::Script::new(include_str!("../src/limits.lua"));
    let mut inv = script.prepare_invoke();
    for k in ["leases", "lease_expiries", "lease_seq", "expired"] {
        inv.key(format!("{p}{{leases:{shard}}}{k}"));
    }
    let now = clock.now().as_nanos();
    inv.arg(op)
        .arg(format!("{} {}", now / 1_000_000_000, now % 1_000_000_000));
    for a in args {
        inv.arg(a);
    }
    inv.invoke(&mut conn).unwrap()
}

#[test]
fn a_replica_that_dies_half_way_leaks_nothing_and_counts_nothing_twice() {
    let Some(c) = cluster("dies") else { return };
    let p = prefix("dies");
    let clock = ManualClock::new(Timestamp::from_nanos(T0));
    let l = limiter(&clock, c, &p);
    let s = spread_subjects(c, &p);
    for subject in &s {
        l.set_policy(subject, policy(vec![LimitDef::new("tokens", 1_000, "1h")]));
    }
    // Died after recording a lease, before holding anything: the pass
    // drops the record and reports nothing.
    let keys: Vec<String> = s.iter().map(|x| format!("{p}{{{x}}}")).collect();
    let mut args = vec![
        "5000000000".to_owned(),
        String::new(),
        "m".to_owned(),
        "3".to_owned(),
        "16".to_owned(),
        "1000000000".to_owned(),
    ];
    args.extend(keys.iter().cloned());
    raw(c, &p, 3, "c_open", &clock, &args);
    assert_eq!(l.outstanding(), 1);
    clock.advance(Duration::from_secs(6));
    assert!(l.expire_leases().is_empty());
    assert_eq!(l.outstanding(), 0);

    // Died half-way through a settle (its claim taken, slots not settled):
    // another settle is turned away while the claim lasts, the expiry pass
    // waits for the claim to run out, then settles every slot at its held
    // amount, once.
    let r = l
        .reserve(
            &Request::new(s.clone(), Amounts::ZERO.with_tokens(40, 0)),
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    let shard = r.id.0 % 16;
    raw(
        c,
        &p,
        shard,
        "c_claim",
        &clock,
        &[
            r.id.0.to_string(),
            String::new(),
            "dead".to_owned(),
            "30000000000".to_owned(),
        ],
    );
    assert_eq!(
        l.commit(r.id, &Amounts::ZERO),
        Err(ReservationError::Unknown(r.id))
    );
    clock.advance(Duration::from_secs(10)); // lease over, claim not
    assert!(l.expire_leases().is_empty(), "the claim still holds it");
    clock.advance(Duration::from_secs(25)); // claim over
    let expired = l.expire_leases();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].held.iter().map(|h| h.amount).sum::<u64>(), 120);
    assert!(l.expire_leases().is_empty());
    for subject in &s {
        assert_eq!(used(&l, subject), vec![40]);
    }
    assert_eq!(l.outstanding(), 0);
    assert_eq!(markers(c, &p), 0);
}

#[test]
fn settles_racing_the_expiry_pass_are_counted_once() {
    let Some(c) = cluster("race") else { return };
    let p = prefix("race");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedisStore::open(&config(c, &p), Arc::new(sluice_core::SystemClock)).unwrap();
        let limiter = Arc::new(RedisLimiter::new(
            store,
            Duration::from_millis(30),
            Duration::from_secs(5),
        ));
        let s = spread_subjects(c, &p);
        for subject in &s {
            limiter.table().set_policy(
                subject,
                policy(vec![LimitDef::new("tokens", 1_000_000, "1h")]),
            );
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reported: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
        let pass = {
            let (limiter, stop, reported) = (limiter.clone(), stop.clone(), reported.clone());
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    for (e, _) in limiter.expire_leases().await.unwrap() {
                        reported.lock().unwrap().push(e.id.0);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        let mut tasks = Vec::new();
        for i in 0..120u64 {
            let (limiter, s) = (limiter.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                let req = Request::new(s, Amounts::ZERO.with_tokens(10, 0));
                let r = limiter
                    .reserve(&req, None, "", "m")
                    .await
                    .unwrap()
                    .value
                    .unwrap();
                // Some settle well inside the 30 ms lease, some around its end, some after.
                tokio::time::sleep(Duration::from_millis(i % 45)).await;
                let actual = Amounts::ZERO.with_tokens(3, 0);
                let settled = limiter.settle(r.id, "", Some(&actual)).await.unwrap();
                (r.id.0, settled)
            }));
        }
        let mut committed = 0u64;
        let mut settled_expired = Vec::new();
        for t in tasks {
            let (id, settled) = t.await.unwrap();
            match settled {
                Settled::Done { .. } => committed += 1,
                Settled::Expired { .. } => settled_expired.push(id),
                Settled::WasExpired => {}
                other => panic!("reservation {id}: {other:?}"),
            }
        }
        // Let the pass report every lease nobody settled (a record is left
        // alone for a second after it is opened).
        for _ in 0..100 {
            if limiter.store().outstanding().await.unwrap() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        pass.await.unwrap();
        for (e, _) in limiter.expire_leases().await.unwrap() {
            reported.lock().unwrap().push(e.id.0);
        }
        let reported = reported.lock().unwrap().clone();
        let mut all: Vec<u64> = reported.iter().chain(&settled_expired).copied().collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(n, all.len(), "an expired reservation reported twice");
        assert_eq!(
            committed as usize + n,
            120,
            "every reservation settled exactly once"
        );
        let expired = n as u64;
        for subject in &s {
            let usage = limiter.usage(subject).await.unwrap().value;
            assert_eq!(usage[0].used, committed * 3 + expired * 10, "{subject}");
        }
        assert_eq!(limiter.store().outstanding().await.unwrap(), 0);
    });
    assert_eq!(markers(c, &p), 0);
}

/// A node that goes down fails the calls that need it (an error, for
/// `on_store_error` to decide: never a pass, never a panic), rolls back what
/// a multi-slot request took on the nodes still up, leaves requests on other
/// nodes working, and service resumes by itself when it returns.
#[test]
fn a_node_down_fails_its_calls_and_service_resumes_when_it_returns() {
    if !cluster_tests_enabled("a_node_down_fails_its_calls") {
        return;
    }
    let mut c = RedisCluster::start(3);
    let p = prefix("outage");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = config(&c, &p);
    cfg.timeout = Duration::from_millis(500);
    let s = spread_subjects(&c, &p);
    let limiter = rt.block_on(async {
        let store = RedisStore::open(&cfg, Arc::new(sluice_core::SystemClock)).unwrap();
        let limiter = RedisLimiter::new(store, Duration::from_secs(30), Duration::from_secs(60));
        for subject in &s {
            limiter
                .table()
                .set_policy(subject, policy(vec![LimitDef::new("requests", 100, "1h")]));
        }
        let all = Request::new(s.clone(), Amounts::ZERO.with(Metric::Requests, 1));
        assert!(limiter.check(&all).await.unwrap().value.is_allowed());
        limiter
    });
    let used = |subject: &Subject| rt.block_on(limiter.usage(subject)).unwrap().value[0].used;
    let one = |i: usize| Request::new([s[i].clone()], Amounts::ZERO.with(Metric::Requests, 1));
    c.stop(1);
    rt.block_on(async {
        assert!(
            limiter.check(&one(1)).await.is_err(),
            "a down node's subject errs"
        );
        let all = Request::new(s.clone(), Amounts::ZERO.with(Metric::Requests, 1));
        assert!(limiter.check(&all).await.is_err());
        assert!(limiter.reserve(&all, None, "", "m").await.is_err());
        assert!(
            limiter.check(&one(0)).await.unwrap().value.is_allowed(),
            "other nodes work"
        );
    });
    assert_eq!(
        used(&s[0]),
        2,
        "what the failed requests took on node 0 was rolled back"
    );
    assert_eq!(used(&s[2]), 1);
    c.restart(1);
    let resumed = rt.block_on(async {
        for _ in 0..100 {
            if let Ok(d) = limiter.check(&one(1)).await {
                return d.value.is_allowed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(resumed, "service resumes without a restart");
    let all = Request::new(s.clone(), Amounts::ZERO.with(Metric::Requests, 1));
    assert!(rt.block_on(limiter.check(&all)).unwrap().value.is_allowed());
    // The restarted node lost its keys (no persistence in this test).
    assert_eq!(used(&s[1]), 2);
}
