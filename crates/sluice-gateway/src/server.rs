//! Start-up (data directory, admin key, database, policies, ledger replay),
//! background tasks (lease expiry, pruning) and serving with graceful shutdown.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_core::{
    Amounts, CalendarUnit, Clock, Limiter, MemoryStore, Metric, Request, Subject, Timestamp, Window,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth::{AgentKey, Keys, generate_key};
use crate::config::Config;
use crate::db::{Db, DbError, LedgerRow, RowKind};
use crate::engine::Engine;
use crate::idempotency::Idempotency;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::wire::{Action, PolicyBody};

/// A shared clock (the system clock in service, a manual one in tests).
#[derive(Clone)]
pub struct SharedClock(pub Arc<dyn Clock>);

impl std::fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClock")
    }
}

impl Clock for SharedClock {
    fn now(&self) -> Timestamp {
        self.0.now()
    }
}

/// The engine as the gateway runs it.
pub type GatewayLimiter = Limiter<SharedClock, MemoryStore>;

/// A policy as stored, beside the engine's checked copy.
#[derive(Debug, Clone)]
pub struct StoredPolicy {
    /// As written (normalised).
    pub body: PolicyBody,
    /// Its action on breach.
    pub action: Action,
    /// The checked policy.
    pub policy: Arc<sluice_core::Policy>,
    /// Last change, ns.
    pub updated_ns: u64,
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The limiter (in memory or in Redis) and reservations' metadata.
    pub engine: Engine,
    /// Time.
    pub clock: SharedClock,
    /// The database.
    pub db: Db,
    /// The ledger writer.
    pub ledger: Ledger,
    /// Keys.
    pub keys: Keys,
    /// Policies by subject.
    pub policies: RwLock<BTreeMap<String, StoredPolicy>>,
    /// Serialises policy writes so the database and the engine agree.
    pub policy_write: tokio::sync::Mutex<()>,
    /// Idempotent answers.
    pub idempotency: Arc<Idempotency>,
    /// Counters.
    pub metrics: Metrics,
    /// Configuration.
    pub config: Config,
    /// Agents an operator stopped.
    pub kill: crate::killswitch::KillSwitch,
    /// Pending approvals, parked requests, overrides in force.
    pub approvals: crate::approvals::Approvals,
    /// Whether any policy has `degrade` rules (set once one does; the proxy
    /// skips the degrade step while none has).
    pub degrade_any: std::sync::atomic::AtomicBool,
    /// Refusals waiting for the audit trail.
    pub breaches: crate::audit::Breaches,
    /// Early warnings.
    pub alerts: crate::alerts::Alerts,
    /// Intent id counter.
    pub intents: AtomicU64,
    /// The client alert webhooks are delivered with (each delivery sets its own timeout).
    pub http: reqwest::Client,
    /// The proxy's client to the providers, their endpoint URLs parsed once.
    pub upstreams: crate::upstream::Upstreams,
    /// Busy polling (`busy_poll_ms`), when on: requests mark it active.
    pub busy_poll: Option<crate::busy_poll::BusyPoll>,
}

