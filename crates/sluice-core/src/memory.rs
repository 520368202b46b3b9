//! The in-memory store: sharded, safe under many threads, bounded memory.
//!
//! Subjects are spread over [`STATE_SHARDS`] mutex-guarded hash tables by
//! their cached hash. A request locks the shards of all its subjects in
//! ascending order (so two requests never deadlock), decides every limit, and
//! only then charges: all-or-nothing, linearizable.
//!
//! Memory stays bounded: when a shard's table has doubled since its last
//! sweep, entries whose state is the same as fresh (every window has passed)
//! are dropped before the insert, so a shard holds at most about twice its
//! live subjects, amortized O(1) per insert. [`Store::sweep`] drops them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;
use smallvec::SmallVec;

use crate::algo::{Admit, Level, LimitState};
use crate::decision::{
    ExpiredReservation, HeldAmount, Overshoot, ReservationError, ReservationId, Settlement,
};
use crate::metric::Amounts;
use crate::policy::Limit;
use crate::store::{Acquired, Hold, LimitKey, PlanSubject, Refusal, Store};
use crate::subject::{Subject, hash_str};
use crate::time::Timestamp;

/// Number of state shards (a power of two).
pub const STATE_SHARDS: usize = 64;
const LEASE_SHARDS: usize = 16;
/// A shard is swept when its table reaches this size at the least.
const MIN_SWEEP_LEN: usize = 1_024;

/// Keeps each shard's lock on its own cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

#[derive(Debug)]
struct Slot {
    key: LimitKey,
    state: LimitState,
}

#[derive(Debug)]
struct Entry {
    subject: Arc<str>,
    /// From this instant every slot is the same as fresh.
    idle_at: u64,
    slots: SmallVec<[Slot; 1]>,
}

impl Entry {
    fn slot(&self, key: LimitKey) -> Option<&LimitState> {
        self.slots.iter().find(|s| s.key == key).map(|s| &s.state)
    }

    fn slot_mut(&mut self, key: LimitKey, limit: &Limit) -> &mut LimitState {
        let pos = match self.slots.iter().position(|s| s.key == key) {
            Some(pos) => pos,
            None => {
                self.slots.push(Slot {
                    key,
                    state: LimitState::new(limit),
                });
                self.slots.len() - 1
            }
        };
        &mut self.slots[pos].state
    }

    fn charge(&mut self, key: LimitKey, limit: &Limit, now: u64, amount: u64) -> (u64, Level) {
        let state = self.slot_mut(key, limit);
        let mark = state.charge(limit, now, amount);
        let idle = state.idle_at(limit, now);
        let level = state.level(limit, now);
        self.idle_at = self.idle_at.max(idle);
        (mark, level)
    }
}

#[derive(Debug)]
struct Shard {
    table: HashTable<Entry>,
    sweep_at: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            table: HashTable::new(),
            sweep_at: MIN_SWEEP_LEN,
        }
    }
}

impl Shard {
    fn find(&self, subject: &Subject) -> Option<&Entry> {
        self.table
            .find(subject.hash_value(), |e| *e.subject == *subject.as_str())
    }

    fn find_mut(&mut self, subject: &Subject) -> Option<&mut Entry> {
        self.table
            .find_mut(subject.hash_value(), |e| *e.subject == *subject.as_str())
    }

    fn sweep(&mut self, now: u64) -> usize {
        let before = self.table.len();
        self.table.retain(|e| e.idle_at > now);
        self.sweep_at = (self.table.len() * 2).max(MIN_SWEEP_LEN);
        before - self.table.len()
    }

    fn entry_mut(&mut self, subject: &Subject, now: u64) -> &mut Entry {
        let hash = subject.hash_value();
        if self.table.len() >= self.sweep_at && self.find(subject).is_none() {
            self.sweep(now);
        }
        let eq = |e: &Entry| *e.subject == *subject.as_str();
        match self.table.entry(hash, eq, |e| hash_str(&e.subject)) {
            hashbrown::hash_table::Entry::Occupied(o) => o.into_mut(),
            hashbrown::hash_table::Entry::Vacant(v) => v
                .insert(Entry {
                    subject: Arc::clone(subject.as_arc()),
                    idle_at: 0,
                    slots: SmallVec::new(),
                })
                .into_mut(),
        }
    }
}

#[derive(Debug)]
struct HeldItem {
    subject: Subject,
    key: LimitKey,
    limit: Arc<Limit>,
    amount: u64,
    mark: u64,
}

