//! Redis Cluster: a request's subjects taken slot by slot.
//!
//! A script may touch only keys of one slot. Each subject's state is one
//! hash tagged by the subject, so a request naming subjects in several slots
//! is decided slot by slot, in ascending slot order, each slot atomically
//! (`c_hold`); a refusal rolls back the slots already taken (`c_settle`
//! release, by the markers `c_hold` left). Reservations are recorded first in
//! one of [`SHARDS`] lease registries (`c_open`), claimed before their slots
//! are settled (`c_claim`, `c_close`), and finalized by the expiry pass
//! (`c_due`) when they run out or when a settle died half-way. The protocol,
//! its crash cases and the bound it leaves are in ARCHITECTURE.md.

use futures_util::future::join_all;

use super::{
    Acquired, Admit, Amounts, Answer, ExpiredReservation, Level, Metric, PlanSubject, RedisStore,
    Refusal, ReservationId, Settled, Settlement, SmallVec, StoreError, Subject, Take, Time,
    Timestamp, array, int, parse_decision, parse_held, parse_overshoot, protocol, push_subject,
    text,
};

/// Lease registries, each in its own slot; an id's registry is `id % SHARDS`.
pub(crate) const SHARDS: usize = 16;
/// How long a claim on a lease record keeps the expiry pass (and other
/// settles) away: a settle that dies is finished this long after it began.
const CLAIM_NS: u64 = 30 * 1_000_000_000;
/// How long a marker outlives its lease (or its claim), so the expiry pass
/// finds it.
const GRACE_NS: u64 = 60 * 1_000_000_000;

/// The cluster slot of a key (CRC16/XMODEM of its hash tag, mod 16384).
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = bytes.get(open + 1..)?;
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| rest.get(..close)).flatten()
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

fn random() -> u64 {
    // A failing OS generator only weakens the uniqueness of spend markers
    // and claim tokens across replicas; fall back to the clock's nanoseconds.
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.subsec_nanos().into())
    })
}

/// Indices of `keys` grouped by slot, slots ascending.
fn groups_of(keys: &[String]) -> Vec<Vec<usize>> {
    let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
    for (i, k) in keys.iter().enumerate() {
        by_slot.entry(slot(k)).or_default().push(i);
    }
    by_slot.into_values().collect()
}

fn marker(subject_key: &str, id: &str) -> String {
    format!("{subject_key}h:{id}")
}

/// One slot's answer: its `now` and the group's levels or its refusal
/// (`plan_subject` an index into the whole plan).
struct Held {
    now: u64,
    outcome: Result<SmallVec<[Level; 4]>, Refusal>,
}

