"""Run identity and records: readable run names, `metrics.jsonl`, and wandb through Accelerate's tracker.

Only the main process writes. Every record goes to `metrics.jsonl` (one JSON object per line with `step`, `epoch`
and metric keys) and, when `log.wandb_project` is set, to the same wandb run with the same keys. wandb honours
WANDB_MODE (offline works without network) and writes under `{artifact_dir}/wandb`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from smptrain.runs import METRICS
from smptrain.storage import WriteFailed, write_text, writing

ADJECTIVES = ("frosty", "thawing", "silent", "amber", "polar", "windy", "misty", "bright", "rapid", "quiet", "boreal",
              "steady", "gentle", "bold", "crisp", "distant")
NOUNS = ("pingo", "tundra", "slump", "delta", "ridge", "lake", "taiga", "ice-wedge", "moraine", "fjord", "esker",
         "permafrost", "headwall", "lowland", "thermokarst", "polygon")


def new_run_id() -> str:
    """8 random characters from [a-z0-9], as DARTS; also the wandb run id."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def new_run_name(artifact_dir: Path) -> str:
    """`adjective-noun-N`, N = number of existing runs + 1, never the name of an existing directory."""
    existing = [p for p in Path(artifact_dir).iterdir() if p.is_dir()] if Path(artifact_dir).is_dir() else []
    count = len(existing) + 1
    while True:
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-{count}"
        if not (Path(artifact_dir) / name).exists():
            return name
        count += 1


def clean_number(value):
    """JSON-friendly float (NaN and inf become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class WandbRun:
    """The wandb run a Recorder writes to: the training run's id and name, so a resumed run and its test append."""

    project: str
    entity: str  # "" = the user's default entity
    name: str
    id: str
    config: dict
    dir: Path  # the artifact directory; wandb writes under dir/wandb
    job: str = "train"
    group: str = ""  # cross-validation and tuning group their runs


def _step_of(line: str) -> float:
    """A metrics.jsonl record's step; a blank or broken line (a write cut short) counts as past every step."""
    try:
        return (json.loads(line).get("step") or 0) if line.strip() else math.inf
    except ValueError:
        return math.inf


class Recorder:
    """Writes records to metrics.jsonl and wandb (main process only); does nothing on other ranks.
    `wandb`: None for no wandb; `resume_step`: drop metrics.jsonl records past the checkpoint resumed from."""

    def __init__(self, accelerator, run_dir: Path, wandb: WandbRun | None, resume_step: int | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / METRICS
        self.wandb = wandb is not None
        self.failure = None  # a write that failed here, raised on every rank at the next checkpoint (never alone)
        if self.main and resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: they will be produced again.
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        if wandb is not None:
            (Path(wandb.dir) / "wandb").mkdir(parents=True, exist_ok=True) if self.main else None
            init = {"name": wandb.name, "id": wandb.id, "resume": "allow", "dir": str(wandb.dir), "job_type": wandb.job}
            if wandb.entity:
                init["entity"] = wandb.entity
            if wandb.group:
                init["group"] = wandb.group
            try:
                accelerator.init_trackers(wandb.project, config=wandb.config, init_kwargs={"wandb": init})
            except Exception as error:  # e.g. online mode without an API key
                from smptrain.errors import UserError

                raise UserError(f"wandb could not start for log.wandb_project = {wandb.project!r}: "
                                f"{str(error).splitlines()[0]} (run `wandb login`, or set WANDB_MODE=offline)") from None

    def log(self, record: dict, step: int | None, write_jsonl: bool = True) -> None:
        if not self.main:
            return
        record = {k: clean_number(v) for k, v in record.items()}
        if write_jsonl and self.failure is None:
            size = self.path.stat().st_size if self.path.exists() else 0
            try:  # a refused append is cut back to the last whole line
                with writing(self.path, cleanup=lambda: os.truncate(self.path, size) if self.path.exists() else None):
                    with open(self.path, "a") as handle:
                        handle.write(json.dumps({"step": step, **record}) + "\n")
            except WriteFailed as error:
                self.failure = error
        if self.wandb:
            self.accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)

    def image(self, key: str, path: Path, step: int | None) -> None:
        if self.main and self.wandb:
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Image(str(path))}, step=step)

    def table(self, key: str, rows: list[dict]) -> None:
        """Rows of equal keys as a wandb table (NaN as empty cells)."""
        if self.main and self.wandb and rows:
            import wandb

            columns = list(rows[0])
            data = [[clean_number(row[c]) for c in columns] for row in rows]
            self.accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Table(columns=columns, data=data)})

    def summary(self, values: dict) -> None:
        if self.main and self.wandb:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            for key, value in values.items():
                run.summary[key] = clean_number(value)

    def finish(self) -> None:
        """Close wandb. Not `end_training()`: that also tears down the process group, which only the end of a
        command, on every rank, may do."""
        if self.main and self.wandb:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
