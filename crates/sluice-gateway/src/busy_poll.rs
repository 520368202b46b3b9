//! Busy polling (`busy_poll_ms`, off by default): while requests keep
//! coming, the runtime's worker threads keep polling for I/O instead of
//! going to sleep between requests.
//!
//! Why: on a virtual machine, waking a virtual CPU that went idle costs tens
//! to hundreds of microseconds, and a proxied call wakes the gateway twice
//! (the client's request, the upstream's answer). Measured on this project's
//! 2-vCPU machine (docs/BENCHMARKS.md), that wake-up is most of the latency
//! a proxy adds at moderate load. This is the gateway-side counterpart of
//! the kernel's `haltpoll` idle driver: poll for a while before sleeping.
//!
//! How: one spinner task per worker thread yields in a loop, so its worker
//! always has a task to run and never parks; tokio then polls the I/O driver
//! without blocking every few dozen polls, so a socket that becomes readable
//! is served within microseconds. Each request marks the gateway active (one
//! relaxed load of a shared flag; a store at most once per check period).
//! When no request has come for `busy_poll_ms`, the spinners park and the
//! workers sleep as usual; the next request wakes them (that one request
//! pays the wake-up).
//!
//! The cost: while traffic flows, every worker thread uses a whole CPU, even
//! when there is one request a second. It is meant for latency-sensitive
//! deployments with cores to spare, not for shared or metered machines.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Yields between two looks at the clock.
const YIELDS_PER_LOOK: u32 = 64;

/// Shared between the request path and the spinners.
#[derive(Debug)]
struct Inner {
    /// A request came since the last check.
    active: AtomicBool,
    /// When a check last saw a request, in ns since `epoch`.
    seen_ns: AtomicU64,
    epoch: Instant,
    /// How long to keep spinning after the last request, in ns.
    window_ns: u64,
    /// How often the spinners look at `active`.
    check: Duration,
    /// Spinners spinning now.
    spinning: AtomicUsize,
    /// Spinners parked now.
    parked: AtomicUsize,
    wake: Notify,
}

/// The handle the request path marks, and the spinners' state.
#[derive(Debug, Clone)]
pub struct BusyPoll {
    inner: Arc<Inner>,
}

impl BusyPoll {
    /// Busy polling until `window` after the last request; nothing spins
    /// until [`spawn`](Self::spawn) starts the spinners.
    pub fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            inner: Arc::new(Inner {
                active: AtomicBool::new(false),
                seen_ns: AtomicU64::new(0),
                epoch: Instant::now(),
                window_ns: nanos(window),
                check: (window / 4).clamp(Duration::from_micros(100), Duration::from_millis(1)),
                spinning: AtomicUsize::new(0),
                parked: AtomicUsize::new(0),
                wake: Notify::new(),
            }),
        }
    }

    /// Start one spinner task per worker thread of the current runtime
    /// (what keeps every worker from parking); they start parked. The
    /// handles are for the caller to abort at shutdown.
    pub fn spawn_per_worker(&self) -> Vec<JoinHandle<()>> {
        self.spawn(tokio::runtime::Handle::current().metrics().num_workers())
    }

    /// Start `spinners` spinner tasks on the current runtime.
    fn spawn(&self, spinners: usize) -> Vec<JoinHandle<()>> {
        (0..spinners.max(1))
            .map(|_| tokio::spawn(spin(Arc::clone(&self.inner))))
            .collect()
    }

    /// A request came. Cheap enough for every request: a relaxed load of a
    /// flag that changes at most once per check period.
    #[inline]
    pub fn mark(&self) {
        let inner = &*self.inner;
        if !inner.active.load(Ordering::Relaxed) {
            // SeqCst with the spinner's park: either it sees the flag or
            // this sees it parked (a lost wake-up would leave busy polling
            // off while requests flow, since later marks find the flag set).
            inner.active.store(true, Ordering::SeqCst);
            if inner.parked.load(Ordering::SeqCst) > 0 {
                inner.wake.notify_waiters();
            }
        }
    }

    /// A router layer that marks every request except those to `probes`
    /// (a load balancer probing a health check every second must not keep
    /// the workers spinning). No boxing: each route keeps its own future.
    pub fn layer(
        &self,
        probes: &'static [&'static str],
    ) -> tower::util::MapRequestLayer<
        impl Fn(axum::extract::Request) -> axum::extract::Request + Clone + Send + Sync + 'static,
    > {
        let busy = self.clone();
        tower::util::MapRequestLayer::new(move |req: axum::extract::Request| {
            if !probes.contains(&req.uri().path()) {
                busy.mark();
            }
            req
        })
    }

    /// Spinners spinning now (the `sluice_busy_poll_spinning` gauge).
    pub fn spinning(&self) -> usize {
        self.inner.spinning.load(Ordering::Relaxed)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Inner {
    /// Whether requests came within the window, as of `now`.
    fn recently_active(&self, now: Instant) -> bool {
        let now_ns = nanos(now.duration_since(self.epoch));
        if self.active.swap(false, Ordering::Relaxed) {
            self.seen_ns.fetch_max(now_ns, Ordering::Relaxed);
            return true;
        }
        now_ns.saturating_sub(self.seen_ns.load(Ordering::Relaxed)) < self.window_ns
    }
}

async fn spin(inner: Arc<Inner>) {
    loop {
        // Parked until a request marks the gateway active. The waiter is
        // registered before the flag is read, so a mark in between is not lost.
        let mut woken = pin!(inner.wake.notified());
        woken.as_mut().enable();
        inner.parked.fetch_add(1, Ordering::SeqCst);
        if !inner.active.load(Ordering::SeqCst) {
            woken.await;
        }
        inner.parked.fetch_sub(1, Ordering::Relaxed);
        // Spinning until no request has come for the window.
        inner.spinning.fetch_add(1, Ordering::Relaxed);
        let mut next_check = Instant::now();
        loop {
            for _ in 0..YIELDS_PER_LOOK {
                tokio::task::yield_now().await;
            }
            let now = Instant::now();
            if now >= next_check {
                if !inner.recently_active(now) {
                    break;
                }
                next_check = now + inner.check;
            }
        }
        inner.spinning.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Let the spinners run a while (paused time does not move by itself
    /// while they spin).
    async fn run_a_while() {
        for _ in 0..(YIELDS_PER_LOOK * 8) {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn spins_while_requests_come_and_parks_after_the_window() {
        let busy = BusyPoll::new(Duration::from_millis(10));
        let tasks = busy.spawn(2);
        run_a_while().await;
        assert_eq!(busy.spinning(), 0, "idle at start: no spinning");

        busy.mark();
        run_a_while().await;
        assert_eq!(busy.spinning(), 2, "a request wakes every spinner");

        // Requests every 4 ms keep them spinning past the 10 ms window.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(4)).await;
            busy.mark();
            run_a_while().await;
            assert_eq!(busy.spinning(), 2);
        }

        // Quiet for less than the window: still spinning.
        tokio::time::advance(Duration::from_millis(6)).await;
        run_a_while().await;
        assert_eq!(busy.spinning(), 2);

        // Quiet for the whole window: parked.
        tokio::time::advance(Duration::from_millis(5)).await;
        run_a_while().await;
        assert_eq!(busy.spinning(), 0);

        // And the next request wakes them again.
        busy.mark();
        run_a_while().await;
        assert_eq!(busy.spinning(), 2);
        for t in tasks {
            t.abort();
        }
    }
}
