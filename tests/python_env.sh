# Sourced by tests/all.sh and tests/deploy_assets.sh (bash):
#   ensure_python MODULE=PIP_NAME ... [cmd:COMMAND=PIP_NAME ...]
# makes `python3` on PATH import every MODULE (and PATH hold every COMMAND
# a package installs), installing the missing ones with pip as PIP_NAME.
#
# It first tries the `python3` already on PATH: a virtualenv, a pyenv or a
# distribution without PEP 668 takes `pip install`. A distribution Python
# that refuses it (PEP 668 "externally-managed-environment": Debian 12,
# Ubuntu 23.04 and later) or has no pip gets a virtualenv of the suite's own
# instead, $TEST_PYTHON_VENV (default target/test-python, so `cargo clean`
# removes it), made with --system-site-packages so apt's packages still
# count, and put first on PATH for the rest of the run and for the tests it
# starts. Installing python3-venv for that needs root (apt-get).
# Returns non-zero, saying what to run, if the modules cannot be had.

ensure_python() {
  local venv=${TEST_PYTHON_VENV:-$PWD/target/test-python}
  # PATH must keep working after a `cd`.
  [[ $venv == /* ]] || venv=$PWD/$venv
  # A venv made by an earlier run comes first.
  if [ -x "$venv/bin/python3" ] && [[ ":$PATH:" != *":$venv/bin:"* ]]; then
    export PATH="$venv/bin:$PATH"
  fi
  local spec missing=() wanted=()
  for spec in "$@"; do
    _python_env_has "${spec%%=*}" || { missing+=("${spec#*=}"); wanted+=("${spec%%=*}"); }
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "python_env: installing ${missing[*]} (pip)"
  local err
  if err=$(python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}" 2>&1); then
    _python_env_check "${wanted[@]}"
    return
  fi
  echo "python_env: the python3 on PATH refused it ($(printf '%s' "$err" | grep -m1 -E 'error|No module' || echo "pip failed")); using a virtualenv at $venv"
  if ! python3 -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null 2>&1 || true
    fi
    rm -rf "$venv"
    python3 -m venv --system-site-packages "$venv" >/dev/null 2>&1 || {
      echo "python_env: cannot make a virtualenv; run: sudo apt-get install python3-venv, or python3 -m pip install ${missing[*]}" >&2
      return 1
    }
  fi
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${missing[@]}" || {
    echo "python_env: cannot install ${missing[*]} into $venv; run: $venv/bin/python3 -m pip install ${missing[*]}" >&2
    return 1
  }
  [[ ":$PATH:" == *":$venv/bin:"* ]] || export PATH="$venv/bin:$PATH"
  _python_env_check "${wanted[@]}"
}

# Whether everything installed is there now: pip succeeding is not proof
# (a package that does not provide the module or command asked for).
_python_env_check() {
  local spec
  for spec in "$@"; do
    _python_env_has "$spec" || { echo "python_env: $spec is still missing after installing" >&2; return 1; }
  done
}

_python_env_has() { # MODULE or cmd:COMMAND
  case "$1" in
    cmd:*) hash -r; command -v "${1#cmd:}" >/dev/null 2>&1 ;;
    *) python3 -c "import $1" 2>/dev/null ;;
  esac
}