impl AppState {
    /// Now.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or admin key file.
    #[error("{0}")]
    Io(String),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Where the admin key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminKeySource {
    /// `SLUICE_ADMIN_KEY`.
    Environment,
    /// Read from this file.
    File(PathBuf),
    /// Generated now and written to this file.
    Generated(PathBuf),
}

/// The admin key file in a data directory.
pub fn admin_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.key")
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StartError {
    StartError::Io(format!("{what} {}: {e}", path.display()))
}

fn admin_key(config: &Config) -> Result<(String, AdminKeySource), StartError> {
    if let Some(k) = &config.admin_key {
        return Ok((k.clone(), AdminKeySource::Environment));
    }
    let path = admin_key_path(&config.data_dir);
    match std::fs::read_to_string(&path) {
        Ok(k) if !k.trim().is_empty() => {
            return Ok((k.trim().to_owned(), AdminKeySource::File(path)));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot read admin key", &path, e)),
    }
    let key = generate_key();
    write_private(&path, &key).map_err(|e| io_err("cannot write admin key", &path, e))?;
    Ok((key, AdminKeySource::Generated(path)))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{contents}\n"))
}

/// How far back the ledger must be replayed for a limit's window to be rebuilt.
fn lookback(window: Window) -> Duration {
    match window {
        Window::Rolling(ns) => Duration::from_nanos(ns),
        // Nominal period plus an hour for DST: rows older than the current
        // period replay harmlessly (a fixed window resets at its boundary).
        Window::Calendar(unit) => Duration::from_secs(
            match unit {
                CalendarUnit::Minute => 60,
                CalendarUnit::Hour => 3_600,
                CalendarUnit::Day => 86_400,
                CalendarUnit::Week => 7 * 86_400,
                CalendarUnit::Month => 31 * 86_400,
            } + 3_600,
        ),
    }
}

/// What start-up found and did.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Policies loaded.
    pub policies: usize,
    /// Ledger rows replayed.
    pub rows: usize,
    /// Reservations found unsettled and settled at their held amounts.
    pub unsettled: usize,
}

/// A gateway, started and ready to serve.
#[derive(Debug)]
pub struct Gateway {
    /// Shared state.
    pub state: Arc<AppState>,
    /// Where the admin key came from.
    pub admin_key_source: AdminKeySource,
    /// What start-up rebuilt.
    pub recovery: Recovery,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Open the data directory and database, load policies and keys, replay
    /// the ledger into the engine, start the ledger writer and background tasks.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, StartError> {
        let clock = SharedClock(clock);
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| io_err("cannot create data directory", &config.data_dir, e))?;
        let (key, admin_key_source) = admin_key(&config)?;
        let db = match &config.database_url {
            Some(url) => Db::open_postgres(url).await?,
            None => Db::open(&config.data_dir, config.ledger_sync).await?,
        };
        let engine = Engine::new(
            &config.store,
            &clock,
            config.default_lease,
            config.max_lease,
        )
        .map_err(StartError::Io)?;
        let keys = Keys::new(&key);
        for k in db.keys().await? {
            if let Some((hash, agent)) = agent_key(k) {
                keys.insert(&hash, agent);
            }
        }
        let mut policies = BTreeMap::new();
        let mut loaded = Vec::new();
        for (subject, body, updated_ns) in db.policies().await? {
            if let Some((s, stored, policy)) = stored_policy(&subject, &body, updated_ns) {
                loaded.push((s, policy));
                policies.insert(subject, stored);
            }
        }
        engine.set_policies(loaded);
        // The providers' quotas from sluice.toml (rolling minutes).
        for (subject, quota) in &config.proxy.quotas {
            let mut def = sluice_core::PolicyDef::default();
            if let Some(rpm) = quota.rpm {
                def.limits
                    .push(sluice_core::LimitDef::new("requests", rpm, "1m"));
            }
            if let Some(tpm) = quota.tpm {
                def.limits
                    .push(sluice_core::LimitDef::new("tokens", tpm, "1m"));
            }
            let (Ok(s), Ok(policy)) = (Subject::parse(subject), sluice_core::Policy::new(&def))
            else {
                return Err(StartError::Io(format!(
                    "cannot install the quota of {subject}"
                )));
            };
            engine.set_policy(&s, policy);
        }
        let ledger = Ledger::start(
            &db,
            &Db::path(&config.data_dir),
            config.ledger_sync,
            config.ledger_batch,
            clock.clone(),
        )
        .map_err(|e| StartError::Io(format!("cannot open the ledger for writing: {e}")))?;
        let (alerts, alert_rx) = crate::alerts::Alerts::new();
        if policies
            .values()
            .any(|p: &StoredPolicy| p.body.alert_at.is_some())
        {
            alerts.enable();
        }
        let kill = crate::killswitch::KillSwitch::default();
        kill.set_all(db.killed().await?);
        let idempotency = Arc::new(Idempotency::default());
        let now = clock.now();
        idempotency.load(
            db.idempotency_since(
                now.as_nanos()
                    .saturating_sub(crate::idempotency::TTL.as_nanos() as u64),
            )
            .await?,
        );
        let busy_poll = config.busy_poll.map(crate::busy_poll::BusyPoll::new);
        let state = Arc::new(AppState {
            engine,
            clock,
            db,
            ledger,
            keys,
            policy_write: tokio::sync::Mutex::new(()),
            idempotency,
            metrics: Metrics::default(),
            kill,
            approvals: crate::approvals::Approvals::default(),
            degrade_any: std::sync::atomic::AtomicBool::new(
                policies
                    .values()
                    .any(|p: &StoredPolicy| p.body.degrade.is_some()),
            ),
            breaches: crate::audit::Breaches::default(),
            alerts,
            intents: AtomicU64::new(1),
            upstreams: crate::upstream::Upstreams::new(&config.proxy, crate::proxy::UPSTREAM_PATHS)
                .map_err(StartError::Io)?,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                // A signed alert goes where it was configured to, not where a redirect points.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| StartError::Io(format!("cannot build the webhook client: {e}")))?,
            busy_poll,
            config,
            policies: RwLock::new(policies),
        });
        crate::proxy::warm_tokenizers(&state.config.proxy.models);
        crate::approvals::reload(&state).await?;
        let recovery = replay(&state).await?;
        let mut tasks = vec![
            tokio::spawn(expire_leases(Arc::clone(&state))),
            tokio::spawn(approvals_tick(Arc::clone(&state))),
            tokio::spawn(prune(Arc::clone(&state))),
            tokio::spawn(write_breaches(Arc::clone(&state))),
            tokio::spawn(crate::alerts::run(Arc::clone(&state), alert_rx)),
        ];
        if let Some(busy) = &state.busy_poll {
            tasks.extend(busy.spawn_per_worker());
        }
        if let crate::db::Pool::Postgres(pool) = state.db.pool() {
            tasks.push(tokio::spawn(follow_changes(
                Arc::clone(&state),
                pool.clone(),
            )));
        }
        Ok(Gateway {
            state,
            admin_key_source,
            recovery,
            tasks,
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> axum::Router {
        crate::routes::router(Arc::clone(&self.state))
    }

    /// Serve on `listener` until `shutdown` resolves; then let in-flight
    /// requests finish, stop background tasks and flush the ledger.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        let router = self.router();
        // No Nagle: a streamed answer's small events go out as they come
        // (otherwise each waits for the client's delayed ACK, up to 40 ms).
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY not set: {e}");
            }
        });
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
        self.shutdown().await;
        served
    }

    /// Stop background tasks and flush the ledger.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Settle what has expired so its rows are written before exit.
        settle_expired(&self.state).await;
        let breaches = self.state.breaches.drain();
        if !breaches.is_empty() {
            if let Err(e) = self.state.db.audit_many(&breaches).await {
                tracing::warn!("writing {} breach records: {e}", breaches.len());
            }
        }
        self.state.ledger.flush().await;
        self.state.db.close().await;
    }
}

