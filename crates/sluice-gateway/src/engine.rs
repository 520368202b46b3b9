//! The limiter as the gateway runs it: in this process (`[store] kind =
//! "memory"`) or shared by every replica through Redis (`kind = "redis"`),
//! behind one async interface. Reservations' metadata (owner, subjects,
//! held amounts) lives with their lease: in memory beside the engine, or in
//! Redis, so any replica can settle or expire a reservation another made.
//!
//! When Redis fails (unreachable, or slower than `timeout_ms`),
//! `on_store_error` decides: `deny` answers 503; `allow` lets requests
//! through (decided by a limiter without limits; their spend still reaches
//! the ledger); `local` decides on this replica alone with every limit
//! divided by `replicas`. Each incident is logged once when it starts and
//! once when Redis answers again, and counted in `/metrics`; service
//! resumes by itself. A call that timed out may still have run in Redis:
//! what it took is then held until its lease ends (never more admitted).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sluice_core::{
    Amounts, Clock, Decision, Denial, LimitStatus, Limiter, LimiterConfig, MemoryStore, Policy,
    PolicyTable, Request, Reservation, ReservationError, ReservationId, Settlement, Statuses,
    Subject, Timestamp,
};
use sluice_redis::{RedisConfig, RedisLimiter, RedisStore, Settled};

use crate::config::{OnStoreError, StoreConfig};
use crate::db::amounts_text;
use crate::reservations::{Meta, Parsed, Reservations};
use crate::server::{GatewayLimiter, SharedClock};

/// The shared store failed and `on_store_error = "deny"` (or the call cannot
/// be decided anywhere else).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the limit store is unavailable: {0}")]
pub struct Unavailable(pub String);

/// How a settle ended.
#[derive(Debug)]
pub enum Settle {
    /// Committed or released.
    Done {
        /// Overshoot, for a commit.
        settlement: Settlement,
        /// The reservation.
        meta: Meta,
    },
    /// Never issued, or already settled.
    Unknown,
    /// Its lease had run out: settled at its held amounts. `Some` when this
    /// call found it so (its `expire` row is the caller's to write).
    Expired(Option<Meta>),
    /// Held by another key.
    Forbidden,
}

/// A reservation that ran out, with what the ledger needs.
#[derive(Debug)]
pub struct Expired {
    /// Public id.
    pub public: String,
    /// The reservation.
    pub meta: Meta,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Store calls that failed.
    pub errors: AtomicU64,
    /// Decisions made by the fallback (`allow` / `local`).
    pub fallbacks: AtomicU64,
    /// Decisions refused because the store failed (`deny`).
    pub denied: AtomicU64,
}

/// In this process.
#[derive(Debug)]
pub struct MemoryEngine {
    limiter: GatewayLimiter,
    reservations: Reservations,
}

/// Through Redis, with a fallback for when it fails.
#[derive(Debug)]
pub struct RedisEngine {
    limiter: RedisLimiter,
    on_error: OnStoreError,
    replicas: u32,
    /// `allow`: no limits; `local`: every limit ÷ replicas.
    fallback: MemoryEngine,
    down: AtomicBool,
    stats: StoreStats,
}

/// The limiter.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per process, never moved after start"
)]
pub enum Engine {
    /// In memory.
    Memory(MemoryEngine),
    /// In Redis.
    Redis(RedisEngine),
}

const SHARED_PREFIX: &str = "rsv_s";

fn memory(clock: &SharedClock, default_lease: Duration, max_lease: Duration) -> MemoryEngine {
    MemoryEngine {
        limiter: Limiter::new(
            clock.clone(),
            MemoryStore::new(),
            LimiterConfig {
                default_lease,
                max_lease,
            },
        ),
        reservations: Reservations::default(),
    }
}

fn meta_json(m: &Meta) -> String {
    serde_json::json!({
        "c": m.caller,
        "s": m.subjects,
        "h": amounts_text(&m.held),
        "t": m.reserved_ns,
        "f": m.forced,
    })
    .to_string()
}

