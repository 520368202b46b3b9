//! `sluice-redis`: limit state shared by gateway replicas, in Redis (or Valkey).
//!
//! sluice-core's algorithms (`sliding`, `gcra`, `fixed`) run inside one Lua
//! script (`limits.lua`, loaded once and called by SHA): every limit of every
//! subject of a request is decided and charged in one round trip,
//! atomically, all-or-nothing, on the server's clock. Each subject's state is
//! one hash (`PREFIX{subject}`, hash-tagged per subject), one field per limit
//! (keyed by [`sluice_core::Limit::state_name`], so every replica and policy
//! version agrees), with a TTL past its last window. Reservations live in
//! Redis with their leases: any replica can settle or expire them, and a
//! replica that dies holding some leaks nothing.
//!
//! The engine crate stays synchronous and I/O-free: this crate plans with
//! [`PolicyTable`] and decides in Redis. [`BlockingRedisStore`] adapts it to
//! the engine's [`Store`] trait so the engine's conformance suite runs
//! against it unchanged.

use std::sync::Arc;
use std::time::Duration;

mod cluster;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use sluice_core::{
    Acquired, Admit, Amounts, Clock, Decision, Denial, ExpiredReservation, HeldAmount, Hold, Level,
    Metric, Overshoot, Plan, PlanSubject, PolicyTable, Refusal, Request, Reservation,
    ReservationError, ReservationId, Settlement, Shape, Statuses, Store, Subject, Timestamp,
    Window,
};
use smallvec::SmallVec;

/// The script.
const LUA: &str = include_str!("limits.lua");

/// How far the replica's clock may be ahead of Redis's for calendar window
/// ends (the script picks the first end after the server's now).
const SKEW: u64 = 120 * 1_000_000_000;

/// A store failure: Redis unreachable, slow past the timeout, or an answer
/// this version does not understand.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// From Redis or the connection.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// An answer of the wrong shape.
    #[error("redis: unexpected answer: {0}")]
    Protocol(String),
}

/// Where a call's `now` comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    /// The Redis server's clock (`TIME`): what replicas use.
    Server,
    /// This instant (ns): for tests driving a manual clock.
    At(u64),
}

/// What a reservation holds as [`Hold`] does, with the lease as a duration
/// from the store's `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Spend the amounts.
    Spend,
    /// Charge without deciding.
    Force,
    /// Hold under a lease of this many ns.
    Lease(u64),
}

/// The answer of [`RedisStore::acquire`] and [`RedisStore::peek`].
#[derive(Debug, Clone)]
pub struct Answer {
    /// The server's `now`, ns.
    pub now: u64,
    /// Levels in plan order (a reservation id with [`Take::Lease`]), or the refusal.
    pub outcome: Result<Acquired, Refusal>,
}

/// The answer of [`RedisStore::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Settled; what it reported, and the reservation's opaque metadata.
    Done {
        /// Limits taken past their limit.
        settlement: Settlement,
        /// As given to `acquire`.
        meta: String,
    },
    /// Never issued, or already settled.
    Unknown,
    /// Its lease ran out: it was settled at its held amounts.
    Expired {
        /// As given to `acquire`.
        meta: String,
    },
    /// Settled by expiry earlier (remembered for a day).
    WasExpired,
    /// Held by another owner.
    Forbidden,
}

/// The key names under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    /// Lease registries: `[leases, expiries, id counter, expired]`; one
    /// without a cluster, [`cluster::SHARDS`] (each in its own slot) with one.
    registries: Vec<[String; 4]>,
}

/// A connection: one server (multiplexed, reconnects by itself) or a
/// cluster (multiplexed per node, follows the slot map; connected on first use).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

struct LazyCluster {
    client: redis::cluster::ClusterClient,
    timeout: Duration,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

/// The Redis limit store: a multiplexed connection (concurrent calls are
/// pipelined on it) that reconnects by itself, and the script.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    script: Arc<redis::Script>,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
    /// Round-robin over the cluster's lease registries.
    next_shard: Arc<std::sync::atomic::AtomicUsize>,
    /// The call timeout.
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `valkey://`, or with TLS `rediss://`, `valkeys://`; with
    /// `cluster`, one or more nodes of the cluster, comma-separated.
    pub url: String,
    /// A Redis Cluster: requests whose subjects live in several slots are
    /// taken slot by slot (see ARCHITECTURE.md).
    pub cluster: bool,
    /// For TLS: PEM certificates to trust instead of the system's roots and
    /// the bundled Mozilla roots (a private CA).
    pub tls_ca: Option<Vec<u8>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// A call slower than this fails (and `on_store_error` decides).
    pub timeout: Duration,
}

