//! The in-memory store: sharded, safe under many threads, bounded memory.
//!
//! Subjects are spread over [`STATE_SHARDS`] mutex-guarded hash tables by
//! their cached hash. A request locks the shards of all its subjects in
//! ascending order (so two requests never deadlock), decides every limit, and
//! only then charges: all-or-nothing, linearizable.
//!
//! Memory stays bounded: when a shard has doubled since its last sweep,
//! entries whose state is the same as fresh (every window has passed) are
//! dropped before the next request's inserts, so a shard holds at most about
//! twice its live subjects, amortized O(1) per insert. [`Store::sweep`] drops
//! them all.
//!
//! State is keyed by the subject's 64-bit hash (random per-process seed,
//! foldhash `quality`), not by its text: the store keeps no subject string
//! alive, and a lookup never compares strings. Two live subjects whose hashes
//! collide (about n²/2⁶⁵ for n live subjects: 3·10⁻⁸ at a million) would
//! share their counters for limits of the same shape, so each would be
//! limited by the pair's combined usage: more strictly, never past its limit.

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
use crate::policy::{Limit, Params};
use crate::store::{Acquired, Hold, LimitKey, PlanSubject, Refusal, Store};
use crate::subject::Subject;
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
struct Entry {
    /// The subject's seeded 64-bit hash: entries are keyed by it alone
    /// (see the module docs), so the store keeps no subject string alive.
    hash: u64,
    /// One state per limit, each tagged with its key.
    slots: SmallVec<[LimitState; 1]>,
}

impl Entry {
    fn new(hash: u64) -> Entry {
        Entry {
            hash,
            slots: SmallVec::new(),
        }
    }

    /// The slot of `key`. `hint` is where it usually is: slots are added in
    /// the order of the policy's limits, so the limit's index finds it at once.
    fn position(&self, key: LimitKey, hint: usize) -> Option<usize> {
        match self.slots.get(hint) {
            Some(s) if s.key() == key.0 => Some(hint),
            _ => self.slots.iter().position(|s| s.key() == key.0),
        }
    }

    fn slot(&self, key: LimitKey, hint: usize) -> Option<&LimitState> {
        self.position(key, hint).map(|i| &self.slots[i])
    }

    fn slot_mut(&mut self, key: LimitKey, hint: usize, limit: &Limit) -> &mut LimitState {
        let pos = match self.position(key, hint) {
            Some(pos) => pos,
            None => {
                self.slots.push(LimitState::new(limit, key.0));
                self.slots.len() - 1
            }
        };
        &mut self.slots[pos]
    }

    fn charge(
        &mut self,
        key: LimitKey,
        hint: usize,
        limit: &Limit,
        now: u64,
        amount: u64,
    ) -> (u64, Level) {
        self.slot_mut(key, hint, limit)
            .charge_level(limit, now, amount)
    }

    /// Whether every slot is the same as fresh at `now`.
    fn is_idle(&self, windows: &[u64], now: u64) -> bool {
        self.slots.iter().all(|s| {
            let window = windows.get(s.key() as usize).copied().unwrap_or(u64::MAX);
            s.is_idle(window, now)
        })
    }
}

/// One shard: entries kept densely in a vector, found through a table of
/// indices (the layout of `indexmap`): 4 bytes of table per subject instead
/// of a whole entry, and an index stays valid while entries are added.
#[derive(Debug)]
struct Shard {
    /// Subject hash → index into `entries`.
    index: HashTable<u32>,
    entries: Vec<Entry>,
    /// The window of each `sliding` limit key charged here (`u64::MAX`:
    /// none), which its state needs to tell when it is idle.
    windows: Vec<u64>,
    sweep_at: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            index: HashTable::new(),
            entries: Vec::new(),
            windows: Vec::new(),
            sweep_at: MIN_SWEEP_LEN,
        }
    }
}

impl Shard {
    fn find(&self, hash: u64) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(hash, |&i| entries[i as usize].hash == hash)
            .map(|&i| i as usize)
    }

    fn entry_mut(&mut self, hash: u64) -> Option<&mut Entry> {
        let i = self.find(hash)?;
        self.entries.get_mut(i)
    }

    /// The entry's index, adding a fresh entry if there is none.
    fn find_or_insert(&mut self, hash: u64) -> usize {
        if let Some(i) = self.find(hash) {
            return i;
        }
        let i = self.entries.len();
        self.entries.push(Entry::new(hash));
        let entries = &self.entries;
        self.index
            .insert_unique(hash, i as u32, |&j| entries[j as usize].hash);
        i
    }

    /// Drop idle entries once the shard has doubled since the last sweep:
    /// amortized O(1) per added subject. Indices found before are invalid after.
    fn sweep_if_grown(&mut self, now: u64) {
        if self.entries.len() >= self.sweep_at {
            self.sweep(now);
        }
    }

    /// Remember a `sliding` limit's window for telling idle state (a key's
    /// window never changes: it is part of what the key identifies).
    fn note_window(&mut self, key: LimitKey, limit: &Limit) {
        if let Params::Sliding { window, .. } = limit.params {
            let k = key.0 as usize;
            if self.windows.get(k) != Some(&window) {
                if self.windows.len() <= k {
                    self.windows.resize(k + 1, u64::MAX);
                }
                self.windows[k] = window;
            }
        }
    }

    fn sweep(&mut self, now: u64) -> usize {
        let before = self.entries.len();
        let windows = &self.windows;
        self.entries.retain(|e| !e.is_idle(windows, now));
        self.index.clear();
        let entries = &self.entries;
        for (i, e) in entries.iter().enumerate() {
            self.index
                .insert_unique(e.hash, i as u32, |&j| entries[j as usize].hash);
        }
        self.sweep_at = (self.entries.len() * 2).max(MIN_SWEEP_LEN);
        before - self.entries.len()
    }
}

