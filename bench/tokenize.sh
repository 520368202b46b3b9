#!/usr/bin/env bash
# What counting a prompt's tokens costs the proxy: max throughput through
# Sluice (non-streaming, one core) with a ~2 KB user message that is the same
# on every call (its token count comes from the cache) and one made unique
# per call (`loadgen --unique`: counted every time), back to back in
# each of ROUNDS rounds. The difference of the two per-call times is the
# cost of counting that message. Same placement as bench/proxy.sh
# (load generator and fake upstream on core 0, sluice on core 1). Loopback
# only; bounded in time.
#
#   bash bench/tokenize.sh            # ROUNDS=3, SECS=5
#   OLD_BIN=path/to/sluice bash bench/tokenize.sh   # that binary too, in the same rounds (an A/B)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"
ROUNDS="${ROUNDS:-3}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen
BIN=target/release
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
PIN0=""; PIN1=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
source bench/lib.sh

$PIN0 "$BIN/examples/fake_upstream" 2>"$WORK/up.log" >/dev/null &
UP="$(wait_addr "$WORK/up.log")"
ADMIN="bench-admin-key-0123456789abcdef"
fake_provider_toml "$UP" "$WORK/sluice.toml"
start_sluice_at "$BIN/sluice" new
NAMES=("this tree"); URLS=("$URL"); KEYS=("$KEY")
if [ -n "${OLD_BIN:-}" ]; then
  start_sluice_at "$OLD_BIN" old
  NAMES+=("$OLD_BIN"); URLS+=("$URL"); KEYS+=("$KEY")
fi
# ~2 KB of prose; {n} is where --unique puts the call's number.
TEXT="$(python3 -c "print(('Call {n}. ' + 'The quick brown fox jumps over the lazy dog while the agent plans its next tool call and summarises the results so far. ' * 17).strip())")"
BODY="{\"model\": \"gpt-4o-mini\", \"max_tokens\": 64, \"messages\": [{\"role\": \"user\", \"content\": \"$TEXT\"}]}"
load() { # $1 url, $2 key, rest: loadgen's
  local url="$1" key="$2"; shift 2
  $PIN0 "$BIN/examples/loadgen" "$url/v1/chat/completions" --body "$BODY" \
    --header "authorization: Bearer $key" --conns 32 --secs "$SECS" "$@"
}
for i in "${!URLS[@]}"; do load "${URLS[$i]}" "${KEYS[$i]}" --secs 2 >/dev/null; done
echo "| round | binary | same message, max rps | unique message, max rps | µs per call, same | µs per call, unique | counting costs (µs) |"
echo "|---|---|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!URLS[@]}"; do
    A="$(field "$(load "${URLS[$i]}" "${KEYS[$i]}")" rps)"; B="$(field "$(load "${URLS[$i]}" "${KEYS[$i]}" --unique)" rps)"
    echo "| $r | ${NAMES[$i]} | $A | $B | $(python3 -c "print(f'{1e6/$A:.1f}')") | $(python3 -c "print(f'{1e6/$B:.1f}')") | $(python3 -c "print(f'{1e6/$B - 1e6/$A:.1f}')") |"
  done
done
