#!/usr/bin/env bash
# The test command: set up the environment, lint (ruff, configured in pyproject.toml), then run the whole suite on
# CPU (268 tests: 9-12 minutes on 2 AVX-512 cores, about 26 minutes on 2 AVX2-only cores; fresh clone, alone).
# One pytest worker per core (pytest-xdist); a test file stays on one worker, so module fixtures are built once and
# the multi-process tests (test_distributed.py) never run two launches at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check smptrain tests tools
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
