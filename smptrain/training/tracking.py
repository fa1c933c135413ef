"""Run identity and records: readable run names, `metrics.jsonl`, and the trackers (wandb, TensorBoard, MLflow)
through Accelerate's tracker classes.

Only the main process writes. Every record goes to `metrics.jsonl` (one JSON object per line with `step`, `epoch`
and metric keys) and to each tracker of `log.trackers` with the same keys and steps (default: wandb when
`log.wandb_project` is set). wandb honours WANDB_MODE (offline works without network) and writes under
`{artifact_dir}/wandb`; TensorBoard writes event files to `{run_dir}/tensorboard`; MLflow writes to
MLFLOW_TRACKING_URI, else to an SQLite store at `{artifact_dir}/mlflow.db`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from smptrain.config import dotted_keys
from smptrain.core.choices import TRACKERS
from smptrain.core.errors import UserError
from smptrain.core.failpoints import failpoint
from smptrain.core.storage import WriteFailed, write_text, writing
from smptrain.training.layout import METRICS, TRACKERS_OPEN

ADJECTIVES = ("frosty", "thawing", "silent", "amber", "polar", "windy", "misty", "bright", "rapid", "quiet", "boreal",
              "steady", "gentle", "bold", "crisp", "distant")
NOUNS = ("pingo", "tundra", "slump", "delta", "ridge", "lake", "taiga", "ice-wedge", "moraine", "fjord", "esker",
         "permafrost", "headwall", "lowland", "thermokarst", "polygon")
TENSORBOARD_DIR = "tensorboard"  # in the run directory: `tensorboard --logdir {artifact_dir}` shows every run
MLFLOW_STORE = "mlflow.db"  # MLflow's SQLite store in the artifact directory, when MLFLOW_TRACKING_URI is not set
MLFLOW_ARTIFACTS = "mlartifacts"  # beside it: the figures and tables MLflow keeps
RUN_TAG = "smptrain.run_id"  # the MLflow tag that finds a run again on resume and for smptrain-test
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
assert set(PACKAGES) == set(TRACKERS)


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


def trackers_of(log: dict) -> tuple[str, ...]:
    """The trackers of a `[log]` section (a dict, so the run.json of older runs reads too): `log.trackers`, or
    wandb when `log.wandb_project` is set."""
    if log.get("trackers"):
        return tuple(log["trackers"])
    return ("wandb",) if log.get("wandb_project") else ()


def mlflow_key(key: str) -> str:
    """MLflow takes letters, digits and `_ - . / : space` in names; anything else (region names, `@0.5`) becomes `_`."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def flat_config(config: dict) -> dict:
    """`{"train.lr": 0.001, "train.augment": '["D4"]'}`: the scalars TensorBoard's hparams and MLflow's params take."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in dotted_keys(config).items()}


@dataclass(frozen=True)
class TrackedRun:
    """The tracker runs a Recorder writes to: the training run's id and name, so a resumed run and its test append."""

    trackers: tuple[str, ...]  # of TRACKERS
    project: str  # the wandb project
    entity: str  # "" = the user's default wandb entity
    experiment: str  # the MLflow experiment
    name: str
    id: str
    config: dict
    dir: Path  # the artifact directory; wandb writes under dir/wandb, MLflow's default store is dir/mlflow.db
    job: str = "train"
    group: str = ""  # cross-validation and tuning group their runs


def tracked_run(config: dict, name: str, run_id: str, job: str = "train") -> TrackedRun | None:
    """The tracker runs of a run with this configuration (a nested dict, as in run.json), or None without trackers."""
    log = config["log"]
    trackers = trackers_of(log)
    if not trackers:
        return None
    return TrackedRun(trackers, log.get("wandb_project", ""), log.get("wandb_entity", ""),
                      log.get("mlflow_experiment") or "smptrain", name, run_id, config, Path(log["artifact_dir"]), job,
                      log.get("wandb_group", ""))


