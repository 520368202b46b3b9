//! The kill switch: agents an operator stopped, whatever their limits say.
//!
//! The set lives in the database (`agent_status`, with every kill and resume
//! in `mesh_events`) and in memory here; replicas on PostgreSQL reload it on
//! each change notice. Decisions and proxied calls naming a stopped agent get
//! 403 `agent_killed`; settling reservations already made still works, so
//! in-flight calls and streams finish.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_core::Subject;

use crate::db::Killed;
use crate::error::ApiError;

/// The stopped agents.
#[derive(Debug, Default)]
pub struct KillSwitch {
    /// Whether any agent is stopped: the decision path reads only this
    /// while none is.
    any: AtomicBool,
    killed: RwLock<HashMap<String, Killed>>,
}

impl KillSwitch {
    /// Replace the set (at start and on reload).
    pub fn set_all(&self, rows: Vec<Killed>) {
        let mut map = self
            .killed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map = rows.into_iter().map(|k| (k.subject.clone(), k)).collect();
        self.any.store(!map.is_empty(), Ordering::Release);
    }

    /// Stop an agent.
    pub fn kill(&self, k: Killed) {
        let mut map = self
            .killed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(k.subject.clone(), k);
        self.any.store(true, Ordering::Release);
    }

    /// Resume an agent.
    pub fn resume(&self, subject: &str) {
        let mut map = self
            .killed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(subject);
        self.any.store(!map.is_empty(), Ordering::Release);
    }

    /// The record of `subject` if it is stopped.
    pub fn get(&self, subject: &str) -> Option<Killed> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.killed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(subject)
            .cloned()
    }

    /// The first stopped agent among `subjects`.
    pub fn first(&self, subjects: &[Subject]) -> Option<Killed> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let map = self
            .killed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        subjects.iter().find_map(|s| map.get(s.as_str()).cloned())
    }

    /// `Err(403 agent_killed)` if any of `subjects` is stopped.
    pub fn ensure_running(&self, subjects: &[Subject]) -> Result<(), ApiError> {
        match self.first(subjects) {
            None => Ok(()),
            Some(k) => Err(killed_error(&k)),
        }
    }
}

/// What a stopped agent's callers are told.
pub fn killed_message(k: &Killed) -> String {
    let since = crate::wire::rfc3339(k.since_ns);
    let why = k
        .reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{} was stopped by an operator at {since}{why}; nothing is decided or forwarded for it until it is resumed (POST /v1/mesh/agents/{}/resume)",
        k.subject, k.subject
    )
}

/// 403 `agent_killed`.
pub fn killed_error(k: &Killed) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "agent_killed",
        killed_message(k),
    )
    .field("subjects")
}
