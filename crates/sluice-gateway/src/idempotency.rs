//! `Idempotency-Key`: a retry with the same key, by the same caller, on the
//! same endpoint, within 24 h, gets the first answer and is counted once.
//!
//! Only answers that took something (2xx) are stored: a refusal took nothing,
//! so a retry after `Retry-After` with the same key is decided afresh (the
//! official SDKs retry 429s with the same key). A retry with the same key but
//! a different body is a 422; a retry while the first is still being decided
//! waits for it. Stored answers are written to the database in the same
//! transaction as their ledger rows and reloaded at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::auth::hex;
use crate::db::IdemRow;
use crate::error::ApiError;

/// How long an answer is kept.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// Most answers kept in memory; past it the oldest are dropped first.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Longest an idempotency key may be.
pub const MAX_KEY_LEN: usize = 255;

/// A stored answer.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Status.
    pub status: u16,
    /// Headers to replay.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Hash of the request body it answered.
    pub fingerprint: String,
    /// When, ns.
    pub created_ns: u64,
}

#[derive(Debug)]
enum Slot {
    InFlight(Arc<Notify>, String),
    Done(Arc<Stored>),
}

/// The table of keys.
#[derive(Debug, Default)]
pub struct Idempotency {
    slots: Mutex<HashMap<String, Slot>>,
}

/// What to do with a keyed request.
#[derive(Debug)]
pub enum Begin {
    /// Decide it; complete or drop the guard.
    Fresh(Guard),
    /// Answer with this.
    Replay(Arc<Stored>),
}

/// Holds a key while its request is decided; dropping it without
/// [`Guard::complete`] frees the key (nothing was stored).
#[derive(Debug)]
pub struct Guard {
    table: Arc<Idempotency>,
    /// The scope (caller, endpoint, key).
    pub scope: String,
    /// The body hash.
    pub fingerprint: String,
    notify: Arc<Notify>,
    done: bool,
}

impl Guard {
    /// Store the answer (only 2xx answers are kept) and wake waiters.
    pub fn complete(mut self, stored: Option<Stored>) {
        let mut slots = self.table.lock();
        match stored {
            Some(s) => {
                slots.insert(self.scope.clone(), Slot::Done(Arc::new(s)));
            }
            None => {
                slots.remove(&self.scope);
            }
        }
        drop(slots);
        self.done = true;
        self.notify.notify_waiters();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            let mut slots = self.table.lock();
            if matches!(slots.get(&self.scope), Some(Slot::InFlight(..))) {
                slots.remove(&self.scope);
            }
            drop(slots);
            self.notify.notify_waiters();
        }
    }
}

/// The `Idempotency-Key` header, checked.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        ApiError::bad_request("Idempotency-Key must be visible ASCII").field("Idempotency-Key")
    })?;
    if v.is_empty() || v.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} characters"
        ))
        .field("Idempotency-Key"));
    }
    Ok(Some(v.to_owned()))
}

/// SHA-256 of a body, hex.
pub fn fingerprint(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

impl Idempotency {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Load stored answers (at start).
    pub fn load(&self, rows: Vec<IdemRow>) {
        let mut slots = self.lock();
        for r in rows {
            let headers = serde_json::from_str(&r.headers).unwrap_or_default();
            slots.insert(
                r.scope,
                Slot::Done(Arc::new(Stored {
                    status: r.status,
                    headers,
                    body: r.body,
                    fingerprint: r.fingerprint,
                    created_ns: r.created_ns,
                })),
            );
        }
    }

    /// Claim `scope` for a request with this body hash, or get the stored
    /// answer; waits (up to 30 s) while another request holds it.
    pub async fn begin(
        self: &Arc<Self>,
        scope: String,
        fingerprint: String,
        now_ns: u64,
    ) -> Result<Begin, ApiError> {
        for _ in 0..3 {
            let notify = {
                let mut slots = self.lock();
                match slots.get(&scope) {
                    Some(Slot::Done(s))
                        if now_ns.saturating_sub(s.created_ns) < TTL.as_nanos() as u64 =>
                    {
                        if s.fingerprint != fingerprint {
                            return Err(reused());
                        }
                        return Ok(Begin::Replay(Arc::clone(s)));
                    }
                    Some(Slot::InFlight(n, fp)) => {
                        if *fp != fingerprint {
                            return Err(reused());
                        }
                        Arc::clone(n)
                    }
                    _ => {
                        let notify = Arc::new(Notify::new());
                        slots.insert(
                            scope.clone(),
                            Slot::InFlight(Arc::clone(&notify), fingerprint.clone()),
                        );
                        return Ok(Begin::Fresh(Guard {
                            table: Arc::clone(self),
                            scope,
                            fingerprint,
                            notify,
                            done: false,
                        }));
                    }
                }
            };
            let notified = notify.notified();
            // Re-check after registering, in case it finished in between.
            if !matches!(self.lock().get(&scope), Some(Slot::InFlight(..))) {
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), notified).await;
        }
        Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still being processed; retry later",
        )
        .field("Idempotency-Key"))
    }

    /// Drop answers older than the TTL, and the oldest past [`MAX_ENTRIES`].
    pub fn prune(&self, now_ns: u64) -> usize {
        let ttl = TTL.as_nanos() as u64;
        let mut slots = self.lock();
        let before = slots.len();
        slots.retain(|_, s| match s {
            Slot::Done(s) => now_ns.saturating_sub(s.created_ns) < ttl,
            Slot::InFlight(..) => true,
        });
        if slots.len() > MAX_ENTRIES {
            let mut ages: Vec<u64> = slots
                .values()
                .filter_map(|s| match s {
                    Slot::Done(s) => Some(s.created_ns),
                    Slot::InFlight(..) => None,
                })
                .collect();
            ages.sort_unstable();
            let cut = ages.get(slots.len() - MAX_ENTRIES).copied().unwrap_or(0);
            slots.retain(|_, s| match s {
                Slot::Done(s) => s.created_ns >= cut,
                Slot::InFlight(..) => true,
            });
        }
        before - slots.len()
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn reused() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request body",
    )
    .field("Idempotency-Key")
}
