//! How long the ledger takes per row: writes batches of check rows through
//! the writer's `SqliteSink`, as the writer thread does, and prints µs per row.
//!
//! `cargo run --release -p sluice-gateway --example ledger_write -- [ROWS] [BATCH]`

use sluice_core::Amounts;
use sluice_gateway::LedgerSync;
use sluice_gateway::db::{Db, LedgerRow, RowKind};
use sluice_gateway::ledger::SqliteSink;

#[allow(clippy::disallowed_methods)] // a benchmark measures real time
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(400), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("sluice-ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = Db::open(&dir, LedgerSync::Batch).await?;
    let mut sink = SqliteSink::open(&Db::path(&dir), LedgerSync::Batch)?;
    let row = |i: usize| LedgerRow {
        ts_ns: 1_800_000_000_000_000_000 + i as u64 * 20_000,
        kind: RowKind::Check,
        reservation: None,
        subjects: vec!["agent://bench/prod/bot".into()],
        amounts: Amounts::one_request().with_cost_micros(100),
        held: None,
        reserved_ns: None,
        caller: "admin".into(),
        request_id: None,
        detail: None,
    };
    let start = std::time::Instant::now();
    let mut i = 0;
    while i < rows {
        let chunk: Vec<LedgerRow> = (i..(i + batch).min(rows)).map(row).collect();
        sink.write(&chunk, &[])?;
        i += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{rows} rows in batches of {batch}: {:.2} µs per row ({:.0} rows/s)",
        secs * 1e6 / rows as f64,
        rows as f64 / secs
    );
    db.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
