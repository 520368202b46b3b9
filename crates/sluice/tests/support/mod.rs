//! Runs the real `sluice` binary: a server on 127.0.0.1:0 in its own directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

pub use sluice_test_support::TempDir;

/// A running `sluice serve`.
pub struct Serve {
    pub child: Child,
    pub url: String,
    pub stderr: mpsc::Receiver<String>,
    pub early: Vec<String>,
}

/// `sluice` with a clean environment (no SLUICE_* from the caller).
pub fn sluice(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd);
    for k in [
        "SLUICE_LISTEN",
        "SLUICE_DATA_DIR",
        "SLUICE_ADMIN_KEY",
        "SLUICE_SERVER",
    ] {
        c.env_remove(k);
    }
    c
}

impl Serve {
    /// Start `sluice serve ARGS` in `cwd` (with SLUICE_LISTEN=127.0.0.1:0) and
    /// wait for its "listening on" line.
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut cmd = sluice(cwd);
        cmd.arg("serve")
            .args(args)
            .env("SLUICE_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut early = Vec::new();
        loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sluice serve did not start; stderr: {early:?}");
            };
            early.push(line.clone());
            if let Some(url) = line.strip_prefix("sluice: listening on ") {
                return Serve {
                    child,
                    url: url.trim().to_owned(),
                    stderr: rx,
                    early,
                };
            }
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait; the exit status and the rest of stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.stderr.try_iter().collect();
        (status, rest)
    }
}

/// A server a test did not stop (it failed, or did not need to) is killed
/// with it, not left running.
impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a CLI command to completion.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    sluice(cwd).args(args).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A virtualenv (under the target directory, reused across runs) with these
/// PyPI packages, or `None` with a printed notice when SLUICE_SKIP_PYTHON_TESTS is set.
pub fn venv(name: &str, packages: &[&str]) -> Option<std::path::PathBuf> {
    if std::env::var_os("SLUICE_SKIP_PYTHON_TESTS").is_some() {
        eprintln!("NOTICE: SLUICE_SKIP_PYTHON_TESTS is set; skipping the {name} test");
        return None;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-venv"));
    let python = dir.join("bin/python");
    let imports: Vec<String> = packages
        .iter()
        .map(|p| {
            p.split(['=', '<', '>', '['])
                .next()
                .unwrap_or(p)
                .replace('-', "_")
        })
        .collect();
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {}", imports.join(", "))])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv failed; install python3-venv or set SLUICE_SKIP_PYTHON_TESTS=1"
        );
        let pip = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "pip install {packages:?} failed (PyPI unreachable?); set SLUICE_SKIP_PYTHON_TESTS=1 to skip"
        );
    }
    Some(python)
}
