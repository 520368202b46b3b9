//! Helpers shared by Sluice's test suites. A dev-dependency only: a failure
//! here is a test failure, so panicking is the right answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod redis_cluster;
pub mod tls;
pub mod upstream;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

static N: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory under the system temp dir, removed on drop; its
/// name carries the tag, the process id and a counter, so parallel tests never share one.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sluice-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_distinct_and_removed() {
        let a = TempDir::new("x");
        let b = TempDir::new("x");
        assert_ne!(a.0, b.0);
        assert!(a.0.is_dir());
        let path = a.0.clone();
        drop(a);
        assert!(!path.exists());
    }
}
