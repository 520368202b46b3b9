#!/usr/bin/env bash
# What a long agent history costs through the proxy: max throughput
# (non-streaming, closed loop, 32 connections) of the bare proxy
# (examples/bare_proxy.rs: forwarding bytes, nothing else) and of Sluice
# with one chat body of MSGS earlier turns (about 2.4 KB each: a system
# prompt, then alternating user/assistant turns) ending in a new user turn
# that is unique per call (`loadgen --unique`: its count is never cached;
# the earlier turns come from the count cache, as an agent resending its
# history does), and direct for scale. Sluice parses the whole body, counts
# it and reserves; the bare proxy copies it. Reported: each proxy's CPU per
# call (user + kernel, all its threads, from /proc over the run), which is
# what the proxy itself spends; with large bodies the throughput can be set
# by core 0 (the load generator and the upstream each copy the body too),
# so max rps alone would hide the difference. Same placement as
# bench/proxy.sh (load generator and fake upstream on core 0, the proxies
# on core 1). Loopback only; bounded in time.
#
#   bash bench/long_prompt.sh            # MSGS=30 (about 74 KB), ROUNDS=3, SECS=5
#   MSGS=4 bash bench/long_prompt.sh     # about 12 KB
#   ALIAS=1 bash bench/long_prompt.sh    # the model asked for is an alias (upstream_name differs):
#                                        # the body goes upstream with the model renamed
#   OLD_BIN=path/to/sluice bash bench/long_prompt.sh   # that binary too, in the same rounds (an A/B)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"; ROUNDS="${ROUNDS:-3}"; MSGS="${MSGS:-30}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen --example bare_proxy
BIN=target/release
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
PIN0=""; PIN1=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
source bench/lib.sh

$PIN0 "$BIN/examples/fake_upstream" 2>"$WORK/up.log" >/dev/null &
UP="$(wait_addr "$WORK/up.log")"
ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
fake_provider_toml "$UP" "$WORK/sluice.toml"
MODEL=gpt-4o-mini
if [ "${ALIAS:-0}" = "1" ]; then
  MODEL=agent-fast
  sed -i 's/^name = "gpt-4o-mini"$/name = "agent-fast"\nupstream_name = "gpt-4o-mini"/' "$WORK/sluice.toml"
fi
start() { # $1 binary, $2 name: start_sluice_at, and the policy on the agent
  start_sluice_at "$1" "$2"
  bench_policy "$URL" "$ADMIN" "$AGENT"
}
start "$BIN/sluice" new
NAMES=("sluice"); URLS=("$URL"); KEYS=("$KEY"); PIDS=("$PID")
if [ -n "${OLD_BIN:-}" ]; then
  start "$OLD_BIN" old
  NAMES+=("sluice $OLD_BIN"); URLS+=("$URL"); KEYS+=("$KEY"); PIDS+=("$PID")
fi
$PIN1 "$BIN/examples/bare_proxy" "$UP/v1" 2>"$WORK/bare.log" &
BARE_PID=$!
BARE="$(wait_addr "$WORK/bare.log")"
TCK="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # the process's user + kernel ticks, all threads

# {n} is where --unique puts the call's number.
BODY="$(python3 - "$MSGS" "$MODEL" <<'PY'
import json, sys
n, model = int(sys.argv[1]), sys.argv[2]
para = ("The agent read the file src/main.rs and found that the function parse_config returns an error "
        "when the key is missing; it then planned to add a default value, ran the tests, and summarised: "
        "14 passed, 2 failed (test_empty, test_unicode). ")
msgs = [{"role": "system", "content": "You are a coding agent. " + para * 4}]
for i in range(n):
    msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}. " + para * 10})
msgs.append({"role": "user", "content": "Call {n}. What next?"})
print(json.dumps({"model": model, "max_tokens": 64, "messages": msgs}))
PY
)"
load() { # $1 base url, $2 bearer, rest: loadgen's
  local url="$1" auth="$2"; shift 2
  $PIN0 "$BIN/examples/loadgen" "$url/v1/chat/completions" --body "$BODY" \
    --header "authorization: Bearer $auth" --conns 32 --secs "$SECS" "$@"
}
# Runs loadgen against $1 (bearer $2, rest loadgen's) while reading process
# $3's CPU; prints "rps µs-of-CPU-per-call".
measure() {
  local url="$1" auth="$2" pid="$3"; shift 3
  local t0 t1 out
  t0="$(ticks "$pid")"; out="$(load "$url" "$auth" "$@")"; t1="$(ticks "$pid")"
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['rps'], f\"{($t1 - $t0) * 1e6 / $TCK / r['requests']:.1f}\")" "$out"
}
for i in "${!URLS[@]}"; do load "${URLS[$i]}" "${KEYS[$i]}" --secs 2 --unique >/dev/null; done
load "$BARE" sk-fake --secs 2 >/dev/null
echo "body: ${#BODY} bytes, $((MSGS + 2)) messages, model $MODEL; CPU per call from /proc (CLK_TCK $TCK)"
echo
echo "| round | direct max rps | bare proxy max rps | bare proxy CPU µs per call | binary | sluice max rps | sluice CPU µs per call | sluice minus bare (µs) |"
echo "|---|---:|---:|---:|---|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  D="$(field "$(load "$UP" sk-fake)" rps)"
  read -r B BC <<<"$(measure "$BARE" sk-fake "$BARE_PID")"
  for i in "${!URLS[@]}"; do
    read -r S SC <<<"$(measure "${URLS[$i]}" "${KEYS[$i]}" "${PIDS[$i]}" --unique)"
    echo "| $r | $D | $B | $BC | ${NAMES[$i]} | $S | $SC | $(python3 -c "print(f'{$SC - $BC:.1f}')") |"
  done
done
