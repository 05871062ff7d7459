# Shared by scripts/test and scripts/demo: the project's virtualenv, made and
# kept up to date by the project's own files (nothing installed by hand).
VENV="${ONION_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

# pip, without the lines some machines' pip configuration prints for every
# package ("Location ... is ignored"); real errors still show.
quiet_pip() {
  local status=0
  "$VENV/bin/python" -m pip "$@" >/dev/null 2>"$VENV/.pip-stderr" || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$VENV/.pip-stderr" >&2 || true
  return "$status"
}

ensure_venv() {
  if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1
  fi
  if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
  fi
  local stamp="$VENV/.installed" want
  want=$(cat setup.cfg pyproject.toml $(find onion_twisted twisted -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | sort) | sha256sum | cut -c1-16)
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    quiet_pip install -q --upgrade pip
    # A real (non-editable) install: twistd finds plugins only in an installed twisted/plugins.
    quiet_pip install -q ".[test]"
    quiet_pip install -q --force-reinstall --no-deps .
    # Refresh twistd's plugin cache now, not in the middle of a test.
    "$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
    echo "$want" > "$stamp"
  fi
  compile_checkout
}

# The tests' members import the package from this checkout (PYTHONPATH), and a
# machine may set PYTHONDONTWRITEBYTECODE (this one does): then every twistd process
# a test starts compiles the whole package again, about 0.5 CPU s of its ~1.2 s
# start. Writing the bytecode once here (only what changed; 0.3 s when none did)
# spares that in every process.
compile_checkout() {
  "$VENV/bin/python" -m compileall -q -j 0 onion_twisted tests bench >/dev/null ||
    echo "could not write the checkout's bytecode: the tests run, each member compiling it again" >&2
}

# Debian packages the tests need, installed only as root with apt-get (CI's case):
# "apt_install PKG..." runs apt-get update once per run, then installs without asking.
# Returns non-zero when it cannot (not root, no apt-get, or the install failed).
APT_UPDATED=""
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