/// A stored key as the authenticator holds it (its hex hash beside it).
fn agent_key(k: crate::db::KeyRow) -> Option<(String, AgentKey)> {
    let Ok(subject) = Subject::parse(&k.subject) else {
        tracing::warn!(
            "key {} has an unparseable subject {:?}; skipped",
            k.id,
            k.subject
        );
        return None;
    };
    Some((
        k.hash,
        AgentKey {
            id: k.id,
            subject,
            name: k.name,
            prefix: k.prefix,
            created_ns: k.created_ns,
        },
    ))
}

/// A stored policy, checked: its subject, what the gateway keeps, the engine's copy.
fn stored_policy(
    subject: &str,
    body: &str,
    updated_ns: u64,
) -> Option<(Subject, StoredPolicy, sluice_core::Policy)> {
    let parsed = Subject::parse(subject).ok().zip(
        serde_json::from_str::<PolicyBody>(body)
            .ok()
            .and_then(|b| b.to_policy().ok().map(|p| (b, p))),
    );
    let Some((s, (body, (policy, action)))) = parsed else {
        tracing::warn!("stored policy for {subject:?} no longer parses; skipped");
        return None;
    };
    let stored = StoredPolicy {
        body,
        action,
        policy: Arc::new(policy.clone()),
        updated_ns,
    };
    Some((s, stored, policy))
}

