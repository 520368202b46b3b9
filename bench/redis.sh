#!/usr/bin/env bash
# Scale-out benchmark: `POST /v1/check` decisions per second of sluice
# replicas sharing one Redis, beside the Redis ceiling measured in the same
# run: `redis-benchmark` calling the very script one decision runs
# (EVALSHA of crates/sluice-redis/src/limits.lua, same keys and arguments:
# one subject, a sliding requests/hour limit and a calendar-day cost limit)
# at the same concurrency. Then three replicas, one load generator each,
# for the aggregate and which side saturates first.
# Loopback only; every run is bounded in time.
#
#   bash bench/redis.sh                       # Redis at 127.0.0.1:6379
#   REDIS_URL=redis://127.0.0.1:6380 SECS=5 CONNS=32 ROUNDS=3 bash bench/redis.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
CONNS="${CONNS:-32}"
ROUNDS="${ROUNDS:-3}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
HOSTPORT="${REDIS_URL#redis://}"; RHOST="${HOSTPORT%:*}"; RPORT="${HOSTPORT##*:}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example loadgen
BIN=target/release
WORK="$(mktemp -d)"
PREFIX="sluice-bench:$$:"
cleanup() {
  kill $(jobs -p) $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true
  redis-cli -h "$RHOST" -p "$RPORT" --scan --pattern "${PREFIX}*" | xargs -r redis-cli -h "$RHOST" -p "$RPORT" del >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
source bench/lib.sh

KEY="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
BODY="{\"subjects\": [\"$AGENT\"], \"amounts\": {\"requests\": 1, \"cost_usd\": 0.0001}}"

start_replica() { # $1 name -> prints address
  mkdir -p "$WORK/$1"
  printf '[store]\nkind = "redis"\nurl = "%s"\nkey_prefix = "%s"\n' "$REDIS_URL" "$PREFIX" > "$WORK/$1/sluice.toml"
  SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn "$BIN/sluice" serve --listen 127.0.0.1:0 --data-dir "$WORK/$1/data" \
    --config "$WORK/$1/sluice.toml" >/dev/null 2>"$WORK/$1.log" &
  echo $! > "$WORK/$1.pid"
  wait_addr "$WORK/$1.log"
}
load() { # $1 url, rest: extra args
  local url="$1"; shift
  "$BIN/examples/loadgen" "$url/v1/check" --body "$BODY" --header "authorization: Bearer $KEY" --conns "$CONNS" --secs "$SECS" "$@"
}

A="$(start_replica a)"
curl -fsS -X PUT "$A/v1/policies/$AGENT" -H "authorization: Bearer $KEY" -H 'content-type: application/json' -d "$BENCH_POLICY" >/dev/null

# The ceiling: the same script with a decision's keys and arguments.
SHA="$(redis-cli -h "$RHOST" -p "$RPORT" SCRIPT LOAD "$(cat crates/sluice-redis/src/limits.lua)")"
ENDS="$(python3 - <<'EOF'
import time
day = 86400 * 10**9
now = time.time_ns() - 120 * 10**9
e0 = (now // day + 1) * day
print(",".join(str(e0 + i * day) for i in range(4)))
EOF
)"
CEILING_ARGS=(EVALSHA "$SHA" 5 "${PREFIX}leases" "${PREFIX}lease_expiries" "${PREFIX}lease_seq" "${PREFIX}expired" "${PREFIX}{$AGENT}"
  acquire "" spend 0 "" "" 1 "$AGENT" 2
  "requests/sliding/3600000000000/60000000000/" s 3600000000000 1000000000 60000000000 0 requests 1h "" 1
  "cost_usd/fixed/day/0/UTC" f 0 1000000000000 0 4 cost_usd day "$ENDS" 100)
ceiling() {
  redis-benchmark -h "$RHOST" -p "$RPORT" -c "$CONNS" -n "$1" -q "${CEILING_ARGS[@]}" 2>/dev/null \
    | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | awk '{print $1}'
}

echo "warming up" >&2
load "$A" --secs 2 >/dev/null; ceiling 20000 >/dev/null

echo "| round | redis-benchmark EVALSHA (ceiling) rps | one replica rps | p50 / p99 (µs) | replica / ceiling |"
echo "|---|---:|---:|---:|---:|"
RATIOS=()
for r in $(seq 1 "$ROUNDS"); do
  C="$(ceiling $((SECS * 20000)))"
  S="$(load "$A")"
  ratio="$(python3 -c "print(f'{$(field "$S" rps) / $C:.3f}')")"
  RATIOS+=("$ratio")
  [ "$(field "$S" errors)" = "0" ] || echo "errors in round $r: $(field "$S" errors)" >&2
  echo "| $r | $C | $(field "$S" rps) | $(field "$S" p50_us) / $(field "$S" p99_us) | $ratio |"
done
echo
echo "median one replica / Redis ceiling: $(python3 -c "print(f'{$(median "${RATIOS[@]}"):.0%}')")"

# Three replicas, one load generator each (CONNS / 3 connections), at once.
# CPU seconds of redis-server and of the replicas over the run (from
# /proc, Redis on this machine only) say which side saturates first.
B="$(start_replica b)"; C3="$(start_replica c)"
PER=$((CONNS / 3 > 0 ? CONNS / 3 : 1))
RPID="$(redis-cli -h "$RHOST" -p "$RPORT" info server | tr -d '\r' | awk -F: '/^process_id:/ {print $2}')"
cpu() { # CPU seconds used so far by the processes $@ (utime + stime)
  for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0; done \
    | awk -v hz="$(getconf CLK_TCK)" '{s += $1} END {printf "%.2f", s / hz}'
}
REPLICA_PIDS="$(cat "$WORK"/*.pid | tr '\n' ' ')"
R0="$(cpu "$RPID")"; S0="$(cpu $REPLICA_PIDS)"
LOADERS=()
for url in "$A" "$B" "$C3"; do
  "$BIN/examples/loadgen" "$url/v1/check" --body "$BODY" --header "authorization: Bearer $KEY" --conns "$PER" --secs "$SECS" > "$WORK/out.$(echo "$url" | tr ':./' '___')" &
  LOADERS+=($!)
done
wait "${LOADERS[@]}"
R1="$(cpu "$RPID")"; S1="$(cpu $REPLICA_PIDS)"
TOTAL=0
for f in "$WORK"/out.*; do
  line="$(cat "$f")"
  echo "replica: $(field "$line" rps) rps, p50 $(field "$line" p50_us) µs, p99 $(field "$line" p99_us) µs, errors $(field "$line" errors)"
  TOTAL="$(python3 -c "print(int($TOTAL + $(field "$line" rps)))")"
done
echo "three replicas together: $TOTAL rps"
python3 -c "
secs = $SECS
r = ($R1 - $R0) / secs; s = ($S1 - $S0) / secs
print(f'redis-server busy {r:.0%} of one core (it runs scripts on one thread); the three replicas {s:.0%} of a core together')
print('saturated first: ' + ('Redis' if r >= 0.9 else 'the replicas and load generators (machine CPU), not Redis'))
"