#[derive(Debug)]
struct HeldItem {
    subject: Subject,
    key: LimitKey,
    /// Where the slot is likely to be (the limit's index in its policy).
    slot: usize,
    limit: Arc<Limit>,
    amount: u64,
    mark: u64,
}

type Leases = HashMap<u64, Lease, foldhash::fast::FixedState>;

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

/// Where a plan subject's state is: its locked shard and, if it has state, its entry.
#[derive(Clone, Copy)]
struct Spot {
    guard: usize,
    entry: Option<usize>,
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

    /// The position of the subject's shard among the locked ones.
    fn pos(&self, subject: &Subject) -> usize {
        if self.guards.len() == 1 {
            0
        } else {
            let target = shard_index(subject);
            self.order.iter().position(|&i| i == target).unwrap_or(0)
        }
    }

    fn shard(&mut self, subject: &Subject) -> &mut Shard {
        let pos = self.pos(subject);
        &mut self.guards[pos]
    }

    /// Each plan subject's spot: one table probe per subject for the whole request.
    fn spots(&self, plan: &[PlanSubject<'_>]) -> SmallVec<[Spot; 4]> {
        plan.iter()
            .map(|p| {
                let guard = self.pos(p.subject);
                Spot {
                    guard,
                    entry: self.guards[guard].find(p.subject.hash_value()),
                }
            })
            .collect()
    }

    fn entry(&self, spot: Spot) -> Option<&Entry> {
        spot.entry.map(|i| &self.guards[spot.guard].entries[i])
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
        self.shards.iter().map(|s| lock(&s.0).entries.len()).sum()
    }

    fn decide(
        locked: &Locked<'_>,
        spots: &[Spot],
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Option<Refusal> {
        let mut refusal = None;
        for (pi, (p, spot)) in plan.iter().zip(spots).enumerate() {
            Self::decide_subject(locked.entry(*spot), pi, p, now, amounts, &mut refusal);
        }
        refusal
    }

    /// Decide one subject's limits, merging any refusal into `refusal`.
    fn decide_subject(
        entry: Option<&Entry>,
        pi: usize,
        p: &PlanSubject<'_>,
        now: u64,
        amounts: &Amounts,
        refusal: &mut Option<Refusal>,
    ) {
        for (li, pl) in p.limits.iter().enumerate() {
            let amount = amounts.get(pl.limit.metric());
            if amount == 0 {
                continue;
            }
            let admit = match entry.and_then(|e| e.slot(pl.key, li)) {
                Some(state) => state.admit(&pl.limit, now, amount),
                None if amount > pl.limit.capacity() => Admit::Never,
                None => Admit::Now,
            };
            if admit != Admit::Now {
                *refusal = worse(
                    *refusal,
                    Refusal {
                        plan_subject: pi,
                        limit: li,
                        admit,
                    },
                );
            }
        }
    }

    fn levels_of(
        entry: Option<&Entry>,
        p: &PlanSubject<'_>,
        now: u64,
        out: &mut SmallVec<[Level; 4]>,
    ) {
        for (li, pl) in p.limits.iter().enumerate() {
            let level = match entry.and_then(|e| e.slot(pl.key, li)) {
                Some(state) => state.level(&pl.limit, now),
                None => LimitState::new(&pl.limit, pl.key.0).level(&pl.limit, now),
            };
            out.push(level);
        }
    }

    /// Take the amounts on one subject (adding its entry if it has none),
    /// writing its levels and, for a lease, what is held. Inlined so that a
    /// `check` (no lease) carries none of the lease's bookkeeping (about 60
    /// instructions a one-limit check, by callgrind).
    #[inline(always)]
    fn take(
        shard: &mut Shard,
        found: Option<usize>,
        p: &PlanSubject<'_>,
        now: u64,
        amounts: &Amounts,
        levels: &mut SmallVec<[Level; 4]>,
        mut held: Option<&mut Vec<HeldItem>>,
    ) {
        if p.limits
            .iter()
            .all(|pl| amounts.get(pl.limit.metric()) == 0)
        {
            Self::levels_of(found.map(|i| &shard.entries[i]), p, now, levels);
            return;
        }
        for pl in p.limits {
            shard.note_window(pl.key, &pl.limit);
        }
        // A subject without state is added here; adding never moves others.
        let i = match found {
            Some(i) => i,
            None => shard.find_or_insert(p.subject.hash_value()),
        };
        let entry = &mut shard.entries[i];
        if let Some(held) = held.as_deref_mut() {
            held.reserve(p.limits.len());
        }
        for (li, pl) in p.limits.iter().enumerate() {
            let amount = amounts.get(pl.limit.metric());
            let state = entry.slot_mut(pl.key, li, &pl.limit);
            let (mark, level) = if amount == 0 {
                (0, state.level(&pl.limit, now))
            } else {
                state.charge_level(&pl.limit, now, amount)
            };
            levels.push(level);
            if let Some(held) = held.as_deref_mut() {
                held.push(HeldItem {
                    subject: p.subject.clone(),
                    key: pl.key,
                    slot: li,
                    limit: Arc::clone(&pl.limit),
                    amount,
                    mark,
                });
            }
        }
    }

    /// `acquire` for one subject (the common case): one shard, no lock set,
    /// and the answer built where it is returned.
    fn acquire_one(
        &self,
        now: u64,
        p: &PlanSubject<'_>,
        amounts: &Amounts,
        hold: Hold,
    ) -> Result<Acquired, Refusal> {
        let mut shard = lock(&self.shards[shard_index(p.subject)].0);
        shard.sweep_if_grown(now);
        let found = shard.find(p.subject.hash_value());
        if hold != Hold::Force {
            let mut refusal = None;
            let entry = found.map(|i| &shard.entries[i]);
            Self::decide_subject(entry, 0, p, now, amounts, &mut refusal);
            if let Some(refusal) = refusal {
                return Err(refusal);
            }
        }
        let mut acquired = Acquired::default();
        let mut held = Vec::new();
        let lease = matches!(hold, Hold::Lease { .. }).then_some(&mut held);
        Self::take(
            &mut shard,
            found,
            p,
            now,
            amounts,
            &mut acquired.levels,
            lease,
        );
        drop(shard);
        if let Hold::Lease { expires_at } = hold {
            acquired.reservation = Some(self.record_lease(expires_at, held));
        }
        Ok(acquired)
    }

    fn record_lease(&self, expires_at: u64, items: Vec<HeldItem>) -> ReservationId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(self.lease_shard(id)).insert(id, Lease { expires_at, items });
        ReservationId(id)
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
        if let [p] = plan {
            return self.acquire_one(now, p, amounts, hold);
        }
        let mut locked = Locked::new(self, plan.iter().map(|p| shard_index(p.subject)));
        for shard in &mut locked.guards {
            shard.sweep_if_grown(now);
        }
        let spots = locked.spots(plan);
        if hold != Hold::Force {
            if let Some(refusal) = Self::decide(&locked, &spots, now, plan, amounts) {
                return Err(refusal);
            }
        }
        let mut acquired = Acquired::default();
        let mut held = Vec::new();
        for (p, spot) in plan.iter().zip(&spots) {
            let shard = &mut locked.guards[spot.guard];
            let held = matches!(hold, Hold::Lease { .. }).then_some(&mut held);
            Self::take(
                shard,
                spot.entry,
                p,
                now,
                amounts,
                &mut acquired.levels,
                held,
            );
        }
        drop(locked);
        if let Hold::Lease { expires_at } = hold {
            acquired.reservation = Some(self.record_lease(expires_at, held));
        }
        Ok(acquired)
    }
    fn peek(
        &self,
        now: u64,
        plan: &[PlanSubject<'_>],
        amounts: &Amounts,
    ) -> Result<SmallVec<[Level; 4]>, Refusal> {
        let locked = Locked::new(self, plan.iter().map(|p| shard_index(p.subject)));
        let spots = locked.spots(plan);
        if let Some(refusal) = Self::decide(&locked, &spots, now, plan, amounts) {
            return Err(refusal);
        }
        let mut levels = SmallVec::new();
        for (p, spot) in plan.iter().zip(&spots) {
            Self::levels_of(locked.entry(*spot), p, now, &mut levels);
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
                if let Some(entry) = shard.entry_mut(item.subject.hash_value()) {
                    entry.slot_mut(item.key, item.slot, &item.limit).refund(
                        &item.limit,
                        item.mark,
                        item.amount - actual,
                    );
                }
            } else if actual > item.amount {
                shard.note_window(item.key, &item.limit);
                let i = shard.find_or_insert(item.subject.hash_value());
                let (_, level) = shard.entries[i].charge(
                    item.key,
                    item.slot,
                    &item.limit,
                    now,
                    actual - item.amount,
                );
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

#[cfg(test)]
mod tests {
    /// The layout the memory figures in docs/BENCHMARKS.md rest on.
    #[test]
    fn a_one_limit_entry_is_48_bytes() {
        assert_eq!(size_of::<crate::algo::LimitState>(), 32);
        assert_eq!(size_of::<super::Entry>(), 48);
    }
}
