#!/usr/bin/env bash
# Every deploy path of deploy/README.md, run as its real, unprivileged user,
# with the files laid out exactly as the docs say, moving bytes end to end:
#
#   systemd     the README's install block, word for word, then the unit's
#               ExecStartPre/ExecStart/ExecReload as the unit's User=/Group=;
#               then the README's key rotation, step by step;
#   container   the README's `docker run` line: its mount, --group-add and
#               arguments, as the image's USER;
#   kubernetes  the manifests' securityContext (runAsUser, runAsGroup,
#               fsGroup) and volumes (defaultMode, fsGroup) as the kubelet
#               lays them out, and the containers' args and env.
#
# systemd, Docker and a kubelet are not available here, so each is emulated
# by what it does to the process: the user and groups (setpriv), the limits
# (prlimit), the files it can see (a private mount namespace). All of it runs
# in fresh mount and network namespaces: /etc and /usr/local/bin are private
# copies, and the network has only its own loopback, so the example configs'
# real ports (9000, 8000, 8080) and the cluster DNS names (in the private
# /etc/hosts) are used as written. Nothing on the host changes.
#
# Needs root (namespaces), util-linux (unshare, setpriv, prlimit, nsenter),
# systemd-sysusers, iproute2 and python3 with PyYAML; tests/all.sh installs them.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
BIN=${SHARDPROXY_BIN:-$PWD/target/debug/shardproxy}

if [ "${SHARDPROXY_DEPLOY_NS:-}" != 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "FAIL tests/deploy_paths.sh needs root (mount and network namespaces)"
    echo "0 passed, 1 failed"
    exit 1
  fi
  need_apt=()
  command -v systemd-sysusers >/dev/null || need_apt+=(systemd)
  command -v ip >/dev/null || need_apt+=(iproute2)
  command -v setpriv >/dev/null && command -v nsenter >/dev/null || need_apt+=(util-linux)
  if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
  python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
  [ -x "$BIN" ] || { echo "FAIL no shardproxy binary at $BIN (run cargo build)"; echo "0 passed, 1 failed"; exit 1; }
  exec unshare --mount --net --propagation private env SHARDPROXY_DEPLOY_NS=1 SHARDPROXY_BIN="$BIN" bash "$0" "$@"
fi

passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }

work=$(mktemp -d)
pids=()
cleanup() {
  disown -a 2>/dev/null
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  pkill -KILL -f "$work/" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

ip link set lo up
cp -a /etc "$work/etc" && mount --bind "$work/etc" /etc
# systemd's RuntimeDirectory= lives in /run: a private, empty one here.
mount -t tmpfs tmpfs /run
mkdir -p "$work/usr-local-bin" && mount --bind "$work/usr-local-bin" /usr/local/bin
# The cluster DNS names the Kubernetes ConfigMap uses, on this namespace's loopback.
echo "127.0.0.1 origin.default.svc.cluster.local shardproxy-exit.shardproxy.svc.cluster.local" >>/etc/hosts
state=$work/state
mkdir -p "$state"

# ---- shared helpers -----------------------------------------------------------
# An echo origin on 127.0.0.1:8080, the examples' and the ConfigMap's origin.
python3 - "$state/origin.ready" <<'PY' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080)); s.listen(64)
open(sys.argv[1], "w").write("up")
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
PY
pids+=($!)
for _ in $(seq 100); do [ -s "$state/origin.ready" ] && break; sleep 0.1; done

# round_trip HOST PORT: sends 256 KiB of random bytes, half-closes, and checks
# that exactly the same bytes come back before EOF.
round_trip() {
  python3 - "$1" "$2" <<'PY'
import hashlib, os, socket, sys
data = os.urandom(256 * 1024)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(data); s.shutdown(socket.SHUT_WR)
got = bytearray()
while (d := s.recv(65536)):
    got += d
if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
    print(f"echo mismatch: sent {len(data)} bytes, got {len(got)}", file=sys.stderr); sys.exit(1)
PY
}

