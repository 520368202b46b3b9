//! Who is calling: the admin key or an agent key, from `Authorization: Bearer`
//! or `x-api-key`. Keys are 256-bit random strings; only their SHA-256 is kept
//! (a slow password hash buys nothing for keys with this much entropy).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sluice_core::Subject;

use crate::error::ApiError;

/// Prefix of every key Sluice generates.
pub const KEY_PREFIX: &str = "sk-sluice-";

/// An agent key, as held in memory.
#[derive(Debug, Clone)]
pub struct AgentKey {
    /// `key_...`.
    pub id: String,
    /// The subject it acts for.
    pub subject: Subject,
    /// Label.
    pub name: String,
    /// First characters of the key.
    pub prefix: String,
    /// Created, ns.
    pub created_ns: u64,
}

/// The caller of a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin key.
    Admin,
    /// An agent key.
    Agent(Arc<AgentKey>),
}

impl Caller {
    /// `admin` or the key id (recorded in the ledger and scoping idempotency keys).
    pub fn id(&self) -> &str {
        match self {
            Caller::Admin => "admin",
            Caller::Agent(k) => &k.id,
        }
    }

    /// Fail unless this is the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(k) => Err(ApiError::forbidden(format!(
                "agent key {} may not use this endpoint; it needs the admin key",
                k.id
            ))),
        }
    }

    /// Fail unless the caller may act for (or read) `subject`.
    pub fn require_subject(&self, subject: &Subject, field: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(k) if k.subject == *subject => Ok(()),
            Caller::Agent(k) => Err(ApiError::forbidden(format!(
                "agent key {} acts for {}, not {subject}",
                k.id, k.subject
            ))
            .field(field)),
        }
    }
}

/// SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if getrandom::fill(&mut buf).is_err() {
        // No OS randomness: refuse to make a predictable key.
        tracing::error!("the OS random number generator failed");
        std::process::abort();
    }
    hex(&buf)
}

/// A new key: the prefix and 256 random bits.
pub fn generate_key() -> String {
    format!("{KEY_PREFIX}{}", random_hex(32))
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Live keys.
#[derive(Debug)]
pub struct Keys {
    admin: [u8; 32],
    agents: RwLock<HashMap<[u8; 32], Arc<AgentKey>>>,
}

impl Keys {
    /// With the admin key and no agent keys.
    pub fn new(admin_key: &str) -> Keys {
        Keys {
            admin: hash_key(admin_key),
            agents: RwLock::default(),
        }
    }

    /// Add an agent key by its stored hex hash.
    pub fn insert(&self, hash_hex: &str, key: AgentKey) {
        if let Some(h) = unhex(hash_hex) {
            self.agents
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(h, Arc::new(key));
        }
    }

    /// Remove an agent key by id; whether it was live.
    pub fn remove(&self, id: &str) -> bool {
        let mut map = self
            .agents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = map.len();
        map.retain(|_, k| k.id != id);
        map.len() != before
    }

    /// Live agent keys.
    pub fn list(&self) -> Vec<Arc<AgentKey>> {
        let mut v: Vec<_> = self
            .agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
        v
    }

    fn lookup(&self, presented: &str) -> Option<Caller> {
        let h = hash_key(presented);
        if ct_eq(&h, &self.admin) {
            return Some(Caller::Admin);
        }
        self.agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&h)
            .map(|k| Caller::Agent(Arc::clone(k)))
    }

    /// Authenticate a request from its headers.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| {
                let v = v.to_str().unwrap_or("");
                match v.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                        Ok(token.trim().to_owned())
                    }
                    _ => Err(ApiError::unauthenticated(
                        "Authorization header must be `Bearer KEY`",
                    )
                    .field("Authorization")),
                }
            })
            .transpose();
        let api_key = headers
            .get("x-api-key")
            .map(|v| v.to_str().unwrap_or("").trim().to_owned());
        let mut presented = false;
        for candidate in [api_key, bearer.as_ref().ok().cloned().flatten()]
            .into_iter()
            .flatten()
        {
            if candidate.is_empty() {
                continue;
            }
            presented = true;
            if let Some(caller) = self.lookup(&candidate) {
                return Ok(caller);
            }
        }
        bearer?;
        if presented {
            Err(ApiError::unauthenticated(
                "the API key is not valid (unknown or revoked)",
            ))
        } else {
            Err(ApiError::unauthenticated(
                "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
            ))
        }
    }
}
