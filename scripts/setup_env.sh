#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install lightning_memkit into it.
# Idempotent: a second run with nothing changed only checks and returns in seconds.
# torch is pinned through constraints.txt, so no CUDA wheels are pulled onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.memkit-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
  # torch first, pinned: every later resolution sees it installed and leaves it alone.
  .venv/bin/python -m pip install -q -c constraints.txt torch
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