def _step_of(line: str) -> float:
    """A metrics.jsonl record's step; a blank or broken line (a write cut short) counts as past every step."""
    try:
        return (json.loads(line).get("step") or 0) if line.strip() else math.inf
    except ValueError:
        return math.inf


def _wandb(run: TrackedRun, run_dir: Path, resume_step: int | None):
    from accelerate.tracking import WandBTracker

    (Path(run.dir) / "wandb").mkdir(parents=True, exist_ok=True)
    init = {"name": run.name, "id": run.id, "resume": "allow", "dir": str(run.dir), "job_type": run.job}
    if run.entity:
        init["entity"] = run.entity
    if run.group:
        init["group"] = run.group
    return WandBTracker(run.project, **init), run.config


def _tensorboard(run: TrackedRun, run_dir: Path, resume_step: int | None):
    from accelerate.tracking import TensorBoardTracker

    # A resumed run drops what came after its checkpoint, as metrics.jsonl does: TensorBoard hides the older events
    # from purge_step on, its own step included (an owed validation a killed session logged there would stay twice),
    # and the records metrics.jsonl kept at that step are replayed.
    options = {"purge_step": resume_step} if resume_step is not None and run.job == "train" else {}
    fresh = resume_step is None and run.job == "train"
    return TensorBoardTracker(TENSORBOARD_DIR, run_dir, **options), flat_config(run.config) if fresh else None


def _mlflow(run: TrackedRun, run_dir: Path, resume_step: int | None):
    """Accelerate's MLflowTracker with names MLflow accepts, continuing the MLflow run of the same smptrain run."""
    import mlflow
    from accelerate.tracking import MLflowTracker

    class Tracker(MLflowTracker):
        def log(self, values: dict, step: int | None = None, **kwargs):
            super().log({mlflow_key(k): v for k, v in values.items()}, step=step, **kwargs)

    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow's own local default since 3.0: an SQLite file (its file store is refused by default and loses
        # runs whose path has a directory named "artifacts", as ours does by default).
        for noisy in ("alembic", "mlflow.store.db.utils"):  # the database's creation, said on every new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        root = Path(run.dir).absolute()
        mlflow.set_tracking_uri(f"sqlite:///{root / MLFLOW_STORE}")
        location = (root / MLFLOW_ARTIFACTS).as_uri()
    if mlflow.get_experiment_by_name(run.experiment) is None:
        try:  # several CV or tuning workers may get here at once: one creates it, the others find it
            mlflow.create_experiment(run.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            if mlflow.get_experiment_by_name(run.experiment) is None:
                raise
    found = mlflow.search_runs(experiment_names=[run.experiment], output_format="list",
                               filter_string=f"tags.`{RUN_TAG}` = '{run.id}'")
    tags = {RUN_TAG: run.id, **({"group": run.group} if run.group else {})}
    tracker = Tracker(run.experiment, run_id=found[0].info.run_id if found else None, run_name=run.name, tags=tags)
    return tracker, flat_config(run.config) if not found else None  # MLflow params cannot change once logged


STARTERS = {"wandb": _wandb, "tensorboard": _tensorboard, "mlflow": _mlflow}


def _values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and v is not None}


def _from_step(first: int, records: list[dict]) -> list[tuple[int, dict]]:
    return [(r["step"], _values(r)) for r in records if r.get("step") is not None and r["step"] >= first]


def _wandb_lacks(tracker, records: list[dict], resume_step: int) -> list[tuple[int, dict]]:
    """wandb takes only steps from its own next one on: an online run resumed continues at the server's last step
    + 1 (what the killed session sent before it is kept, and steps it already has are not taken twice), an offline
    session starts at 0 (its directory then holds the whole run: wandb cannot merge offline directories)."""
    return _from_step(tracker.run.step, records)