# wait_log FILE PATTERN: up to 10 s for a log line.
wait_log() {
  for _ in $(seq 100); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$2' in $1:" >&2; cat "$1" >&2; return 1
}

# readme_block MARKER: the fenced block after the README comment holding MARKER.
readme_block() {
  python3 - "$1" <<'PY'
import sys
lines = open("deploy/README.md").read().splitlines()
i = next(n for n, l in enumerate(lines) if l.startswith("<!--") and sys.argv[1] in l)
assert lines[i + 1].startswith("```"), "the marker must sit right above a code block"
for l in lines[i + 2:]:
    if l.startswith("```"):
        break
    print(l)
PY
}

# ---- systemd emulation ----------------------------------------------------------
# What systemd does for shardproxy@.service, as shell functions that the
# README's commands call: `systemctl enable --now` runs ExecStartPre and then
# ExecStart as User=/Group= (with its supplementary groups, as systemd's
# initgroups does) under LimitMEMLOCK=; `systemctl reload` runs each
# ExecReload= with $MAINPID; `journalctl -u` prints the unit's log.
cat >"$state/systemd-emulation.sh" <<'SH'
unit=/etc/systemd/system/shardproxy@.service
unit_get() { sed -n "s/^$1=//p" "$unit"; }
# LimitMEMLOCK=, capped at this sandbox's hard limit (raising it needs
# CAP_SYS_RESOURCE, which a container may not have); either is >= glommio's need.
memlock() {
  local want hard
  want=$(numfmt --from=iec "$(unit_get LimitMEMLOCK)")
  hard=$(ulimit -H -l); [ "$hard" = unlimited ] && { echo "$want"; return; }
  hard=$((hard * 1024)); echo $((want < hard ? want : hard))
}
as_service_user() {
  prlimit --memlock="$(memlock)" \
    setpriv --reuid="$(unit_get User)" --regid="$(unit_get Group)" --init-groups "$@"
}
# The same, replacing the calling (sub)shell, so that its PID is the service's.
exec_as_service_user() {
  exec prlimit --memlock="$(memlock)" \
    setpriv --reuid="$(unit_get User)" --regid="$(unit_get Group)" --init-groups "$@"
}
instance() { local i=${1#shardproxy@}; echo "${i%.service}"; }
# Type=notify: systemd's NOTIFY_SOCKET, a datagram socket whose messages
# go to $STATE/<instance>.notify, one per line.
notify_socket() {
  # Where the service user can reach it, as systemd's /run/systemd/notify.
  mkdir -p -m 0755 /run/systemd-emulation
  local sock=/run/systemd-emulation/$1.notify
  python3 - "$sock" "$STATE/$1.notify" <<'PY' >/dev/null 2>&1 &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        log.write(s.recv(4096).decode().replace("\n", " ") + "\n")
PY
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  echo "$sock"
}
systemctl() {
  case "$1" in
    daemon-reload) return 0 ;;
    enable)
      shift; [ "$1" = --now ] && shift
      local i; i=$(instance "$1")
      local cmd dir
      while read -r cmd; do
        [ -n "$cmd" ] || continue
        as_service_user ${cmd//%i/$i} || { echo "ExecStartPre failed: $cmd" >&2; return 1; }
      done < <(unit_get ExecStartPre)
      dir=$(unit_get RuntimeDirectory); dir=/run/${dir//%i/$i}
      install -d -m "$(unit_get RuntimeDirectoryMode)" -o "$(unit_get User)" -g "$(unit_get Group)" "$dir"
      export NOTIFY_SOCKET; NOTIFY_SOCKET=$(notify_socket "$i")
      cmd=$(unit_get ExecStart)
      (exec_as_service_user ${cmd//%i/$i}) 2>"$STATE/$i.log" &
      echo $! >"$STATE/$i.pid"
      # Type=notify: started means READY=1.
      for _ in $(seq 100); do grep -q 'READY=1' "$STATE/$i.notify" 2>/dev/null && return 0; sleep 0.1; done
      echo "shardproxy@$i sent no READY=1:" >&2; cat "$STATE/$i.log" >&2; return 1 ;;
    reload)
      local i; i=$(instance "$2")
      local pid; pid=$(cat "$STATE/$i.pid")
      local cmd
      while read -r cmd; do
        [ -n "$cmd" ] || continue
        cmd=${cmd//%i/$i}
        as_service_user ${cmd//\$MAINPID/$pid} || { echo "ExecReload failed: $cmd" >&2; return 1; }
      done < <(unit_get ExecReload)
      return 0 ;;
    kill)
      # systemctl kill --signal=SIG --kill-whom=main UNIT: signal MAINPID;
      # then follow MAINPID= as systemd does.
      local sig=${2#--signal=} i; i=$(instance "$4")
      local pid; pid=$(cat "$STATE/$i.pid")
      kill -s "${sig#SIG}" "$pid" || return 1
      [ "$sig" = SIGUSR2 ] || return 0
      local new=""
      for _ in $(seq 200); do
        new=$(grep -o 'MAINPID=[0-9]*' "$STATE/$i.notify" | cut -d= -f2 | grep -vx "$pid" | tail -1)
        [ -n "$new" ] && break; sleep 0.1
      done
      [ -n "$new" ] || { echo "no new MAINPID after $sig" >&2; return 1; }
      echo "$new" >"$STATE/$i.pid" ;;
    *) echo "systemctl $*: not emulated" >&2; return 1 ;;
  esac
}
journalctl() { cat "$STATE/$(instance "$2").log"; }
cargo() { echo "(cargo $*: the test uses the binary it was given)"; }
sysctl() { echo "(sysctl $*: not run, it would change the host's kernel)"; }
set -e
SH

# run_readme MARKER [STEP]: runs a README block (or one "# N." step of it)
# in bash -e with the emulation above, from a checkout whose
# target/release/shardproxy is the binary under test.
src=$work/src
mkdir -p "$src/target/release"
ln -s "$repo/deploy" "$src/deploy"
cp "$BIN" "$src/target/release/shardproxy"
# readme_step MARKER N: the block's lines before its first "# 1." (its
# preamble), then the lines of step N.
readme_step() {
  readme_block "$1" | awk -v step="# $2." '/^# [0-9]+\./ { started = 1; on = (index($0, step) == 1) } !started || on'
}
run_readme() {
  local script=$state/block.sh
  cp "$state/systemd-emulation.sh" "$script"
  if [ $# -gt 1 ]; then
    readme_step "$1" "$2" >>"$script"
  else
    readme_block "$1" >>"$script"
  fi
  (cd "$src" && STATE=$state bash "$script")
}

# ---- systemd: install, start, move bytes ----------------------------------------
# A LoadCredential= copy of the key is taken once, at unit start: `systemctl
# reload` would re-read the stale copy (and log success) mid-rotation.
grep -q '^LoadCredential' deploy/systemd/shardproxy@.service \
  && bad "systemd: the unit hands the key over as a credential (stale on reload)" \
  || ok "systemd: the unit reads the key file itself (reload sees the file on disk)"

if run_readme "runs this block word for word" >"$state/install.out" 2>&1; then
  ok "systemd: README install block ran as written (user, modes, check as the service user, start)"
else
  bad "systemd: README install block failed"; cat "$state/install.out"
fi
svc_user=$(sed -n 's/^User=//p' /etc/systemd/system/shardproxy@.service)
exit_pid=$(cat "$state/exit.pid" 2>/dev/null)
[ -n "$exit_pid" ] && [ "$(stat -c %U "/proc/$exit_pid")" = "$svc_user" ] && [ "$svc_user" != root ] \
  && ok "systemd: shardproxy@exit runs as $svc_user, not root" || bad "systemd: exit not running as the service user"
ls -l /etc/shardproxy >"$state/layout"
stat -c '%a %U:%G' /etc/shardproxy /etc/shardproxy/psk /etc/shardproxy/exit.toml | tr '\n' ' ' >"$state/modes"
[ "$(cat "$state/modes")" = "750 root:shardproxy 640 root:shardproxy 640 root:shardproxy " ] \
  && ok "systemd: layout is 0750/0640 root:shardproxy" || { bad "systemd: layout"; cat "$state/modes"; }
grep -q "keys from /etc/shardproxy/psk: 1 key(s), fingerprints" "$state/exit.log" \
  && ok "systemd: the exit logged its key's fingerprint" || bad "systemd: no key fingerprint in the log"

# The entry host: the same layout with entry.toml, in its own mount namespace
# (its own /etc/shardproxy), as the README says ("On an entry host, the same").
entry_etc=$work/entry-host
install -d -m 0750 -o root -g shardproxy "$entry_etc"
install -m 0640 -o root -g shardproxy /etc/shardproxy/psk "$entry_etc/psk"
install -m 0640 -o root -g shardproxy deploy/examples/entry.toml "$entry_etc/entry.toml"
cp "$state/systemd-emulation.sh" "$state/entry-start.sh"
echo 'systemctl enable --now shardproxy@entry' >>"$state/entry-start.sh"
unshare --mount --propagation private bash -c "mount --bind '$entry_etc' /etc/shardproxy && STATE='$state' bash '$state/entry-start.sh'" \
  >"$state/entry-start.out" 2>&1 || { cat "$state/entry-start.out"; }
entry_pid=$(cat "$state/entry.pid" 2>/dev/null || echo 0)
[ -n "$entry_pid" ] && pids+=("$entry_pid")
[ -n "$exit_pid" ] && pids+=("$exit_pid")
round_trip 127.0.0.1 8000 && ok "systemd: bytes through shardproxy@entry -> shardproxy@exit -> origin" \
  || bad "systemd: round trip through the units failed"

# ---- systemd: the README's upgrade (SIGUSR2) under load ----------------------------
python3 - >"$state/upgrade-load.out" 2>&1 <<'PY' &
import hashlib, os, socket, time
ok = failed = 0
end = time.time() + 8
while time.time() < end:
    data = os.urandom(4096)
    try:
        s = socket.create_connection(("127.0.0.1", 8000), timeout=10)
        s.sendall(data); s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while (d := s.recv(65536)):
            got += d
        ok += bytes(got) == data
        failed += bytes(got) != data
    except OSError:
        failed += 1
    time.sleep(0.01)
print(ok, failed)
PY
load_pid=$!
sleep 2   # the load runs before, during and after the upgrade: it is the input, not a wait
if run_readme "runs this upgrade" >"$state/upgrade.out" 2>&1 \
  && wait_log "$state/exit.log" "hand-over complete" \
  && [ "$(cat "$state/exit.pid")" != "$exit_pid" ] && kill -0 "$(cat "$state/exit.pid")"; then
  ok "systemd: the README's upgrade (SIGUSR2) hands over to a new main process"
else
  bad "systemd: the README's upgrade"; cat "$state/upgrade.out" "$state/exit.log"
fi
wait "$load_pid"
read -r up_ok up_failed <"$state/upgrade-load.out"
[ "${up_failed:-1}" = 0 ] && [ "${up_ok:-0}" -gt 50 ] \
  && ok "systemd: $up_ok connections across the upgrade, 0 failed" \
  || { bad "systemd: connections failed across the upgrade"; cat "$state/upgrade-load.out"; }
exit_pid=$(cat "$state/exit.pid")
pids+=("$exit_pid")

# ---- systemd: the README's key rotation, step by step ------------------------------
new_fp=""
old_fp=$(grep -o 'fingerprints [0-9a-f]*' "$state/exit.log" | head -1 | cut -d' ' -f2)
if run_readme "runs these steps" 1 >"$state/rot1.out" 2>&1 \
  && new_fp=$(sed -n 's/^wrote key to psk.new (fingerprint \([0-9a-f]*\), as logs name it)$/\1/p' "$state/rot1.out") && [ -n "$new_fp" ] \
  && wait_log "$state/exit.log" "SIGHUP: reloaded 2 key(s), fingerprints $new_fp (primary), $old_fp" \
  && round_trip 127.0.0.1 8000; then
  ok "rotation step 1: exits hold new+old (logged), the old-key entry still works"
else
  bad "rotation step 1"; cat "$state/rot1.out"
fi
# Step 2 runs on the entry host, which got psk.new copied over.
install -m 0640 -o root -g shardproxy /etc/shardproxy/psk.new "$entry_etc/psk.new"
{ cat "$state/systemd-emulation.sh"; readme_step "runs these steps" 2; } >"$state/entry-step2.sh"
if nsenter --target "$entry_pid" --mount env STATE="$state" bash "$state/entry-step2.sh" >"$state/rot2.out" 2>&1 \
  && wait_log "$state/entry.log" "SIGHUP: reloaded 2 key(s), fingerprints $new_fp (primary), $old_fp" \
  && round_trip 127.0.0.1 8000; then
  ok "rotation step 2: the entry's primary key is the new one (logged), bytes flow"
else
  bad "rotation step 2"; cat "$state/rot2.out"
fi
if run_readme "runs these steps" 3 >"$state/rot3.out" 2>&1 \
  && wait_log "$state/exit.log" "SIGHUP: reloaded 1 key(s), fingerprints $new_fp (primary)" \
  && round_trip 127.0.0.1 8000; then
  ok "rotation step 3: the exits hold only the new key (logged), bytes flow"
else
  bad "rotation step 3"; cat "$state/rot3.out"
fi
# The exit really dropped the old key: an entry still on it is refused.
old_only=$work/old.key
"$BIN" keygen --out "$work/unused.key" >/dev/null
grep -v '^#' "$entry_etc/psk" | tail -1 >"$old_only"; chmod 600 "$old_only"
"$BIN" entry --listen 127.0.0.1:8001 --upstream 127.0.0.1:9000 --key-file "$old_only" --cores 1 \
  --handshake-timeout 2s 2>"$state/old-entry.log" &
pids+=($!)
wait_log "$state/old-entry.log" 'listening on' >/dev/null
round_trip 127.0.0.1 8001 2>/dev/null && bad "rotation: an old-key entry still gets through" \
  || ok "rotation: an entry still on the old key is refused after step 3"
python3 - <<'PY' && ok "rotation: /metrics shows only the new key in shardproxy_key_info" || bad "rotation: key_info"
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=5).read().decode()
info = [l for l in text.splitlines() if l.startswith("shardproxy_key_info{")]
assert len(info) == 1 and 'slot="0"' in info[0], info
PY
# A key file that does not parse: `systemctl reload` fails, the keys stay.
cp /etc/shardproxy/psk "$work/psk.good"
echo "not a key" >/etc/shardproxy/psk
(cd "$src" && STATE=$state bash -c "source '$state/systemd-emulation.sh'; set +e; systemctl reload shardproxy@exit") >"$state/badreload.out" 2>&1 \
  && bad "systemd: reload with a broken key file succeeded" \
  || { round_trip 127.0.0.1 8000 && ok "systemd: reload with a broken key file fails visibly; traffic goes on"; } \
  || bad "systemd: traffic after a failed reload"
cp "$work/psk.good" /etc/shardproxy/psk
kill -TERM "$exit_pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$exit_pid" 2>/dev/null || break; sleep 0.1; done

# ---- container: the README's docker run, as the image's USER ---------------------------
docker_line=$(readme_block "runs the proxy the way this command does" | grep '^docker run')
image_user=$(sed -n 's/^USER //p' deploy/container/Dockerfile)
entrypoint=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]/\1/p' deploy/container/Dockerfile)
eval "set -- ${docker_line#docker run}"
groups=() mounts=() args=() network=bridge
while [ $# -gt 0 ]; do
  case "$1" in
    --group-add) groups+=("$2"); shift 2 ;;
    --network) network=$2; shift 2 ;;
    -v) mounts+=("$2"); shift 2 ;;
    --ulimit | --security-opt | --cpuset-cpus | -p | --stop-timeout) shift 2 ;;
    --rm) shift ;;
    -*) echo "unknown docker flag $1" >&2; shift ;;
    *) shift; args=("$@"); break ;;   # the image, then its arguments
  esac
