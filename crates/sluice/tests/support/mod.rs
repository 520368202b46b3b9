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

/// Run a CLI command to completion.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    sluice(cwd).args(args).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
