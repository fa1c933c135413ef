#!/usr/bin/env bash
# The test command: set up the environment, lint (ruff, configured in pyproject.toml), then run the whole suite on
# CPU (379 tests: 11:19 on 2 AVX-512 cores, alone, 2026-12-07, about 4 minutes of one worker a real SLURM's waits;
# AVX2-only cores are slower: 268 tests took about 26 minutes there before commands forked from a pre-imported
# interpreter).
# One pytest worker per core (pytest-xdist); a test file stays on one worker, so module fixtures are built once and
# the multi-process tests (test_distributed.py) never run two launches at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/cluster-packages.sh  # SLURM and PostgreSQL for tests/test_cluster.py, where root may install them
.venv/bin/ruff check smptrain tests tools
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder "$@"  # tests/conftest.py orders the files
