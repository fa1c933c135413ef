#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite on CPU (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
