#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install smptrain with its test and docs extras. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,onnx,trackers,docs,postgres,imagery]' 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import smptrain, segmentation_models_pytorch, accelerate, zarr" \
  || { echo "setup failed: smptrain does not import" >&2; exit 1; }