type Leases = HashMap<u64, Lease>;

#[derive(Debug)]
struct Lease {
    expires_at: u64,
    items: Vec<HeldItem>,
}

/// The in-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Padded<Mutex<Shard>>]>,
    leases: Box<[Padded<Mutex<Leases>>]>,
    next_id: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path panics while holding a lock; if one ever did, the state
    // it guards is still well-formed (every update is a single assignment).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn shard_index(subject: &Subject) -> usize {
    // Middle bits: hashbrown uses the low bits for the bucket and the top 7 for tags.
    ((subject.hash_value() >> 32) as usize) & (STATE_SHARDS - 1)
}

/// Merge one limit's answer into the request's: `Never` wins, then the latest `At`.
fn worse(current: Option<Refusal>, candidate: Refusal) -> Option<Refusal> {
    Some(match (current, candidate.admit) {
        (None, _) => candidate,
        (Some(cur), Admit::Never) if cur.admit != Admit::Never => candidate,
        (Some(cur), Admit::At(t)) if matches!(cur.admit, Admit::At(c) if t > c) => candidate,
        (Some(cur), _) => cur,
    })
}

/// The shards a plan touches, locked in ascending order.
struct Locked<'a> {
    order: SmallVec<[usize; 4]>,
    guards: SmallVec<[MutexGuard<'a, Shard>; 4]>,
}

