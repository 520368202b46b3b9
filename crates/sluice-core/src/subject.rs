//! Subjects: who a limit applies to.

use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

/// The longest subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 512;

/// The kind of a subject, from its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    /// `agent://org/env/name`
    Agent,
    /// `user:ID`
    User,
    /// `key:ID`
    Key,
    /// `team:ID`
    Team,
    /// `session:ID`
    Session,
    /// `ip:ADDR`
    Ip,
    /// `model:NAME`
    Model,
    /// `provider:PROVIDER/MODEL`: an upstream provider's own quota on one of
    /// its models (the gateway sets these from its configuration).
    Provider,
    /// `global`
    Global,
}

impl SubjectKind {
    /// The prefix that introduces this kind (`"user:"`, `"agent://"`, ...).
    pub fn prefix(self) -> &'static str {
        match self {
            SubjectKind::Agent => "agent://",
            SubjectKind::User => "user:",
            SubjectKind::Key => "key:",
            SubjectKind::Team => "team:",
            SubjectKind::Session => "session:",
            SubjectKind::Ip => "ip:",
            SubjectKind::Model => "model:",
            SubjectKind::Provider => "provider:",
            SubjectKind::Global => "global",
        }
    }
}

/// Why a string is not a valid subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Empty input.
    #[error("subject is empty")]
    Empty,
    /// Longer than [`MAX_SUBJECT_LEN`].
    #[error("subject is longer than {MAX_SUBJECT_LEN} bytes")]
    TooLong,
    /// No known prefix.
    #[error(
        "unknown subject kind in {0:?}: expected agent://org/env/name, user:ID, key:ID, team:ID, session:ID, ip:ADDR, model:NAME, provider:NAME/MODEL or global"
    )]
    UnknownKind(String),
    /// The part after the prefix is empty.
    #[error("{kind} subject has an empty id")]
    EmptyId {
        /// The prefix, e.g. `user:`.
        kind: &'static str,
    },
    /// A character that is not allowed.
    #[error("subject contains {0:?}, which is not allowed (no whitespace or control characters)")]
    BadChar(char),
    /// An agent address that is not `agent://org/env/name`.
    #[error(
        "agent address must be agent://org/env/name with three non-empty segments of [A-Za-z0-9._-], got {0:?}"
    )]
    BadAgent(String),
    /// `ip:` followed by something that is not an IP address.
    #[error("ip subject needs an IPv4 or IPv6 address, got {0:?}")]
    BadIp(String),
}

/// A validated subject in canonical form. Cloning is cheap (a shared string).
#[derive(Clone)]
pub struct Subject {
    text: Arc<str>,
    kind: SubjectKind,
    /// Hash of `text` under this process's seed, computed once at parse time
    /// so that stores never hash on the request path.
    hash: u64,
}

/// The per-process seeded hasher for subject strings.
///
/// The in-memory store keys counter state by this hash alone, so it is the
/// `quality` variant (full avalanche) with a random per-process seed.
pub(crate) fn hash_str(s: &str) -> u64 {
    static STATE: OnceLock<foldhash::quality::RandomState> = OnceLock::new();
    STATE
        .get_or_init(foldhash::quality::RandomState::default)
        .hash_one(s)
}

impl PartialEq for Subject {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}
impl Eq for Subject {}
impl std::hash::Hash for Subject {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}
impl PartialOrd for Subject {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Subject {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl Subject {
    /// Parse and validate a subject.
    pub fn parse(s: &str) -> Result<Subject, SubjectError> {
        if s.is_empty() {
            return Err(SubjectError::Empty);
        }
        if s.len() > MAX_SUBJECT_LEN {
            return Err(SubjectError::TooLong);
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(SubjectError::BadChar(c));
        }
        if s == "global" {
            return Ok(Subject::global());
        }
        if let Some(rest) = s.strip_prefix("agent://") {
            return Self::parse_agent(s, rest);
        }
        let Some((prefix, id)) = s.split_once(':') else {
            return Err(SubjectError::UnknownKind(s.to_owned()));
        };
        let kind = match prefix {
            "user" => SubjectKind::User,
            "key" => SubjectKind::Key,
            "team" => SubjectKind::Team,
            "session" => SubjectKind::Session,
            "ip" => SubjectKind::Ip,
            "model" => SubjectKind::Model,
            "provider" => SubjectKind::Provider,
            _ => return Err(SubjectError::UnknownKind(s.to_owned())),
        };
        if id.is_empty() {
            return Err(SubjectError::EmptyId {
                kind: kind.prefix(),
            });
        }
        if kind == SubjectKind::Ip && id != "*" {
            // Canonical form, so `ip:::1` and `ip:0:0:0:0:0:0:0:1` are one subject.
            let addr = IpAddr::from_str(id).map_err(|_| SubjectError::BadIp(id.to_owned()))?;
            return Ok(Subject::new(format!("ip:{addr}").into(), kind));
        }
        Ok(Subject::new(s.into(), kind))
    }

