#!/usr/bin/env bash
# Proxy benchmark: the same chat-completion load against the fake upstream
# directly, through `sluice serve`, and through LiteLLM's proxy, in one run.
#
# - Max throughput: closed loop (CONNS connections), direct, a bare proxy
#   (examples/bare_proxy.rs: the same axum server and upstream pool forwarding bytes,
#   nothing else) and sluice back to back in each of ROUNDS rounds (median
#   ratios reported: this machine is noisy), LiteLLM once.
# - Added latency: open loop at RATE req/s (default 1,000), in every round:
#   each proxy minus that round's direct at p50 and p99, then the median over
#   the rounds of each. LiteLLM cannot sustain that on one core, so it is measured
#   at 80% of its own max, with sluice at the same rate for comparison.
# - Both non-streaming and streaming (`"stream": true`, 4 chunks + usage).
# - Busy polling: a second bare proxy and a second sluice with busy polling
#   on (`busy_poll_ms = BUSY_MS`, default 200), measured in the same rounds
#   (throughput) and at the same rate (latency). After each busy run the
#   script waits BUSY_MS + 300 ms so that its spinners have parked before the
#   next measurement shares the proxy core with it.
#
# Placement (2 cores): the upstream and the load generator share core 0; the
# proxy under test (sluice or LiteLLM) has core 1 to itself. PLACEMENT=one
# puts every process on one core instead: each hop is then a context switch,
# not a wake-up of the other virtual CPU (which costs this VM tens to hundreds
# of µs), so the latency tables show the proxy's own added work; the
# throughput tables then compare shares of one core and mean little.
# PLACEMENT=free leaves the proxies unpinned (they may run on core 0 beside
# the load generator and upstream): a machine without a core to spare.
# PLACEMENT=swap is the default placement with the cores exchanged (the
# proxies on core 0): on a VM whose virtual CPUs do not run at the same
# speed, the two placements bracket the ratios. Sluice enforces a
# request limit and a dollar budget on the agent's key; LiteLLM runs with a
# global `max_budget` (its per-key budgets need PostgreSQL plus Prisma engines
# downloaded at start, which this offline machine cannot fetch).
# Loopback only; every run is bounded in time.
#
#   bash bench/proxy.sh                         # ROUNDS=3, SECS=10
#   SECS=5 ROUNDS=1 LITELLM=0 bash bench/proxy.sh
#   PLACEMENT=one ROUNDS=1 LITELLM=0 bash bench/proxy.sh   # latency without cross-core wake-ups
#   PLACEMENT=free ROUNDS=2 LITELLM=0 bash bench/proxy.sh  # proxies unpinned: no core to spare
#   PLACEMENT=swap ROUNDS=2 LITELLM=0 bash bench/proxy.sh  # the proxies on core 0, the rest on core 1
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
CONNS="${CONNS:-32}"
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-1000}"
BUSY_MS="${BUSY_MS:-200}"
LITELLM="${LITELLM:-1}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen --example bare_proxy
BIN=target/release
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

PIN_UP=""; PIN_LOAD=""; PIN_PROXY=""
if [ "${PLACEMENT:-split}" = "one" ] && command -v taskset >/dev/null; then
  PIN_UP="taskset -c 0"; PIN_LOAD="taskset -c 0"; PIN_PROXY="taskset -c 0"
elif [ "${PLACEMENT:-split}" = "free" ] && command -v taskset >/dev/null; then
  PIN_UP="taskset -c 0"; PIN_LOAD="taskset -c 0"; PIN_PROXY=""