def _tensorboard_lacks(tracker, records: list[dict], resume_step: int) -> list[tuple[int, dict]]:
    """TensorBoard hides an earlier session's events from the resumed step on (purge_step): those records again."""
    return _from_step(resume_step, records)


def _mlflow_lacks(tracker, records: list[dict], resume_step: int) -> list[tuple[int, dict]]:
    """MLflow keeps every point it was sent (no way to remove one): the (key, step) points it has not got."""
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(), tracker.active_run.info.run_id
    keys = {key for record in records for key in _values(record)}
    held = {(key, m.step) for key in keys for m in client.get_metric_history(run_id, mlflow_key(key))}
    missing = [(r["step"], {k: v for k, v in _values(r).items() if (k, r["step"]) not in held}) for r in records
               if r.get("step") is not None]
    return [(step, values) for step, values in missing if values]


LACKING = {"wandb": _wandb_lacks, "tensorboard": _tensorboard_lacks, "mlflow": _mlflow_lacks}
assert set(LACKING) == set(TRACKERS)
assert set(STARTERS) == set(TRACKERS)


def start_trackers(accelerator, run: TrackedRun, run_dir: Path, resume_step: int | None) -> None:
    """Start each tracker of `run` through Accelerate (main process only); one that cannot start is a UserError."""
    started = []
    for name in run.trackers:
        accelerator.trackers = []  # init_trackers starts every tracker in this list: only the new one
        try:
            tracker, config = STARTERS[name](run, run_dir, resume_step)
            accelerator.log_with = [tracker]
            accelerator.init_trackers(run.project or run.experiment)
            if config is not None:
                accelerator.trackers[-1].store_init_configuration(config)
        except Exception as error:  # e.g. wandb online without an API key, an MLflow server that does not answer
            _close(started + accelerator.trackers)
            accelerator.trackers = []
            if isinstance(error, ModuleNotFoundError):
                raise UserError(f"log.trackers includes {name!r} but {error.name} is not installed: pip install "
                                f"{PACKAGES[name]}, or pip install 'smptrain[trackers]'") from None
            raise UserError(_failed(name, run, error)) from None
        started += accelerator.trackers
    accelerator.trackers = started


def _close(trackers: list) -> None:
    """Finish the trackers that started before one failed, so no run is left open in this process."""
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception:  # already failing: the first error is the one to report
            pass


def _failed(name: str, run: TrackedRun, error: Exception) -> str:
    first = (str(error).splitlines() or [type(error).__name__])[0]
    if name == "wandb":
        return (f"wandb could not start for log.wandb_project = {run.project!r}: {first} "
                f"(run `wandb login`, or set WANDB_MODE=offline)")
    if name == "mlflow":
        import mlflow

        return f"mlflow could not start with tracking URI {mlflow.get_tracking_uri()}: {first}"
    return f"{name} could not start: {first}"


