#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) with the pinned
# dependencies from setup.py. Re-installs only when setup.py changed, so it is
# cheap to call before every command. Prints what it does; fails with a
# message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.feedbeam-installed"

find_python() {
  for candidate in "${FEEDBEAM_PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  if ! python=$(find_python); then
    echo "bootstrap: Python 3.11 is required (Beam 2.77 and the pinned wheels)." >&2
    echo "  install it (e.g. 'apt-get install python3.11 python3.11-venv' or 'pyenv install 3.11')," >&2
    echo "  or point FEEDBEAM_PYTHON at a python3.11 binary." >&2
    exit 1
  fi
  echo "bootstrap: creating $venv with $($python --version)"
  if ! "$python" -m venv "$venv"; then
    echo "bootstrap: '$python -m venv' failed; on Debian install python3.11-venv" >&2
    exit 1
  fi
fi

want=$(sha256sum setup.py | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "bootstrap: installing feedbeam and its pinned dependencies into $venv (a few minutes the first time)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
