#!/usr/bin/env bash
# Real tunnels while an exit is flooded with silent connections (docs/
# BENCHMARKS.md, "Real tunnels under a connection flood"): an A/B of builds.
#
#   legit.py (200-byte echoes, one connection each, 50/s) -> entry -> exit -> echo origin
#   silent_flood.py (RATE connections/s that send nothing)  -----^
#
# The exit runs with a small --max-handshakes (default 8) on two shards, so
# the flood overflows it and its oldest pending handshakes are closed as new
# ones arrive: the question is whether a real entry's handshakes survive.
# Usage (about 25 s per binary and round):
#   bash benches/flood/churn_flood.sh LABEL=PATH_TO_SHARDPROXY [LABEL=PATH ...]
# Env: ROUNDS (1), SECS (20), RATE (2000, sent in bursts every 50 ms),
# MAX_HANDSHAKES (8).
# Prints, per run, the real clients served and failed. Needs python3. Uses
# ports 23901-23903 on 127.0.0.1.
set -euo pipefail
[ $# -gt 0 ] || { sed -n 2,15p "$0"; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/churn-flood.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
rounds=${ROUNDS:-1}; secs=${SECS:-20}; rate=${RATE:-2000}; mh=${MAX_HANDSHAKES:-8}
python3 "$here/echo_origin.py" 23901 & origin=$!
first=${1#*=}
"$first" keygen --out "$dir/key" >/dev/null
for round in $(seq 1 "$rounds"); do
  for pair in "$@"; do
    label=${pair%%=*}; bin=${pair#*=}
    "$bin" exit --listen 127.0.0.1:23902 --upstream 127.0.0.1:23901 --key-file "$dir/key" \
      --cores 2 --max-handshakes "$mh" --max-connections 50 2>"$dir/exit.log" & ex=$!
    "$bin" entry --listen 127.0.0.1:23903 --upstream 127.0.0.1:23902 --key-file "$dir/key" \
      --cores 2 --tunnel-keepalive 0 2>"$dir/entry.log" & en=$!
    for _ in $(seq 100); do
      grep -q listening "$dir/exit.log" && grep -q listening "$dir/entry.log" && break
      sleep 0.1
    done
    python3 "$here/legit.py" 23903 "$secs" > "$dir/legit.out" & legit=$!
    python3 "$here/silent_flood.py" 127.0.0.1:23902 "$secs" "$rate" > "$dir/flood.out"
    wait $legit
    kill $ex $en; wait $ex $en 2>/dev/null || true
    echo "round $round $label: $(cat "$dir/legit.out"); flood: $(cat "$dir/flood.out")"
  done
done
kill $origin
