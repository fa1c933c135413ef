#!/usr/bin/env bash
# The main job on the built-in default: set up, generate demo data, train, test and convert (about 70 s on 2 CPU cores after the first install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline}
RUN=${RUN:-demo-$(date +%Y%m%d-%H%M%S)}
.venv/bin/smptrain-demo-data data/demo --overwrite
.venv/bin/smptrain-inspect --config configs/demo.toml --json .demo/splits.json
.venv/bin/python -m smptrain.train --config configs/demo.toml --set log.run_name="$RUN"
.venv/bin/smptrain-test ".demo/artifacts/$RUN"
.venv/bin/smptrain-convert ".demo/artifacts/$RUN" --out-dir .demo/converted --name "$RUN" --overwrite
echo "done: run directory .demo/artifacts/$RUN, converted model in .demo/converted/"
