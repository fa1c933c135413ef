"""`RUN_DIR/summary.json`: a run at a glance, kept current by training (after every validation, at a stop and at the
end) and by `smptrain-test`, read by `smptrain-compare`: how the run stands or ended, its best validation and
checkpoint, its last, epochs and steps done, the wall time of every session together, device and precision, and the
latest test's metrics. Written whole (`core.storage`), by the main process.

    {"run_name", "run_id", "status": running | finished | early-stopped | pruned | interrupted | diverged,
     "epochs": done, "max_epochs", "steps", "monitor": "val/JaccardIndex",
     "best": {"value", "checkpoint", "metrics"}, "last": {"checkpoint", "metrics"} (checkpoint names in checkpoints/),
     "wall_time_s", "device", "precision", "world_size", "updated", "test": {...} (after smptrain-test)}

Epochs here are counted as a person counts them (`epochs` done; a checkpoint's `epoch` is DARTS' 0-based one, as in
its name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from smptrain.core.storage import write_text
from smptrain.training.layout import SUMMARY, now


def read_summary(run_dir: Path) -> dict:
    """The run's summary.json ({} where there is none, or an unreadable one: it is written again whole)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def update_summary(run_dir: Path, **fields) -> dict:
    """Main process: summary.json with `fields` changed (the others kept); returns it."""
    summary = {**read_summary(run_dir), **fields, "updated": now()}
    write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


class SessionClock:
    """The run's wall time over every session: what the summary held when this session began, plus this one's."""

    def __init__(self, run_dir: Path):
        self.earlier = float(read_summary(run_dir).get("wall_time_s") or 0.0)
        self.start = time.monotonic()

    def total(self) -> float:
        return round(self.earlier + time.monotonic() - self.start, 1)
