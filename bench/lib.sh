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

# A new agent key for subject $3 from the sluice at $1 (admin key $2).
agent_key() {
  curl -fsS -X POST "$1/v1/keys" -H "authorization: Bearer $2" -H 'content-type: application/json' \
    -d "{\"subject\": \"$3\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}