class Recorder:
    """Writes records to metrics.jsonl and the trackers (main process only); does nothing on other ranks.
    `tracked`: None for no trackers; `resume_step`, `resume_bytes`: drop records past the checkpoint resumed from."""

    def __init__(self, accelerator, run_dir: Path, tracked: TrackedRun | None, resume_step: int | None = None,
                 resume_bytes: int | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / METRICS
        self.names = set(tracked.trackers) if tracked is not None and self.main else set()
        self.failure = None  # a write that failed here, raised on every rank at the next checkpoint (never alone)
        if self.main and resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: they will be produced again. The checkpoint says
            # how much of the file was written when it was saved; by step alone, the records of its own step that a
            # later, killed run wrote (an owed validation) would stay and be written twice.
            text = self.path.read_bytes()
            if resume_bytes is not None and resume_bytes <= len(text):
                kept = text[:resume_bytes].decode()
            else:  # a checkpoint older than its record of the file's size
                kept = "".join(line + "\n" for line in text.decode().splitlines() if _step_of(line) <= resume_step)
            write_text(self.path, kept)
        self.open_mark = Path(run_dir) / TRACKERS_OPEN
        if self.names:
            start_trackers(accelerator, tracked, Path(run_dir), resume_step)
            write_text(self.open_mark, f"{tracked.job}\n")  # removed when they are closed: left, a kill cut them short
            if resume_step is not None:
                self.replay(resume_step)

    def replay(self, resume_step: int) -> None:
        """A resumed run's trackers made whole from metrics.jsonl as the checkpoint left it: each gets the points it
        lacks, in step order, before the run goes on (`LACKING` says which for each tracker). A kill loses what a
        tracker had not written yet (wandb keeps up to 15 s in memory, and its offline directories cannot be
        merged); metrics.jsonl, cut back to the checkpoint, is the record of what happened."""
        kept = self.records()
        said = []
        for name in sorted(self.names):
            tracker = self.accelerator.get_tracker(name)
            missing = LACKING[name](tracker, kept, resume_step)
            for step, values in missing:
                tracker.log(values, step=step)
            if missing:
                said.append(f"{name} {len(missing)} (steps {missing[0][0]}-{missing[-1][0]})")
        if said:
            self.accelerator.print(f"trackers: replayed from {METRICS} the records they lacked: {', '.join(said)}")

    def records(self) -> list[dict]:
        """Every record metrics.jsonl holds (main process; a line cut short is skipped)."""
        records = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def _tracker(self, name: str):
        return self.accelerator.get_tracker(name, unwrap=True) if name in self.names else None

    def log(self, record: dict, step: int | None, write_jsonl: bool = True) -> None:
        if not self.main:
            return
        record = {k: clean_number(v) for k, v in record.items()}
        if write_jsonl and self.failure is None:
            size = self.path.stat().st_size if self.path.exists() else 0
            try:  # a refused append is cut back to the last whole line
                with writing(self.path, cleanup=lambda: os.truncate(self.path, size) if self.path.exists() else None):
                    failpoint("metrics.before_append")
                    with open(self.path, "a") as handle:
                        handle.write(json.dumps({"step": step, **record}) + "\n")
                    failpoint("metrics.after_append")
            except WriteFailed as error:
                self.failure = error
        if self.names:
            self.accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)

    def image(self, key: str, path: Path, step: int | None) -> None:
        if not self.main:
            return
        if (run := self._tracker("wandb")) is not None:
            import wandb

            run.log({key: wandb.Image(str(path))}, step=step)
        if (writer := self._tracker("tensorboard")) is not None:
            from matplotlib.image import imread

            writer.add_image(key, imread(str(path))[..., :3], global_step=step, dataformats="HWC")
        if self._tracker("mlflow") is not None:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=mlflow_key(key.rpartition("/")[0]) or None)

    def table(self, key: str, rows: list[dict]) -> None:
        """Rows of equal keys as a wandb table, a TensorBoard text table and an MLflow JSON artifact (NaN as empty)."""
        if not self.main or not rows:
            return
        columns = list(rows[0])
        data = [[clean_number(row[c]) for c in columns] for row in rows]
        if (run := self._tracker("wandb")) is not None:
            import wandb

            run.log({key: wandb.Table(columns=columns, data=data)})
        if (writer := self._tracker("tensorboard")) is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                        for v in row) + " |" for row in data]
            writer.add_text(key, "\n".join(lines))
        if self._tracker("mlflow") is not None:
            import mlflow

            mlflow.log_dict({"columns": columns, "data": data}, mlflow_key(key) + ".json")

    def summary(self, values: dict) -> None:
        if (run := self._tracker("wandb")) is not None and self.main:
            for key, value in values.items():
                run.summary[key] = clean_number(value)

    def finish(self) -> None:
        """Close the trackers. Not `end_training()`: that also tears down the process group, which only the end of
        a command, on every rank, may do."""
        if self.main and self.names:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.open_mark.unlink(missing_ok=True)
            self.names = set()