    fn new(text: Arc<str>, kind: SubjectKind) -> Subject {
        let hash = hash_str(&text);
        Subject { text, kind, hash }
    }

    fn parse_agent(s: &str, rest: &str) -> Result<Subject, SubjectError> {
        let ok_segment = |seg: &str| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let valid =
            rest == "*" || (segments.len() == 3 && segments.iter().all(|seg| ok_segment(seg)));
        if !valid {
            return Err(SubjectError::BadAgent(s.to_owned()));
        }
        Ok(Subject::new(s.into(), SubjectKind::Agent))
    }

    /// The `global` subject (shared: no allocation).
    pub fn global() -> Subject {
        static GLOBAL: OnceLock<Subject> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Subject::new("global".into(), SubjectKind::Global))
            .clone()
    }

    /// The wildcard subject for a kind (`user:*`, `agent://*`); `global` for [`SubjectKind::Global`].
    pub fn wildcard(kind: SubjectKind) -> Subject {
        if kind == SubjectKind::Global {
            return Subject::global();
        }
        Subject::new(format!("{}*", kind.prefix()).into(), kind)
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The shared canonical text.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.text
    }

    /// The cached hash (per-process seed).
    pub(crate) fn hash_value(&self) -> u64 {
        self.hash
    }

    /// The kind.
    pub fn kind(&self) -> SubjectKind {
        self.kind
    }

    /// Whether this is a tier wildcard (`user:*`, `agent://*`).
    pub fn is_wildcard(&self) -> bool {
        self.kind != SubjectKind::Global
            && self.text.ends_with('*')
            && self.text.len() == self.kind.prefix().len() + 1
    }
}

impl FromStr for Subject {
    type Err = SubjectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Subject::parse(s)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        for (s, kind) in [
            (
                "agent://myorg/production/order-processor",
                SubjectKind::Agent,
            ),
            ("user:42", SubjectKind::User),
            ("key:k_1", SubjectKind::Key),
            ("team:infra", SubjectKind::Team),
            ("session:abc-123", SubjectKind::Session),
            ("ip:10.0.0.1", SubjectKind::Ip),
            ("model:gpt-4o-mini", SubjectKind::Model),
            ("model:openrouter/anthropic/claude-3.5", SubjectKind::Model),
            ("provider:openai/gpt-4o-mini", SubjectKind::Provider),
            ("global", SubjectKind::Global),
        ] {
            let subject = Subject::parse(s).unwrap();
            assert_eq!(subject.kind(), kind, "{s}");
            assert_eq!(subject.as_str(), s);
            assert!(!subject.is_wildcard());
        }
    }

    #[test]
    fn canonicalises_ip() {
        assert_eq!(
            Subject::parse("ip:0:0:0:0:0:0:0:1").unwrap().as_str(),
            "ip:::1"
        );
    }

    #[test]
    fn wildcards() {
        assert!(Subject::parse("user:*").unwrap().is_wildcard());
        assert!(Subject::parse("agent://*").unwrap().is_wildcard());
        assert_eq!(Subject::wildcard(SubjectKind::Team).as_str(), "team:*");
        assert!(!Subject::parse("user:a*").unwrap().is_wildcard());
    }

    #[test]
    fn rejects_bad_subjects_with_a_reason() {
        type Check = fn(&SubjectError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, SubjectError::Empty)),
            ("bob", |e| matches!(e, SubjectError::UnknownKind(_))),
            ("org:1", |e| matches!(e, SubjectError::UnknownKind(_))),
            ("user:", |e| matches!(e, SubjectError::EmptyId { .. })),
            ("user:a b", |e| matches!(e, SubjectError::BadChar(' '))),
            ("user:a\nb", |e| matches!(e, SubjectError::BadChar('\n'))),
            ("agent://org/name", |e| {
                matches!(e, SubjectError::BadAgent(_))
            }),
            ("agent://org//name", |e| {
                matches!(e, SubjectError::BadAgent(_))
            }),
            ("agent://o/e/n/x", |e| {
                matches!(e, SubjectError::BadAgent(_))
            }),
            ("agent://o/e/n?x", |e| {
                matches!(e, SubjectError::BadAgent(_))
            }),
            ("ip:300.1.1.1", |e| matches!(e, SubjectError::BadIp(_))),
        ];
        for (input, check) in cases {
            let err = Subject::parse(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("user:{}", "x".repeat(MAX_SUBJECT_LEN));
        assert_eq!(Subject::parse(&long).unwrap_err(), SubjectError::TooLong);
    }
}
