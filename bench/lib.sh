# Helpers shared by the benchmark scripts (sourced, not run).

# The address a server prints as `listening on http://ADDR` in its log ($1).
wait_addr() {
  for _ in $(seq 1 100); do
    addr="$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$1" | head -1 | sed 's/listening on //')" || true
    # Read it twice: a slow writer (valgrind) may be caught mid-line.
    [ -n "$addr" ] && sleep 0.1 && [ "$addr" = "$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$1" | head -1 | sed 's/listening on //')" ] \
      && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "server did not start: $(cat "$1")" >&2; exit 1
}

# A field ($2) of the load generator's JSON line ($1).
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# The median of the arguments.
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# A sluice.toml ($2) with one OpenAI-wire provider, the fake upstream at $1
# (its key from BENCH_UPSTREAM_KEY), serving gpt-4o-mini at the built-in price.
fake_provider_toml() {
  printf '[[providers]]\nname = "fake"\nformat = "openai"\nbase_url = "%s/v1"\napi_key_env = "BENCH_UPSTREAM_KEY"\n\n[[models]]\nname = "gpt-4o-mini"\nprovider = "fake"\n' "$1" >"$2"
}

# Start `sluice serve` (binary $1; $2 names its data dir and log under
# $WORK) with $WORK/sluice.toml, pinned by $PIN1, the upstream key
# BENCH_UPSTREAM_KEY=sk-fake and the admin key $ADMIN; sets PID, URL and
# KEY (an agent key for "agent://bench/prod/bot"). Call it in the script's
# own shell, not in $(...), so that the script's EXIT trap stops it.
start_sluice_at() {
  BENCH_UPSTREAM_KEY=sk-fake SLUICE_ADMIN_KEY="$ADMIN" SLUICE_LOG=warn $PIN1 "$1" serve \
    --listen 127.0.0.1:0 --data-dir "$WORK/data-$2" --config "$WORK/sluice.toml" 2>"$WORK/$2.log" >/dev/null &
  PID=$!
  URL="$(wait_addr "$WORK/$2.log")"
  KEY="$(agent_key "$URL" "$ADMIN" "agent://bench/prod/bot")"
}

# A new agent key for subject $3 from the sluice at $1 (admin key $2).
agent_key() {
  curl -fsS -X POST "$1/v1/keys" -H "authorization: Bearer $2" -H 'content-type: application/json' \
    -d "{\"subject\": \"$3\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

# A policy no benchmark run reaches: requests per hour and a dollar budget per day.
BENCH_POLICY='{"limits": [{"metric": "requests", "limit": 1000000000, "window": "1h"}, {"metric": "cost_usd", "limit": 1000000, "window": "day"}]}'

# Put BENCH_POLICY on subject $3 of the sluice at $1 (admin key $2).
bench_policy() {
  curl -fsS -X PUT "$1/v1/policies/$3" -H "authorization: Bearer $2" -H 'content-type: application/json' \
    -d "$BENCH_POLICY" >/dev/null
}

# Build commit $1 in a worktree at $WORK/old (into OLD_TARGET if set, else
# $WORK/old-target); sets OLD_BIN to its `sluice`. The caller's EXIT trap
# runs remove_old_rev.
build_old_rev() {
  git worktree add -q --detach "$WORK/old" "$1"
  OLD_TARGET="${OLD_TARGET:-$WORK/old-target}"
  (cd "$WORK/old" && CARGO_TARGET_DIR="$OLD_TARGET" cargo build --release -q -p sluice)
  OLD_BIN="$OLD_TARGET/release/sluice"
}
remove_old_rev() {
  if [ -d "${WORK:-}/old" ]; then git worktree remove --force "$WORK/old"; fi
}
