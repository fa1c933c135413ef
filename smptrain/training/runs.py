"""Opening a run directory: a new one created, or the one being resumed read back; its clean-up, and its identity
(where its data is, and whether a dataset is the one it was trained on). The names inside it: `layout`.

A run records its paths absolute (so test, convert and resume work from any working directory) and, in `run.json`,
the paths as they were given, where the dataset lies relative to the run directory, and a fingerprint of the
dataset. When the data has moved, a resumed or tested run finds it again next to the run (both moved together), or
takes `--set data.dir=NEW` if the dataset there has the same fingerprint; a different dataset is refused for
resuming.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.config import Config, replace
from smptrain.core.errors import UserError
from smptrain.core.failpoints import failpoint
from smptrain.core.processes import is_main_process, on_main
from smptrain.core.storage import write_text, writing
from smptrain.training.checkpoint import TrainState, point, prune
from smptrain.training.layout import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    IDENTITY,
    LAST,
    PREVIEWS,
    SPLITS,
    checkpoint_link,
    checkpoints_dir,
    has_checkpoint,
    now,
)
from smptrain.training.loading import read_meta


def create_run_dir(cfg: Config, splits: dict, world_size: int, given: dict, info) -> list:
    """Main process: a new run directory with its config, split manifest and identity; [path, name, id]."""
    from smptrain.config import dump_toml
    from smptrain.training.tracking import new_run_id, new_run_name

    artifact_dir = Path(cfg.log.artifact_dir)
    name = cfg.log.run_name or new_run_name(artifact_dir)
    run_dir = artifact_dir / name
    if run_dir.exists():
        raise UserError(f"run directory {run_dir} already exists; continue it with --resume {run_dir} or choose "
                        f"another log.run_name")
    run_id = new_run_id()
    # Made under a hidden name and renamed into place: a kill at any moment leaves the run directory complete or
    # absent (a half-made one would stop every requeued `--resume auto`); a leftover of a killed start goes first.
    tmp = artifact_dir / f".{name}.creating"
    for leftover in (tmp, artifact_dir / f".{name}.removing"):
        shutil.rmtree(leftover, ignore_errors=True)
    with writing(run_dir, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        checkpoints_dir(tmp).mkdir(parents=True)
        failpoint("run_dir.created")
        (tmp / PREVIEWS).mkdir()
        (tmp / CONFIG).write_text(dump_toml(cfg))
        (tmp / SPLITS).write_text(json.dumps(splits) + "\n")
        (tmp / IDENTITY).write_text(json.dumps({"run_name": name, "run_id": run_id, "created": now(),
                                                "world_size": world_size, **identity(cfg, given, info, run_dir)},
                                               indent=2) + "\n")
        try:
            os.rename(tmp, run_dir)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"run directory {run_dir} already exists; continue it with --resume {run_dir} or choose "
                            f"another log.run_name") from None
    return [str(run_dir), name, run_id]


@dataclass
class Opening:
    """A run as `begin` finds it: the one value that says whether the run is new or resumed, and what a resumed run
    brings back; set-up, the loop and the trackers read it instead of asking again.

    A new run knows only its configuration until `open_run` creates its directory (after every check, so that a
    mistake leaves nothing behind). A resumed run is read back once, from its directory and its `last` checkpoint."""

    cfg: Config  # paths absolute; a resumed run's data found again if it moved with the run
    given: dict  # the paths as given, for a new run's run.json
    resumed: bool = False
    run_dir: Path | None = None  # None until a new run's directory exists
    run_name: str = ""
    run_id: str = ""
    splits: dict | None = None  # a resumed run's own; a new run's are made from the data
    state: TrainState = field(default_factory=TrainState)  # the counters, as `last` left them
    best: dict = field(default_factory=dict)  # metrics of the best and of the last validation so far
    last: dict = field(default_factory=dict)
    world_size: int | None = None  # the processes a resumed run used
    records: int | None = None  # bytes of metrics.jsonl at `last` (None: a checkpoint older than this record)
    followed: object | None = None  # the TrainConfig the run followed until `last` (its schedule), when resumed

    @property
    def finished(self) -> bool:
        """A resumed run with nothing left to do: every epoch trained and validated, or stopped early."""
        return self.resumed and not self.state.validation_owed and (
            self.state.epoch >= self.cfg.train.max_epochs or self.state.early_stopped)

    def require_data(self, info) -> None:
        """A resumed run continues only on the dataset it was trained on."""
        if self.resumed:
            require_same_data(self.run_dir, info)


def begin(cfg: Config, resume: Path | None) -> Opening:
    """The run `cfg` and `resume` describe: a new one (nothing is written yet), or the run in `resume`, read back
    from its `last` checkpoint with its data found again if it moved, living where its directory is now."""
    if resume is None:
        cfg, given = absolute_paths(cfg)
        return Opening(cfg, given)
    resume = Path(resume)
    if not has_checkpoint(resume):
        raise UserError(f"{resume} has no complete checkpoint to resume from ({CHECKPOINTS}/{LAST} is missing)")
    meta = read_meta(checkpoint_link(resume, LAST))
    cfg = replace(find_data(resume, cfg), **{"log.artifact_dir": str(resume.absolute().parent)})
    state = TrainState(**meta["train_state"])
    if state.early_stopped and state.bad_validations < cfg.train.early_stopping_patience:
        state.early_stopped = False  # the patience was raised on resume
    best = read_meta(checkpoint_link(resume, BEST)).get("metrics", {}) if has_checkpoint(resume, BEST) else {}
    return Opening(cfg, {}, True, resume, meta["run_name"], meta["run_id"], json.loads((resume / SPLITS).read_text()),
                   state, best, meta.get("metrics") or {}, meta.get("world_size"), meta.get("metrics_bytes"),
                   followed_schedule(meta))


def followed_schedule(meta: dict):
    """The TrainConfig a checkpoint was trained under (None for one whose configuration cannot be read back)."""
    from smptrain.config import from_dict

    try:
        return from_dict({"train": meta["config"]["train"]}, "the checkpoint's meta.json", choices=False).train
    except (KeyError, UserError):
        return None


def open_run(accelerator, opening: Opening, splits: dict, info) -> Opening:
    """The run's directory, once everything is checked (every rank calls it; the main process writes). A new run
    is named and created by the main process and broadcast; a resumed run's config.toml takes the `--set` changes
    resuming allows."""
    from smptrain.config import dump_toml

    cfg = opening.cfg
    if opening.resumed:
        def settle():  # what a kill left behind goes; config.toml takes the --set changes resuming allows
            tidy(opening)
            write_text(opening.run_dir / CONFIG, dump_toml(cfg))

        on_main(settle, opening.run_dir / CONFIG)
        if opening.world_size != accelerator.num_processes:
            accelerator.print(f"note: the run used {opening.world_size} process(es), this one uses "
                              f"{accelerator.num_processes}; the data order changes, so the continuation is not exact")
        return opening
    run_dir, name, run_id = on_main(lambda: create_run_dir(cfg, splits, accelerator.num_processes, opening.given, info),
                                    Path(cfg.log.artifact_dir))
    return dataclasses.replace(opening, run_dir=Path(run_dir), run_name=name, run_id=run_id, splits=splits)


def tidy(opening: Opening) -> None:
    """Main process, resuming: what a kill left in the run directory goes (temporaries; `best` not yet pointing to
    the best checkpoint of the top-k; checkpoints that a kill between linking and pruning kept); a tidy directory is
    left as it is, byte for byte."""
    remove_temporaries(opening.run_dir)
    best = opening.state.top_k[0][1] if opening.state.top_k else None
    link = checkpoint_link(opening.run_dir, BEST)
    if (os.readlink(link) if link.is_symlink() else None) != best:  # killed between linking `last` and `best`
        point(opening.run_dir, BEST, best)
    prune(opening.run_dir, {name for _, name in opening.state.top_k})


def remove_temporaries(run_dir: Path) -> None:
    """What a process killed while writing left in a run directory: hidden temporaries of `storage.replacing`
    (`.NAME.PID-THREAD.tmp`) and of checkpoints being assembled (`checkpoints/.tmp-NAME`)."""
    for path in list(Path(run_dir).rglob(".*")):
        if path.name.endswith(".tmp") and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
        elif path.parent.name == CHECKPOINTS and path.name.startswith(".tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def remover(accelerator, run_dir: Path):
    """What removes a new run's directory when it ends before its first checkpoint (None off the main process):
    it holds nothing to resume, and leaving it would make the corrected re-run stop with "already exists"."""
    if not accelerator.is_main_process:
        return None
    return lambda: remove_run_dir(run_dir)


def remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory so that a kill halfway leaves none: renamed to a hidden name first (one step), then
    deleted; `create_run_dir` clears what a killed removal left."""
    gone = run_dir.with_name(f".{run_dir.name}.removing")
    try:
        os.rename(run_dir, gone)
    except FileNotFoundError:
        return
    except OSError:
        gone = run_dir
    shutil.rmtree(gone, ignore_errors=True)


