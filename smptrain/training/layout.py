"""The names inside a run directory, and where a run's checkpoints are; imports nothing of smptrain.

    RUN_DIR/config.toml  splits.json  run.json  metrics.jsonl  schedule.png  curves.png  previews/  [.trackers-open]
    RUN_DIR/test/{metrics.json, threshold.json}
    RUN_DIR/checkpoints/NAME/{model.safetensors, meta.json, state/}   checkpoints/last -> NAME, checkpoints/best -> NAME
"""

from __future__ import annotations

import datetime
from pathlib import Path

# Every name inside a run directory; other modules ask for them here.
CONFIG, SPLITS, IDENTITY, METRICS = "config.toml", "splits.json", "run.json", "metrics.jsonl"
CHECKPOINTS, PREVIEWS, TEST = "checkpoints", "previews", "test"
SCHEDULE_PLOT = "schedule.png"  # the planned learning rate (smptrain.training.schedule)
CURVES_PLOT = "curves.png"  # train loss, validation metrics and learning rate so far, redrawn at each validation
TEST_METRICS, THRESHOLD = "metrics.json", "threshold.json"  # inside test/, from smptrain-test
LAST, BEST = "last", "best"  # links in checkpoints/ to the newest and the best checkpoint
TRACKERS_OPEN = ".trackers-open"  # while a session writes to the trackers; left behind, a kill cut them short
WEIGHTS, META, STATE = "model.safetensors", "meta.json", "state"  # inside a checkpoint directory


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_link(run_dir: Path, which: str) -> Path:
    """checkpoints/last or checkpoints/best of a run."""
    return checkpoints_dir(run_dir) / which


def has_checkpoint(run_dir: Path, which: str = LAST) -> bool:
    """Whether the run has a complete checkpoint behind `which` (a run that saved nothing has none)."""
    return (checkpoint_link(run_dir, which) / META).is_file()


def run_of(checkpoint_dir: Path) -> Path:
    """The run directory a checkpoint directory lies in (itself when it lies elsewhere)."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == CHECKPOINTS else checkpoint_dir


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