impl RedisStore {
    /// Connect lazily (start-up does not wait for Redis; the first call
    /// connects, and a lost connection is re-established by itself).
    /// `clock` is the replica's clock, used only to compute calendar window
    /// ends around now; decisions use the server's time.
    pub fn open(config: &RedisConfig, clock: Arc<dyn Clock>) -> Result<RedisStore, StoreError> {
        let p = &config.key_prefix;
        if config.cluster {
            let nodes: Vec<&str> = config.url.split(',').map(str::trim).collect();
            let mut builder = redis::cluster::ClusterClient::builder(nodes)
                .response_timeout(config.timeout)
                .connection_timeout(config.timeout)
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200);
            if let Some(ca) = &config.tls_ca {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                });
            }
            let client = builder.build()?;
            let registries = (0..cluster::SHARDS)
                .map(|n| {
                    let tag = format!("{p}{{leases:{n}}}");
                    [
                        format!("{tag}leases"),
                        format!("{tag}lease_expiries"),
                        format!("{tag}lease_seq"),
                        format!("{tag}expired"),
                    ]
                })
                .collect();
            return Ok(RedisStore {
                conn: Conn::Cluster(Arc::new(LazyCluster {
                    client,
                    timeout: config.timeout,
                    conn: tokio::sync::OnceCell::new(),
                })),
                script: Arc::new(redis::Script::new(LUA)),
                keys: Arc::new(Keys {
                    prefix: p.clone(),
                    registries,
                }),
                clock,
                next_shard: Arc::default(),
                timeout: config.timeout,
            });
        }
        let client = match &config.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            None => redis::Client::open(config.url.as_str())?,
        };
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)?;
        Ok(RedisStore {
            conn: Conn::Single(conn),
            script: Arc::new(redis::Script::new(LUA)),
            keys: Arc::new(Keys {
                prefix: p.clone(),
                registries: vec![[
                    format!("{p}leases"),
                    format!("{p}lease_expiries"),
                    format!("{p}lease_seq"),
                    format!("{p}expired"),
                ]],
            }),
            clock,
            next_shard: Arc::default(),
            timeout: config.timeout,
        })
    }

    /// Whether this store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// A call of the script's `op` at `time`, with no keys yet.
    fn call(&self, op: &str, time: Time) -> redis::ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(op).arg(match time {
            Time::Server => String::new(),
            Time::At(ns) => format!("{} {}", ns / 1_000_000_000, ns % 1_000_000_000),
        });
        inv
    }

    /// A call of `op` on lease registry `shard` (its four keys first).
    fn registry_call(&self, op: &str, time: Time, shard: usize) -> redis::ScriptInvocation<'_> {
        let mut inv = self.call(op, time);
        if let Some(keys) = self.keys.registries.get(shard) {
            for k in keys {
                inv.key(k);
            }
        }
        inv
    }

    /// Run a script call (loading the script where it is missing).
    async fn eval(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        Ok(match &self.conn {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await?,
            Conn::Cluster(c) => inv.invoke_async(&mut c.connection().await?).await?,
        })
    }

    /// The key of a subject's state hash.
    fn subject_key(&self, subject: &Subject) -> String {
        format!("{}{{{}}}", self.keys.prefix, subject.as_str())
    }

    /// When calendar windows are computed from.
    fn around(&self, time: Time) -> u64 {
        match time {
            Time::At(ns) => ns,
            Time::Server => self.clock.now().as_nanos(),
        }
        .saturating_sub(SKEW)
    }

    /// Decide every limit of `plan` for `amounts`; if all fit, take them
    /// (under a lease with [`Take::Lease`], recording `owner` and `meta`
    /// with it); otherwise change nothing and say which limit refused.
    pub async fn acquire(
        &self,
        time: Time,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
        take: Take,
        owner: &str,
        meta: &str,
    ) -> Result<Answer, StoreError> {
        self.decide("acquire", time, plan, amounts, take, owner, meta)
            .await
    }

    /// As `acquire`, without taking anything.
    pub async fn peek(
        &self,
        time: Time,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Result<Answer, StoreError> {
        self.decide("peek", time, plan, amounts, Take::Spend, "", "")
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        op: &str,
        time: Time,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
        take: Take,
        owner: &str,
        meta: &str,
    ) -> Result<Answer, StoreError> {
        if self.is_cluster() {
            return cluster::decide(self, op, time, plan, amounts, take, owner, meta).await;
        }
        let mut inv = self.registry_call(op, time, 0);
        let (hold, lease) = match take {
            Take::Spend => ("spend", 0),
            Take::Force => ("force", 0),
            Take::Lease(ns) => ("lease", ns),
        };
        inv.arg(hold)
            .arg(lease)
            .arg(owner)
            .arg(meta)
            .arg(plan.len());
        let around = self.around(time);
        for p in plan {
            inv.key(self.subject_key(p.subject));
            push_subject(&mut inv, p, amounts, around);
        }
        let value = self.eval(&inv).await?;
        parse_decision(value, plan)
    }

    /// Settle reservation `id`: `Some(actual)` commits (refunding what was
    /// held beyond it, charging what exceeds it), `None` releases. With a
    /// non-empty `owner`, a reservation held by another owner is refused.
    pub async fn settle(
        &self,
        time: Time,
        id: ReservationId,
        owner: &str,
        actual: Option<&Amounts>,
    ) -> Result<Settled, StoreError> {
        if self.is_cluster() {
            return cluster::settle(self, time, id, owner, actual).await;
        }
        let mut inv = self.registry_call("settle", time, 0);
        inv.arg(id.0).arg(owner).arg(if actual.is_some() {
            "commit"
        } else {
            "release"
        });
        for m in Metric::ALL {
            inv.arg(actual.map_or(0, |a| a.get(m)));
        }
        let items = array(self.eval(&inv).await?)?;
        let kind = text(items.first())?;
        Ok(match kind.as_str() {
            "unknown" => Settled::Unknown,
            "forbidden" => Settled::Forbidden,
            "was_expired" => Settled::WasExpired,
            "expired" => Settled::Expired {
                meta: text(items.get(1))?,
            },
            "ok" => {
                let meta = text(items.get(2))?;
                let settlement = Settlement {
                    overshoot: parse_overshoot(items.get(3..).unwrap_or_default())?,
                };
                Settled::Done { settlement, meta }
            }
            other => return Err(protocol(other)),
        })
    }

    /// Settle every lease that has run out (at most 1,000 a call) at its
    /// held amounts; each with the metadata given to `acquire`.
    pub async fn expire(
        &self,
        time: Time,
    ) -> Result<Vec<(ExpiredReservation, String)>, StoreError> {
        if self.is_cluster() {
            return cluster::expire(self, time).await;
        }
        let inv = self.registry_call("expire", time, 0);
        let items = array(self.eval(&inv).await?)?;
        let mut out = Vec::new();
        let mut i = 1;
        while i < items.len() {
            let id = ReservationId(int(items.get(i))?);
            let expires_at = Timestamp::from_nanos(int(items.get(i + 1))?);
            let meta = text(items.get(i + 2))?;
            let n = usize::try_from(int(items.get(i + 3))?).map_err(|_| protocol("count"))?;
            i += 4;
            let end = i + 4 * n;
            let held = parse_held(items.get(i..end).ok_or_else(|| protocol("held"))?)?;
            i = end;
            out.push((
                ExpiredReservation {
                    id,
                    expires_at,
                    held,
                },
                meta,
            ));
        }
        out.sort_by_key(|(e, _)| e.id);
        Ok(out)
    }

    /// Reservations not yet settled.
    pub async fn outstanding(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        for shard in 0..self.keys.registries.len() {
            let inv = self.registry_call("outstanding", Time::Server, shard);
            let n = int(Some(&self.eval(&inv).await?))?;
            total += usize::try_from(n).map_err(|_| protocol("outstanding"))?;
        }
        Ok(total)
    }

    /// Round trip to Redis (for health checks; every primary of a cluster).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: Value = match &self.conn {
            Conn::Single(c) => redis::cmd("PING").query_async(&mut c.clone()).await?,
            Conn::Cluster(c) => {
                redis::cmd("PING")
                    .query_async(&mut c.connection().await?)
                    .await?
            }
        };
        Ok(())
    }
}

