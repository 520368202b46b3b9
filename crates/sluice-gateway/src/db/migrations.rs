//! The schema: versioned migrations, applied in order at start.

/// Migrations, in order; each runs once, in a transaction, and is recorded.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE policies (
        subject TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        updated_ns BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        subject TEXT NOT NULL,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        revoked_ns BIGINT
    );
    CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        reservation TEXT,
        subjects TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        held TEXT,
        reserved_ns BIGINT,
        caller TEXT NOT NULL,
        request_id TEXT,
        detail TEXT
    );
    CREATE INDEX ledger_ts ON ledger (ts_ns);
    CREATE TABLE spend_daily (
        subject TEXT NOT NULL,
        day TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        PRIMARY KEY (subject, day)
    );
    CREATE TABLE idempotency (
        scope TEXT PRIMARY KEY,
        created_ns BIGINT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX idempotency_created ON idempotency (created_ns);",
    ),
    // The time index cost ~15% of each ledger insert; rows are appended in
    // time order, so replay finds its start by binary search on `seq` instead.
    (2, "DROP INDEX IF EXISTS ledger_ts;"),
    // PostgreSQL's ledger writer marks each batch it writes, in the batch's
    // transaction, so a retry after a commit whose answer was lost writes
    // nothing twice.
    (
        3,
        "CREATE TABLE ledger_batches (id TEXT PRIMARY KEY, ts_ns BIGINT NOT NULL);",
    ),
    // The kill switch: which agents an operator stopped, and the mesh's
    // event log (kills and resumes; append-only).
    (
        4,
        "CREATE TABLE agent_status (
        subject TEXT PRIMARY KEY,
        killed BIGINT NOT NULL,
        changed_ns BIGINT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT
    );
    CREATE TABLE mesh_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT
    );",
    ),
    // The audit trail: append-only; the API never updates or deletes a row.
    (
        5,
        "CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_subject ON audit (subject, seq);",
    ),
    // Early warnings: one row per (subject, limit, threshold, window), so
    // replicas that see the same crossing raise it once; with its delivery.
    (
        6,
        "CREATE TABLE alerts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns BIGINT NOT NULL,
        subject TEXT NOT NULL,
        metric TEXT NOT NULL,
        win TEXT NOT NULL,
        threshold_bp BIGINT NOT NULL,
        window_key BIGINT NOT NULL,
        used BIGINT NOT NULL,
        lim BIGINT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        last_error TEXT,
        delivered_ns BIGINT,
        UNIQUE (subject, metric, win, threshold_bp, window_key)
    );",
    ),
    // Human approval: one open (pending) approval per (subject, limit), so
    // every replica's parked requests wait on the same one; its decision and
    // the override it grants.
    (
        7,
        "CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        created_ns BIGINT NOT NULL,
        subject TEXT NOT NULL,
        metric TEXT NOT NULL,
        win TEXT NOT NULL,
        lim BIGINT NOT NULL,
        used BIGINT NOT NULL,
        requested TEXT NOT NULL,
        model TEXT,
        caller TEXT NOT NULL,
        resets_ns BIGINT NOT NULL,
        status TEXT NOT NULL,
        decided_ns BIGINT,
        decided_by TEXT,
        reason TEXT,
        extra TEXT,
        until_ns BIGINT
    );
    CREATE UNIQUE INDEX approvals_open ON approvals (subject, metric, win) WHERE status = 'pending';
    CREATE INDEX approvals_created ON approvals (created_ns);",
    ),
    // An alert may announce an approval waiting for a human.
    (8, "ALTER TABLE alerts ADD COLUMN approval_id TEXT;"),
    // The mesh event log reads breaches from the audit trail by kind and time.
    (9, "CREATE INDEX audit_kind ON audit (kind, ts_ns);"),
];

/// The schema version a migrated database is at.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// A migration's text for PostgreSQL: the same schema in its types.
pub(super) fn postgres_sql(sql: &str) -> String {
    sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("status INTEGER", "status BIGINT")
        .replace(" BLOB ", " BYTEA ")
}

/// The channel replicas listen on for policy and key changes (PostgreSQL).
pub const CHANGES_CHANNEL: &str = "sluice_changes";

/// Arbitrary key of the advisory lock migrations run under (PostgreSQL).
pub(super) const MIGRATION_LOCK: i64 = 0x0051_C3D8;
