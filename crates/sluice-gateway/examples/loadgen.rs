//! A small HTTP/1.1 load generator for the gateway benchmark (loopback only).
//!
//! Closed loop (no `--rate`): each connection sends its next request when the
//! last one is answered; measures maximum throughput. Open loop (`--rate R`):
//! requests are scheduled at R per second spread over the connections; when
//! a connection falls more than 2 ms behind its schedule (the server was
//! slow), latency is measured from the scheduled time, so slow answers are
//! not hidden (no coordinated omission, as in wrk2); on schedule it is
//! measured from the send (tokio's timer may wake up to 1 ms late). Bounded in time (`--secs`) and count (`--max`).
//!
//! `loadgen URL --body JSON [--header 'k: v'] [--conns 32] [--secs 10] [--rate R] [--max N] [--unique]`
//! (`--unique`: the first `{n}` in the body becomes a number no other request, of this run or another, gets).
//! prints one JSON line: requests, errors, rps, p50/p90/p99/p999/max in µs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

struct Opts {
    url: String,
    body: String,
    headers: Vec<(String, String)>,
    conns: usize,
    secs: u64,
    rate: Option<f64>,
    max: u64,
    unique: bool,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        url: String::new(),
        body: "{}".into(),
        headers: vec![],
        conns: 32,
        secs: 10,
        rate: None,
        max: 10_000_000,
        unique: false,
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--body" => o.body = val()?,
            "--header" => {
                let h = val()?;
                let (k, v) = h.split_once(':').ok_or("--header 'name: value'")?;
                o.headers.push((k.trim().into(), v.trim().into()));
            }
            "--conns" => o.conns = val()?.parse().map_err(|_| "--conns")?,
            "--secs" => o.secs = val()?.parse().map_err(|_| "--secs")?,
            "--rate" => o.rate = Some(val()?.parse().map_err(|_| "--rate")?),
            "--max" => o.max = val()?.parse().map_err(|_| "--max")?,
            "--unique" => o.unique = true,
            url if o.url.is_empty() => o.url = url.into(),
            other => return Err(format!("unexpected {other}")),
        }
    }
    if !o.url.starts_with("http://127.0.0.1") && !o.url.starts_with("http://localhost") {
        return Err("loadgen only targets 127.0.0.1".into());
    }
    Ok(o)
}

#[allow(clippy::disallowed_methods)] // a load generator measures real time
fn now() -> Instant {
    Instant::now()
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let o = Arc::new(parse()?);
    let rest = o.url.trim_start_matches("http://");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (authority, path) = (
        authority.to_owned(),
        if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start = now();
    let deadline = start + Duration::from_secs(o.secs);
    let mut tasks = Vec::new();
    for c in 0..o.conns {
        let (o, stop, sent, authority, path) = (
            o.clone(),
            stop.clone(),
            sent.clone(),
            authority.clone(),
            path.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| e.to_string())?;
            let mut errors = 0u64;
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            // Open loop: this connection's share of the rate, phase-shifted.
            let period = o.rate.map(|r| Duration::from_secs_f64(o.conns as f64 / r));
            let mut next =
                start + period.map_or(Duration::ZERO, |p| p.mul_f64(c as f64 / o.conns as f64));
            loop {
                if stop.load(Ordering::Relaxed)
                    || now() >= deadline
                    || sent.fetch_add(1, Ordering::Relaxed) >= o.max
                {
                    break;
                }
                let scheduled = match period {
                    Some(p) => {
                        let at = next;
                        next += p;
                        let t = now();
                        if at > t {
                            // On schedule: tokio's timer wakes up to ~1 ms late; that
                            // lateness is ours, not the server's, so time from the send.
                            tokio::time::sleep_until(at.into()).await;
                            now()
                        } else if t.duration_since(at) > Duration::from_millis(2) {
                            // Behind schedule because earlier answers were slow: time from
                            // when this request should have gone (no coordinated omission).
                            at
                        } else {
                            t
                        }
                    }
                    None => now(),
                };
                let mut req = Request::post(path.as_str())
                    .header("host", authority.as_str())
                    .header("content-type", "application/json");
                for (k, v) in &o.headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let body = if o.unique {
                    // The process id in the high bits: no two runs share a number either.
                    static N: AtomicU64 = AtomicU64::new(0);
                    let n =
                        (u64::from(std::process::id()) << 32) | N.fetch_add(1, Ordering::Relaxed);
                    o.body.replacen("{n}", &n.to_string(), 1)
                } else {
                    o.body.clone()
                };
                let req = req
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| e.to_string())?;
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if !ok {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
                let us = now().duration_since(scheduled).as_micros() as u64;
                let _ = hist.record(us.max(1));
            }
            Ok::<_, String>((hist, errors))
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| e.to_string())?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.map_err(|e| e.to_string())??;
        hist.add(h).map_err(|e| e.to_string())?;
        errors += e;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = now().duration_since(start).as_secs_f64();
    println!(
        "{{\"requests\":{},\"errors\":{},\"secs\":{:.2},\"rps\":{:.0},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        hist.len(),
        errors,
        elapsed,
        hist.len() as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    Ok(())
}
