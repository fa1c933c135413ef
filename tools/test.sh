#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite on CPU (about 9 minutes on 2 cores).
# One pytest worker per core (pytest-xdist); a test file stays on one worker, so module fixtures are built once and
# the multi-process tests (test_distributed.py) never run two launches at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
