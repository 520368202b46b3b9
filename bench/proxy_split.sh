#!/usr/bin/env bash
# Where a proxied call's CPU goes: user and kernel time per call, per thread,
# for the bare proxy (examples/bare_proxy.rs: the same axum server and
# upstream pool, forwarding bytes) and for `sluice serve`, at saturation.
#
# Placement as in bench/proxy.sh: the fake upstream and the load generator on
# core 0, each proxy on core 1. Each round sends N non-streaming (or, with
# STREAM=true, streaming) chat completions through the bare proxy and then
# through Sluice (closed loop, CONNS connections) and reads every thread's
# utime and stime from /proc/PID/task/*/stat before and after: CPU per call,
# kernel time included (which callgrind, bench/proxy_instr.sh, leaves out).
# The ticks are 1/CLK_TCK s, so keep N large enough for a few hundred of them.
# A third row per round, direct (the load generator to the upstream), gives
# core 0's CPU per call: the upstream's threads plus the load generator's own
# (its rusage, read by a python wrapper), the yardstick bench/proxy.sh divides by.
# Loopback only; every run is bounded in count and time.
#
#   bash bench/proxy_split.sh                     # N=40000, CONNS=32, ROUNDS=2
#   STREAM=true ROUNDS=3 bash bench/proxy_split.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-40000}"; CONNS="${CONNS:-32}"; ROUNDS="${ROUNDS:-2}"; STREAM="${STREAM:-false}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen --example bare_proxy
BIN=target/release
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
source bench/lib.sh
PIN0=""; PIN1=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
TCK="$(getconf CLK_TCK)"

$PIN0 "$BIN/examples/fake_upstream" 2>"$WORK/up.log" &
UP_PID=$!
UP="$(wait_addr "$WORK/up.log")"
$PIN1 "$BIN/examples/bare_proxy" "$UP/v1" 2>"$WORK/bare.log" &
BARE_PID=$!
BARE="$(wait_addr "$WORK/bare.log")"
fake_provider_toml "$UP" "$WORK/s.toml"
ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn $PIN1 "$BIN/sluice" serve \
  --listen 127.0.0.1:0 --data-dir "$WORK/d" --config "$WORK/s.toml" 2>"$WORK/s.log" &
SLUICE_PID=$!
SLUICE="$(wait_addr "$WORK/s.log")"
bench_policy "$SLUICE" "$ADMIN" "$AGENT"
KEY="$(agent_key "$SLUICE" "$ADMIN" "$AGENT")"

BODY="{\"model\": \"gpt-4o-mini\", \"max_tokens\": 64, \"stream\": $STREAM, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in one short sentence, please.\"}]}"
load() { # $1 url, $2 key, $3 calls; the load generator's own CPU time (s) goes to $WORK/lg
  $PIN0 python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime} {r.ru_stime}")' "$WORK/lg" "$BIN/examples/loadgen" "$1/v1/chat/completions" --body "$BODY" \
    --header "authorization: Bearer $2" --conns "$CONNS" --secs 120 --max "$3"
}
# One line per thread: "name user_ticks sys_ticks" (the name may hold spaces: comm is in parentheses).
threads() {
  for t in /proc/"$1"/task/*; do
    python3 -c 'import sys; s=open(sys.argv[1]).read(); n=s[s.index("(")+1:s.rindex(")")]; f=s[s.rindex(")")+2:].split(); print(n.replace(" ", "_"), f[11], f[12])' "$t/stat"
  done | sort
}
# Per-call µs by thread name from two `threads` snapshots ($1 before, $2 after, $3 calls).
per_call() { # $4: a file with the load generator's user and system seconds, to add as a thread
  python3 - "$1" "$2" "$3" "$TCK" "${4:-}" <<'EOF'
import sys, collections
def read(p):
    d = collections.defaultdict(lambda: [0, 0])
    for line in open(p):
        name, u, s = line.split()
        d[name][0] += int(u); d[name][1] += int(s)
    return d
a, b, n, tck = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5]:
    u, s = map(float, open(sys.argv[5]).read().split())
    b["loadgen"] = [round(u * tck), round(s * tck)]
us = lambda ticks: ticks * 1e6 / tck / n
tu = ts = 0
for name in sorted(b):
    du, ds = b[name][0] - a[name][0], b[name][1] - a[name][1]
    tu += du; ts += ds
    if du or ds:
        print(f"| | {name} | {us(du):.1f} | {us(ds):.1f} | {us(du + ds):.1f} |")
print(f"| | **all threads** | {us(tu):.1f} | {us(ts):.1f} | **{us(tu + ts):.1f}** |")
EOF
}

echo "warming up" >&2
load "$BARE" sk-fake 4000 >/dev/null; load "$SLUICE" "$KEY" 4000 >/dev/null
echo "stream: $STREAM, $N calls per measurement, $CONNS connections, CLK_TCK $TCK"
echo
echo "| round, proxy (req/s) | thread | user µs/call | kernel µs/call | total µs/call |"
echo "|---|---|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  for who in direct bare sluice; do
    case $who in
      direct) pid=$UP_PID; url=$UP; key=sk-fake ;;
      bare) pid=$BARE_PID; url=$BARE; key=sk-fake ;;
      sluice) pid=$SLUICE_PID; url=$SLUICE; key=$KEY ;;
    esac
    threads "$pid" >"$WORK/t0"
    res="$(load "$url" "$key" "$N")"   # errors: checked below
    threads "$pid" >"$WORK/t1"
    [ "$(field "$res" errors)" = 0 ] || { echo "$who: errors: $res" >&2; exit 1; }
    echo "| $r, $who ($(field "$res" rps)) | | | | |"
    if [ "$who" = direct ]; then per_call "$WORK/t0" "$WORK/t1" "$N" "$WORK/lg"; else per_call "$WORK/t0" "$WORK/t1" "$N"; fi
  done
done
