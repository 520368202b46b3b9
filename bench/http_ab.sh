#!/usr/bin/env bash
# A/B of `POST /v1/check` between an older commit and the working tree, in
# one run (this VM's speed drifts between minutes, so a regression shows
# only next to its baseline). Usage: bash bench/http_ab.sh <old-rev>
# Builds <old-rev> in a temporary worktree (its own target dir), starts
# both gateways on core 0, and alternates 8 s closed-loop rounds on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_REV="${1:?usage: bench/http_ab.sh <old-rev>}"
ROUNDS="${ROUNDS:-4}"; SECS="${SECS:-8}"
cargo build --release -q -p sluice
cargo build --release -q -p sluice-gateway --example loadgen
WORK="$(mktemp -d)"
source bench/lib.sh
trap 'kill $(jobs -p) 2>/dev/null || true; remove_old_rev; rm -rf "$WORK"' EXIT
build_old_rev "$OLD_REV"
PIN_SERVER=""; PIN_LOAD=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN_SERVER="taskset -c 0"; PIN_LOAD="taskset -c 1"; fi
KEY="bench-admin-key-0123456789abcdef"
SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn $PIN_SERVER "$OLD_BIN" serve --listen 127.0.0.1:0 --data-dir "$WORK/old-data" 2>"$WORK/old.log" &
OLD="$(wait_addr "$WORK/old.log")"
SLUICE_ADMIN_KEY="$KEY" SLUICE_LOG=warn $PIN_SERVER target/release/sluice serve --listen 127.0.0.1:0 --data-dir "$WORK/new-data" 2>"$WORK/new.log" &
NEW="$(wait_addr "$WORK/new.log")"
AGENT="agent://bench/prod/bot"
for U in "$OLD" "$NEW"; do
  bench_policy "$U" "$KEY" "$AGENT"
done
BODY="{\"subjects\": [\"$AGENT\"], \"amounts\": {\"requests\": 1, \"cost_usd\": 0.0001}}"
run() { local url="$1"; shift; $PIN_LOAD target/release/examples/loadgen "$url/v1/check" --body "$BODY" --header "authorization: Bearer $KEY" --conns 32 --secs "$SECS" "$@"; }
run "$OLD" --secs 2 >/dev/null; run "$NEW" --secs 2 >/dev/null
echo "| round | $OLD_REV rps | working tree rps | ratio |"
echo "|---|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  O="$(run "$OLD")"; N="$(run "$NEW")"
  echo "| $r | $(field "$O" rps) | $(field "$N" rps) | $(python3 -c "print(f'{$(field "$N" rps) / $(field "$O" rps):.3f}')") |"
done
