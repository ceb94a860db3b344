#!/usr/bin/env bash
# The lever probe of docs/BENCHMARKS.md ("History: before and after each
# lever"): a quick A/B of builds, less noisy than benches/e2e.rs because the
# load generator and the origin sit on one core and both proxies on the other.
#
#   wrk -c50 -t1 (core 0) -> proxy A -> proxy B -> nginx (core 0)
#                            (both proxies pinned to core 1)
#
# Usage (about 25 s per pair and scenario, three interleaved rounds):
#   bash benches/lever_probe.sh LABEL=PATH_TO_SHARDPROXY [LABEL=enc:PATH] [haproxy=haproxy] [ss=ss2022] ...
# A plain PATH runs two `forward` proxies; `enc:PATH` an entry+exit pair;
# `haproxy` two HAProxy 2.x (`nbthread 1`, `mode tcp`); `floor` two copies
# of benches/floor/relay.c, the least work a user-space relay can do per
# message (built with cc; see docs/BENCHMARKS.md, "The floor"); `ss2022` sslocal
# (tunnel mode) + ssserver with 2022-blake3-chacha20-poly1305
# (/opt/ssrust/bin, see the e2e bench). SCEN="1k" or SCEN="churn" runs one
# scenario (default both): 1 KiB keep-alive requests, or the same with
# `Connection: close` (one connection per request).
# PLACE="split" pins proxy A to core 0 and proxy B to core 1 and leaves wrk
# and nginx unpinned, as benches/e2e.rs places its pairs (default "one": the
# layout above, which separates levers more reliably).
# SECS (default 5, at most 60) and ROUNDS (default 3, at most 15) set each
# load's length and the number of interleaved rounds.
# Prints the proxies' CPU-seconds (utime+stime) per 100k requests.
# Needs: nginx, wrk, haproxy (apt-get install nginx wrk haproxy); root for
# nothing. Uses ports 18401, 18402 and 18080 on 127.0.0.1.
set -euo pipefail
[ "${SECS:-5}" -ge 1 ] && [ "${SECS:-5}" -le 60 ] || { echo "lever_probe: SECS must be 1-60" >&2; exit 2; }
[ "${ROUNDS:-3}" -ge 1 ] && [ "${ROUNDS:-3}" -le 15 ] || { echo "lever_probe: ROUNDS must be 1-15" >&2; exit 2; }
[ $# -gt 0 ] || { sed -n 2,20p "$0"; exit 2; }
for t in nginx wrk; do
  command -v $t >/dev/null || { echo "lever_probe: needs $t (apt-get install $t)" >&2; exit 1; }
done
dir=$(mktemp -d /tmp/lever-probe.XXXXXX)
head -c 1024 /dev/zero | tr '\0' x > "$dir/one.k"
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:18080 reuseport; root $dir; }
}
CONF
# Cores: load and origin (LOAD), proxy A (CA), proxy B (CB).
if [ "${PLACE:-one}" = split ]; then LOAD=0,1 CA=0 CB=1; else LOAD=0 CA=1 CB=1; fi
taskset -c $LOAD nginx -c "$dir/nginx.conf" &
nginx_pid=$!
key=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
echo "$key" > "$dir/key"
chmod 600 "$dir/key"
trap 'kill $nginx_pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 50); do curl -s -m1 127.0.0.1:18080/one.k >/dev/null && break; sleep 0.1; done

clk=$(getconf CLK_TCK)
cpu() { awk -v c="$clk" '{print ($14+$15)/c}' "/proc/$1/stat"; }
run_pair() { # label kind scenario
  local label=$1 kind=$2 sc=$3 pa pb
  case "$kind" in
    haproxy)
      printf 'global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nlisten b\n  bind 127.0.0.1:18402\n  server s 127.0.0.1:18080\n' > "$dir/hb.cfg"
      sed 's/18402/18401/; s/18080/18402/; s/listen b/listen a/' "$dir/hb.cfg" > "$dir/ha.cfg"
      taskset -c $CB haproxy -f "$dir/hb.cfg" & pb=$!
      taskset -c $CA haproxy -f "$dir/ha.cfg" & pa=$!
      ;;
    floor)
      [ -x "$dir/floor-relay" ] || cc -O2 -o "$dir/floor-relay" "$(dirname "$0")/floor/relay.c"
      taskset -c $CB "$dir/floor-relay" 18402 18080 & pb=$!
      taskset -c $CA "$dir/floor-relay" 18401 18402 & pa=$!
      ;;
    ss2022)
      taskset -c $CB /opt/ssrust/bin/ssserver --single-threaded -s 127.0.0.1:18402 -m 2022-blake3-chacha20-poly1305 -k $key >/dev/null 2>&1 & pb=$!
      taskset -c $CA /opt/ssrust/bin/sslocal --single-threaded --protocol tunnel -b 127.0.0.1:18401 --forward-addr 127.0.0.1:18080 -s 127.0.0.1:18402 -m 2022-blake3-chacha20-poly1305 -k $key >/dev/null 2>&1 & pa=$!
      ;;
    enc:*)
      local bin=${kind#enc:}
      "$bin" exit --listen 127.0.0.1:18402 --upstream 127.0.0.1:18080 --cpu-list $CB --key-file "$dir/key" --metrics-listen 127.0.0.1:0 >/dev/null 2>&1 & pb=$!
      "$bin" entry --listen 127.0.0.1:18401 --upstream 127.0.0.1:18402 --cpu-list $CA --key-file "$dir/key" --metrics-listen 127.0.0.1:0 >/dev/null 2>&1 & pa=$!
      ;;
    *)
      "$kind" forward --listen 127.0.0.1:18402 --upstream 127.0.0.1:18080 --cpu-list $CB --metrics-listen 127.0.0.1:0 >/dev/null 2>&1 & pb=$!
      "$kind" forward --listen 127.0.0.1:18401 --upstream 127.0.0.1:18402 --cpu-list $CA --metrics-listen 127.0.0.1:0 >/dev/null 2>&1 & pa=$!
      ;;
  esac
  for _ in $(seq 1 50); do curl -s -m1 127.0.0.1:18401/one.k >/dev/null && break; sleep 0.1; done
  local hdr=()
  [ "$sc" = churn ] && hdr=(-H "Connection: close")
  local c0a c0b c1a c1b reqs
  c0a=$(cpu $pa); c0b=$(cpu $pb)
  reqs=$(taskset -c $LOAD wrk -c50 -t1 -d"${SECS:-5}s" "${hdr[@]}" http://127.0.0.1:18401/one.k | awk '/requests in/ {print $1}')
  c1a=$(cpu $pa); c1b=$(cpu $pb)
  kill $pa $pb; wait $pa $pb 2>/dev/null || true
  python3 -c "print(f'$sc $label reqs={$reqs} cpu_per_100k={($c1a-$c0a+$c1b-$c0b)/$reqs*1e5:.3f}')"
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  for sc in ${SCEN:-1k churn}; do
    for spec in "$@"; do run_pair "${spec%%=*}" "${spec#*=}" "$sc"; done
  done
done