PATH_KEYS = (("data", "dir"), ("log", "artifact_dir"), ("model", "encoder_weights"), ("model", "weights_from"))


def absolute_paths(cfg: Config) -> tuple[Config, dict]:
    """cfg with its paths made absolute, and the paths as given ({section.key: value})."""
    from smptrain.model.network import is_weights_file

    given, changes = {}, {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not value or (key == "encoder_weights" and not is_weights_file(value)):  # "none", "imagenet": names
            continue
        given[f"{section}.{key}"] = value
        changes[f"{section}.{key}"] = str(Path(value).expanduser().absolute())
    return replace(cfg, **changes), given


def fingerprint(info) -> dict:
    """What makes a dataset the same one: rows, patch size, band names and a checksum of the training metadata."""
    columns = info.metadata.sort_index()[["sample_id", "region", "empty"]]
    digest = hashlib.sha256(columns.to_csv().encode()).hexdigest()
    return {"rows": int(info.num_rows), "patch_size": int(info.patch_size), "bands": list(info.bands),
            "metadata_sha256": digest}


def identity(cfg: Config, given: dict, info, run_dir: Path) -> dict:
    """What run.json records about the data, next to the run's name and id."""
    return {"paths_as_given": given, "data_fingerprint": fingerprint(info),
            "data_dir_from_run": os.path.relpath(Path(cfg.data.dir).absolute(), Path(run_dir).absolute())}


def read_identity(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / IDENTITY).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def find_data(run_dir: Path, cfg: Config) -> Config:
    """cfg whose data.dir is where the run's dataset is now: as configured, or (when that path is gone) where it
    lies relative to the run directory, for data and runs moved together."""
    if Path(cfg.data.dir).is_dir():
        return cfg
    relative = read_identity(run_dir).get("data_dir_from_run")
    moved = (Path(run_dir).absolute() / relative).resolve() if relative else None
    if moved is not None and moved.is_dir():
        return replace(cfg, **{"data.dir": str(moved)})
    raise UserError(f"the dataset of run {run_dir} is not at {cfg.data.dir} any more; if it moved, give its new "
                    f"place with --set data.dir=NEW")


def is_same_data(run_dir: Path, info) -> bool | None:
    """Whether `info` is the dataset the run was trained on (None when the run predates fingerprints)."""
    expected = read_identity(run_dir).get("data_fingerprint")
    return None if expected is None else expected == fingerprint(info)


def require_same_data(run_dir: Path, info) -> None:
    expected = read_identity(run_dir).get("data_fingerprint")
    if expected is None:
        return
    found = fingerprint(info)
    if found != expected:
        differing = next(key for key in expected if expected[key] != found.get(key))
        raise UserError(f"{info.root} is not the dataset run {Path(run_dir).name} was trained on (its {differing} "
                        f"differs); resuming needs the same dataset: give its place with --set data.dir=PATH")


# Keys a resumed run may change with --set; anything else would make the continuation a different experiment.
RESUMABLE = {"data.dir", "train.max_epochs", "train.early_stopping_patience", "train.val_every_n_epochs", "data.num_workers",
             "data.in_memory", "data.memory_device", "data.reader", "log.log_every_n_steps", "log.preview_every_n_val",
             "log.progress"}


def start_or_continue(cfg: Config | None) -> tuple[Config, Path | None]:
    """`--resume auto`: (cfg, None) to start the run `{log.artifact_dir}/{log.run_name}`, or (its configuration with
    this one's resumable keys, its directory) to continue it. A directory that never got a checkpoint is started
    over; one whose configuration differs outside RESUMABLE is refused, naming the first such key."""
    if cfg is None:
        raise UserError("--resume auto needs --config (the run it starts the first time)")
    if not cfg.log.run_name:
        raise UserError("--resume auto needs log.run_name, so that the re-run of the same command finds its run")
    run_dir = Path(cfg.log.artifact_dir) / cfg.log.run_name
    if not run_dir.exists():
        return cfg, None
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} exists and is not a run directory (no {CONFIG}); choose another log.run_name")
    if not has_checkpoint(run_dir):  # started, but killed before its first checkpoint: nothing to continue
        if is_main_process():  # the other ranks decide the same, from the same files
            remove_run_dir(run_dir)
        return cfg, None
    return continued(run_dir, cfg, "--resume auto")


