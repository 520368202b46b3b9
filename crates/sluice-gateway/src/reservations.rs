//! What the gateway keeps about each reservation beside the engine's lease:
//! who made it (only they, or the admin, may settle it), its subjects and
//! held amounts (for the ledger), and its public id.
//!
//! Public ids are `rsv_<boot>_<n>`: `<boot>` is random per process start, so
//! an id from before a restart is never mistaken for a new one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use sluice_core::{Amounts, ReservationId};

use crate::auth::random_hex;

const SHARDS: usize = 16;
/// How many settled-by-expiry ids are remembered (to answer 409, not 404).
const EXPIRED_MEMORY: usize = 100_000;

/// One reservation.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Caller id.
    pub caller: String,
    /// Subjects, as strings.
    pub subjects: Vec<String>,
    /// What it holds.
    pub held: Amounts,
    /// When it was made, ns.
    pub reserved_ns: u64,
    /// Subjects let past their limits (`alert` action): not held; charged
    /// by force when the reservation settles (the actual on commit, the
    /// held amounts on expiry).
    pub forced: Vec<String>,
}

/// The table.
#[derive(Debug)]
pub struct Reservations {
    boot: String,
    shards: Vec<Mutex<HashMap<u64, Meta>>>,
    /// Public ids settled by expiry or found unsettled at start.
    expired: Mutex<(HashSet<String>, std::collections::VecDeque<String>)>,
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations {
            boot: random_hex(4),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            expired: Mutex::default(),
        }
    }
}

/// A public id, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Issued by this process.
    Current(ReservationId),
    /// Issued before a restart (or not by us).
    Other,
}

impl Reservations {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Meta>> {
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This process's random boot tag (also used in intent ids).
    pub fn boot(&self) -> &str {
        &self.boot
    }

    /// The public id of an engine id.
    pub fn public_id(&self, id: ReservationId) -> String {
        format!("rsv_{}_{}", self.boot, id.0)
    }

    /// Parse a public id; `None` if it is not one at all.
    pub fn parse(&self, public: &str) -> Option<Parsed> {
        let rest = public.strip_prefix("rsv_")?;
        let (boot, n) = rest.split_once('_')?;
        if boot.len() != 8 || !boot.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let n: u64 = n.parse().ok()?;
        Some(if boot == self.boot {
            Parsed::Current(ReservationId(n))
        } else {
            Parsed::Other
        })
    }

    /// Record a new reservation.
    pub fn insert(&self, id: ReservationId, meta: Meta) {
        self.shard(id.0).insert(id.0, meta);
    }

    /// The reservation's caller, if it is held.
    pub fn caller(&self, id: ReservationId) -> Option<String> {
        self.shard(id.0).get(&id.0).map(|m| m.caller.clone())
    }

    /// Take a reservation out (to settle it).
    pub fn take(&self, id: ReservationId) -> Option<Meta> {
        self.shard(id.0).remove(&id.0)
    }

    /// Remember that a public id was settled at its held amounts.
    pub fn mark_expired(&self, public: String) {
        let mut e = self
            .expired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if e.0.insert(public.clone()) {
            e.1.push_back(public);
            while e.1.len() > EXPIRED_MEMORY {
                if let Some(old) = e.1.pop_front() {
                    e.0.remove(&old);
                }
            }
        }
    }

    /// Whether a public id was settled at its held amounts.
    pub fn was_expired(&self, public: &str) -> bool {
        self.expired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .contains(public)
    }
}
