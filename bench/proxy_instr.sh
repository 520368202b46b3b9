#!/usr/bin/env bash
# Sluice's user-space instructions per proxied call, counted by callgrind:
# a figure this noisy VM cannot move (wall time here swings 2-4x by the hour),
# for comparing changes to the proxy's per-call CPU. Kernel time (sockets,
# wake-ups: about a third of a call's CPU at saturation) is not counted.
#
# `sluice serve` runs under `valgrind --tool=callgrind` beside the fake
# upstream; after a warm-up, for each of non-streaming and streaming chat
# completions it zeroes the counters, sends N and then 2N calls (closed loop,
# CONNS connections) and reports (instructions for 2N - for N) / N, so what
# does not grow with the calls (timers, start-up) cancels out. The ledger's
# SQLite thread is included (one row per call, written in batches).
# Usage: bash bench/proxy_instr.sh            # N=400, CONNS=4
#        bash bench/proxy_instr.sh REV        # the same for commit REV (built in a worktree,
#                                             # into OLD_TARGET if set), then this tree
#        OLD_BIN=path/to/sluice bash bench/proxy_instr.sh   # an already built binary, then this tree
#        BARE=1 bash bench/proxy_instr.sh       # and the bare proxy (examples/bare_proxy.rs), the yardstick
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-400}"; CONNS="${CONNS:-4}"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
  || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen --example bare_proxy
WORK="$(mktemp -d)"
source bench/lib.sh
trap 'kill $(jobs -p) 2>/dev/null || true; remove_old_rev; rm -rf "$WORK"' EXIT
BINS=("target/release/sluice")
NAMES=("this tree")
if [ -n "${1:-}" ]; then
  build_old_rev "$1"
  BINS=("$OLD_BIN" "target/release/sluice")
  NAMES=("$1" "this tree")
elif [ -n "${OLD_BIN:-}" ]; then
  BINS=("$OLD_BIN" "target/release/sluice")
  NAMES=("$OLD_BIN" "this tree")
fi
target/release/examples/fake_upstream 2>"$WORK/up.log" &
UP="$(wait_addr "$WORK/up.log")"
fake_provider_toml "$UP" "$WORK/s.toml"
ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
# Total instructions (Ir) in the newest callgrind dump of process $1.
ir_of() { grep -h '^summary:' "$(ls -t "$WORK"/cg.out."$1"* | head -1)" | awk '{print $2}'; }
calls() { # $1 url, $2 key, $3 stream, $4 count: sends them, prints how many were answered 200
  local r
  r="$(target/release/examples/loadgen "$1/v1/chat/completions" --header "authorization: Bearer $2" \
    --body "{\"model\": \"gpt-4o-mini\", \"max_tokens\": 64, \"stream\": $3, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in one short sentence, please.\"}]}" \
    --conns "$CONNS" --secs 120 --max "$4")"
  [ "$(field "$r" errors)" = 0 ] || { echo "errors: $r" >&2; exit 1; }
  field "$r" requests
}
measure() { # $1 name, $2 url, $3 key: a row per stream mode for the server $PID
  local stream n1 n2 a b
  for stream in false true; do
    calls "$2" "$3" "$stream" 200 >/dev/null   # warm-up: pools, caches, tokenizer
    sleep 1
    callgrind_control -z "$PID" >/dev/null 2>&1; n1="$(calls "$2" "$3" "$stream" "$N")"; sleep 1
    callgrind_control -d "$PID" >/dev/null 2>&1; a="$(ir_of "$PID")"
    callgrind_control -z "$PID" >/dev/null 2>&1; n2="$(calls "$2" "$3" "$stream" $((2 * N)))"; sleep 1
    callgrind_control -d "$PID" >/dev/null 2>&1; b="$(ir_of "$PID")"
    echo "| $1 | $stream | $(( (b - a) / (n2 - n1) )) |"
  done
}
echo "| build | stream | instructions per call |"
echo "|---|---|---:|"
for i in "${!BINS[@]}"; do
  BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn valgrind --tool=callgrind \
    --callgrind-out-file="$WORK/cg.out.%p" "${BINS[$i]}" serve --listen 127.0.0.1:0 \
    --data-dir "$WORK/d$i" --config "$WORK/s.toml" 2>"$WORK/s$i.log" &
  PID=$!
  S="$(wait_addr "$WORK/s$i.log")"
  bench_policy "$S" "$ADMIN" "$AGENT"
  KEY="$(agent_key "$S" "$ADMIN" "$AGENT")"
  measure "${NAMES[$i]}" "$S" "$KEY"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
if [ "${BARE:-0}" = 1 ]; then   # the yardstick: the bare proxy (forwarding bytes, nothing else)
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" target/release/examples/bare_proxy \
    "$UP/v1" 2>"$WORK/bare.log" &
  PID=$!
  measure "bare proxy" "$(wait_addr "$WORK/bare.log")" sk-fake
  kill "$PID"; wait "$PID" 2>/dev/null || true
fi