/// Bring this replica's policies and keys in line with the database, after
/// another replica changed them.
pub async fn reload(state: &AppState) -> Result<(), DbError> {
    let _write = state.policy_write.lock().await;
    let rows = state.db.keys().await?;
    let live: std::collections::HashSet<String> = rows.iter().map(|k| k.id.clone()).collect();
    let known: std::collections::HashSet<String> =
        state.keys.list().iter().map(|k| k.id.clone()).collect();
    for k in rows {
        if !known.contains(&k.id) {
            if let Some((hash, agent)) = agent_key(k) {
                state.keys.insert(&hash, agent);
            }
        }
    }
    for id in known.difference(&live) {
        state.keys.remove(id);
    }
    state.kill.set_all(state.db.killed().await?);
    let rows = state.db.policies().await?;
    let present: std::collections::HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let gone: Vec<String> = state
        .policies
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .keys()
        .filter(|k| !present.contains(k.as_str()))
        .cloned()
        .collect();
    for subject in gone {
        if let Ok(s) = Subject::parse(&subject) {
            state.engine.remove_policy(&s);
        }
        state
            .policies
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&subject);
    }
    let mut changed = Vec::new();
    for (subject, body, updated_ns) in &rows {
        let same = state
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(subject)
            .is_some_and(|p| p.updated_ns == *updated_ns);
        if same {
            continue;
        }
        if let Some((s, stored, policy)) = stored_policy(subject, body, *updated_ns) {
            changed.push((s, policy));
            if stored.body.alert_at.is_some() {
                state.alerts.enable();
            }
            if stored.body.degrade.is_some() {
                state
                    .degrade_any
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            state
                .policies
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(subject.clone(), stored);
        }
    }
    state.engine.set_policies(changed);
    crate::approvals::reload(state).await
}

