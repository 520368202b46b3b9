//! The ledger writer: rows are queued by request handlers and written by one
//! task in transactions (group commit). In `batch` mode the writer gathers
//! rows for `ledger_batch_ms` (default 10 ms) after the first one, then writes
//! them all, so a row reaches disk at most that long plus one write after it
//! is acknowledged; in `always` mode the handler waits for the transaction
//! before it answers (and the writer does not wait to gather). A failed write is retried with
//! backoff and never dropped; the queue is bounded, so a stalled database
//! slows decisions instead of losing rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_core::Clock;

use crate::server::SharedClock;
use tokio::sync::{mpsc, oneshot};

use crate::config::LedgerSync;
use crate::db::{Db, IdemRow, LedgerRow};

/// Rows that may wait in the queue before handlers wait for room.
pub const QUEUE: usize = 65_536;
/// Most rows in one transaction.
const MAX_BATCH: usize = 4_096;

enum Msg {
    Rows {
        rows: Vec<LedgerRow>,
        idem: Option<IdemRow>,
        enqueued_ns: u64,
        ack: Option<oneshot::Sender<()>>,
    },
    Flush(oneshot::Sender<()>),
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Rows queued and not yet written.
    pub pending: AtomicU64,
    /// Rows written since start.
    pub written: AtomicU64,
    /// Write transactions that failed (and were retried).
    pub failures: AtomicU64,
    /// How long the oldest row of the last batch waited, ns.
    pub last_lag_ns: AtomicU64,
}

/// The handle request handlers write through.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    sync: LedgerSync,
    clock: SharedClock,
    /// Counters.
    pub stats: Arc<LedgerStats>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Ledger {
    /// Start the writer task on `db`.
    pub fn start(db: Db, sync: LedgerSync, gather: Duration, clock: SharedClock) -> Ledger {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(LedgerStats::default());
        let gather = match sync {
            LedgerSync::Batch => gather,
            LedgerSync::Always => Duration::ZERO,
        };
        tokio::spawn(writer(db, rx, gather, Arc::clone(&stats), clock.clone()));
        Ledger {
            tx,
            sync,
            clock,
            stats,
        }
    }

    /// Queue rows (and an idempotency record, written in the same
    /// transaction); with `ledger_sync = "always"`, wait until they are durable.
    pub async fn record(&self, rows: Vec<LedgerRow>, idem: Option<IdemRow>) {
        let n = rows.len() as u64;
        let (ack, wait) = match self.sync {
            LedgerSync::Always => {
                let (a, w) = oneshot::channel();
                (Some(a), Some(w))
            }
            LedgerSync::Batch => (None, None),
        };
        self.stats.pending.fetch_add(n, Ordering::Relaxed);
        let msg = Msg::Rows {
            rows,
            idem,
            enqueued_ns: self.clock.now().as_nanos(),
            ack,
        };
        if self.tx.send(msg).await.is_err() {
            tracing::error!("ledger writer has stopped; {n} rows not recorded");
            return;
        }
        if let Some(w) = wait {
            let _ = w.await;
        }
    }

    /// Wait until everything queued so far is written.
    pub async fn flush(&self) {
        let (a, w) = oneshot::channel();
        if self.tx.send(Msg::Flush(a)).await.is_ok() {
            let _ = w.await;
        }
    }
}

async fn writer(
    db: Db,
    mut rx: mpsc::Receiver<Msg>,
    gather: Duration,
    stats: Arc<LedgerStats>,
    clock: SharedClock,
) {
    let mut rows = Vec::new();
    let mut idem = Vec::new();
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut oldest = u64::MAX;
        let mut take = |msg: Msg,
                        rows: &mut Vec<LedgerRow>,
                        idem: &mut Vec<IdemRow>,
                        acks: &mut Vec<oneshot::Sender<()>>| match msg {
            Msg::Rows {
                rows: r,
                idem: i,
                enqueued_ns,
                ack,
            } => {
                oldest = oldest.min(enqueued_ns);
                rows.extend(r);
                idem.extend(i);
                acks.extend(ack);
            }
            Msg::Flush(ack) => acks.push(ack),
        };
        let flush = matches!(first, Msg::Flush(_));
        take(first, &mut rows, &mut idem, &mut acks);
        if !gather.is_zero() && !flush {
            // Gather by sleeping, then drain: the task is not woken once per
            // row (tens of thousands of wake-ups a second under load), and a
            // transaction carries a whole interval's rows.
            tokio::time::sleep(gather).await;
        }
        while rows.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut rows, &mut idem, &mut acks),
                Err(_) => break,
            }
        }
        if !rows.is_empty() || !idem.is_empty() {
            let mut backoff = Duration::from_millis(50);
            loop {
                match db.write_batch(&rows, &idem).await {
                    Ok(()) => break,
                    Err(e) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "ledger write of {} rows failed, retrying in {:?}: {e}",
                            rows.len(),
                            backoff
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let n = rows.len() as u64;
            stats.pending.fetch_sub(n, Ordering::Relaxed);
            stats.written.fetch_add(n, Ordering::Relaxed);
            if oldest != u64::MAX {
                stats.last_lag_ns.store(
                    clock.now().as_nanos().saturating_sub(oldest),
                    Ordering::Relaxed,
                );
            }
        }
        rows.clear();
        idem.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}
