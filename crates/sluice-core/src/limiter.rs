//! The engine's front door: policies, time and a [`Store`], turned into decisions.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use std::time::Duration;

use smallvec::SmallVec;

use crate::decision::{
    Decision, Denial, DenialReason, ExpiredReservation, LimitStatus, Request, Reservation,
    ReservationError, ReservationId, Settlement, Statuses,
};
use crate::memory::MemoryStore;
use crate::metric::Amounts;
use crate::policy::{Policy, StateIdentity};
use crate::store::{Admit, Hold, Level, LimitKey, PlanSubject, PlannedLimit, Refusal, Store};
use crate::subject::{Subject, SubjectKind};
use crate::time::{Clock, SystemClock, Timestamp, duration_nanos};

/// Limiter settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterConfig {
    /// Lease of a reservation when the caller names none.
    pub default_lease: Duration,
    /// The longest lease a caller may ask for (longer ones are cut to this).
    pub max_lease: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            default_lease: Duration::from_secs(300),
            max_lease: Duration::from_secs(3_600),
        }
    }
}

/// Subjects carry their hash; hashing them again would be waste.
#[derive(Default)]
struct SubjectHasher(u64);

impl Hasher for SubjectHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Clone, Debug)]
struct Resolved {
    policy: Arc<Policy>,
    planned: Arc<[PlannedLimit]>,
}

type Exact = HashMap<Subject, Resolved, BuildHasherDefault<SubjectHasher>>;
type Tiers = Vec<(SubjectKind, Resolved)>;

/// Number of policy shards (a power of two): a policy change copies one
/// shard's map, so this keeps loading many policies from quadratic cost.
const POLICY_SHARDS: usize = 256;

/// What a reader sees of one shard: its subjects' own policies and the tiers.
#[derive(Clone, Debug, Default)]
struct PolicyShard {
    exact: Arc<Exact>,
    tiers: Arc<Tiers>,
}

impl PolicyShard {
    fn resolve(&self, subject: &Subject) -> Option<&Resolved> {
        self.exact.get(subject).or_else(|| {
            self.tiers
                .iter()
                .find(|(kind, _)| *kind == subject.kind())
                .map(|(_, r)| r)
        })
    }
}

/// Put `resolved` in as `kind`'s tier; the tier it replaces, if any.
fn replace_tier(tiers: &mut Tiers, kind: SubjectKind, resolved: Resolved) -> Option<Resolved> {
    let old = tiers
        .iter()
        .position(|(k, _)| *k == kind)
        .map(|i| tiers.remove(i).1);
    tiers.push((kind, resolved));
    old
}

fn policy_shard(subject: &Subject) -> usize {
    // Bits the store's shards and hashbrown's buckets and tags do not use.
    ((subject.hash_value() >> 40) as usize) & (POLICY_SHARDS - 1)
}

/// Every subject's policy, and the tiers (`user:*`) that apply to subjects
/// without one: what turns a [`Request`] into a plan for a [`Store`].
/// The [`Limiter`] holds one; a limiter over an asynchronous store (Redis)
/// holds one too and plans with [`PolicyTable::plan`].
///
/// Readers never lock and never write shared memory: each shard is an
/// `ArcSwap` loaded through arc-swap's per-thread slots, so threads deciding
/// for the same subject do not contend on a lock's cache line. A change
/// copies the one shard it touches (a tier change, only the shard handles)
/// and swaps it in; changes are serialized by one mutex, which also interns
/// state keys.
#[derive(Debug)]
pub struct PolicyTable {
    shards: Box<[ArcSwap<PolicyShard>]>,
    writer: Mutex<HashMap<StateIdentity, LimitKey>>,
}

impl Default for PolicyTable {
    fn default() -> Self {
        PolicyTable {
            shards: (0..POLICY_SHARDS)
                .map(|_| ArcSwap::from_pointee(PolicyShard::default()))
                .collect(),
            writer: Mutex::default(),
        }
    }
}

/// One subject of a [`Plan`]: the subject, its index in the request, its limits.
type PlannedSubject = (Subject, usize, Arc<[PlannedLimit]>);

