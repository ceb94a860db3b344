#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# then runs every test. This is the README's test command; .ci/run calls it.
#
# Needs: promtool (Debian `prometheus`), iproute2 and nftables (network
# namespace fault tests), qemu-user (the binary on a pre-AVX2 CPU model), haproxy
# (the PROXY protocol against a real load balancer), Python's `cryptography` (the independent protocol
# client) and `hdrhistogram` (the independent histogram decoder; pip, or a
# virtualenv where PEP 668 refuses pip: tests/python_env.sh). Installing
# needs root (apt-get); without it, the missing pieces are listed with the
# command that installs them, and the run fails. Tests never skip silently:
# a test whose tool is missing fails, naming it (see tests/common `require`).
set -euo pipefail
cd "$(dirname "$0")/.."

# glommio needs at least 512 KiB of locked memory for io_uring.
ulimit -l unlimited 2>/dev/null || ulimit -l 8192 2>/dev/null || true

missing_apt=()
command -v promtool >/dev/null 2>&1 || missing_apt+=(prometheus)
command -v ip >/dev/null 2>&1 || missing_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || missing_apt+=(nftables)
command -v qemu-x86_64 >/dev/null 2>&1 || missing_apt+=(qemu-user)
command -v haproxy >/dev/null 2>&1 || missing_apt+=(haproxy)
command -v python3 >/dev/null 2>&1 || missing_apt+=(python3)
# The system's own too: a test runs it as another user (nobody).
[ -x /usr/bin/python3 ] || missing_apt+=(python3)
command -v strace >/dev/null 2>&1 || missing_apt+=(strace)
# The build links the system's OpenSSL 3 (Cargo.toml, feature `openssl`).
command -v pkg-config >/dev/null 2>&1 || missing_apt+=(pkg-config)
pkg-config --exists 'openssl >= 3' 2>/dev/null || missing_apt+=(libssl-dev)
if [ ${#missing_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/all.sh: installing ${missing_apt[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  else
    echo "tests/all.sh: missing ${missing_apt[*]}; install with: sudo apt-get install ${missing_apt[*]}" >&2
    exit 1
  fi
fi
# Python packages: pip, or a virtualenv of the suite's own where the
# distribution's Python refuses pip (PEP 668); see tests/python_env.sh.
. tests/python_env.sh
ensure_python cryptography=cryptography hdrh=hdrhistogram || exit 1

log=$(mktemp)
# The tests' own files (control sockets, configs, logs, keys) go in a
# directory of this run's, removed at the end, not loose in /tmp: a test
# that fails, or a process killed mid-test, left them behind. Mode 1777
# as /tmp: some tests run processes as other users.
scratch=$(mktemp -d)
chmod 1777 "$scratch"
trap 'rm -f "$log"; rm -rf "$scratch"' EXIT
# Every step runs, whatever an earlier one found (--no-fail-fast: every
# test binary too), so that one failure still shows what else passes, and
# the total line always comes.
status=0
TMPDIR=$scratch cargo test --locked --no-fail-fast 2>&1 | tee "$log" || status=1
# deploy/ assets, each checked by its ecosystem's validator (installs them).
bash tests/deploy_assets.sh 2>&1 | tee -a "$log" || status=1
# Each deploy path run as its real user, files laid out as documented.
bash tests/deploy_paths.sh 2>&1 | tee -a "$log" || status=1

# One line for the whole run: cargo's per-binary results plus the deploy checks.
passed=$(grep -oE '(ok|FAILED)\. [0-9]+ passed' "$log" | awk '{s+=$2} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
# The two deploy scripts each end with "N passed, M failed".
passed=$((passed + $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | awk '{s+=$1} END {print s+0}')))
failed=$((failed + $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | awk '{s+=$3} END {print s+0}')))
# A deploy script that died before its summary line counts as a failure.
[ "$(grep -cE '^[0-9]+ passed, [0-9]+ failed$' "$log")" -eq 2 ] || failed=$((failed + 1))
echo "total: $passed passed, $failed failed"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "tests/all.sh: a step failed without a failing test (a build error?): see above" >&2
fi
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
