"""How a run ends: its `RunResult`, what is written and said at the end of each kind of ending (finished, stopped
early, pruned, interrupted, diverged, or already finished when a requeued job finds nothing to do), and the run's
summary.json kept current (`summary`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.core.processes import is_main_process
from smptrain.core.storage import WriteFailed
from smptrain.training.checkpoint import MONITOR, raise_pending
from smptrain.training.divergence import TrainingStopped
from smptrain.training.layout import BEST, LAST, checkpoint_link, checkpoints_dir
from smptrain.training.prepare import Run, finish_trackers_left_open
from smptrain.training.runs import Opening, tidy
from smptrain.training.summary import update_summary


@dataclass
class RunResult:
    """How a run ended: what the CLI, cross-validation and tuning read."""

    status: str  # finished | early-stopped | pruned | interrupted | diverged
    run_dir: Path | None  # None when a new run was interrupted before its first step (nothing was kept)
    best: dict = field(default_factory=dict)  # metrics of the best validation ({} before the first)
    last: dict = field(default_factory=dict)  # metrics of the last validation
    epochs: int = 0
    steps: int = 0
    message: str = ""  # why it stopped early


def already_finished(opening: Opening) -> RunResult:
    """A resumed run with nothing left to do (a requeued job whose run had finished): nothing is written, unless a
    kill after the last checkpoint left something to tidy or trackers to close. Another dataset than the run's is
    still refused, as it would be for a run with epochs left."""
    from smptrain.data.darts import open_dataset

    opening.require_data(open_dataset(opening.cfg.data.dir, opening.cfg.data.band_normalisation))
    state = opening.state
    if is_main_process():
        tidy(opening)  # what a kill after its last checkpoint left; nothing, for a tidy run
    finish_trackers_left_open(opening)
    if is_main_process():
        print(f"{opening.run_dir}: the run has already finished ({state.epoch} epoch(s), {state.step} step(s), "
              f"best {MONITOR} = {state.best if state.best is None else round(state.best, 4)}); nothing to do "
              f"(raise train.max_epochs to train it further)", flush=True)
    return RunResult("early-stopped" if state.early_stopped else "finished", opening.run_dir, opening.best,
                     opening.last, state.epoch, state.step, "already finished")


def stop_interrupted(run: Run, epoch: int, saved: bool = False) -> RunResult:
    """Ctrl-C / SIGTERM: write `last` at the current step (mid-epoch if need be; `saved`: the validation just done
    wrote it) and close the trackers."""
    if not saved:
        run.keeper.save_interrupted(run.model, epoch, run.recorder.failure)
    summarise(run, "interrupted")
    run.recorder.finish()
    return RunResult("interrupted", run.run_dir, run.best, run.last, run.state.epoch, run.state.step,
                     f"stopped at step {run.state.step} (epoch {epoch + 1}/{run.cfg.train.max_epochs}); saved "
                     f"{checkpoint_link(run.run_dir, LAST)}")


def discard_if_nothing_saved(run: Run | None) -> None:
    """Remove a new run's directory when it stopped before writing any checkpoint: it holds nothing to resume,
    and leaving it would make the corrected re-run fail ("already exists") and --resume fail too."""
    if run is None or run.stop.undo is None or checkpoint_link(run.run_dir, LAST).exists():
        return
    run.recorder.finish()
    run.stop.undo()
    run.stop.undo = None


def end(run: Run | None, status: str, message: str = "") -> RunResult:
    """Close the trackers and say how the run ended."""
    if run is None:
        raise TrainingStopped(message)
    state = run.state
    summarise(run, status)
    raise_pending(run.accelerator, run.recorder.failure)  # a figure, record or summary the disk refused since the save
    if status != "diverged":
        run.recorder.summary({"best/" + MONITOR: state.best, "steps": state.step, "epochs": state.epoch})
    run.recorder.finish()
    if status in ("finished", "early-stopped", "pruned"):
        best = run.keeper.best_name
        run.accelerator.print(
            f"{'finished' if status != 'pruned' else message} after {state.epoch} epoch(s), {state.step} step(s); "
            f"best {MONITOR} = {state.best if state.best is None else round(state.best, 4)}"
            f"{f' ({best})' if best else ''}\ncheckpoints: {checkpoints_dir(run.run_dir)} ({LAST}, {BEST})\n"
            f"run directory: {run.run_dir}")
    return RunResult(status, run.run_dir, run.best, run.last, state.epoch, state.step, message)


def summarise(run: Run, status: str) -> None:
    """Main process: summary.json as the run stands now (a write the disk refuses is raised on every rank at the
    next checkpoint or the end, as for a figure). Nothing for a new run whose directory was discarded."""
    if not run.accelerator.is_main_process or not run.run_dir.is_dir():
        return
    last = checkpoint_link(run.run_dir, LAST)
    try:
        update_summary(run.run_dir, run_name=run.keeper.describe["run_name"], run_id=run.keeper.describe["run_id"],
                       status=status, epochs=run.state.epoch, max_epochs=run.cfg.train.max_epochs,
                       steps=run.state.step, monitor=MONITOR,
                       best={"value": run.state.best, "checkpoint": run.keeper.best_name, "metrics": run.best},
                       last={"checkpoint": os.readlink(last) if last.is_symlink() else None, "metrics": run.last},
                       wall_time_s=run.clock.total() if run.clock else None, device=str(run.accelerator.device),
                       precision=run.precision, world_size=run.accelerator.num_processes)
    except WriteFailed as error:
        run.recorder.failure = run.recorder.failure or error