/// A request resolved against the policies, owning what it needs (no lock
/// is held): each subject that has limits, with them.
#[derive(Debug, Clone)]
pub struct Plan {
    subjects: SmallVec<[PlannedSubject; 4]>,
}

impl Plan {
    /// The plan as a store sees it.
    pub fn subjects(&self) -> SmallVec<[PlanSubject<'_>; 4]> {
        self.subjects
            .iter()
            .map(|(subject, index, limits)| PlanSubject {
                subject,
                index: *index,
                limits,
            })
            .collect()
    }

    /// The statuses of a store's levels (in plan order).
    pub fn statuses(&self, levels: &[Level]) -> Statuses {
        statuses(&self.subjects(), levels)
    }

    /// The denial of a store's refusal, with the wait measured from `now` (ns).
    pub fn denial(&self, refusal: Refusal, amounts: &Amounts, now: u64) -> Denial {
        denial(&self.subjects(), refusal, amounts, now)
    }
}

impl PolicyTable {
    fn shard(&self, subject: &Subject) -> arc_swap::Guard<Arc<PolicyShard>> {
        self.shards[policy_shard(subject)].load()
    }

    fn write(&self) -> MutexGuard<'_, HashMap<StateIdentity, LimitKey>> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the tiers (every shard shares one list).
    fn tiers(&self) -> Tiers {
        Tiers::clone(&self.shards[0].load().tiers)
    }

    /// Replace every shard's tiers (the exact maps are shared, not copied).
    fn set_tiers(&self, tiers: Tiers) {
        let tiers = Arc::new(tiers);
        for shard in self.shards.iter() {
            let current = shard.load();
            shard.store(Arc::new(PolicyShard {
                exact: Arc::clone(&current.exact),
                tiers: Arc::clone(&tiers),
            }));
        }
    }

    /// Copy one shard's map, change it, and swap it in.
    fn update_exact<R>(&self, index: usize, change: impl FnOnce(&mut Exact) -> R) -> R {
        let shard = &self.shards[index];
        let current = shard.load();
        let mut exact = Exact::clone(&current.exact);
        let out = change(&mut exact);
        shard.store(Arc::new(PolicyShard {
            exact: Arc::new(exact),
            tiers: Arc::clone(&current.tiers),
        }));
        out
    }

    /// A policy with its limits' state keys (interned under the writer lock).
    fn resolved(keys: &mut HashMap<StateIdentity, LimitKey>, policy: Policy) -> Resolved {
        let planned = policy
            .limits()
            .iter()
            .map(|limit| {
                let next = LimitKey(u32::try_from(keys.len()).unwrap_or(u32::MAX));
                let key = *keys.entry(limit.identity.clone()).or_insert(next);
                PlannedLimit {
                    key,
                    limit: Arc::clone(limit),
                }
            })
            .collect();
        Resolved {
            policy: Arc::new(policy),
            planned,
        }
    }

    /// Set (or replace) a subject's policy; a wildcard subject (`user:*`) sets
    /// the tier for every subject of its kind without a policy of its own.
    /// Usage of limits that stay the same (metric, window, algorithm) is kept.
    pub fn set_policy(&self, subject: &Subject, policy: Policy) -> Option<Arc<Policy>> {
        let mut keys = self.write();
        let resolved = Self::resolved(&mut keys, policy);
        if subject.is_wildcard() {
            let mut tiers = self.tiers();
            let old = replace_tier(&mut tiers, subject.kind(), resolved);
            self.set_tiers(tiers);
            old.map(|r| r.policy)
        } else {
            self.update_exact(policy_shard(subject), |exact| {
                exact.insert(subject.clone(), resolved).map(|r| r.policy)
            })
        }
    }