elif [ "${PLACEMENT:-split}" = "swap" ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_UP="taskset -c 1"; PIN_LOAD="taskset -c 1"; PIN_PROXY="taskset -c 0"
elif command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_UP="taskset -c 0"; PIN_LOAD="taskset -c 0"; PIN_PROXY="taskset -c 1"
fi

source bench/lib.sh

$PIN_UP "$BIN/examples/fake_upstream" 2>"$WORK/up.log" &
UP="$(wait_addr "$WORK/up.log")"

$PIN_PROXY "$BIN/examples/bare_proxy" "$UP/v1" 2>"$WORK/bare.log" &
BARE="$(wait_addr "$WORK/bare.log")"

$PIN_PROXY "$BIN/examples/bare_proxy" "$UP/v1" "$BUSY_MS" 2>"$WORK/bare_busy.log" &
BARE_BUSY="$(wait_addr "$WORK/bare_busy.log")"

ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
start_sluice() { # $1: name (data dir, log), $2: extra sluice.toml lines; sets SLUICE_URL
  fake_provider_toml "$UP" "$WORK/$1.providers.toml"   # gpt-4o-mini, priced from the built-in table
  { printf '%s' "$2"; cat "$WORK/$1.providers.toml"; } >"$WORK/$1.toml"   # top-level keys before the tables
  BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn $PIN_PROXY "$BIN/sluice" serve \
    --listen 127.0.0.1:0 --data-dir "$WORK/$1" --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
  SLUICE_URL="$(wait_addr "$WORK/$1.log")"
  bench_policy "$SLUICE_URL" "$ADMIN" "$AGENT"
}
start_sluice sluice ""; SLUICE="$SLUICE_URL"
KEY="$(agent_key "$SLUICE" "$ADMIN" "$AGENT")"
start_sluice sluice_busy "busy_poll_ms = $BUSY_MS
"; SLUICE_BUSY="$SLUICE_URL"
KEY_BUSY="$(agent_key "$SLUICE_BUSY" "$ADMIN" "$AGENT")"
park() { sleep "$(python3 -c "print(($BUSY_MS + 300) / 1000)")"; }   # let busy spinners park

body() { # $1: stream true|false
  echo "{\"model\": \"gpt-4o-mini\", \"max_tokens\": 64, \"stream\": $1, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in one short sentence, please.\"}]}"
}
load() { # $1 base url, $2 bearer, $3 stream, rest: extra args
  local url="$1" auth="$2" stream="$3"; shift 3
  $PIN_LOAD "$BIN/examples/loadgen" "$url/v1/chat/completions" --body "$(body "$stream")" \
    --header "authorization: Bearer $auth" --conns "$CONNS" --secs "$SECS" "$@"
}
check_errors() { # $1 name, $2 result
  [ "$(field "$2" errors)" = "0" ] || echo "$1: $(field "$2" errors) errors" >&2
}

echo "warming up" >&2
load "$UP" sk-fake false --secs 2 >/dev/null; load "$SLUICE" "$KEY" false --secs 2 >/dev/null
load "$SLUICE_BUSY" "$KEY_BUSY" false --secs 2 >/dev/null; park

NAMES=("direct" "bare proxy" "sluice" "bare proxy, busy_poll_ms=$BUSY_MS" "sluice, busy_poll_ms=$BUSY_MS")
for STREAM in false true; do
  echo
  echo "### stream: $STREAM"
  echo
  echo "| round | direct max rps | bare proxy max rps | sluice max rps | sluice / direct | bare / direct | sluice / bare | sluice busy-poll max rps | sluice busy-poll / direct |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  RATIOS=(); BRATIOS=(); SB=(); S_RPS=(); BUSY=(); LAT=()
  for r in $(seq 1 "$ROUNDS"); do
    D="$(load "$UP" sk-fake "$STREAM")"; P="$(load "$BARE" sk-fake "$STREAM")"; S="$(load "$SLUICE" "$KEY" "$STREAM")"
    SP="$(load "$SLUICE_BUSY" "$KEY_BUSY" "$STREAM")"; park
    check_errors direct "$D"; check_errors bare "$P"; check_errors sluice "$S"; check_errors "sluice busy-poll" "$SP"
    ratio="$(python3 -c "print(f'{$(field "$S" rps) / $(field "$D" rps):.3f}')")"
    bratio="$(python3 -c "print(f'{$(field "$P" rps) / $(field "$D" rps):.3f}')")"
    sb="$(python3 -c "print(f'{$(field "$S" rps) / $(field "$P" rps):.3f}')")"
    busy="$(python3 -c "print(f'{$(field "$SP" rps) / $(field "$D" rps):.3f}')")"
    RATIOS+=("$ratio"); BRATIOS+=("$bratio"); SB+=("$sb"); S_RPS+=("$(field "$S" rps)"); BUSY+=("$busy")
    echo "| $r | $(field "$D" rps) | $(field "$P" rps) | $(field "$S" rps) | $ratio | $bratio | $sb | $(field "$SP" rps) | $busy |"
    # The open-loop latency runs of this round, in the order of NAMES.
    D1="$(load "$UP" sk-fake "$STREAM" --rate "$RATE")"; P1="$(load "$BARE" sk-fake "$STREAM" --rate "$RATE")"; S1="$(load "$SLUICE" "$KEY" "$STREAM" --rate "$RATE")"
    PB1="$(load "$BARE_BUSY" sk-fake "$STREAM" --rate "$RATE")"; park
    SB1="$(load "$SLUICE_BUSY" "$KEY_BUSY" "$STREAM" --rate "$RATE")"; park
    check_errors direct "$D1"; check_errors bare "$P1"; check_errors sluice "$S1"
    check_errors "bare busy-poll" "$PB1"; check_errors "sluice busy-poll" "$SB1"
    LAT+=("$r|$(field "$D1" p50_us)|$(field "$D1" p99_us)|$(field "$P1" p50_us)|$(field "$P1" p99_us)|$(field "$S1" p50_us)|$(field "$S1" p99_us)|$(field "$PB1" p50_us)|$(field "$PB1" p99_us)|$(field "$SB1" p50_us)|$(field "$SB1" p99_us)")
  done
  echo
  echo "median max throughput: sluice / direct $(python3 -c "print(f'{$(median "${RATIOS[@]}"):.0%}')")," \
    "bare proxy / direct $(python3 -c "print(f'{$(median "${BRATIOS[@]}"):.0%}')"), sluice / bare proxy $(python3 -c "print(f'{$(median "${SB[@]}"):.0%}')")," \
    "sluice busy-poll / direct $(python3 -c "print(f'{$(median "${BUSY[@]}"):.0%}')")"
  echo
  # Each round's p50 and p99 (µs), each proxy's added to that round's direct;
  # then the median over the rounds of each added figure (a single run's p99
  # on this VM is the 1% worst of its few thousand calls, and moves by the minute).
  echo "| at $RATE req/s, round | p50 (µs) | p99 (µs) | p50 added to direct | p99 added to direct |"
  echo "|---|---:|---:|---:|---:|"
  python3 - "$RATE" "${NAMES[@]}" -- "${LAT[@]}" <<'PY'
import statistics, sys
args = sys.argv[2:]
cut = args.index("--")
names, rows = args[:cut], [r.split("|") for r in args[cut + 1:]]
added = {n: ([], []) for n in names}
for row in rows:
    r, vals = row[0], list(map(int, row[1:]))
    d50, d99 = vals[0], vals[1]
    for i, n in enumerate(names):
        p50, p99 = vals[2 * i], vals[2 * i + 1]
        print(f"| {n}, round {r} | {p50} | {p99} | {p50 - d50} | {p99 - d99} |")
        added[n][0].append(p50 - d50); added[n][1].append(p99 - d99)
print()
print(f"| at {sys.argv[1]} req/s: median over {len(rows)} rounds | p50 added to direct | p99 added to direct |")
print("|---|---:|---:|")
for n in names[1:]:
    print(f"| {n} | {statistics.median(added[n][0]):.0f} | {statistics.median(added[n][1]):.0f} |")
PY
  declare "SMAX_$STREAM=$(median "${S_RPS[@]}")"
done
echo
echo "sluice reservations outstanding at the end: $(curl -fsS "$SLUICE/metrics" | awk '/^sluice_reservations_outstanding/ {print $2}')," \
  "busy-poll sluice: $(curl -fsS "$SLUICE_BUSY/metrics" | awk '/^sluice_reservations_outstanding/ {print $2}')"

# LiteLLM last, so its process is not on the proxy core while sluice's max is measured.
LITE=""
if [ "$LITELLM" = "1" ]; then
  VENV="${LITELLM_VENV:-target/bench/litellm-venv}"
  if [ ! -x "$VENV/bin/litellm" ]; then
    echo "installing litellm[proxy] into $VENV" >&2
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q 'litellm[proxy]' >&2
  fi
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  cat >"$WORK/litellm.yaml" <<EOF
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: $UP/v1
      api_key: sk-fake
general_settings:
  master_key: sk-bench-master
litellm_settings:
  max_budget: 1000000
EOF
  LITELLM_LOCAL_MODEL_COST_MAP=True $PIN_PROXY "$VENV/bin/litellm" --config "$WORK/litellm.yaml" \
    --host 127.0.0.1 --port "$PORT" --num_workers 1 >"$WORK/litellm.log" 2>&1 &
  for _ in $(seq 1 120); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health/liveliness" 2>/dev/null && { LITE="http://127.0.0.1:$PORT"; break; }
    sleep 0.5
  done
  [ -n "$LITE" ] || echo "LiteLLM did not start: $(tail -5 "$WORK/litellm.log")" >&2
fi

if [ -n "$LITE" ]; then
  load "$LITE" sk-bench-master false --secs 2 --conns 8 >/dev/null
  echo
  echo "### LiteLLM $("$VENV/bin/pip" show litellm 2>/dev/null | awk '/^Version/ {print $2}') (one worker, the proxy core, 8 connections)"
  echo
  echo "| stream | LiteLLM max rps | p50 / p99 at max (µs) | sluice median max / LiteLLM max | at 80% of LiteLLM's max: LiteLLM p50 / p99 (µs) | same rate, sluice p50 / p99 (µs) |"
  echo "|---|---:|---:|---:|---:|---:|"
  for STREAM in false true; do
    L="$(load "$LITE" sk-bench-master "$STREAM" --conns 8)"; check_errors litellm "$L"
    LR="$(python3 -c "print(max(1, int($(field "$L" rps) * 0.8)))")"
    L8="$(load "$LITE" sk-bench-master "$STREAM" --rate "$LR" --conns 8)"
    S8="$(load "$SLUICE" "$KEY" "$STREAM" --rate "$LR" --conns 8)"
    smax="SMAX_$STREAM"
    echo "| $STREAM | $(field "$L" rps) | $(field "$L" p50_us) / $(field "$L" p99_us) | $(python3 -c "print(f'{${!smax} / $(field "$L" rps):.0f}x')") | $LR req/s: $(field "$L8" p50_us) / $(field "$L8" p99_us) | $(field "$S8" p50_us) / $(field "$S8" p99_us) |"
  done
fi