/// Follow other replicas' policy and key changes (PostgreSQL `LISTEN`):
/// reload on each notice, and after every (re)connection, when notices may
/// have been missed.
async fn follow_changes(state: Arc<AppState>, pool: sqlx::PgPool) {
    use sqlx::postgres::PgListener;
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(crate::db::CHANGES_CHANNEL).await {
                Ok(()) => loop {
                    if let Err(e) = reload(&state).await {
                        tracing::warn!("reloading policies and keys: {e}");
                    }
                    match listener.try_recv().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break, // connection lost: reconnect, then reload
                        Err(e) => {
                            tracing::warn!("listening for policy changes: {e}");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!("listening for policy changes: {e}"),
            },
            Err(e) => tracing::warn!("listening for policy changes: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn parse_subjects(subjects: &[String]) -> Vec<Subject> {
    subjects
        .iter()
        .filter_map(|s| Subject::parse(s).ok())
        .collect()
}

fn saturating_sub(a: &Amounts, b: &Amounts) -> Amounts {
    let mut out = Amounts::ZERO;
    for m in Metric::ALL {
        out.set(m, a.get(m).saturating_sub(b.get(m)));
    }
    out
}

fn min(a: &Amounts, b: &Amounts) -> Amounts {
    let mut out = Amounts::ZERO;
    for m in Metric::ALL {
        out.set(m, a.get(m).min(b.get(m)));
    }
    out
}

/// Rebuild window state from the ledger: every spend at its time; each
/// settled reservation as what it kept at its reservation time plus any
/// overshoot at its settle time; reservations never settled (the process died
/// holding them) as spent at their held amounts, recorded as `restart` rows.
async fn replay(state: &Arc<AppState>) -> Result<Recovery, StartError> {
    let now = state.now();
    let longest = {
        let policies = state
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        policies
            .values()
            .flat_map(|p| p.policy.limits().iter().map(|l| lookback(l.window())))
            .max()
    };
    let mut recovery = Recovery {
        policies: state
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len(),
        ..Recovery::default()
    };
    if state.engine.is_shared() {
        // Window state and unsettled leases live in the shared store.
        return Ok(recovery);
    }
    let since = match longest {
        Some(d) => now.as_nanos().saturating_sub(d.as_nanos() as u64),
        // No policy: nothing to rebuild, but unsettled reservations still need settling.
        None => now
            .as_nanos()
            .saturating_sub(state.config.max_lease.as_nanos() as u64),
    };
    let rows = state.db.ledger_since(since).await?;
    recovery.rows = rows.len();
    let mut charges: Vec<(u64, Vec<Subject>, Amounts)> = Vec::with_capacity(rows.len());
    let mut open: HashMap<String, LedgerRow> = HashMap::new();
    for row in rows {
        match row.kind {
            RowKind::Check | RowKind::Intent => {
                charges.push((row.ts_ns, parse_subjects(&row.subjects), row.amounts));
            }
            RowKind::Reserve => {
                if let Some(id) = row.reservation.clone() {
                    open.insert(id, row);
                }
            }
            RowKind::Commit | RowKind::Release | RowKind::Expire | RowKind::Restart => {
                if let Some(id) = &row.reservation {
                    open.remove(id);
                }
                let held = row.held.unwrap_or(row.amounts);
                let reserved = row.reserved_ns.unwrap_or(row.ts_ns);
                let subjects = parse_subjects(&row.subjects);
                charges.push((reserved, subjects.clone(), min(&held, &row.amounts)));
                let over = saturating_sub(&row.amounts, &held);
                if over != Amounts::ZERO {
                    charges.push((row.ts_ns, subjects, over));
                }
            }
        }
    }
    let mut restart_rows = Vec::new();
    for (id, row) in open {
        charges.push((row.ts_ns, parse_subjects(&row.subjects), row.amounts));
        state.engine.mark_expired(id.clone());
        restart_rows.push(LedgerRow {
            ts_ns: now.as_nanos(),
            kind: RowKind::Restart,
            reservation: Some(id),
            subjects: row.subjects,
            amounts: row.amounts,
            held: Some(row.amounts),
            reserved_ns: Some(row.ts_ns),
            caller: row.caller,
            request_id: row.request_id,
            detail: None,
        });
    }
    charges.sort_by_key(|c| c.0);
    for (ts, subjects, amounts) in charges {
        if amounts == Amounts::ZERO || subjects.is_empty() {
            continue;
        }
        state
            .engine
            .charge_at(&Request::new(subjects, amounts), Timestamp::from_nanos(ts));
    }
    recovery.unsettled = restart_rows.len();
    if !restart_rows.is_empty() {
        tracing::warn!(
            "{} reservations were unsettled when the server stopped; settled at their held amounts",
            restart_rows.len()
        );
        state.ledger.record(restart_rows, None).await;
        state.ledger.flush().await;
    }
    Ok(recovery)
}

/// Settle leases that have run out, writing `expire` rows.
pub async fn settle_expired(state: &Arc<AppState>) {
    let expired = state.engine.expire().await;
    if expired.is_empty() {
        return;
    }
    let now = state.now().as_nanos();
    let rows = expired
        .into_iter()
        .map(|e| LedgerRow {
            ts_ns: now,
            kind: RowKind::Expire,
            reservation: Some(e.public),
            subjects: e.meta.subjects,
            amounts: e.meta.held,
            held: Some(e.meta.held),
            reserved_ns: Some(e.meta.reserved_ns),
            caller: e.meta.caller,
            request_id: None,
            detail: None,
        })
        .collect();
    state.ledger.record(rows, None).await;
}

async fn expire_leases(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.lease_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        settle_expired(&state).await;
    }
}

/// Approvals' clock work (overrides ending, pending ones expiring), at the
/// lease-check interval.
async fn approvals_tick(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.lease_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        crate::approvals::tick(&state).await;
    }
}

/// Breach records, once a second; what a failed write leaves is retried
/// with the next (up to 65,536 records, then the oldest are dropped with a
/// warning).
async fn write_breaches(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unwritten: Vec<(u64, crate::db::Audit)> = Vec::new();
    loop {
        tick.tick().await;
        unwritten.extend(state.breaches.drain());
        if unwritten.is_empty() {
            continue;
        }
        match state.db.audit_many(&unwritten).await {
            Ok(()) => unwritten.clear(),
            Err(e) => {
                tracing::warn!("writing {} breach records: {e}", unwritten.len());
                if unwritten.len() > 65_536 {
                    let drop = unwritten.len() - 65_536;
                    tracing::error!("dropping the {drop} oldest breach records");
                    unwritten.drain(..drop);
                }
            }
        }
    }
}

async fn prune(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = state.now().as_nanos();
        state.idempotency.prune(now);
        let cutoff = now.saturating_sub(crate::idempotency::TTL.as_nanos() as u64);
        if let Err(e) = state.db.prune_idempotency(cutoff).await {
            tracing::warn!("pruning idempotency records: {e}");
        }
        state.engine.sweep();
    }
}
