//! A throwaway local Redis Cluster for tests: `n` primaries on free ports,
//! no persistence, in a temp dir; each server is watched by a shell loop
//! that stops it when this test process ends (however it ends), and
//! [`RedisCluster`]'s drop shuts it down at once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::TempDir;

/// A running cluster.
#[derive(Debug)]
pub struct RedisCluster {
    /// Client ports of the primaries.
    pub ports: Vec<u16>,
    watchers: Vec<Child>,
    dir: TempDir,
}

/// Whether cluster tests run: only where the shared Redis tests run
/// (`SLUICE_TEST_REDIS_URL` set), unless `SLUICE_SKIP_CLUSTER_TESTS` is set;
/// prints a notice when they do not.
pub fn cluster_tests_enabled(test: &str) -> bool {
    if std::env::var_os("SLUICE_SKIP_CLUSTER_TESTS").is_some() {
        eprintln!("NOTICE: SLUICE_SKIP_CLUSTER_TESTS is set; skipping {test}");
        return false;
    }
    match std::env::var("SLUICE_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => true,
        _ => {
            eprintln!(
                "NOTICE: SLUICE_TEST_REDIS_URL is not set; skipping the Redis Cluster test {test}"
            );
            false
        }
    }
}

/// A port `p` with `p + 10000` (the cluster bus) free too.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

/// Send one inline command; the raw reply (best effort).
fn command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(buf.get(..n)?).into_owned())
}

/// One node, watched: it stops when this process ends, and then its files
/// go too (the last node's watcher removes the directory), since a cluster
/// kept in a `static` is never dropped. A node stopped while this process
/// lives keeps its files: `restart` rejoins with them.
fn spawn_node(dir: &TempDir, p: u16) -> Child {
    let parent = std::process::id();
    let script = format!(
        "redis-server --port {p} --bind 127.0.0.1 --cluster-enabled yes \
         --cluster-config-file nodes-{p}.conf --dir {dir} --save '' --appendonly no \
         --cluster-node-timeout 2000 >>{dir}/log-{p}.txt 2>&1 & s=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.5; done; \
         kill $s 2>/dev/null; \
         if ! kill -0 {parent} 2>/dev/null; then \
           wait $s 2>/dev/null; rm -f {dir}/nodes-{p}.conf {dir}/log-{p}.txt; rmdir {dir} 2>/dev/null; \
         fi",
        dir = dir.0.display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sh for redis-server: {e}"))
}

fn wait_up(dir: &TempDir, p: u16) {
    let up = (0..100).any(|_| {
        let ok = command(p, "PING").is_some_and(|r| r.contains("PONG"));
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    let log = std::fs::read_to_string(dir.0.join(format!("log-{p}.txt"))).unwrap_or_default();
    assert!(
        up,
        "redis-server on port {p} did not start (is redis-server installed?): {log}"
    );
}

fn wait_formed(ports: &[u16]) {
    let formed = (0..200).any(|_| {
        let ok = ports
            .iter()
            .all(|&p| command(p, "CLUSTER INFO").is_some_and(|r| r.contains("cluster_state:ok")));
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(
        formed,
        "the Redis Cluster on {ports:?} did not reach cluster_state:ok"
    );
}

impl RedisCluster {
    /// Start `n` primaries (at least 3 for `redis-cli --cluster create`)
    /// and join them; panics with the reason if `redis-server` or
    /// `redis-cli` is missing or the cluster does not form within ~20 s.
    pub fn start(n: usize) -> RedisCluster {
        let dir = TempDir::new("redis-cluster");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < n {
            let p = free_port_pair();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut watchers = Vec::new();
        for &p in &ports {
            watchers.push(spawn_node(&dir, p));
        }
        for &p in &ports {
            wait_up(&dir, p);
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_formed(&ports);
        RedisCluster {
            ports,
            watchers,
            dir,
        }
    }

    /// Stop node `i` at once (no save: its keys are gone when it returns).
    pub fn stop(&mut self, i: usize) {
        let _ = command(self.ports[i], "SHUTDOWN NOSAVE");
        let _ = self.watchers[i].wait();
    }

    /// Start node `i` again (it rejoins with its slots, empty) and wait
    /// until the cluster is whole.
    pub fn restart(&mut self, i: usize) {
        self.watchers[i] = spawn_node(&self.dir, self.ports[i]);
        wait_up(&self.dir, self.ports[i]);
        wait_formed(&self.ports);
    }

    /// The nodes as a comma-separated URL list (`store.url` accepts it).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot a key lives in, as the cluster says (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = *self.ports.first().unwrap();
        let reply = command(port, &format!("CLUSTER KEYSLOT \"{key}\"")).unwrap();
        reply.trim().trim_start_matches(':').parse().unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for &p in &self.ports {
            let _ = command(p, "SHUTDOWN NOSAVE");
        }
        // Each watcher ends within half a second of its server (bounded).
        for w in &mut self.watchers {
            let done = (0..60).any(|_| {
                let exited = matches!(w.try_wait(), Ok(Some(_)));
                if !exited {
                    std::thread::sleep(Duration::from_millis(50));
                }
                exited
            });
            if !done {
                let _ = w.kill();
                let _ = w.wait();
            }
        }
    }
}
