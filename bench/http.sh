#!/usr/bin/env bash
# Gateway benchmark: POST /v1/check on `sluice serve` against a trivial axum
# handler (the yardstick), in the same run, with the same load generator.
# Throughput: closed loop, yardstick and sluice back to back in each of
# ROUNDS rounds, the median ratio reported (this machine is noisy). Latency:
# open loop at 80% of sluice's median max, for both servers.
# Loopback only; every run is bounded in time.
#
#   bash bench/http.sh            # 5 rounds of 10 s per server, then the 80% runs
#   SECS=5 ROUNDS=3 CONNS=32 bash bench/http.sh
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

source bench/lib.sh

KEY="bench-admin-key-0123456789abcdef"
SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn $PIN_SERVER "$BIN/sluice" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" 2>"$WORK/sluice.log" &
SLUICE="$(wait_addr "$WORK/sluice.log")"
$PIN_SERVER "$BIN/examples/yardstick" 127.0.0.1:0 2>"$WORK/yard.log" &
YARD="$(wait_addr "$WORK/yard.log")"

AGENT="agent://bench/prod/bot"
bench_policy "$SLUICE" "$KEY" "$AGENT"
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

echo "warming up" >&2
run "$YARD" --secs 2 >/dev/null; run "$SLUICE" --secs 2 >/dev/null; drain

# Throughput: ROUNDS rounds, each yardstick then sluice back to back, so both
# see the same machine; the figure is the median of the per-round ratios.
ROUNDS="${ROUNDS:-5}"
echo "| round | yardstick max rps | sluice max rps | sluice p50 / p99 at max (µs) | ratio | ledger rows queued after |"
echo "|---|---:|---:|---:|---:|---:|"
RATIOS=(); S_RPS=()
for r in $(seq 1 "$ROUNDS"); do
  Y="$(run "$YARD")"; S="$(run "$SLUICE")"; P="$(pending)"; drain
  ratio="$(python3 -c "print(f'{$(field "$S" rps) / $(field "$Y" rps):.3f}')")"
  RATIOS+=("$ratio"); S_RPS+=("$(field "$S" rps)")
  [ "$(field "$S" errors)" = "0" ] || echo "sluice errors in round $r: $(field "$S" errors)" >&2
  echo "| $r | $(field "$Y" rps) | $(field "$S" rps) | $(field "$S" p50_us) / $(field "$S" p99_us) | $ratio | $P |"
done
MEDIAN="$(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
S_MED="$(printf '%s\n' "${S_RPS[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
echo
echo "median sluice / yardstick throughput: $(python3 -c "print(f'{$MEDIAN:.0%}')")"

# Latency at 80% of sluice's median max throughput (open loop), both servers at that rate.
RATE="$(python3 -c "print(int($S_MED * 0.8))")"
Y80="$(run "$YARD" --rate "$RATE")"; S80="$(run "$SLUICE" --rate "$RATE")"; P80="$(pending)"
echo "at $RATE req/s (80% of sluice's median max): yardstick p50 $(field "$Y80" p50_us) µs, p99 $(field "$Y80" p99_us) µs; sluice p50 $(field "$S80" p50_us) µs, p99 $(field "$S80" p99_us) µs, p99.9 $(field "$S80" p999_us) µs (ledger rows queued after: $P80, errors: $(field "$S80" errors))"
echo "ledger rows written: $(curl -fsS "$SLUICE/metrics" | grep '^sluice_ledger_rows_written_total' | awk '{print $2}')"