impl LazyCluster {
    /// The connection, made on first use (a failed attempt is retried by
    /// the next call).
    async fn connection(&self) -> Result<ClusterConnection, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.timeout, self.client.get_async_connection()).await {
                    Ok(r) => r.map_err(StoreError::from),
                    Err(_) => Err(protocol("cluster: connecting timed out")),
                }
            })
            .await?;
        Ok(conn.clone())
    }
}

/// One subject's arguments: its name, limit count, then per limit the nine
/// spec fields and the amount (its key is the caller's).
fn push_subject(
    inv: &mut redis::ScriptInvocation<'_>,
    p: &PlanSubject<'_>,
    amounts: &Amounts,
    around: u64,
) {
    inv.arg(p.subject.as_str()).arg(p.limits.len());
    for pl in p.limits {
        let limit = &pl.limit;
        let (algo, window, param, ends) = match limit.shape() {
            Shape::Sliding {
                window,
                granularity,
            } => ("s", window, granularity, String::new()),
            Shape::Gcra { window, burst } => ("g", window, burst, String::new()),
            Shape::Fixed => {
                let e0 = limit.fixed_window_end(around);
                let e1 = limit.fixed_window_end(e0);
                let e2 = limit.fixed_window_end(e1);
                let e3 = limit.fixed_window_end(e2);
                ("f", 0, 0, format!("{e0},{e1},{e2},{e3}"))
            }
        };
        let metric = limit.metric();
        inv.arg(limit.state_name())
            .arg(algo)
            .arg(window)
            .arg(limit.limit())
            .arg(param)
            .arg(metric_index(metric))
            .arg(metric.name())
            .arg(limit.window().to_string())
            .arg(ends)
            .arg(amounts.get(metric));
    }
}

