#!/usr/bin/env bash
# A small C load harness for one pair of proxies, to compare shardproxy with
# the floor relay (relay.c), HAProxy and shadowsocks-rust per connection or
# per GB without the e2e bench's Rust client (docs/BENCHMARKS.md, "The
# floor"). Split placement: proxy A on core 0, B on core 1.
#
#   bash benches/floor/harness.sh KIND        KIND: fwd | enc | floor | ha | ss
#
#   default  churn.c: 4 threads of connect + 1 KiB + close against echo.c;
#            prints CPU-s per 100k connections
#   BULK=1   bulk.c: one stream into sink.c; prints CPU-s per GB
#   SECS=N   load seconds (default 5; bounded to 60)
#   PERF=1   also `perf record -F 1000 -g -p A,B -- sleep 5` into
#            perf.KIND.data in the current directory (8 s of load);
#            PERF_CALLGRAPH="--call-graph dwarf" unwinds with DWARF instead
#   STRACE=1 also `strace -c -f -p B` during the load, and prints proxy B's
#            system calls per connection (or per MB), by call; the CPU
#            figure of such a run is strace's, not the proxy's
#   SP=PATH  the shardproxy binary (default target/release/shardproxy)
#
# Also prints the pair's context switches (voluntary and not) during the
# load. Needs cc; haproxy and /opt/ssrust for those kinds. Ports 18401,
# 18402 and 18080 on 127.0.0.1.
set -euo pipefail
kind=${1:?usage: harness.sh fwd|enc|floor|ha|ss}
here=$(cd "$(dirname "$0")" && pwd)
SP=${SP:-$here/../../target/release/shardproxy}
secs=${SECS:-5}
[ "$secs" -le 60 ] || secs=60
d=$(mktemp -d /tmp/floor-harness.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"; }
trap cleanup EXIT
for t in relay echo sink; do cc -O2 -o "$d/$t" "$here/$t.c"; done
for t in churn bulk; do cc -O2 -pthread -o "$d/$t" "$here/$t.c"; done
key=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
echo "$key" > "$d/key"
chmod 600 "$d/key"

if [ -n "${BULK:-}" ]; then "$d/sink" 18080 & else "$d/echo" 18080 & fi
pids+=($!)
case $kind in
  fwd)
    "$SP" forward --listen 127.0.0.1:18402 --upstream 127.0.0.1:18080 --cpu-list 1 --metrics-listen 127.0.0.1:0 2>/dev/null & pb=$!
    "$SP" forward --listen 127.0.0.1:18401 --upstream 127.0.0.1:18402 --cpu-list 0 --metrics-listen 127.0.0.1:0 2>/dev/null & pa=$! ;;
  enc)
    "$SP" exit --listen 127.0.0.1:18402 --upstream 127.0.0.1:18080 --cpu-list 1 --key-file "$d/key" --metrics-listen 127.0.0.1:0 2>/dev/null & pb=$!
    "$SP" entry --listen 127.0.0.1:18401 --upstream 127.0.0.1:18402 --cpu-list 0 --key-file "$d/key" --metrics-listen 127.0.0.1:0 2>/dev/null & pa=$! ;;
  floor)
    taskset -c 1 "$d/relay" 18402 18080 & pb=$!
    taskset -c 0 "$d/relay" 18401 18402 & pa=$! ;;
  ha)
    printf 'global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nlisten b\n  bind 127.0.0.1:18402\n  server s 127.0.0.1:18080\n' > "$d/hb.cfg"
    sed 's/18402/18401/; s/18080/18402/; s/listen b/listen a/' "$d/hb.cfg" > "$d/ha.cfg"
    taskset -c 1 haproxy -f "$d/hb.cfg" & pb=$!
    taskset -c 0 haproxy -f "$d/ha.cfg" & pa=$! ;;
  ss)
    taskset -c 1 /opt/ssrust/bin/ssserver --single-threaded -s 127.0.0.1:18402 -m 2022-blake3-chacha20-poly1305 -k "$key" >/dev/null 2>&1 & pb=$!
    taskset -c 0 /opt/ssrust/bin/sslocal --single-threaded --protocol tunnel -b 127.0.0.1:18401 --forward-addr 127.0.0.1:18080 -s 127.0.0.1:18402 -m 2022-blake3-chacha20-poly1305 -k "$key" >/dev/null 2>&1 & pa=$! ;;
  *) echo "harness.sh: unknown kind $kind" >&2; exit 2 ;;
esac
pids+=("$pa" "$pb")
# Wait for the pair to listen (a port, not a sleep).
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/18401) 2>/dev/null && break
  sleep 0.05
done

clk=$(getconf CLK_TCK)
cpu() { awk -v c="$clk" '{print ($14+$15)/c}' "/proc/$1/stat"; }
ctx() { cat /proc/"$1"/task/*/status | awk '/voluntary_ctxt_switches/ {s+=$2} END {print s}'; }
a0=$(cpu "$pa"); b0=$(cpu "$pb"); x0=$(( $(ctx "$pa") + $(ctx "$pb") ))
if [ -n "${BULK:-}" ]; then client=("$d/bulk" 18401); else client=("$d/churn" 18401); fi
if [ -n "${PERF:-}" ]; then
  "${client[@]}" 8 > "$d/n" & cp=$!
  sleep 1
  perf record -F 1000 ${PERF_CALLGRAPH:--g} -o "perf.$kind.data" -p "$pa,$pb" -- sleep 5 >/dev/null 2>&1
  wait $cp
elif [ -n "${STRACE:-}" ]; then
  strace -c -f -o "$d/strace" -p "$pb" & sp=$!
  sleep 0.5
  "${client[@]}" "$secs" > "$d/n"
  kill -INT $sp; wait $sp || true
else
  "${client[@]}" "$secs" > "$d/n"
fi
a1=$(cpu "$pa"); b1=$(cpu "$pb"); x1=$(( $(ctx "$pa") + $(ctx "$pb") ))
n=$(cat "$d/n")
if [ -n "${STRACE:-}" ]; then
  per=$n; [ -n "${BULK:-}" ] && per=$((n / 1000000))
  awk -v n="$per" -v unit="${BULK:+MB}" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
      printf "  %-16s %6.2f per %s\n", $NF, $4 / n, (unit == "" ? "connection" : unit); t += $4 }
    END { printf "  %-16s %6.2f\n", "total", t / n }' "$d/strace"
fi
if [ -n "${BULK:-}" ]; then
  python3 -c "print(f'$kind GB={$n/1e9:.2f} cpu_per_GB={($a1-$a0+$b1-$b0)/$n*1e9:.3f} ctxt_switches_per_GB={($x1-$x0)/($n/1e9):.0f}')"
else
  python3 -c "print(f'$kind conns={$n} cpu_per_100k_conn={($a1-$a0+$b1-$b0)/$n*1e5:.3f} ctxt_switches_per_conn={($x1-$x0)/$n:.1f}')"
fi
