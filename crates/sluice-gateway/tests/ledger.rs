//! The ledger's storage: what the writer writes, replay reads back, from the
//! right place (binary search on seq, no time index).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use sluice_core::Amounts;
use sluice_gateway::LedgerSync;
use sluice_gateway::db::{Db, LedgerRow, RowKind};
use sluice_gateway::ledger::SqliteSink;
use support::TempDir;

const SEC: u64 = 1_000_000_000;

fn row(ts_ns: u64, n: u64) -> LedgerRow {
    LedgerRow {
        ts_ns,
        kind: RowKind::Check,
        reservation: None,
        subjects: vec!["user:1".into(), "agent://a/b/c".into()],
        amounts: Amounts::one_request().with_cost_micros(n),
        held: None,
        reserved_ns: None,
        caller: "admin".into(),
        request_id: Some(format!("r{n}")),
        detail: None,
    }
}

#[tokio::test]
async fn ledger_since_returns_exactly_the_rows_at_or_after_the_cutoff() {
    let dir = TempDir::new("ledger");
    let db = Db::open(&dir.0, LedgerSync::Batch).await.unwrap();
    assert_eq!(
        db.schema_version().await.unwrap(),
        sluice_gateway::db::SCHEMA_VERSION
    );
    let mut sink = SqliteSink::open(&Db::path(&dir.0), LedgerSync::Batch).unwrap();
    // Three days of rows, one a minute, written in batches, a few slightly out of order.
    let t0 = 1_800_000_000 * SEC;
    let mut all = Vec::new();
    for i in 0..(3 * 24 * 60u64) {
        let jitter = if i % 7 == 0 { 2 * SEC } else { 0 };
        all.push(row(t0 + i * 60 * SEC - jitter, i));
    }
    for chunk in all.chunks(500) {
        sink.write(chunk, &[]).unwrap();
    }
    assert_eq!(db.ledger_len().await.unwrap(), all.len() as u64);
    for since in [
        0,
        t0,
        t0 + 3_600 * SEC,
        t0 + 36 * 3_600 * SEC + 17 * SEC,
        t0 + 80 * 3_600 * SEC,
    ] {
        let got: Vec<String> = db
            .ledger_since(since)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id.unwrap())
            .collect();
        let want: Vec<String> = all
            .iter()
            .filter(|r| r.ts_ns >= since)
            .map(|r| r.request_id.clone().unwrap())
            .collect();
        assert_eq!(got, want, "since {since}");
    }
    // Spend was rolled up per subject and UTC day.
    let total = db.spend("user:1", None, None).await.unwrap();
    assert_eq!(
        total.amounts.get(sluice_core::Metric::Requests),
        all.len() as u64
    );
    db.close().await;
}

/// Batches of every size from 1 to 40 come back whole: every column of every
/// row as written, in the order written.
#[tokio::test]
async fn batches_of_every_size_are_written_whole_and_in_order() {
    let dir = TempDir::new("ledger-chunks");
    let db = Db::open(&dir.0, LedgerSync::Batch).await.unwrap();
    let mut sink = SqliteSink::open(&Db::path(&dir.0), LedgerSync::Batch).unwrap();
    let t0 = 1_800_000_000 * SEC;
    let mut all = Vec::new();
    let mut n = 0u64;
    for size in 1..=40u64 {
        let batch: Vec<LedgerRow> = (0..size)
            .map(|_| {
                n += 1;
                // Every column differs from row to row; the optional ones
                // are set on some rows and not others.
                let mut r = row(t0 + n * SEC, n);
                r.kind = if n % 2 == 0 {
                    RowKind::Reserve
                } else {
                    RowKind::Commit
                };
                r.reservation = (n % 3 != 0).then(|| format!("res-{n}"));
                r.subjects = vec![format!("user:{n}"), "global".into()];
                r.amounts = Amounts::one_request()
                    .with_tokens(n, 2 * n)
                    .with_cost_micros(7 * n);
                r.held = (n % 4 == 0).then(|| Amounts::one_request().with_cost_micros(n));
                r.reserved_ns = (n % 5 != 0).then_some(t0 + n);
                r.caller = format!("key-{}", n % 7);
                r.request_id = (n % 6 != 0).then(|| format!("r{n}"));
                r.detail = (n % 2 == 1).then(|| format!("{{\"n\":{n}}}"));
                r
            })
            .collect();
        sink.write(&batch, &[]).unwrap();
        all.extend(batch);
    }
    let got = db.ledger_since(0).await.unwrap();
    assert_eq!(got.len(), all.len());
    for (g, w) in got.iter().zip(&all) {
        assert_eq!(format!("{g:?}"), format!("{w:?}"));
    }
    db.close().await;
}

/// Admin writes that read, then write (the kill switch reads the agent's
/// status first) succeed while the ledger writer commits on its own
/// connection: a deferred SQLite transaction would fail at once with
/// "database is locked" when the ledger wrote between its read and its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_wait_for_the_ledger_writer_instead_of_failing() {
    let dir = TempDir::new("ledger-contention");
    let db = Db::open(&dir.0, LedgerSync::Batch).await.unwrap();
    let path = Db::path(&dir.0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = SqliteSink::open(&path, LedgerSync::Batch).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                sink.write(&[row(n * SEC, n)], &[]).unwrap();
                n += 1;
            }
            n
        })
    };
    let audit = sluice_gateway::db::Audit {
        kind: "agent.killed",
        subject: "agent://a/b/c".into(),
        actor: "admin".into(),
        detail: None,
    };
    for i in 0..300u64 {
        let changed = db
            .set_killed("agent://a/b/c", i % 2 == 0, i, "admin", None, &audit)
            .await
            .unwrap_or_else(|e| panic!("toggle {i}: {e}"));
        assert!(changed, "toggle {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    assert_eq!(db.ledger_len().await.unwrap(), written);
}

/// `try_record` queues at once in batch mode (what a stream's settlement
/// uses instead of a task per row) and gives the rows back in `always` mode,
/// where the caller must wait for durability from a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_record_queues_in_batch_mode_and_gives_rows_back_otherwise() {
    use sluice_gateway::ledger::Ledger;
    use sluice_gateway::server::SharedClock;
    use std::sync::Arc;
    use std::time::Duration;
    for sync in [LedgerSync::Batch, LedgerSync::Always] {
        let dir = TempDir::new("ledger-try");
        let db = Db::open(&dir.0, sync).await.unwrap();
        let clock = SharedClock(Arc::new(sluice_core::ManualClock::new(
            sluice_core::Timestamp::from_nanos(1_800_000_000 * SEC),
        )));
        let ledger = Ledger::start(
            &db,
            &Db::path(&dir.0),
            sync,
            Duration::from_millis(1),
            clock,
        )
        .unwrap();
        let rows = vec![row(1_800_000_000 * SEC, 7)];
        match (sync, ledger.try_record(rows)) {
            (LedgerSync::Batch, Ok(())) => {}
            (LedgerSync::Always, Err(back)) => {
                assert_eq!(back.len(), 1);
                assert_eq!(back[0].request_id.as_deref(), Some("r7"));
                ledger.record(back, None).await;
            }
            (sync, got) => panic!("{sync:?}: {:?}", got.map_err(|r| r.len())),
        }
        ledger.flush().await;
        assert_eq!(db.ledger_len().await.unwrap(), 1, "{sync:?}");
    }
}
