#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite on CPU.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q --timeout=900 --durations=10 "$@"