/// Overshoot records: (subject, metric, window, limit, used) ...
fn parse_overshoot(items: &[Value]) -> Result<Vec<Overshoot>, StoreError> {
    items
        .chunks(5)
        .map(|o| {
            let [subject, metric, window, limit, used] = o else {
                return Err(protocol("overshoot"));
            };
            Ok(Overshoot {
                subject: parse_subject(subject)?,
                metric: parse_metric(&text(Some(metric))?)?,
                window: parse_window(window)?,
                limit: int(Some(limit))?,
                used: int(Some(used))?,
            })
        })
        .collect()
}

/// Held amounts: (subject, metric, window, amount) ...
fn parse_held(items: &[Value]) -> Result<Vec<HeldAmount>, StoreError> {
    items
        .chunks(4)
        .map(|h| {
            let [subject, metric, window, amount] = h else {
                return Err(protocol("held"));
            };
            Ok(HeldAmount {
                subject: parse_subject(subject)?,
                metric: parse_metric(&text(Some(metric))?)?,
                window: parse_window(window)?,
                amount: int(Some(amount))?,
            })
        })
        .collect()
}

fn metric_index(m: Metric) -> usize {
    Metric::ALL.iter().position(|x| *x == m).unwrap_or(0)
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(what.to_owned())
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(StoreError::Protocol(format!("{other:?}"))),
    }
}

fn text(v: Option<&Value>) -> Result<String, StoreError> {
    match v {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).map_err(|_| protocol("utf-8")),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        Some(Value::Int(n)) => Ok(n.to_string()),
        other => Err(StoreError::Protocol(format!("{other:?}"))),
    }
}

fn int(v: Option<&Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Int(n)) => u64::try_from(*n).map_err(|_| protocol("negative")),
        Some(other) => text(Some(other))?
            .parse()
            .map_err(|_| StoreError::Protocol(format!("{other:?}"))),
        None => Err(protocol("short answer")),
    }
}

fn parse_subject(v: &Value) -> Result<Subject, StoreError> {
    Subject::parse(&text(Some(v))?).map_err(|e| StoreError::Protocol(e.to_string()))
}

fn parse_metric(s: &str) -> Result<Metric, StoreError> {
    s.parse().map_err(|_| protocol("metric"))
}

fn parse_window(v: &Value) -> Result<Window, StoreError> {
    text(Some(v))?.parse().map_err(|_| protocol("window"))
}

