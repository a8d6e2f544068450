#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install lightning_memkit into it
# (editable, with the test extras). Idempotent: when pyproject.toml and constraints.txt are unchanged
# since the last successful install, it returns at once.
# torch is pinned through constraints.txt and installed first, so no dependency can pull a CUDA
# build onto a CPU machine. Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.memkit-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup_env: installing lightning_memkit and its dependencies into .venv (log: .venv/install.log)"
  log=.venv/install.log
  {
    .venv/bin/python -m pip install --upgrade "pip>=23" "setuptools>=77" wheel &&
    .venv/bin/python -m pip install -c constraints.txt torch &&
    .venv/bin/python -m pip install -c constraints.txt -e ".[test]"
  } >"$log" 2>&1 || { tail -n 60 "$log"; echo "setup_env: install failed; full log in $log" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup_env: done"
fi