def continued(run_dir: Path, cfg: Config, how: str) -> tuple[Config, Path]:
    """(the run's configuration with `cfg`'s RESUMABLE keys, its directory): `cfg` must describe the same run."""
    from smptrain.config import load_config, to_dict

    stored, given = to_dict(load_config(run_dir / CONFIG)), to_dict(absolute_paths(cfg)[0])
    for section, values in stored.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE and name not in ("log.artifact_dir", "log.run_name") and given[section][key] != value:
                raise UserError(f"{run_dir} holds a run with {name} = {value!r}, but this configuration says "
                                f"{given[section][key]!r}; {how} continues only the same run (these may "
                                f"change: {', '.join(sorted(RESUMABLE))})")
    changes = {name: given[name.split(".")[0]][name.split(".")[1]] for name in RESUMABLE}
    return replace(load_config(run_dir / CONFIG), **changes), run_dir


def requested(config_path: str | None, overrides=(), resume: str | None = None,
              debug: bool = False) -> tuple[Config, Path | None]:
    """(configuration, run directory to continue or None) for the training command's options: `--config` and
    `--set` start a run; `--resume DIR` continues DIR with its own config.toml (`--set` may change the RESUMABLE
    keys), or with the `--config` it was started with (the same run, the RESUMABLE keys aside: adding `--resume` to
    the original command works); `--resume auto` starts or continues the run `log.run_name` names."""
    from smptrain.cli import read_options, require_config
    from smptrain.training.layout import runs_beside

    if resume == "auto":
        return start_or_continue(read_options(config_path, overrides, debug).config if config_path else None)
    if resume is None:
        loaded = read_options(require_config(config_path, "to start a run"), overrides, debug)
        if "data.dir" not in loaded.given and is_main_process():  # a my.toml that forgot it trains on the demo data
            print(f"note: {loaded.source} sets no data.dir: training on the default, {loaded.config.data.dir}",
                  flush=True)
        return loaded.config, None
    resume = Path(resume)
    if not resume.is_dir():
        raise UserError(f"--resume {resume}: there is no such run directory; {runs_beside(resume)}")
    if not (resume / CONFIG).is_file():
        raise UserError(f"--resume {resume} is not a run directory (it has no {CONFIG}); {runs_beside(resume)}")
    if config_path:
        return continued(resume, read_options(config_path, overrides, debug).config, f"--resume {resume}")
    changed = [o.partition("=")[0].strip() for o in overrides if o.partition("=")[0].strip() not in RESUMABLE]
    if changed:
        raise UserError(f"--set {changed[0]} cannot change on resume; only {', '.join(sorted(RESUMABLE))} can")
    return read_options(str(resume / CONFIG), overrides, debug).config, resume