fn parse_decision(value: Value, plan: &[PlanSubject<'_>]) -> Result<Answer, StoreError> {
    let items = array(value)?;
    let ok = int(items.first())?;
    let now = int(items.get(1))?;
    if ok == 0 {
        let mut flat = usize::try_from(int(items.get(2))?).map_err(|_| protocol("index"))?;
        let admit = match text(items.get(3))?.as_str() {
            "never" => Admit::Never,
            _ => Admit::At(int(items.get(4))?),
        };
        for (pi, p) in plan.iter().enumerate() {
            if flat <= p.limits.len() {
                return Ok(Answer {
                    now,
                    outcome: Err(Refusal {
                        plan_subject: pi,
                        limit: flat.saturating_sub(1),
                        admit,
                    }),
                });
            }
            flat -= p.limits.len();
        }
        return Err(protocol("refusal index"));
    }
    let id = int(items.get(2))?;
    let mut levels = SmallVec::new();
    for l in items.get(3..).unwrap_or_default().chunks(3) {
        let [used, remaining, reset] = l else {
            return Err(protocol("levels"));
        };
        levels.push(Level {
            used: int(Some(used))?,
            remaining: int(Some(remaining))?,
            reset_at: int(Some(reset))?,
        });
    }
    Ok(Answer {
        now,
        outcome: Ok(Acquired {
            reservation: (id > 0).then_some(ReservationId(id)),
            levels,
        }),
    })
}

/// A limiter over the Redis store: the engine's policy table and decisions,
/// with state and time from Redis.
#[derive(Debug)]
pub struct RedisLimiter {
    table: PolicyTable,
    store: RedisStore,
    default_lease: Duration,
    max_lease: Duration,
}

/// A decision with the server's `now` it was made at.
#[derive(Debug, Clone)]
pub struct Timed<T> {
    /// Redis's clock at the decision, ns.
    pub now: u64,
    /// The decision.
    pub value: T,
}

impl RedisLimiter {
    /// A limiter on `store`, leases as [`sluice_core::LimiterConfig`].
    pub fn new(store: RedisStore, default_lease: Duration, max_lease: Duration) -> RedisLimiter {
        RedisLimiter {
            table: PolicyTable::default(),
            store,
            default_lease,
            max_lease,
        }
    }

    /// The policies.
    pub fn table(&self) -> &PolicyTable {
        &self.table
    }

    /// The store.
    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    /// Decide and, if allowed, take the amounts.
    pub async fn check(&self, request: &Request) -> Result<Timed<Decision>, StoreError> {
        let (plan, a) = self.take(request, Take::Spend).await?;
        Ok(timed_decision(&plan, request, a))
    }

    /// Plan the request and take its amounts (`Spend` or `Force`; no lease).
    async fn take(&self, request: &Request, take: Take) -> Result<(Plan, Answer), StoreError> {
        let plan = self.table.plan(request);
        let a = self
            .store
            .acquire(
                Time::Server,
                &plan.subjects(),
                &request.amounts,
                take,
                "",
                "",
            )
            .await?;
        Ok((plan, a))
    }

    /// Take the amounts without deciding (past every limit: a request let
    /// through on purpose); the levels after.
    pub async fn force(&self, request: &Request) -> Result<Timed<Statuses>, StoreError> {
        let (plan, a) = self.take(request, Take::Force).await?;
        let now = a.now;
        let value = match a.outcome {
            Ok(acquired) => plan.statuses(&acquired.levels),
            Err(_) => Statuses::new(),
        };
        Ok(Timed { now, value })
    }

    /// Decide without taking anything.
    pub async fn peek(&self, request: &Request) -> Result<Timed<Decision>, StoreError> {
        let plan = self.table.plan(request);
        let a = self
            .store
            .peek(Time::Server, &plan.subjects(), &request.amounts)
            .await?;
        Ok(timed_decision(&plan, request, a))
    }

    /// Hold the amounts under a lease (recording `owner` and `meta` with it).
    pub async fn reserve(
        &self,
        request: &Request,
        lease: Option<Duration>,
        owner: &str,
        meta: &str,
    ) -> Result<Timed<Result<Reservation, Denial>>, StoreError> {
        let lease = lease
            .unwrap_or(self.default_lease)
            .min(self.max_lease)
            .max(Duration::from_nanos(1));
        let lease_ns = u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX);
        let plan = self.table.plan(request);
        let a = self
            .store
            .acquire(
                Time::Server,
                &plan.subjects(),
                &request.amounts,
                Take::Lease(lease_ns),
                owner,
                meta,
            )
            .await?;
        let now = a.now;
        let value = match a.outcome {
            Ok(acquired) => Ok(Reservation {
                id: acquired.reservation.unwrap_or(ReservationId(0)),
                expires_at: Timestamp::from_nanos(now.saturating_add(lease_ns)),
                limits: plan.statuses(&acquired.levels),
            }),
            Err(refusal) => Err(plan.denial(refusal, &request.amounts, now)),
        };
        Ok(Timed { now, value })
    }

    /// Settle a reservation (see [`RedisStore::settle`]).
    pub async fn settle(
        &self,
        id: ReservationId,
        owner: &str,
        actual: Option<&Amounts>,
    ) -> Result<Settled, StoreError> {
        self.store.settle(Time::Server, id, owner, actual).await
    }

    /// Used, remaining and reset of each limit that applies to `subject`.
    pub async fn usage(&self, subject: &Subject) -> Result<Timed<Statuses>, StoreError> {
        let request = Request::new([subject.clone()], Amounts::ZERO);
        let d = self.peek(&request).await?;
        Ok(Timed {
            now: d.now,
            value: match d.value {
                Decision::Allowed(s) => s,
                Decision::Denied(_) => Statuses::new(),
            },
        })
    }

    /// Settle every lease that has run out.
    pub async fn expire_leases(&self) -> Result<Vec<(ExpiredReservation, String)>, StoreError> {
        self.store.expire(Time::Server).await
    }
}

