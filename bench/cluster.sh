#!/usr/bin/env bash
# Redis Cluster benchmark: one replica's `POST /v1/check` decisions per
# second on a local 3-node Redis Cluster, beside the same replica binary on
# one Redis server in the same run (the yardstick), for a request naming one
# subject (one slot: one script call, as on one server) and one naming three
# subjects on the three nodes (three slots: decided slot by slot, two holds
# with markers, a last hold, then the markers dropped: 4 round trips, the
# first three in sequence). Every server here shares this machine's cores
# with the replica and the load generator, so the figures compare
# protocols, not hardware. Loopback only; every run is bounded in time.
#
#   bash bench/cluster.sh                    # single Redis at 127.0.0.1:6379
#   SECS=5 CONNS=32 ROUNDS=3 bash bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-8}"
CONNS="${CONNS:-32}"
ROUNDS="${ROUNDS:-3}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example loadgen
BIN=target/release
WORK="$(mktemp -d)"
PREFIX="sluice-bench:$$:"
PORTS=()
cleanup() {
  kill $(jobs -p) $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true
  for p in "${PORTS[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
source bench/lib.sh

# Three cluster nodes on free ports (and their bus ports).
read -r -a PORTS <<< "$(python3 -c "
import socket
ports = []
while len(ports) < 3:
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close()
    if p > 55000 or p in ports: continue
    b = socket.socket()
    try: b.bind(('127.0.0.1', p + 10000)); b.close(); ports.append(p)
    except OSError: pass
print(*ports)
")"
for p in "${PORTS[@]}"; do
  (cd "$WORK" && redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
    --save '' --appendonly no --daemonize yes --logfile "$WORK/redis-$p.log" >/dev/null)
done
for p in "${PORTS[@]}"; do
  for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 1 100); do
  ok=1; for p in "${PORTS[@]}"; do redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0; done
  [ "$ok" = 1 ] && break; sleep 0.1
done
CLUSTER_URL="$(printf 'redis://127.0.0.1:%s,' "${PORTS[@]}")"; CLUSTER_URL="${CLUSTER_URL%,}"

KEY="bench-admin-key-0123456789abcdef"
# Three subjects whose keys live on the three nodes (slot ranges 0-5460, 5461-10922, 10923-16383).
SUBJECTS=()
for want in 0 1 2; do
  for i in $(seq 0 300); do
    s="user:bench$i"
    slot="$(redis-cli -p "${PORTS[0]}" cluster keyslot "${PREFIX}{$s}")"
    if [ $((slot / 5462)) = "$want" ]; then SUBJECTS+=("$s"); break; fi
  done
done
ONE="{\"subjects\": [\"${SUBJECTS[0]}\"], \"amounts\": {\"requests\": 1, \"cost_usd\": 0.0001}}"
THREE="{\"subjects\": [\"${SUBJECTS[0]}\", \"${SUBJECTS[1]}\", \"${SUBJECTS[2]}\"], \"amounts\": {\"requests\": 1, \"cost_usd\": 0.0001}}"

start_replica() { # $1 name, $2 url, $3 cluster (true|false) -> prints address
  mkdir -p "$WORK/$1"
  printf '[store]\nkind = "redis"\nurl = "%s"\ncluster = %s\nkey_prefix = "%s"\n' "$2" "$3" "$PREFIX" > "$WORK/$1/sluice.toml"
  SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn "$BIN/sluice" serve --listen 127.0.0.1:0 --data-dir "$WORK/$1/data" \
    --config "$WORK/$1/sluice.toml" >/dev/null 2>"$WORK/$1.log" &
  echo $! > "$WORK/$1.pid"
  wait_addr "$WORK/$1.log"
}
SINGLE="$(start_replica single "$REDIS_URL" false)"
CLUSTER="$(start_replica cluster "$CLUSTER_URL" true)"
for url in "$SINGLE" "$CLUSTER"; do
  for s in "${SUBJECTS[@]}"; do
    curl -fsS -X PUT "$url/v1/policies/$s" -H "authorization: Bearer $KEY" -H 'content-type: application/json' -d "$BENCH_POLICY" >/dev/null
  done
done
load() { # $1 url, $2 body
  "$BIN/examples/loadgen" "$1/v1/check" --body "$2" --header "authorization: Bearer $KEY" --conns "$CONNS" --secs "$SECS"
}
echo "warming up" >&2
load "$SINGLE" "$ONE" >/dev/null; load "$CLUSTER" "$THREE" >/dev/null

echo "| round | subjects | one Redis rps | p50 / p99 (µs) | 3-node cluster rps | p50 / p99 (µs) | cluster / one Redis |"
echo "|---|---:|---:|---:|---:|---:|---:|"
R1=(); R3=()
for r in $(seq 1 "$ROUNDS"); do
  for n in 1 3; do
    body="$ONE"; [ "$n" = 3 ] && body="$THREE"
    S="$(load "$SINGLE" "$body")"; C="$(load "$CLUSTER" "$body")"
    for x in "$S" "$C"; do [ "$(field "$x" errors)" = "0" ] || echo "errors: $x" >&2; done
    ratio="$(python3 -c "print(f'{$(field "$C" rps) / $(field "$S" rps):.2f}')")"
    if [ "$n" = 1 ]; then R1+=("$ratio"); else R3+=("$ratio"); fi
    echo "| $r | $n | $(field "$S" rps) | $(field "$S" p50_us) / $(field "$S" p99_us) | $(field "$C" rps) | $(field "$C" p50_us) / $(field "$C" p99_us) | $ratio |"
  done
done
echo
echo "median cluster / one Redis: one subject $(median "${R1[@]}"), three subjects on three nodes $(median "${R3[@]}")"
