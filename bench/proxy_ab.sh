#!/usr/bin/env bash
# A/B of the proxy's max throughput between an older commit and the working
# tree, in one run (this VM's speed drifts between minutes, so a change
# shows only next to its baseline). Usage: bash bench/proxy_ab.sh <old-rev>
# Builds <old-rev> in a temporary worktree (its own target dir, or
# OLD_TARGET), starts both on core 1 against one fake upstream on core 0,
# and alternates SECS-second closed-loop rounds (the order flips each round).
# STREAM=true|false (default true), ROUNDS (default 6), SECS (default 6).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_REV="${1:?usage: bench/proxy_ab.sh <old-rev>}"
ROUNDS="${ROUNDS:-6}"; SECS="${SECS:-6}"; STREAM="${STREAM:-true}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example fake_upstream --example loadgen
WORK="$(mktemp -d)"
source bench/lib.sh
trap 'kill $(jobs -p) 2>/dev/null || true; remove_old_rev; rm -rf "$WORK"' EXIT
build_old_rev "$OLD_REV"
PIN_UP=""; PIN_PROXY=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN_UP="taskset -c 0"; PIN_PROXY="taskset -c 1"; fi
$PIN_UP target/release/examples/fake_upstream 2>"$WORK/up.log" &
UP="$(wait_addr "$WORK/up.log")"
fake_provider_toml "$UP" "$WORK/sluice.toml"
ADMIN="bench-admin-key-0123456789abcdef"
AGENT="agent://bench/prod/bot"
start() { # $1 name, $2 binary; sets URL and KEY
  BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn $PIN_PROXY "$2" serve \
    --listen 127.0.0.1:0 --data-dir "$WORK/$1" --config "$WORK/sluice.toml" 2>"$WORK/$1.log" &
  URL="$(wait_addr "$WORK/$1.log")"
  bench_policy "$URL" "$ADMIN" "$AGENT"
  KEY="$(agent_key "$URL" "$ADMIN" "$AGENT")"
}
start old "$OLD_BIN"; OLD="$URL"; KOLD="$KEY"
start new target/release/sluice; NEW="$URL"; KNEW="$KEY"
BODY="{\"model\": \"gpt-4o-mini\", \"max_tokens\": 64, \"stream\": $STREAM, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in one short sentence, please.\"}]}"
run() { $PIN_UP target/release/examples/loadgen "$1/v1/chat/completions" --body "$BODY" --header "authorization: Bearer $2" --conns 32 --secs "$SECS" "${@:3}"; }
run "$OLD" "$KOLD" --secs 2 >/dev/null; run "$NEW" "$KNEW" --secs 2 >/dev/null
echo "stream: $STREAM"
echo "| round | $OLD_REV rps | working tree rps | ratio |"
echo "|---|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then O="$(run "$OLD" "$KOLD")"; N="$(run "$NEW" "$KNEW")"
  else N="$(run "$NEW" "$KNEW")"; O="$(run "$OLD" "$KOLD")"; fi
  echo "| $r | $(field "$O" rps) | $(field "$N" rps) | $(python3 -c "print(f'{$(field "$N" rps) / $(field "$O" rps):.3f}')") |"
done
