#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite on CPU.
# By default only the fast subset runs (pytest -m "not slow"); --all runs every test, slow ones included.
# Other arguments go to pytest, e.g.: bash scripts/test.sh -x tests/test_config.py
#                                     bash scripts/test.sh --all --durations=30
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then all=1; else args+=("$a"); fi
done
bash scripts/setup_env.sh
export PYTHONUNBUFFERED=1
if [ "$all" = 1 ]; then
  exec .venv/bin/python -m pytest -q --timeout=900 --durations=10 ${args[@]+"${args[@]}"}
else
  exec .venv/bin/python -m pytest -q --timeout=900 --durations=10 -m "not slow" ${args[@]+"${args[@]}"}
fi
