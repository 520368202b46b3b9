# Helpers shared by the benchmark scripts (sourced, not run).

# The address a server prints as `listening on http://ADDR` in its log ($1).
wait_addr() {
  for _ in $(seq 1 100); do
    addr="$(grep -o 'listening on http://[0-9.:]*' "$1" | head -1 | sed 's/listening on //')" || true
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "server did not start: $(cat "$1")" >&2; exit 1
}

# A field ($2) of the load generator's JSON line ($1).
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# The median of the arguments.
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