impl<'a> Locked<'a> {
    fn new(store: &'a MemoryStore, subjects: impl Iterator<Item = usize>) -> Locked<'a> {
        let mut order: SmallVec<[usize; 4]> = SmallVec::new();
        for shard in subjects {
            if !order.contains(&shard) {
                order.push(shard);
            }
        }
        order.sort_unstable();
        let mut guards = SmallVec::with_capacity(order.len());
        for &i in &order {
            guards.push(lock(&store.shards[i].0));
        }
        Locked { order, guards }
    }

    fn shard(&mut self, subject: &Subject) -> &mut Shard {
        let pos = if self.guards.len() == 1 {
            0
        } else {
            let target = shard_index(subject);
            self.order.iter().position(|&i| i == target).unwrap_or(0)
        };
        &mut self.guards[pos]
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore {
            shards: (0..STATE_SHARDS).map(|_| Padded::default()).collect(),
            leases: (0..LEASE_SHARDS).map(|_| Padded::default()).collect(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Subjects with state held right now (for memory accounting and tests).
    pub fn subjects(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).table.len()).sum()
    }

    fn decide(
        locked: &mut Locked<'_>,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Option<Refusal> {
        let mut refusal = None;
        for (pi, p) in plan.iter().enumerate() {
            let entry = locked.shard(p.subject).find(p.subject);
            for (li, pl) in p.limits.iter().enumerate() {
                let amount = amounts.get(pl.limit.metric());
                if amount == 0 {
                    continue;
                }
                let admit = match entry.and_then(|e| e.slot(pl.key)) {
                    Some(state) => state.admit(&pl.limit, now, amount),
                    None if amount > pl.limit.capacity() => Admit::Never,
                    None => Admit::Now,
                };
                if admit != Admit::Now {
                    refusal = worse(
                        refusal,
                        Refusal {
                            plan_subject: pi,
                            limit: li,
                            admit,
                        },
                    );
                }
            }
        }
        refusal
    }

    fn levels_of(shard: &Shard, p: &PlanSubject<'_>, now: u64, out: &mut SmallVec<[Level; 4]>) {
        let entry = shard.find(p.subject);
        for pl in p.limits {
            let level = match entry.and_then(|e| e.slot(pl.key)) {
                Some(state) => state.level(&pl.limit, now),
                None => LimitState::new(&pl.limit).level(&pl.limit, now),
            };
            out.push(level);
        }
    }

    fn lease_shard(&self, id: u64) -> &Mutex<Leases> {
        &self.leases[(id as usize) % LEASE_SHARDS].0
    }
}

impl Store for MemoryStore {
    fn acquire(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
        hold: Hold,
    ) -> Result<Acquired, Refusal> {
        let mut locked = Locked::new(self, plan.iter().map(|p| shard_index(p.subject)));
        if hold != Hold::Force {
            if let Some(refusal) = Self::decide(&mut locked, now, plan, amounts) {
                return Err(refusal);
            }
        }
        let mut levels = SmallVec::new();
        let mut held = Vec::new();
        for p in plan {
            let shard = locked.shard(p.subject);
            if p.limits
                .iter()
                .all(|pl| amounts.get(pl.limit.metric()) == 0)
            {
                Self::levels_of(shard, p, now, &mut levels);
            } else {
                let entry = shard.entry_mut(p.subject, now);
                for pl in p.limits {
                    let amount = amounts.get(pl.limit.metric());
                    let (mark, level) = if amount == 0 {
                        (0, entry.slot_mut(pl.key, &pl.limit).level(&pl.limit, now))
                    } else {
                        entry.charge(pl.key, &pl.limit, now, amount)
                    };
                    levels.push(level);
                    if let Hold::Lease { .. } = hold {
                        held.push(HeldItem {
                            subject: p.subject.clone(),
                            key: pl.key,
                            limit: Arc::clone(&pl.limit),
                            amount,
                            mark,
                        });
                    }
                }
            }
        }
        drop(locked);
        let reservation = match hold {
            Hold::Spend | Hold::Force => None,
            Hold::Lease { expires_at } => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                lock(self.lease_shard(id)).insert(
                    id,
                    Lease {
                        expires_at,
                        items: held,
                    },
                );
                Some(ReservationId(id))
            }
        };
        Ok(Acquired {
            reservation,
            levels,
        })
    }

    fn peek(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Result<SmallVec<[Level; 4]>, Refusal> {
        let mut locked = Locked::new(self, plan.iter().map(|p| shard_index(p.subject)));
        if let Some(refusal) = Self::decide(&mut locked, now, plan, amounts) {
            return Err(refusal);
        }
        let mut levels = SmallVec::new();
        for p in plan {
            Self::levels_of(locked.shard(p.subject), p, now, &mut levels);
        }
        Ok(levels)
    }

    fn settle(
        &self,
        now: u64,
        id: ReservationId,
        actual: Option<&Amounts>,
    ) -> Result<Settlement, ReservationError> {
        let lease = lock(self.lease_shard(id.0))
            .remove(&id.0)
            .ok_or(ReservationError::Unknown(id))?;
        if now >= lease.expires_at {
            // Settled at the held amounts, which are already counted.
            return Err(ReservationError::Expired(id));
        }
        let mut settlement = Settlement::default();
        let mut locked = Locked::new(self, lease.items.iter().map(|h| shard_index(&h.subject)));
        for item in &lease.items {
            let actual = actual.map_or(0, |a| a.get(item.limit.metric()));
            let shard = locked.shard(&item.subject);
            if actual < item.amount {
                if let Some(entry) = shard.find_mut(&item.subject) {
                    entry.slot_mut(item.key, &item.limit).refund(
                        &item.limit,
                        item.mark,
                        item.amount - actual,
                    );
                }
            } else if actual > item.amount {
                let entry = shard.entry_mut(&item.subject, now);
                let (_, level) = entry.charge(item.key, &item.limit, now, actual - item.amount);
                if level.used > item.limit.limit() {
                    settlement.overshoot.push(Overshoot {
                        subject: item.subject.clone(),
                        metric: item.limit.metric(),
                        window: item.limit.window(),
                        limit: item.limit.limit(),
                        used: level.used,
                    });
                }
            }
        }
        Ok(settlement)
    }

    fn expire(&self, now: u64) -> Vec<ExpiredReservation> {
        let mut expired = Vec::new();
        for shard in self.leases.iter() {
            lock(&shard.0).retain(|&id, lease| {
                if lease.expires_at > now {
                    return true;
                }
                expired.push(ExpiredReservation {
                    id: ReservationId(id),
                    expires_at: Timestamp::from_nanos(lease.expires_at),
                    held: lease
                        .items
                        .iter()
                        .filter(|h| h.amount > 0)
                        .map(|h| HeldAmount {
                            subject: h.subject.clone(),
                            metric: h.limit.metric(),
                            window: h.limit.window(),
                            amount: h.amount,
                        })
                        .collect(),
                });
                false
            });
        }
        expired.sort_by_key(|e| e.id);
        expired
    }

    fn sweep(&self, now: u64) -> usize {
        self.shards.iter().map(|s| lock(&s.0).sweep(now)).sum()
    }

    fn outstanding(&self) -> usize {
        self.leases.iter().map(|s| lock(&s.0).len()).sum()
    }
}
