"""The names inside a run directory, and where a run's checkpoints are; imports nothing of smptrain.

    RUN_DIR/config.toml  splits.json  run.json  metrics.jsonl  summary.json  schedule.png  curves.png  previews/
    RUN_DIR/.trackers-open   (while a session writes to the trackers)
    RUN_DIR/test/{metrics.json, threshold.json}
    RUN_DIR/checkpoints/NAME/{model.safetensors, meta.json, state/}   checkpoints/last -> NAME, checkpoints/best -> NAME
"""

from __future__ import annotations

import datetime
from pathlib import Path

# Every name inside a run directory; other modules ask for them here.
CONFIG, SPLITS, IDENTITY, METRICS = "config.toml", "splits.json", "run.json", "metrics.jsonl"
SUMMARY = "summary.json"  # the run at a glance, kept current by training and smptrain-test (training.summary)
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


def runs_beside(path: Path) -> str:
    """For a run directory that does not exist: the closest runs beside it, or those there are (a phrase)."""
    import difflib

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    runs = sorted(p.name for p in parent.iterdir() if (p / CONFIG).is_file()) if parent.is_dir() else []
    if not runs:
        return f"{parent} holds no run directory" if parent.is_dir() else f"{parent} does not exist either"
    close = difflib.get_close_matches(path.name, runs, n=2, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(str(parent / c) for c in close)}?"
    return f"the runs in {parent}: {', '.join(runs[:8])}{' ...' if len(runs) > 8 else ''}"
