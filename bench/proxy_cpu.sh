#!/usr/bin/env bash
# What busy polling costs in CPU: `sluice serve` on core 1 (the fake
# upstream and the load generator on core 0), with busy_poll_ms = 0 and
# then BUSY_MS (default 200); for each, open-loop non-streaming load at 10
# and 1,000 req/s for SECS (default 5) seconds, then SECS of silence. The
# figure is the process's CPU ticks (/proc/PID/stat utime + stime, 100 a
# second) over the wall time of the interval (the load generator's start
# and drain included), as a share of one core.
# Usage: bash bench/proxy_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"; BUSY_MS="${BUSY_MS:-200}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
source bench/lib.sh
PIN_UP=""; PIN_PROXY=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN_UP="taskset -c 0"; PIN_PROXY="taskset -c 1"; fi
$PIN_UP target/release/examples/fake_upstream 2>"$WORK/up.log" &
UP="$(wait_addr "$WORK/up.log")"
ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
fake_provider_toml "$UP" "$WORK/providers.toml"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now_ms() { date +%s%3N; }
share() { echo $(( ($2 - $1) * 1000 / ($4 - $3) )); }   # ticks t0 t1, ms t0 t1 -> % of a core
echo "| busy_poll_ms | load | CPU (% of one core) | p50 (µs) |"
echo "|---:|---|---:|---:|"
for busy in 0 "$BUSY_MS"; do
  { echo "busy_poll_ms = $busy"; cat "$WORK/providers.toml"; } >"$WORK/s$busy.toml"
  BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn $PIN_PROXY target/release/sluice serve \
    --listen 127.0.0.1:0 --data-dir "$WORK/d$busy" --config "$WORK/s$busy.toml" 2>"$WORK/s$busy.log" &
  PID=$!
  S="$(wait_addr "$WORK/s$busy.log")"
  curl -fsS -X PUT "$S/v1/policies/$AGENT" -H "authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d '{"limits": [{"metric": "requests", "limit": 1000000000, "window": "1h"}]}' >/dev/null
  KEY="$(agent_key "$S" "$ADMIN" "$AGENT")"
  for rate in 10 1000; do
    c0="$(ticks "$PID")"; m0="$(now_ms)"
    R="$($PIN_UP target/release/examples/loadgen "$S/v1/chat/completions" --header "authorization: Bearer $KEY" \
      --body '{"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}' \
      --conns 8 --secs "$SECS" --rate "$rate")"
    c1="$(ticks "$PID")"; m1="$(now_ms)"
    echo "| $busy | $rate req/s | $(share "$c0" "$c1" "$m0" "$m1") | $(field "$R" p50_us) |"
  done
  sleep 1; c0="$(ticks "$PID")"; m0="$(now_ms)"; sleep "$SECS"; c1="$(ticks "$PID")"; m1="$(now_ms)"
  echo "| $busy | none (1 s after the load) | $(share "$c0" "$c1" "$m0" "$m1") | |"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
