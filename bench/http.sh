#!/usr/bin/env bash
# Gateway benchmark: POST /v1/check on `sluice serve` against a trivial axum
# handler (the yardstick), in the same run, with the same load generator.
# For each: the maximum throughput (closed loop), then p50/p99 latency at 80%
# of that throughput (open loop, latency from the scheduled send time).
# Loopback only; every run is bounded in time.
#
#   bash bench/http.sh            # 10 s per run
#   SECS=5 CONNS=32 bash bench/http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
CONNS="${CONNS:-32}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example yardstick --example loadgen
BIN=target/release
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# Server on core 0, load generator on core 1, when taskset is there.
PIN_SERVER=""; PIN_LOAD=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN_SERVER="taskset -c 0"; PIN_LOAD="taskset -c 1"; fi

wait_addr() { # $1: log file
  for _ in $(seq 1 100); do
    addr="$(grep -o 'listening on http://[0-9.:]*' "$1" | head -1 | sed 's/listening on //')" || true
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "server did not start: $(cat "$1")" >&2; exit 1
}

KEY="bench-admin-key-0123456789abcdef"
SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn $PIN_SERVER "$BIN/sluice" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" 2>"$WORK/sluice.log" &
SLUICE="$(wait_addr "$WORK/sluice.log")"
$PIN_SERVER "$BIN/examples/yardstick" 127.0.0.1:0 2>"$WORK/yard.log" &
YARD="$(wait_addr "$WORK/yard.log")"

AGENT="agent://bench/prod/bot"
curl -fsS -X PUT "$SLUICE/v1/policies/$AGENT" -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
  -d '{"limits": [{"metric": "requests", "limit": 1000000000, "window": "1h"}, {"metric": "cost_usd", "limit": 1000000, "window": "day"}]}' >/dev/null
BODY="{\"subjects\": [\"$AGENT\"], \"amounts\": {\"requests\": 1, \"cost_usd\": 0.0001}}"

run() { # $1 url, rest: extra args
  local url="$1"; shift
  $PIN_LOAD "$BIN/examples/loadgen" "$url/v1/check" --body "$BODY" --header "authorization: Bearer $KEY" --conns "$CONNS" --secs "$SECS" "$@"
}
drain() { # wait (bounded) until the ledger has written everything queued
  for _ in $(seq 1 300); do
    p="$(curl -fsS "$SLUICE/metrics" | awk '/^sluice_ledger_pending_rows/ {print $2}')"
    [ "$p" = "0" ] && return
    sleep 0.1
  done
  echo "ledger still has $p rows pending after 30 s" >&2
}
pending() { curl -fsS "$SLUICE/metrics" | awk '/^sluice_ledger_pending_rows/ {print $2}'; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

echo "warming up" >&2
run "$YARD" --secs 2 >/dev/null; run "$SLUICE" --secs 2 >/dev/null; drain
Y_MAX="$(run "$YARD")"; S_MAX="$(run "$SLUICE")"
S_PENDING="$(pending)"; drain
Y_RATE="$(python3 -c "print(int($(field "$Y_MAX" rps) * 0.8))")"
S_RATE="$(python3 -c "print(int($(field "$S_MAX" rps) * 0.8))")"
Y_80="$(run "$YARD" --rate "$Y_RATE")"; S_80="$(run "$SLUICE" --rate "$S_RATE")"
S80_PENDING="$(pending)"
ERRORS=$(( $(field "$S_MAX" errors) + $(field "$S_80" errors) ))

echo "| target | max rps | p50 at max (µs) | p99 at max (µs) | rate at 80% | p50 at 80% (µs) | p99 at 80% (µs) |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for t in yardstick sluice; do
  if [ $t = yardstick ]; then M="$Y_MAX"; E="$Y_80"; R="$Y_RATE"; else M="$S_MAX"; E="$S_80"; R="$S_RATE"; fi
  echo "| $t | $(field "$M" rps) | $(field "$M" p50_us) | $(field "$M" p99_us) | $R | $(field "$E" p50_us) | $(field "$E" p99_us) |"
done
python3 -c "print(f'sluice / yardstick throughput: {$(field "$S_MAX" rps) / $(field "$Y_MAX" rps):.0%}')"
echo "sluice errors (non-2xx or failed): $ERRORS"
echo "ledger rows still queued at the end of the max run: $S_PENDING; of the 80% run: $S80_PENDING"
echo "ledger rows written: $(curl -fsS "$SLUICE/metrics" | grep '^sluice_ledger_rows_written_total' | awk '{print $2}')"