fn timed_decision(plan: &Plan, request: &Request, a: Answer) -> Timed<Decision> {
    let value = match a.outcome {
        Ok(acquired) => Decision::Allowed(plan.statuses(&acquired.levels)),
        Err(refusal) => Decision::Denied(plan.denial(refusal, &request.amounts, a.now)),
    };
    Timed { now: a.now, value }
}

/// [`RedisStore`] as the engine's synchronous [`Store`], on its own
/// single-threaded runtime, with time from the caller (the engine's clock):
/// for tests, chiefly the engine's conformance suite. Not for async contexts.
#[derive(Debug)]
pub struct BlockingRedisStore {
    store: RedisStore,
    runtime: tokio::runtime::Runtime,
}

impl BlockingRedisStore {
    /// Wrap a store on a new runtime (the store must be opened inside it:
    /// use [`BlockingRedisStore::open`]).
    pub fn open(config: &RedisConfig) -> Result<BlockingRedisStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Protocol(format!("runtime: {e}")))?;
        let store = runtime
            .block_on(async { RedisStore::open(config, Arc::new(sluice_core::SystemClock)) })?;
        Ok(BlockingRedisStore { store, runtime })
    }

    /// The async store.
    pub fn inner(&self) -> &RedisStore {
        &self.store
    }

    fn run<T>(&self, f: impl std::future::Future<Output = Result<T, StoreError>>) -> T {
        match self.runtime.block_on(f) {
            Ok(v) => v,
            // The engine's Store trait has no error path: a test store fails loudly.
            #[allow(clippy::panic, reason = "test adapter without an error path")]
            Err(e) => panic!("{e}"),
        }
    }
}

impl Store for BlockingRedisStore {
    fn acquire(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
        hold: Hold,
    ) -> Result<Acquired, Refusal> {
        let take = match hold {
            Hold::Spend => Take::Spend,
            Hold::Force => Take::Force,
            Hold::Lease { expires_at } => Take::Lease(expires_at.saturating_sub(now)),
        };
        self.run(
            self.store
                .acquire(Time::At(now), plan, amounts, take, "", ""),
        )
        .outcome
    }

    fn peek(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Result<SmallVec<[Level; 4]>, Refusal> {
        self.run(self.store.peek(Time::At(now), plan, amounts))
            .outcome
            .map(|a| a.levels)
    }

    fn settle(
        &self,
        now: u64,
        id: ReservationId,
        actual: Option<&Amounts>,
    ) -> Result<Settlement, ReservationError> {
        match self.run(self.store.settle(Time::At(now), id, "", actual)) {
            Settled::Done { settlement, .. } => Ok(settlement),
            Settled::Expired { .. } => Err(ReservationError::Expired(id)),
            // The engine forgets a reservation once settled, expiry included.
            Settled::Unknown | Settled::WasExpired | Settled::Forbidden => {
                Err(ReservationError::Unknown(id))
            }
        }
    }

    fn expire(&self, now: u64) -> Vec<ExpiredReservation> {
        self.run(self.store.expire(Time::At(now)))
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    fn sweep(&self, _now: u64) -> usize {
        0 // every key has a TTL: Redis drops idle state itself
    }

    fn outstanding(&self) -> usize {
        self.run(self.store.outstanding())
    }
}