done
mount_cmds=""
for m in "${mounts[@]}"; do
  IFS=: read -r host_path ctr_path mode <<<"$m"
  mount_cmds+="mount --bind '$host_path' '$ctr_path' && mount -o remount,bind,${mode:-rw} '$ctr_path' && "
done
# With Docker's default bridge network the container's 127.0.0.1 is not the
# host's, and the example config's upstream (127.0.0.1:8080) would be
# unreachable: the README's command must use the host's network.
[ "$network" = host ] && ok "container: the docker run uses --network host (the config's loopback addresses hold)" \
  || bad "container: docker run on network '$network': the example config's 127.0.0.1 upstream is unreachable there"
# Docker gives the process exactly the --group-add groups as supplementary ones.
group_opt=--clear-groups
[ ${#groups[@]} -gt 0 ] && group_opt="--groups=$(IFS=,; echo "${groups[*]}")"
unshare --mount --propagation private bash -c "$mount_cmds exec setpriv --reuid='${image_user%%:*}' --regid='${image_user##*:}' \
  $group_opt '$BIN' ${args[*]}" 2>"$state/docker.log" &
docker_pid=$!
pids+=("$docker_pid")
if wait_log "$state/docker.log" 'listening on' && round_trip 127.0.0.1 8000; then
  ok "container: the README's docker run ($image_user, --group-add ${groups[*]}, read-only mount) starts and serves"
else
  bad "container: the README's docker run did not serve"
fi
# Rotation in the container: the host's files change as under systemd (the
# directory mount shows the renamed file), then `docker kill --signal HUP`.
"$BIN" keygen --out "$work/docker-new.key" >/dev/null
(cd /etc/shardproxy && (umask 027 && cat "$work/docker-new.key" psk > psk.next) && chgrp shardproxy psk.next && mv psk.next psk)
kill -HUP "$docker_pid" 2>/dev/null
wait_log "$state/docker.log" "SIGHUP: reloaded 2 key(s)" && round_trip 127.0.0.1 8000 \
  && ok "container: a key file replaced on the host is reloaded on SIGHUP (docker kill --signal HUP)" \
  || bad "container: key reload through the read-only mount"
kill -TERM "$docker_pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$docker_pid" 2>/dev/null || break; sleep 0.1; done
kill -TERM "$entry_pid" 2>/dev/null

# ---- kubernetes: the manifests' users, groups, volumes, args ---------------------------
# The entry DaemonSet and the exit Deployment, with the ConfigMap and a
# Secret holding a real key, laid out as the kubelet does: one mount
# namespace per pod, each volume a tmpfs at its mountPath, files owned by
# root with the volume's defaultMode; with fsGroup, group fsGroup and g+r
# (kubelet's SetVolumeOwnership), and fsGroup among the process's groups.
"$BIN" keygen --out "$work/k8s.key" >/dev/null
python3 - "$BIN" "$work" "$work/k8s.key" >"$state/k8s.out" 2>&1 <<'PY'
import os, re, subprocess, sys, time, urllib.request, yaml
binary, work, keyfile = sys.argv[1:4]
docs = {}
for f in os.listdir("deploy/kubernetes"):
    for d in yaml.safe_load_all(open("deploy/kubernetes/" + f)):
        if d:
            docs[(d["kind"], d["metadata"]["name"])] = d
cm = docs[("ConfigMap", "shardproxy-config")]["data"]
secret = {"psk": open(keyfile).read()}
env_values = {"status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}

def pod(kind, name):
    spec = docs[(kind, name)]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    sc = spec.get("securityContext", {})
    uid, gid, fsg = sc.get("runAsUser", 0), sc.get("runAsGroup", 0), sc.get("fsGroup")
    assert uid != 0, f"{name}: runs as root"
    groups = [g for g in [fsg] + sc.get("supplementalGroups", []) if g is not None]
    script = ["set -e"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    for v in spec["volumes"]:
        path = mounts[v["name"]]
        if "configMap" in v:
            files, mode = cm, v["configMap"].get("defaultMode", 0o644)
        else:
            files, mode = secret, v["secret"].get("defaultMode", 0o644)
        script.append(f"mkdir -p {path} && mount -t tmpfs tmpfs {path}")
        for fname, content in files.items():
            p = f"{path}/{fname}"
            open(f"{work}/{name}-{fname}", "w").write(content)
            fmode, group = mode, 0
            if fsg is not None:
                fmode, group = mode | 0o440, fsg
            script.append(f"install -m {fmode:o} -o 0 -g {group} {work}/{name}-{fname} {p}")
    env = {}
    for e in c.get("env", []):
        env[e["name"]] = env_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    user = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"]
    check = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                            "\n".join(script + [" ".join(user + [binary, "check", "--config", args[2]])])],
                           capture_output=True, text=True)
    assert check.returncode == 0, f"{name}: check as {uid}:{gid} groups {groups}: {check.stderr}"
    log = open(f"{work}/{name}.log", "w")
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                          "\n".join(script + ["exec " + " ".join(user + [binary] + args)])], stderr=log)
    return p, f"{work}/{name}.log", c, uid, groups

