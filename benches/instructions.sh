#!/usr/bin/env bash
# User-space instructions per connection, counted by valgrind's callgrind.
#
# The e2e bench measures CPU-seconds, which on this shared 2-core VM moves by
# ±5% between runs: too coarse to tell whether a per-connection feature costs
# 3% or 7%. Instruction counts are repeatable to a fraction of a percent, so
# this script answers "what does feature X add per connection" exactly, for
# the user-space half of the cost.
#
# What it runs, per configuration: nginx (the origin, 1 KiB file), then the
# proxy pair under `valgrind --tool=callgrind` (forward ×2, or entry + exit),
# WARM connections to warm up, counters zeroed, then CONNS sequential
# connections (connect, `GET` 1 KiB, read to EOF, close) from a Python client,
# counters dumped. Reported: instructions per connection of both proxies
# together (`Ir`, all threads), and the ratio to the same pair with the
# feature off.
#
# What it does not count: kernel time (about 80% of the proxies' CPU on
# loopback, see docs/BENCHMARKS.md). A feature's user-space delta divided by
# the pair's *user-space* instructions is therefore an upper bound on its
# share of the pair's CPU, as long as the feature adds no system call per
# connection (the access log writes from its own thread in batches; the
# PROXY header rides in the same `send` as the first bytes, see
# docs/BENCHMARKS.md for the syscall counts).
#
# Run: bash benches/instructions.sh        (CONNS=2000 WARM=200 by default;
#      about 9 minutes; needs valgrind, nginx, python3: installed if missing)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
CONNS=${CONNS:-2000}
WARM=${WARM:-200}
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
BIN=$PWD/target/release/shardproxy
W=$(mktemp -d /tmp/sp-instr.XXXXXX)
chmod 755 "$W" # nginx workers read the origin file as their own user
cleanup() {
    set +e
    kill $(jobs -p) 2>/dev/null
    [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 600); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),timeout=1).close()" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    exit 1
}

head -c 1024 /dev/zero | tr '\0' x >"$W/one.k"
ORIGIN=$(free_port)
ORIGIN_PP=$(free_port)
cat >"$W/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $W/nginx.pid;
error_log $W/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:$ORIGIN; root $W; }
  server { listen 127.0.0.1:$ORIGIN_PP proxy_protocol; root $W; }
}
EOF
nginx -c "$W/nginx.conf"
wait_port "$ORIGIN"
"$BIN" keygen --out "$W/key" >/dev/null

cat >"$W/client.py" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET /one.k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    got = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
    s.close()
    if not got.startswith(b"HTTP/1.1 200") or len(got) < 1024:
        sys.exit(f"connection {i}: bad response {got[:60]!r}")
EOF

# run NAME ROLE_A ARGS_A -- ROLE_B ARGS_B: A is the client-facing proxy.
# Prints the instructions per connection of A and B together.
run() {
    local name=$1 a_args b_args pa pb front back
    shift
    a_args=()
    while [ "$1" != -- ]; do a_args+=("$1"); shift; done
    shift
    b_args=("$@")
    front=$(free_port)
    back=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$W/$name.b.%p" \
        "$BIN" "${b_args[@]}" --listen "127.0.0.1:$back" --cores 1 \
        --metrics-listen 127.0.0.1:0 >"$W/$name.b.log" 2>&1 &
    pb=$!
    valgrind --tool=callgrind --callgrind-out-file="$W/$name.a.%p" \
        "$BIN" "${a_args[@]}" --listen "127.0.0.1:$front" --upstream "127.0.0.1:$back" \
        --cores 1 --metrics-listen 127.0.0.1:0 >"$W/$name.a.log" 2>&1 &
    pa=$!
    wait_port "$back"
    wait_port "$front"
    python3 "$W/client.py" "$front" "$WARM"
    callgrind_control -z $pa >/dev/null
    callgrind_control -z $pb >/dev/null
    python3 "$W/client.py" "$front" "$CONNS"
    callgrind_control -d $pa >/dev/null
    callgrind_control -d $pb >/dev/null
    kill $pa $pb
    wait $pa $pb 2>/dev/null || true
    local total=0 f
    for f in "$W/$name.a.$pa.1" "$W/$name.b.$pb.1"; do
        total=$((total + $(awk '/^summary:/ {print $2}' "$f")))
    done
    echo $((total / CONNS))
}