    /// Set many policies at once, as [`set_policy`](Self::set_policy) would
    /// one by one (later ones win), copying each shard they touch once
    /// instead of once per policy: loading n policies costs O(n), not
    /// O(n² / shards).
    pub fn set_policies(&self, policies: impl IntoIterator<Item = (Subject, Policy)>) {
        let mut keys = self.write();
        let mut batches: HashMap<usize, Vec<(Subject, Resolved)>> = HashMap::new();
        let mut tiers: Option<Tiers> = None;
        for (subject, policy) in policies {
            let resolved = Self::resolved(&mut keys, policy);
            if subject.is_wildcard() {
                let tiers = tiers.get_or_insert_with(|| self.tiers());
                replace_tier(tiers, subject.kind(), resolved);
            } else {
                batches
                    .entry(policy_shard(&subject))
                    .or_default()
                    .push((subject, resolved));
            }
        }
        for (index, batch) in batches {
            self.update_exact(index, |exact| exact.extend(batch));
        }
        if let Some(tiers) = tiers {
            self.set_tiers(tiers);
        }
    }

    /// Remove a subject's own policy (or a tier). Its counters stay until idle.
    pub fn remove_policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        let _keys = self.write();
        if subject.is_wildcard() {
            let mut tiers = self.tiers();
            let pos = tiers.iter().position(|(k, _)| *k == subject.kind())?;
            let old = tiers.remove(pos).1.policy;
            self.set_tiers(tiers);
            Some(old)
        } else {
            if !self.shard(subject).exact.contains_key(subject) {
                return None;
            }
            self.update_exact(policy_shard(subject), |exact| {
                exact.remove(subject).map(|r| r.policy)
            })
        }
    }

    /// The subject's own policy (or the tier's, for a wildcard subject).
    pub fn policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        let shard = self.shard(subject);
        if subject.is_wildcard() {
            shard
                .tiers
                .iter()
                .find(|(k, _)| *k == subject.kind())
                .map(|(_, r)| Arc::clone(&r.policy))
        } else {
            shard.exact.get(subject).map(|r| Arc::clone(&r.policy))
        }
    }

    /// The policy that applies to a subject: its own, else its kind's tier.
    pub fn effective_policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        self.shard(subject)
            .resolve(subject)
            .map(|r| Arc::clone(&r.policy))
    }

    /// Every policy, tiers included, sorted by subject.
    pub fn policies(&self) -> Vec<(Subject, Arc<Policy>)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.load();
            all.extend(
                shard
                    .exact
                    .iter()
                    .map(|(s, r)| (s.clone(), Arc::clone(&r.policy))),
            );
        }
        all.extend(
            self.shards[0]
                .load()
                .tiers
                .iter()
                .map(|(k, r)| (Subject::wildcard(*k), Arc::clone(&r.policy))),
        );
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Resolve a request: each distinct subject with a policy, with its limits.
    pub fn plan(&self, request: &Request) -> Plan {
        let mut subjects: SmallVec<[PlannedSubject; 4]> = SmallVec::new();
        for (index, subject) in request.subjects.iter().enumerate() {
            if request.subjects[..index].contains(subject) {
                continue;
            }
            if let Some(resolved) = self.shard(subject).resolve(subject) {
                subjects.push((subject.clone(), index, Arc::clone(&resolved.planned)));
            }
        }
        Plan { subjects }
    }

    fn with_plan<R>(&self, request: &Request, f: impl FnOnce(&[PlanSubject<'_>]) -> R) -> R {
        if let [subject] = &request.subjects[..] {
            // One subject (the common case): one shard load, nothing to gather.
            let shard = self.shard(subject);
            return match shard.resolve(subject) {
                Some(resolved) => f(&[PlanSubject {
                    subject,
                    index: 0,
                    limits: &resolved.planned,
                }]),
                None => f(&[]),
            };
        }
        // Hold each distinct subject's shard while the plan borrows from it.
        let mut loaded: SmallVec<[(usize, arc_swap::Guard<Arc<PolicyShard>>); 4]> = SmallVec::new();
        for (index, subject) in request.subjects.iter().enumerate() {
            if !request.subjects[..index].contains(subject) {
                loaded.push((index, self.shard(subject)));
            }
        }
        let mut subjects: SmallVec<[PlanSubject<'_>; 4]> = SmallVec::new();
        for (index, shard) in &loaded {
            let subject = &request.subjects[*index];
            if let Some(resolved) = shard.resolve(subject) {
                subjects.push(PlanSubject {
                    subject,
                    index: *index,
                    limits: &resolved.planned,
                });
            }
        }
        f(&subjects)
    }
}

fn statuses(plan: &[PlanSubject<'_>], levels: &[Level]) -> Statuses {
    // `new`, not `with_capacity`: the latter builds the 264-byte vector and
    // then moves it (a memcpy on every decision).
    let mut out = Statuses::new();
    fill_statuses(plan, levels, &mut out);
    out
}

/// An allowed decision, its statuses written in place (building them apart
/// and moving them in costs a memcpy of 264 bytes).
fn allowed(plan: &[PlanSubject<'_>], levels: &[Level]) -> Decision {
    let mut decision = Decision::Allowed(Statuses::new());
    if let Decision::Allowed(out) = &mut decision {
        fill_statuses(plan, levels, out);
    }
    decision
}

fn fill_statuses(plan: &[PlanSubject<'_>], levels: &[Level], out: &mut Statuses) {
    let mut levels = levels.iter();
    for p in plan {
        for (pl, level) in p.limits.iter().zip(levels.by_ref()) {
            out.push(LimitStatus {
                subject: p.index,
                metric: pl.limit.metric(),
                window: pl.limit.window(),
                algorithm: pl.limit.algorithm(),
                limit: pl.limit.limit(),
                used: level.used,
                remaining: level.remaining,
                reset_at: Timestamp::from_nanos(level.reset_at),
            });
        }
    }
}

fn denial(plan: &[PlanSubject<'_>], refusal: Refusal, amounts: &Amounts, now: u64) -> Denial {
    let p = &plan[refusal.plan_subject];
    let limit = &p.limits[refusal.limit].limit;
    let reason = match refusal.admit {
        Admit::At(t) => {
            DenialReason::RetryAfter(Duration::from_nanos(t.saturating_sub(now).max(1)))
        }
        Admit::Now | Admit::Never => DenialReason::NeverFits {
            requested: amounts.get(limit.metric()),
            capacity: limit.capacity(),
        },
    };
    Denial {
        subject: p.index,
        metric: limit.metric(),
        window: limit.window(),
        limit: limit.limit(),
        reason,
    }
}

/// The limit engine: decides requests against every subject's policy.
///
/// Generic over where time comes from and where state lives; the defaults are
/// the system clock and the in-memory store.
#[derive(Debug)]
pub struct Limiter<C = SystemClock, S = MemoryStore> {
    clock: C,
    store: S,
    config: LimiterConfig,
    table: PolicyTable,
}

impl Limiter {
    /// An in-memory limiter on the system clock.
    pub fn in_memory() -> Limiter {
        Limiter::new(SystemClock, MemoryStore::new(), LimiterConfig::default())
    }
}

impl<C: Clock, S: Store> Limiter<C, S> {
    /// A limiter with this clock, store and settings.
    pub fn new(clock: C, store: S, config: LimiterConfig) -> Limiter<C, S> {
        Limiter {
            clock,
            store,
            config,
            table: PolicyTable::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The policies.
    pub fn table(&self) -> &PolicyTable {
        &self.table
    }

    /// Set (or replace) a subject's policy; see [`PolicyTable::set_policy`].
    pub fn set_policy(&self, subject: &Subject, policy: Policy) -> Option<Arc<Policy>> {
        self.table.set_policy(subject, policy)
    }

    /// Set many policies at once; see [`PolicyTable::set_policies`].
    pub fn set_policies(&self, policies: impl IntoIterator<Item = (Subject, Policy)>) {
        self.table.set_policies(policies);
    }

    /// Remove a subject's own policy (or a tier). Its counters stay until idle.
    pub fn remove_policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        self.table.remove_policy(subject)
    }

    /// The subject's own policy (or the tier's, for a wildcard subject).
    pub fn policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        self.table.policy(subject)
    }

    /// The policy that applies to a subject: its own, else its kind's tier.
    pub fn effective_policy(&self, subject: &Subject) -> Option<Arc<Policy>> {
        self.table.effective_policy(subject)
    }

    /// Every policy, tiers included, sorted by subject.
    pub fn policies(&self) -> Vec<(Subject, Arc<Policy>)> {
        self.table.policies()
    }

    /// Decide and, if allowed, take the amounts at once (reserve + commit).
    pub fn check(&self, request: &Request) -> Decision {
        self.table.with_plan(request, |plan| {
            let now = self.clock.now().as_nanos();
            match self.store.acquire(now, plan, &request.amounts, Hold::Spend) {
                Ok(acquired) => allowed(plan, &acquired.levels),
                Err(refusal) => Decision::Denied(denial(plan, refusal, &request.amounts, now)),
            }
        })
    }

    /// Take the amounts at instant `at` without deciding: every limit is
    /// charged, even past its limit. For replaying a ledger after a restart
    /// (in time order) and for letting a request through on purpose.
    /// Returns the statuses after the charge.
    pub fn charge_at(&self, request: &Request, at: Timestamp) -> Statuses {
        self.table.with_plan(request, |plan| {
            match self
                .store
                .acquire(at.as_nanos(), plan, &request.amounts, Hold::Force)
            {
                Ok(acquired) => statuses(plan, &acquired.levels),
                Err(_) => Statuses::new(), // a forced charge is never refused
            }
        })
    }

    /// Decide without taking anything.
    pub fn peek(&self, request: &Request) -> Decision {
        self.table.with_plan(request, |plan| {
            let now = self.clock.now().as_nanos();
            match self.store.peek(now, plan, &request.amounts) {
                Ok(levels) => allowed(plan, &levels),
                Err(refusal) => Decision::Denied(denial(plan, refusal, &request.amounts, now)),
            }
        })
    }

    /// Hold the amounts until [`commit`](Self::commit), [`release`](Self::release)
    /// or the lease's end (default [`LimiterConfig::default_lease`]), when they
    /// are settled as spent.
    pub fn reserve(
        &self,
        request: &Request,
        lease: Option<Duration>,
    ) -> Result<Reservation, Denial> {
        let lease = lease
            .unwrap_or(self.config.default_lease)
            .min(self.config.max_lease)
            .max(Duration::from_nanos(1));
        self.table.with_plan(request, |plan| {
            let now = self.clock.now().as_nanos();
            let expires_at = now.saturating_add(duration_nanos(lease));
            match self
                .store
                .acquire(now, plan, &request.amounts, Hold::Lease { expires_at })
            {
                Ok(acquired) => Ok(Reservation {
                    id: acquired.reservation.unwrap_or(ReservationId(0)),
                    expires_at: Timestamp::from_nanos(expires_at),
                    limits: statuses(plan, &acquired.levels),
                }),
                Err(refusal) => Err(denial(plan, refusal, &request.amounts, now)),
            }
        })
    }

    /// Settle a reservation at the actual amounts: less than held is refunded,
    /// more is charged even past the limit and reported as overshoot.
    pub fn commit(
        &self,
        id: ReservationId,
        actual: &Amounts,
    ) -> Result<Settlement, ReservationError> {
        self.store
            .settle(self.clock.now().as_nanos(), id, Some(actual))
    }

    /// Refund everything a reservation holds.
    pub fn release(&self, id: ReservationId) -> Result<(), ReservationError> {
        self.store
            .settle(self.clock.now().as_nanos(), id, None)
            .map(|_| ())
    }

    /// Used, remaining and reset of each limit that applies to `subject`
    /// (`subject` index 0 in each status).
    pub fn usage(&self, subject: &Subject) -> Vec<LimitStatus> {
        let request = Request::new([subject.clone()], Amounts::ZERO);
        match self.peek(&request) {
            Decision::Allowed(statuses) => statuses.into_vec(),
            Decision::Denied(_) => Vec::new(), // a zero request is never refused
        }
    }

    /// Settle every lease that has run out, returning what each held.
    pub fn expire_leases(&self) -> Vec<ExpiredReservation> {
        self.store.expire(self.clock.now().as_nanos())
    }

    /// Drop idle state now (the store also does this as it grows).
    pub fn sweep(&self) -> usize {
        self.store.sweep(self.clock.now().as_nanos())
    }

    /// Reservations not yet settled.
    pub fn outstanding(&self) -> usize {
        self.store.outstanding()
    }
}