# Sizing: the connection limit is reached before the memory limit. Per
# session and at start, as measured by benches/memory.rs (docs/BENCHMARKS.md,
# "Memory per connection"): ~96 KiB at the limit in the tunnel roles (50 KiB
# idle, a quarter of a 64 KiB batch buffer for transfers and another quarter
# for large chunks received, OpenSSL contexts while busy) and
# ~17 MiB, with 64 MiB kept for kernel socket buffers.
import tomllib
units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
for kind, name, cfg in [("Deployment", "shardproxy-exit", "exit.toml"), ("DaemonSet", "shardproxy-entry", "entry.toml")]:
    c = docs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
    limit = c["resources"]["limits"]["memory"]
    limit = int(limit[:-2]) * units[limit[-2:]]
    conf = tomllib.loads(cm[cfg])
    need = 17 * (1 << 20) + conf["cores"] * conf["max_connections"] * 96 * 1024 + 64 * (1 << 20)
    assert need <= limit, f"{name}: {conf['cores']} x {conf['max_connections']} sessions need {need >> 20} MiB > limit {limit >> 20} MiB"
    print(f"{name}: {conf['cores']} shard(s) x {conf['max_connections']} sessions: {need >> 20} MiB <= limit {limit >> 20} MiB")

procs = []
try:
    for kind, name in [("Deployment", "shardproxy-exit"), ("DaemonSet", "shardproxy-entry")]:
        p, log, c, uid, groups = pod(kind, name)
        procs.append(p)
        deadline = time.time() + 10
        while "listening on" not in open(log).read():
            assert p.poll() is None and time.time() < deadline, f"{name} did not start: " + open(log).read()
            time.sleep(0.1)
        ports = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            h = c[probe]["httpGet"]
            url = f"http://127.0.0.1:{ports.get(h['port'], h['port'])}{h['path']}"
            assert urllib.request.urlopen(url, timeout=5).status == 200, url
        real_uid = int(next(l for l in open(f"/proc/{p.pid}/status") if l.startswith("Uid:")).split()[1])
        assert real_uid == uid, f"{name}: runs as uid {real_uid}, not {uid}"
        print(f"{name}: runs as uid {uid}, groups {groups}; probes answer 200")
    import hashlib, socket
    data = os.urandom(256 * 1024)
    s = socket.create_connection(("127.0.0.1", 8000), timeout=10)
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while (d := s.recv(65536)):
        got += d
    assert bytes(got) == data, f"echo mismatch: {len(got)} bytes"
    print("bytes through entry DaemonSet -> exit Deployment -> origin")
finally:
    for p in procs:
        p.terminate()
        p.wait(timeout=40)
PY
if [ $? -eq 0 ]; then
  ok "kubernetes: sized so max_connections is reached before the memory limit; both pods start as runAsUser with fsGroup-owned volumes, probes answer, bytes flow"
else
  bad "kubernetes: pods as laid out by the manifests"; cat "$state/k8s.out"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