fn parse_meta(s: &str) -> Option<Meta> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(Meta {
        caller: v["c"].as_str()?.to_owned(),
        subjects: v["s"]
            .as_array()?
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        held: crate::db::parse_amounts_text(v["h"].as_str()?)?,
        reserved_ns: v["t"].as_u64()?,
        forced: v["f"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The charge a settled reservation owes its forced subjects, if any.
fn forced_request(meta: &Meta, amounts: &Amounts) -> Option<Request> {
    if meta.forced.is_empty() || *amounts == Amounts::ZERO {
        return None;
    }
    let subjects: Vec<Subject> = meta
        .forced
        .iter()
        .filter_map(|s| Subject::parse(s).ok())
        .collect();
    Some(Request::new(subjects, *amounts))
}

impl MemoryEngine {
    /// [`Engine::charge_forced`] without I/O.
    fn charge_forced(&self, meta: &Meta, amounts: &Amounts) {
        if let Some(request) = forced_request(meta, amounts) {
            let now = self.limiter.clock().now();
            self.limiter.charge_at(&request, now);
        }
    }

    fn check(&self, request: &Request) -> Decision {
        self.limiter.check(request)
    }

    fn reserve(
        &self,
        request: &Request,
        lease: Option<Duration>,
        meta: Meta,
    ) -> Result<(Reservation, String), Denial> {
        let r = self.limiter.reserve(request, lease)?;
        let public = self.reservations.public_id(r.id);
        self.reservations.insert(r.id, meta);
        Ok((r, public))
    }

    fn settle(&self, public: &str, owner: Option<&str>, actual: Option<Amounts>) -> Settle {
        let id = match self.reservations.parse(public) {
            Some(Parsed::Current(id)) => id,
            Some(Parsed::Other) if self.reservations.was_expired(public) => {
                return Settle::Expired(None);
            }
            _ => return Settle::Unknown,
        };
        match (self.reservations.caller(id), owner) {
            (None, _) if self.reservations.was_expired(public) => return Settle::Expired(None),
            (None, _) => return Settle::Unknown,
            (Some(c), Some(o)) if c != o => return Settle::Forbidden,
            _ => {}
        }
        let Some(meta) = self.reservations.take(id) else {
            return if self.reservations.was_expired(public) {
                Settle::Expired(None)
            } else {
                Settle::Unknown
            };
        };
        let outcome = match actual {
            Some(a) => self.limiter.commit(id, &a),
            None => self.limiter.release(id).map(|()| Settlement::default()),
        };
        match outcome {
            Ok(settlement) => Settle::Done { settlement, meta },
            Err(ReservationError::Expired(_) | ReservationError::Unknown(_)) => {
                self.reservations.mark_expired(public.to_owned());
                Settle::Expired(Some(meta))
            }
        }
    }

    fn expire(&self) -> Vec<Expired> {
        let mut out = Vec::new();
        for e in self.limiter.expire_leases() {
            let public = self.reservations.public_id(e.id);
            // Mark first: a commit racing with us then answers 409, not 404.
            self.reservations.mark_expired(public.clone());
            if let Some(meta) = self.reservations.take(e.id) {
                out.push(Expired { public, meta });
            } // else the commit path took it and records it
        }
        out
    }
}

impl Engine {
    /// The engine `store` asks for. Redis is connected lazily: start-up does
    /// not wait for it.
    pub fn new(
        store: &StoreConfig,
        clock: &SharedClock,
        default_lease: Duration,
        max_lease: Duration,
    ) -> Result<Engine, String> {
        match store {
            StoreConfig::Memory => Ok(Engine::Memory(memory(clock, default_lease, max_lease))),
            StoreConfig::Redis {
                url,
                cluster,
                key_prefix,
                on_error,
                timeout,
                replicas,
                tls_ca,
            } => {
                let store = RedisStore::open(
                    &RedisConfig {
                        url: url.clone(),
                        cluster: *cluster,
                        tls_ca: tls_ca.clone(),
                        key_prefix: key_prefix.clone(),
                        timeout: *timeout,
                    },
                    Arc::clone(&clock.0),
                )
                .map_err(|e| format!("store.url: {e}"))?;
                Ok(Engine::Redis(RedisEngine {
                    limiter: RedisLimiter::new(store, default_lease, max_lease),
                    on_error: *on_error,
                    replicas: *replicas,
                    fallback: memory(clock, default_lease, max_lease),
                    down: AtomicBool::new(false),
                    stats: StoreStats::default(),
                }))
            }
        }
    }

    /// Whether limit state is shared with other replicas (nothing to replay at start).
    pub fn is_shared(&self) -> bool {
        matches!(self, Engine::Redis(_))
    }

    /// The policies in force.
    pub fn table(&self) -> &PolicyTable {
        match self {
            Engine::Memory(m) => m.limiter.table(),
            Engine::Redis(r) => r.limiter.table(),
        }
    }

    /// Set a subject's policy.
    pub fn set_policy(&self, subject: &Subject, policy: Policy) {
        self.set_policies(vec![(subject.clone(), policy)]);
    }

    /// Set many policies at once (loading them at start or on a reload):
    /// each policy shard is copied once, not once per policy.
    pub fn set_policies(&self, policies: Vec<(Subject, Policy)>) {
        if let Engine::Redis(r) = self {
            if r.on_error == OnStoreError::Local {
                let divided = policies
                    .iter()
                    .map(|(s, p)| (s.clone(), p.divided(u64::from(r.replicas))));
                r.fallback.limiter.set_policies(divided);
            }
        }
        self.table().set_policies(policies);
    }

    /// Remove a subject's policy.
    pub fn remove_policy(&self, subject: &Subject) {
        if let Engine::Redis(r) = self {
            r.fallback.limiter.remove_policy(subject);
        }
        self.table().remove_policy(subject);
    }

    /// Store counters (zero for the in-memory store).
    pub fn stats(&self) -> Option<&StoreStats> {
        match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => Some(&r.stats),
        }
    }

    /// Take the amounts without deciding: a request let past its limits on
    /// purpose (the `alert` action). The levels after.
    pub async fn force(&self, request: &Request) -> Result<Statuses, Unavailable> {
        match self {
            Engine::Memory(m) => {
                let now = m.limiter.clock().now();
                Ok(m.limiter.charge_at(request, now))
            }
            // Every Redis call is boxed: its future is kilobytes, and inline it
            // would grow every caller's future (the proxy's among them), which
            // is moved whole when the server boxes a handler's future.
            Engine::Redis(r) => match Box::pin(r.limiter.force(request)).await {
                Ok(s) => {
                    r.up();
                    Ok(s.value)
                }
                Err(e) => {
                    r.failed(&e);
                    r.fallback_engine()?;
                    let now = r.fallback.limiter.clock().now();
                    Ok(r.fallback.limiter.charge_at(request, now))
                }
            },
        }
    }

    /// Charge a settled reservation's forced subjects (see [`Meta::forced`]).
    async fn charge_forced(&self, meta: &Meta, amounts: &Amounts) {
        let Some(request) = forced_request(meta, amounts) else {
            return;
        };
        if let Err(e) = self.force(&request).await {
            tracing::warn!(
                "charging {:?} past their limits (alert action) failed: {e}",
                meta.forced
            );
        }
    }

    /// Decide and, if allowed, take the amounts.
    pub async fn check(&self, request: &Request) -> Result<Decision, Unavailable> {
        match self {
            Engine::Memory(m) => Ok(m.check(request)),
            Engine::Redis(r) => match Box::pin(r.limiter.check(request)).await {
                Ok(d) => {
                    r.up();
                    Ok(d.value)
                }
                Err(e) => {
                    r.failed(&e);
                    r.fallback_engine()?;
                    Ok(r.fallback.check(request))
                }
            },
        }
    }

    /// Used, remaining and reset of each limit on `subject`.
    pub async fn usage(&self, subject: &Subject) -> Result<Vec<LimitStatus>, Unavailable> {
        match self {
            Engine::Memory(m) => Ok(m.limiter.usage(subject)),
            Engine::Redis(r) => match Box::pin(r.limiter.usage(subject)).await {
                Ok(s) => {
                    r.up();
                    Ok(s.value.into_vec())
                }
                Err(e) => {
                    r.failed(&e);
                    Err(Unavailable(e.to_string()))
                }
            },
        }
    }

    /// Hold the amounts; the public id of the reservation with it.
    pub async fn reserve(
        &self,
        request: &Request,
        lease: Option<Duration>,
        meta: Meta,
    ) -> Result<Result<(Reservation, String), Denial>, Unavailable> {
        match self {
            Engine::Memory(m) => Ok(m.reserve(request, lease, meta)),
            Engine::Redis(r) => {
                let json = meta_json(&meta);
                match Box::pin(r.limiter.reserve(request, lease, &meta.caller, &json)).await {
                    Ok(t) => {
                        r.up();
                        Ok(t.value.map(|res| {
                            let public = format!("{SHARED_PREFIX}{}", res.id.0);
                            (res, public)
                        }))
                    }
                    Err(e) => {
                        r.failed(&e);
                        r.fallback_engine()?;
                        Ok(r.fallback.reserve(request, lease, meta))
                    }
                }
            }
        }
    }

    /// Settle a reservation by public id: `Some(actual)` commits, `None`
    /// releases. `owner`: the caller's key id (`None` for the admin and the
    /// proxy, which may settle any).
    pub async fn settle(
        &self,
        public: &str,
        owner: Option<&str>,
        actual: Option<Amounts>,
    ) -> Result<Settle, Unavailable> {
        let out = self.settle_held(public, owner, actual).await?;
        if let (Settle::Done { meta, .. }, Some(a)) = (&out, &actual) {
            self.charge_forced(meta, a).await;
        }
        Ok(out)
    }

    async fn settle_held(
        &self,
        public: &str,
        owner: Option<&str>,
        actual: Option<Amounts>,
    ) -> Result<Settle, Unavailable> {
        let r = match self {
            Engine::Memory(m) => return Ok(m.settle(public, owner, actual)),
            Engine::Redis(r) => r,
        };
        let Some(n) = public
            .strip_prefix(SHARED_PREFIX)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            // Made by this replica's fallback while Redis was down (or unknown).
            return Ok(r.fallback.settle(public, owner, actual));
        };
        match Box::pin(
            r.limiter
                .settle(ReservationId(n), owner.unwrap_or(""), actual.as_ref()),
        )
        .await
        {
            Ok(s) => {
                r.up();
                Ok(match s {
                    Settled::Done { settlement, meta } => match parse_meta(&meta) {
                        Some(meta) => Settle::Done { settlement, meta },
                        None => Settle::Unknown,
                    },
                    Settled::Unknown => Settle::Unknown,
                    Settled::Expired { meta } => Settle::Expired(parse_meta(&meta)),
                    Settled::WasExpired => Settle::Expired(None),
                    Settled::Forbidden => Settle::Forbidden,
                })
            }
            Err(e) => {
                r.failed(&e);
                Err(Unavailable(e.to_string()))
            }
        }
    }

    /// Settle at once when that needs no I/O (the in-memory store, or a
    /// reservation this replica's fallback made); `None` otherwise.
    pub fn settle_in_process(&self, public: &str, actual: Option<Amounts>) -> Option<Settle> {
        let m = match self {
            Engine::Memory(m) => m,
            Engine::Redis(r) if !public.starts_with(SHARED_PREFIX) => &r.fallback,
            Engine::Redis(_) => return None,
        };
        let out = m.settle(public, None, actual);
        if let (Settle::Done { meta, .. }, Some(a)) = (&out, &actual) {
            m.charge_forced(meta, a);
        }
        Some(out)
    }

    /// Settle every lease that has run out, here and (for Redis) wherever it
    /// was made: each is popped by exactly one replica.
    pub async fn expire(&self) -> Vec<Expired> {
        let out = self.expire_held().await;
        for e in &out {
            self.charge_forced(&e.meta, &e.meta.held).await;
        }
        out
    }

    async fn expire_held(&self) -> Vec<Expired> {
        match self {
            Engine::Memory(m) => m.expire(),
            Engine::Redis(r) => {
                let mut out = r.fallback.expire();
                match r.limiter.expire_leases().await {
                    Ok(list) => {
                        r.up();
                        for (e, meta) in list {
                            if let Some(meta) = parse_meta(&meta) {
                                out.push(Expired {
                                    public: format!("{SHARED_PREFIX}{}", e.id.0),
                                    meta,
                                });
                            }
                        }
                    }
                    Err(e) => r.failed(&e),
                }
                out
            }
        }
    }

    /// Reservations not yet settled (`None` if the store did not answer).
    pub async fn outstanding(&self) -> Option<u64> {
        match self {
            Engine::Memory(m) => Some(m.limiter.outstanding() as u64),
            Engine::Redis(r) => {
                let shared = r.limiter.store().outstanding().await.ok()?;
                Some((shared + r.fallback.limiter.outstanding()) as u64)
            }
        }
    }

    /// Subjects with state in this process.
    pub fn subjects(&self) -> u64 {
        match self {
            Engine::Memory(m) => m.limiter.store().subjects() as u64,
            Engine::Redis(r) => r.fallback.limiter.store().subjects() as u64,
        }
    }

    /// Drop idle in-process state.
    pub fn sweep(&self) {
        match self {
            Engine::Memory(m) => {
                m.limiter.sweep();
            }
            Engine::Redis(r) => {
                r.fallback.limiter.sweep();
            }
        }
    }

    /// Replay a charge at its time (rebuilding in-process state after a
    /// restart; shared state needs no replay).
    pub fn charge_at(&self, request: &Request, at: Timestamp) {
        if let Engine::Memory(m) = self {
            m.limiter.charge_at(request, at);
        }
    }

    /// Remember that a public id was settled at its held amounts (found
    /// unsettled at start).
    pub fn mark_expired(&self, public: String) {
        if let Engine::Memory(m) = self {
            m.reservations.mark_expired(public);
        }
    }

    /// This process's random boot tag.
    pub fn boot(&self) -> &str {
        match self {
            Engine::Memory(m) => m.reservations.boot(),
            Engine::Redis(r) => r.fallback.reservations.boot(),
        }
    }
}

impl RedisEngine {
    fn up(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::warn!("the Redis limit store answers again; decisions are shared again");
        }
    }

    fn failed(&self, e: &sluice_redis::StoreError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            let what = match self.on_error {
                OnStoreError::Deny => "refusing decisions with 503 (on_store_error = \"deny\")",
                OnStoreError::Allow => "letting requests through (on_store_error = \"allow\")",
                OnStoreError::Local => {
                    "deciding on this replica with limits divided by the replica count (on_store_error = \"local\")"
                }
            };
            tracing::error!("the Redis limit store failed ({e}); {what} until it answers");
        }
    }

    /// Whether the fallback may decide; the error to answer if not.
    fn fallback_engine(&self) -> Result<(), Unavailable> {
        match self.on_error {
            OnStoreError::Deny => {
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                Err(Unavailable(
                    "Redis did not answer in time; on_store_error = \"deny\"".to_owned(),
                ))
            }
            OnStoreError::Allow | OnStoreError::Local => {
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}