K=(--key-file "$W/key")
declare -A ir
ir[fwd]=$(run fwd forward -- forward --upstream "127.0.0.1:$ORIGIN")
ir[fwd_log]=$(run fwd_log forward --access-log "$W/a.log" -- forward --upstream "127.0.0.1:$ORIGIN" --access-log "$W/b.log")
ir[fwd_pp]=$(run fwd_pp forward -- forward --upstream "127.0.0.1:$ORIGIN_PP" --send-proxy-v2)
ir[enc]=$(run enc entry "${K[@]}" -- exit "${K[@]}" --upstream "127.0.0.1:$ORIGIN")
ir[enc_log]=$(run enc_log entry "${K[@]}" --access-log "$W/c.log" -- exit "${K[@]}" --upstream "127.0.0.1:$ORIGIN" --access-log "$W/d.log")
ir[enc_pp]=$(run enc_pp entry "${K[@]}" -- exit "${K[@]}" --upstream "127.0.0.1:$ORIGIN_PP" --send-proxy-v2)

# The logs must hold a line per connection, or the "on" rows measured nothing
# (one or two more: the readiness probes of `wait_port`).
for f in a b c d; do
    lines=$(wc -l <"$W/$f.log")
    if [ "$lines" -lt $((WARM + CONNS)) ]; then
        echo "access log $f.log has $lines lines, expected at least $((WARM + CONNS))" >&2
        exit 1
    fi
done

# attributed NAME SYMBOL...: instructions per connection spent inside the
# named function (inclusive, both proxies), from run NAME's profiles: the
# feature's own cost, free of the run-to-run noise of the totals (about ±1%:
# how often a shard loops or sleeps depends on timing even under valgrind).
attributed() {
    local name=$1 f sym total=0 found=0 ir
    shift
    for f in "$W/$name".a.*.1 "$W/$name".b.*.1; do
        # The symbols name nested functions (outermost first), any of which
        # the compiler may have inlined: the largest inclusive cost among
        # those present is the outermost one's.
        local best=0
        for sym in "$@"; do
            ir=$(callgrind_annotate --inclusive=yes --threshold=100 "$f" 2>/dev/null |
                awk -v want=":$sym [$BIN]" 'index($0, want) {gsub(",", "", $1); if ($1 > m) m = $1} END {print m + 0}')
            if [ "$ir" -gt "$best" ]; then best=$ir; fi
        done
        if [ "$best" -gt 0 ]; then found=1; fi
        total=$((total + best))
    done
    if [ $found = 1 ]; then echo $((total / CONNS)); else echo "n/a"; fi
}
# The periodic hand-over to the writer thread and the writer's `write`s are
# not attributed: a few hundred instructions per 64 KiB batch.
log_syms=(shardproxy::context::ShardCtx::log_access shardproxy::access_log::ShardLog::log
    shardproxy::access_log::Record::line)
pp_syms=(shardproxy::proxy_protocol::header_v2)
att_fwd_log=$(attributed fwd_log "${log_syms[@]}")
att_enc_log=$(attributed enc_log "${log_syms[@]}")
att_fwd_pp=$(attributed fwd_pp "${pp_syms[@]}")
att_enc_pp=$(attributed enc_pp "${pp_syms[@]}")

ratio() { python3 -c "print(f'{$1/$2:.3f}×')"; }
share() { case $1 in n/a) echo n/a ;; *) python3 -c "print(f'{100*$1/$2:.1f}%')" ;; esac; }
echo "user-space instructions per connection (both proxies, valgrind callgrind, $CONNS connections)"
echo
echo "| pair | feature | off | on | on / off | in the feature's code | its share of off |"
echo "|---|---|---|---|---|---|---|"
echo "| forward ×2 | access log (both) | ${ir[fwd]} | ${ir[fwd_log]} | $(ratio ${ir[fwd_log]} ${ir[fwd]}) | $att_fwd_log | $(share $att_fwd_log ${ir[fwd]}) |"
echo "| forward ×2 | --send-proxy-v2 (second) | ${ir[fwd]} | ${ir[fwd_pp]} | $(ratio ${ir[fwd_pp]} ${ir[fwd]}) | $att_fwd_pp | $(share $att_fwd_pp ${ir[fwd]}) |"
echo "| entry+exit | access log (both) | ${ir[enc]} | ${ir[enc_log]} | $(ratio ${ir[enc_log]} ${ir[enc]}) | $att_enc_log | $(share $att_enc_log ${ir[enc]}) |"
echo "| entry+exit | --send-proxy-v2 (exit) | ${ir[enc]} | ${ir[enc_pp]} | $(ratio ${ir[enc_pp]} ${ir[enc]}) | $att_enc_pp | $(share $att_enc_pp ${ir[enc]}) |"