#[allow(clippy::too_many_arguments)]
async fn hold(
    store: &RedisStore,
    time: Time,
    plan: &[PlanSubject<'_>],
    keys: &[String],
    group: &[usize],
    amounts: &Amounts,
    mode: &str,
    mark: Option<(&str, u64)>,
) -> Result<Held, StoreError> {
    let mut inv = store.call("c_hold", time);
    for &i in group {
        inv.key(keys.get(i).map_or("", String::as_str));
    }
    if let Some((id, _)) = mark {
        for &i in group {
            inv.key(marker(keys.get(i).map_or("", String::as_str), id));
        }
    }
    inv.arg(if mark.is_some() { "mark" } else { mode })
        .arg(mark.map_or(0, |(_, ttl)| ttl))
        .arg(group.len());
    let around = store.around(time);
    let sub: Vec<PlanSubject<'_>> = group.iter().filter_map(|&i| plan.get(i).copied()).collect();
    for p in &sub {
        push_subject(&mut inv, p, amounts, around);
    }
    let answer = parse_decision(store.eval(&inv).await?, &sub)?;
    Ok(Held {
        now: answer.now,
        outcome: match answer.outcome {
            Ok(acquired) => Ok(acquired.levels),
            Err(r) => Err(Refusal {
                plan_subject: group.get(r.plan_subject).copied().unwrap_or(0),
                ..r
            }),
        },
    })
}

/// Settle the markers `id` left on the subjects `group` of `keys`:
/// `commit` (with `actual`), `release` or `finalize`. Returns the markers
/// found and the rest of the answer (overshoot or held records).
async fn settle_slot(
    store: &RedisStore,
    time: Time,
    keys: &[String],
    group: &[usize],
    id: &str,
    mode: &str,
    actual: Option<&Amounts>,
) -> Result<(u64, Vec<redis::Value>), StoreError> {
    let mut inv = store.call("c_settle", time);
    for &i in group {
        inv.key(marker(keys.get(i).map_or("", String::as_str), id));
    }
    for &i in group {
        inv.key(keys.get(i).map_or("", String::as_str));
    }
    inv.arg(mode);
    for m in Metric::ALL {
        inv.arg(actual.map_or(0, |a| a.get(m)));
    }
    let mut items = array(store.eval(&inv).await?)?;
    let found = int(items.get(1))?;
    items.drain(..2.min(items.len()));
    Ok((found, items))
}

/// Release `groups` (by marker; idempotent); whether every slot answered.
async fn release(
    store: &RedisStore,
    time: Time,
    keys: &[String],
    groups: &[Vec<usize>],
    id: &str,
) -> bool {
    join_all(
        groups
            .iter()
            .map(|g| settle_slot(store, time, keys, g, id, "release", None)),
    )
    .await
    .iter()
    .all(Result::is_ok)
}

/// The refusal the single script would give: the first "never" in plan
/// order, else the latest admit (the first of equals).
fn worst(mut refusals: Vec<Refusal>) -> Option<Refusal> {
    refusals.sort_by_key(|r| (r.plan_subject, r.limit));
    let mut out: Option<Refusal> = None;
    for r in refusals {
        out = Some(match (out, r.admit) {
            (None, _) => r,
            (Some(w), Admit::Never) if w.admit != Admit::Never => r,
            (Some(w), Admit::At(t)) if matches!(w.admit, Admit::At(u) if t > u) => r,
            (Some(w), _) => w,
        });
    }
    out
}

/// Levels of every plan subject, in plan order, from per-group answers.
fn assemble(
    plan: &[PlanSubject<'_>],
    groups: &[Vec<usize>],
    levels: &[SmallVec<[Level; 4]>],
) -> Result<SmallVec<[Level; 4]>, StoreError> {
    let mut per: Vec<&[Level]> = vec![&[]; plan.len()];
    for (g, ls) in groups.iter().zip(levels) {
        let mut at = 0;
        for &i in g {
            let n = plan.get(i).map_or(0, |p| p.limits.len());
            let slice = ls.get(at..at + n).ok_or_else(|| protocol("levels"))?;
            if let Some(slot) = per.get_mut(i) {
                *slot = slice;
            }
            at += n;
        }
    }
    Ok(per.into_iter().flatten().copied().collect())
}

/// [`RedisStore::acquire`] and [`RedisStore::peek`] on a cluster.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decide(
    store: &RedisStore,
    op: &str,
    time: Time,
    plan: &[PlanSubject<'_>],
    amounts: &Amounts,
    take: Take,
    owner: &str,
    meta: &str,
) -> Result<Answer, StoreError> {
    let keys: Vec<String> = plan.iter().map(|p| store.subject_key(p.subject)).collect();
    let mut groups = groups_of(&keys);
    let lease_ns = match take {
        Take::Lease(ns) if op != "peek" => Some(ns),
        _ => None,
    };
    if groups.is_empty() && lease_ns.is_none() {
        // No subject has a limit: one call, for the server's `now`.
        groups.push(Vec::new());
    }
    let mode = match (op, take) {
        ("peek", _) => "peek",
        (_, Take::Force) => "force",
        _ => "spend",
    };
    if mode != "spend" || (groups.len() == 1 && lease_ns.is_none()) {
        // Nothing to roll back: every slot at once.
        let answers = join_all(
            groups
                .iter()
                .map(|g| hold(store, time, plan, &keys, g, amounts, mode, None)),
        )
        .await;
        let mut now = 0;
        let mut levels = Vec::with_capacity(groups.len());
        let mut refusals = Vec::new();
        for a in answers {
            let a = a?;
            now = now.max(a.now);
            match a.outcome {
                Ok(l) => levels.push(l),
                Err(r) => refusals.push(r),
            }
        }
        let outcome = match worst(refusals) {
            Some(r) => Err(r),
            None => Ok(Acquired {
                reservation: None,
                levels: assemble(plan, &groups, &levels)?,
            }),
        };
        return Ok(Answer { now, outcome });
    }
    // A lease: its record first, so the ledger and the counters agree
    // whatever happens next.
    let (id, opened) = match lease_ns {
        Some(ns) => {
            let shard = store
                .next_shard
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % SHARDS;
            // Each call may take the timeout (twice, with a retry): past
            // that the reserve is over (or its replica is gone).
            let per_call = u64::try_from(store.timeout.as_nanos()).unwrap_or(u64::MAX);
            let opening = per_call
                .saturating_mul(2)
                .saturating_mul(groups.len() as u64 + 1)
                .max(1_000_000_000);
            let mut inv = store.registry_call("c_open", time, shard);
            inv.arg(ns)
                .arg(owner)
                .arg(meta)
                .arg(shard)
                .arg(SHARDS)
                .arg(opening);
            for k in &keys {
                inv.arg(k);
            }
            let items = array(store.eval(&inv).await?)?;
            (text(items.get(1))?, Some((shard, int(items.first())?)))
        }
        None => (format!("s{:016x}", random()), None),
    };
    let registry = opened.map(|(shard, _)| shard);
    let ttl = lease_ns.unwrap_or(0).saturating_add(CLAIM_NS + GRACE_NS);
    let last = groups.len().saturating_sub(1);
    let mut levels = Vec::with_capacity(groups.len());
    let mut now = 0;
    for (gi, g) in groups.iter().enumerate() {
        // A spend's last slot needs no marker: nothing after it can refuse.
        let mark = (lease_ns.is_some() || gi < last).then_some((id.as_str(), ttl));
        let held = match hold(store, time, plan, &keys, g, amounts, "spend", mark).await {
            Ok(h) => h,
            Err(e) => {
                // This slot may have been taken before the error: release it
                // too. A lease record stays for the expiry pass if any
                // release fails (what it still holds is reported then).
                let taken = groups.get(..=gi).unwrap_or_default();
                if release(store, time, &keys, taken, &id).await {
                    close_refused(store, time, registry, &id).await;
                }
                return Err(e);
            }
        };
        now = now.max(held.now);
        match held.outcome {
            Ok(l) => levels.push(l),
            Err(refusal) => {
                let taken = groups.get(..gi).unwrap_or_default();
                let later = groups.get(gi + 1..).unwrap_or_default();
                let (released, peeks) = tokio::join!(
                    release(store, time, &keys, taken, &id),
                    join_all(
                        later
                            .iter()
                            .map(|g| hold(store, time, plan, &keys, g, amounts, "peek", None))
                    )
                );
                if released {
                    close_refused(store, time, registry, &id).await;
                }
                // Exact retry_after: the latest admit over every slot.
                let mut refusals = vec![refusal];
                refusals.extend(
                    peeks
                        .into_iter()
                        .filter_map(|p| p.ok().and_then(|h| h.outcome.err())),
                );
                let refusal = worst(refusals).ok_or_else(|| protocol("refusal"))?;
                return Ok(Answer {
                    now: held.now,
                    outcome: Err(refusal),
                });
            }
        }
    }
    if lease_ns.is_none() {
        // An admitted spend: drop its markers (they would expire anyway).
        let marked = groups.get(..last).unwrap_or_default();
        join_all(
            marked
                .iter()
                .map(|g| settle_slot(store, time, &keys, g, &id, "finalize", None)),
        )
        .await;
    }
    Ok(Answer {
        now: opened.map_or(now, |(_, at)| at),
        outcome: Ok(Acquired {
            reservation: opened.and_then(|_| id.parse().ok()).map(ReservationId),
            levels: assemble(plan, &groups, &levels)?,
        }),
    })
}

/// Delete the record (in registry `shard`; none for a spend) of a refused
/// (or failed) reservation.
async fn close_refused(store: &RedisStore, time: Time, shard: Option<usize>, id: &str) {
    let Some(shard) = shard else { return };
    let mut inv = store.registry_call("c_close", time, shard);
    inv.arg(id).arg("open").arg("settled");
    // If this fails, the expiry pass finds the record and no markers.
    let _ = store.eval(&inv).await;
}

fn parse_keys(v: Option<&redis::Value>) -> Result<Vec<String>, StoreError> {
    match v {
        Some(redis::Value::Array(items)) => items.iter().map(|k| text(Some(k))).collect(),
        _ => Err(protocol("lease keys")),
    }
}

/// Put `items` in plan order: the order of their subjects' keys in the record.
fn order_by_keys<T>(
    store: &RedisStore,
    keys: &[String],
    items: &mut [T],
    subject: fn(&T) -> &Subject,
) {
    items.sort_by_cached_key(|it| {
        let key = store.subject_key(subject(it));
        keys.iter().position(|k| *k == key).unwrap_or(usize::MAX)
    });
}

/// [`RedisStore::settle`] on a cluster.
pub(crate) async fn settle(
    store: &RedisStore,
    time: Time,
    id: ReservationId,
    owner: &str,
    actual: Option<&Amounts>,
) -> Result<Settled, StoreError> {
    let token = format!("{:016x}", random());
    let shard = usize::try_from(id.0).unwrap_or(0) % SHARDS;
    let mut inv = store.registry_call("c_claim", time, shard);
    inv.arg(id.0).arg(owner).arg(&token).arg(CLAIM_NS);
    let items = array(store.eval(&inv).await?)?;
    let id_text = id.0.to_string();
    match text(items.first())?.as_str() {
        "unknown" | "busy" => Ok(Settled::Unknown),
        "forbidden" => Ok(Settled::Forbidden),
        "was_expired" => Ok(Settled::WasExpired),
        "expired" => {
            // Settled at its held amounts (already counted): drop the markers.
            let keys = parse_keys(items.get(2))?;
            let groups = groups_of(&keys);
            join_all(
                groups
                    .iter()
                    .map(|g| settle_slot(store, time, &keys, g, &id_text, "finalize", None)),
            )
            .await;
            Ok(Settled::Expired {
                meta: text(items.get(1))?,
            })
        }
        "ok" => {
            let meta = text(items.get(2))?;
            let keys = parse_keys(items.get(3))?;
            let groups = groups_of(&keys);
            let mode = if actual.is_some() {
                "commit"
            } else {
                "release"
            };
            // On an error the claim runs out and the expiry pass finishes
            // the slots not settled (idempotent: a settled slot has no marker).
            let answers = join_all(
                groups
                    .iter()
                    .map(|g| settle_slot(store, time, &keys, g, &id_text, mode, actual)),
            )
            .await;
            let mut overshoot = Vec::new();
            for a in answers {
                overshoot.extend(parse_overshoot(&a?.1)?);
            }
            order_by_keys(store, &keys, &mut overshoot, |o| &o.subject);
            // Every slot is settled: the answer is Done even if closing the
            // record fails (the expiry pass then drops it, finding no marker).
            let mut inv = store.registry_call("c_close", time, shard);
            inv.arg(&id_text).arg(&token).arg("settled");
            let _ = store.eval(&inv).await;
            Ok(Settled::Done {
                settlement: Settlement { overshoot },
                meta,
            })
        }
        other => Err(protocol(other)),
    }
}

/// [`RedisStore::expire`] on a cluster: every registry's due records,
/// claimed, finalized slot by slot, closed.
pub(crate) async fn expire(
    store: &RedisStore,
    time: Time,
) -> Result<Vec<(ExpiredReservation, String)>, StoreError> {
    let token = format!("{:016x}", random());
    let passes = join_all((0..SHARDS).map(|shard| expire_shard(store, time, shard, &token))).await;
    let mut out = Vec::new();
    let mut error = None;
    let mut answered = false;
    for p in passes {
        match p {
            Ok(list) => {
                answered = true;
                out.extend(list);
            }
            Err(e) => error = Some(e),
        }
    }
    if let (false, Some(e)) = (answered, error) {
        return Err(e);
    }
    out.sort_by_key(|(e, _)| e.id);
    Ok(out)
}

async fn expire_shard(
    store: &RedisStore,
    time: Time,
    shard: usize,
    token: &str,
) -> Result<Vec<(ExpiredReservation, String)>, StoreError> {
    let mut inv = store.registry_call("c_due", time, shard);
    inv.arg(token).arg(CLAIM_NS);
    let items = array(store.eval(&inv).await?)?;
    let mut out = Vec::new();
    for rec in items.get(1..).unwrap_or_default().chunks(4) {
        let [id, expires, meta, keys] = rec else {
            return Err(protocol("due"));
        };
        let id_text = text(Some(id))?;
        let keys = parse_keys(Some(keys))?;
        let groups = groups_of(&keys);
        let answers = join_all(
            groups
                .iter()
                .map(|g| settle_slot(store, time, &keys, g, &id_text, "finalize", None)),
        )
        .await;
        let mut found = 0;
        let mut held = Vec::new();
        let mut failed = false;
        for a in answers {
            match a {
                Ok((n, rest)) => {
                    found += n;
                    held.extend(parse_held(&rest)?);
                }
                Err(_) => failed = true,
            }
        }
        if failed {
            continue; // the claim runs out; a later pass finishes it
        }
        let mut close = store.registry_call("c_close", time, shard);
        close.arg(&id_text).arg(token).arg("expired");
        // Not closed (an error, or another pass took it after our claim ran
        // out): not reported by this pass.
        let closed = match store.eval(&close).await {
            Ok(v) => int(Some(&v))? == 1,
            Err(_) => false,
        };
        // A record with no marker is a reservation that never held anything
        // (a replica died before its first slot): nothing to report. One
        // that names no subject (none had a limit) held nothing by design.
        if closed && (found > 0 || keys.is_empty()) {
            order_by_keys(store, &keys, &mut held, |h| &h.subject);
            out.push((
                ExpiredReservation {
                    id: ReservationId(int(Some(id))?),
                    expires_at: Timestamp::from_nanos(int(Some(expires))?),
                    held,
                },
                text(Some(meta))?,
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis() {
        // CLUSTER KEYSLOT answers on Redis 7.0.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("123456789"), 0x31c3);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("p:{agent://a/b/c}"), slot("agent://a/b/c"));
        assert_eq!(slot("p:{leases:3}seq"), slot("leases:3"));
    }
}
