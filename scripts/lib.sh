# Shared by scripts/test and scripts/demo: the project's virtualenv, made and
# kept up to date by the project's own files (nothing installed by hand).
VENV="${ONION_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

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
  want=$(cat setup.cfg pyproject.toml $(find onion_twisted twisted -type f -name '*.py' | sort) | sha256sum | cut -c1-16)
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # A real (non-editable) install: twistd finds plugins only in an installed twisted/plugins.
    "$VENV/bin/python" -m pip install -q ".[test]" >/dev/null
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps . >/dev/null
    # Refresh twistd's plugin cache now, not in the middle of a test.
    "$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
    echo "$want" > "$stamp"
  fi
}
