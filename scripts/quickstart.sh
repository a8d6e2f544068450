#!/usr/bin/env bash
# Set up the environment (idempotent) and run the quickstart recipe: a small Llama-style model trained
# on the Python standard library's sources with strategy=memkit, printing validation perplexity and
# the memory report. Extra arguments go to `memkit fit`, e.g. --trainer.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/memkit fit --config recipes/quickstart.yaml "$@"
