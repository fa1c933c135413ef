"""Training: `accelerate launch -m smptrain.train --config configs/base.toml [--set k=v ...] [--resume RUN_DIR]`.

`train()` reads top to bottom: `set_up()` (accelerator, data, model, run directory, resumed state), then for each
epoch `train_one_epoch()` and, on DARTS' cadence, `validate_and_keep()`. It returns a `RunResult` (finished,
early-stopped, pruned, interrupted or diverged) instead of ending the process, so cross-validation and tuning call
it like any function; `main()` turns the result into an exit status. Progress is counted in optimizer steps;
DARTS' cadence (learning-rate decay, validation, patience) in epochs and validations.

Exact resume: the data order is a function of (seed, epoch), augmentations of (seed, epoch, micro-step, rank), the
learning rate of the epoch; weights, optimizer, scaler and RNG come back from Accelerate's state. So training 4
epochs equals training 2, stopping, and resuming to 4 (on CUDA with train.deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import torch
from tqdm.auto import tqdm

from smptrain.augment import augment, augment_generator
from smptrain.breakdown import validation_regions
from smptrain.checkpoint import MONITOR, CheckpointKeeper, TrainState, checkpoint_name, read_meta
from smptrain.cli import config_options, resolve_config
from smptrain.config import Config, dump_toml, to_dict
from smptrain.dataset import EvalBatches, PatchDataset, TrainBatches, open_dataset
from smptrain.errors import UserError, report_user_errors
from smptrain.evaluate import evaluate, sample_figure, write_curves
from smptrain.feed import feed, optimizer_state_to_come, place_in_memory
from smptrain.labels import OUTPUT_CLASSES
from smptrain.losses import Loss, loss_from_config
from smptrain.model import (build_model, check_patch_size, nondeterministic_on_cuda, segmentation_logits,
                            warm_start)
from smptrain.runs import absolute_paths, find_data, identity, require_same_data
from smptrain.runtime import (choose_precision, configure_threads, describe_precision, end_processes,
                              local_processes, make_accelerator)
from smptrain.splits import make_splits
from smptrain.tracking import Recorder, new_run_id, new_run_name

# Keys a resumed run may change with --set; anything else would make the continuation a different experiment.
RESUMABLE = {"data.dir", "train.max_epochs", "train.early_stopping_patience", "train.val_every_n_epochs", "data.num_workers",
             "data.in_memory", "data.memory_device", "data.reader", "log.log_every_n_steps", "log.preview_every_n_val"}
MAX_SKIPPED_FP16_STEPS = 25  # consecutive fp16 overflow skips before we call the loss diverged


class TrainingStopped(UserError):
    """Training cannot go on (non-finite loss); the message names the step and the last good checkpoint."""


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


@dataclass
class Run:
    """Everything a run's phases share; built once by `set_up()`."""

    cfg: Config
    accelerator: object
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Loss
    train_set: PatchDataset
    val_set: PatchDataset
    batches: TrainBatches
    train_loader: object
    val_loader: object
    run_dir: Path
    recorder: Recorder
    keeper: CheckpointKeeper
    state: TrainState
    stop: "StopSignal"
    guard: "NonFiniteGuard | None"
    previews: list[int]
    val_regions: list[str]  # the region of each validation sample, for per-region IoU
    best: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)
    skipped_in_row: int = 0  # fp16 steps the grad scaler skipped in a row, and in all
    skipped_total: int = 0


def train(cfg: Config, resume: Path | None = None, on_validation: Callable[[int, dict], bool] | None = None,
          trust_pickle: bool = False) -> RunResult:
    """Train a model as `cfg` says (or continue the run in `resume`). Every rank calls it.

    `on_validation(validations, metrics)` is called after each validation (on every rank, with the same numbers);
    returning True ends the run there as "pruned" (how tuning drops hopeless trials).
    """
    stop = StopSignal()  # before the first step a signal ends the run at once: there is nothing to save yet
    run = None
    try:
        run = set_up(cfg, resume, stop, trust_pickle)
        while run.state.epoch < cfg.train.max_epochs and not run.state.early_stopped:
            epoch = run.state.epoch
            # One pass over the training split; False when the ranks agreed to stop for a signal.
            if not train_one_epoch(run, epoch):
                return stop_interrupted(run, epoch)
            # DARTS' cadence: validate every n epochs and after the last one, then select, save and preview.
            if (epoch + 1) % cfg.train.val_every_n_epochs == 0 or epoch + 1 == cfg.train.max_epochs:
                validate_and_keep(run, epoch)
                if on_validation is not None and on_validation(run.state.validations, run.last):
                    return end(run, "pruned", f"pruned after validation {run.state.validations}")
        return end(run, "early-stopped" if run.state.early_stopped else "finished")
    except TrainingStopped as error:  # diverged: nothing more is saved, the last good checkpoint stays
        discard_if_nothing_saved(run)
        return end(run, "diverged", str(error))
    except Interrupted as interruption:
        if interruption.undo is not None:
            interruption.undo()
        if run is not None:
            run.recorder.finish()
        kept = run.run_dir if run is not None and interruption.undo is None else resume
        return RunResult("interrupted", kept, message=str(interruption))
    except Exception:  # bad data met mid-run, or a bug: a new run that saved nothing must not block the re-run
        discard_if_nothing_saved(run)
        raise
    finally:
        stop.restore()


# --- the phases of train(), in the order it uses them -------------------------------------------------------------


def set_up(cfg: Config, resume: Path | None, stop: "StopSignal", trust_pickle: bool = False) -> Run:
    """Accelerator, data, model and optimizer, then (only once all of them are checked) the run directory, the
    resumed state and the trackers."""
    # Paths absolute, so the run can be tested, converted and resumed from anywhere; a resumed run finds its data
    # again if it moved with the run, and lives where its directory is now.
    if resume is None:
        cfg, given = absolute_paths(cfg)
    else:
        cfg = find_data(resume, cfg)
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, artifact_dir=str(resume.absolute().parent)))
        given = {}
    precision, why = choose_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(precision, "wandb" if cfg.log.wandb_project else None, cfg.train.grad_accum_steps,
                                   cfg.train.deterministic)
    say = accelerator.print
    threads = configure_threads(cfg.train.threads, local_processes(accelerator))
    say(f"precision: {describe_precision(precision)} ({why}); {threads} CPU thread(s) per process")

    # Data as it is on disk and the split manifest (make_splits refuses empty sets; a resumed run keeps its own).
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    if resume is not None:
        require_same_data(resume, info)
    band_indices = info.band_indices(cfg.data.bands)
    # Every check of config and data comes before anything is written: a mistake found once the run directory
    # exists would leave it behind, and the corrected command would then stop with "already exists".
    bands = info.band_meta(band_indices)  # a band without normalisation is refused here
    loss_fn = loss_from_config(cfg.train)
    splits = (json.loads((resume / "splits.json").read_text()) if resume
              else make_splits(info.metadata, cfg.data, cfg.train.seed))
    model, optimizer = build_for_training(cfg, accelerator, precision, len(band_indices), info.patch_size,
                                          None if resume else cfg.model.weights_from, trust_pickle)
    train_set, val_set, batches, train_loader, val_loader = build_data(cfg, accelerator, info, splits, band_indices,
                                                                       optimizer_state_to_come(optimizer))
    previews = pick_previews(info, splits["val"])
    val_regions = info.metadata.loc[val_set.rows, "region"].astype(str).tolist()
    note = determinism_note(cfg.model.arch, cfg.model.encoder, len(band_indices), info.patch_size,
                            accelerator.device.type, cfg.train.deterministic)
    if note:
        say(note)

    # Only now the run directory (named once by the main process).
    run_dir, run_name, run_id, meta = open_run(accelerator, cfg, resume, splits, given, info)
    if not meta and accelerator.is_main_process:
        stop.undo = lambda: shutil.rmtree(run_dir, ignore_errors=True)  # a new run that saved nothing leaves nothing
    try:
        state = TrainState(**meta["train_state"]) if meta else TrainState()
        say(f"run directory: {run_dir}")
        if meta:
            restore(accelerator, run_dir, run_name, state)
        recorder = Recorder(accelerator, run_dir, cfg.log.wandb_project, cfg.log.wandb_entity, run_name, run_id,
                            to_dict(cfg), Path(cfg.log.artifact_dir), resume_step=state.step if meta else None,
                            group=cfg.log.wandb_group)
    except Exception:
        if stop.undo is not None:
            stop.undo()
            stop.undo = None
        raise
    describe = dict(run_name=run_name, run_id=run_id, world_size=accelerator.num_processes, mixed_precision=precision,
                    patch_size=info.patch_size,
                    model={"arch": cfg.model.arch, "encoder_name": cfg.model.encoder, "in_channels": len(band_indices),
                           "classes": OUTPUT_CLASSES},
                    bands=bands, config=to_dict(cfg))
    if state.early_stopped and state.bad_validations < cfg.train.early_stopping_patience:
        state.early_stopped = False  # the patience was raised on resume
    run = Run(cfg, accelerator, precision, model, optimizer, loss_fn, train_set, val_set, batches,
              train_loader, val_loader, run_dir, recorder,
              CheckpointKeeper(accelerator, run_dir, describe, cfg.train.save_top_k, state), state, stop,
              NonFiniteGuard(optimizer, accelerator.device) if precision != "fp16" else None, previews, val_regions)
    if meta:
        run.last = meta.get("metrics") or {}
        best = run_dir / "checkpoints" / "best"
        run.best = read_meta(best).get("metrics", {}) if (best / "meta.json").is_file() else {}
    say(f"loss: {run.loss_fn.describe()}")
    return run


def build_for_training(cfg: Config, accelerator, precision: str, in_channels: int, patch_size: int,
                       weights_from: str | None = None, trust_pickle: bool = False):
    """The model (same initial weights on every rank, or those of `weights_from`) and AdamW, prepared by
    Accelerate. A resumed run skips `weights_from`: its own checkpoint comes back afterwards."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, in_channels, cfg.model.encoder_weights)
    check_patch_size(model, cfg.model.arch, patch_size)
    if weights_from:
        warm_start(model, weights_from, trust_pickle)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The fused AdamW can skip a step on a device-side flag (NonFiniteGuard); under fp16 Accelerate's grad scaler
    # does the skipping and counts it, which only works with the unfused optimizer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=precision != "fp16")
    if cfg.train.compile:
        model = torch.compile(model)
    # prepare: DDP across processes, autocast for mixed precision, a grad scaler for fp16.
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.train.seed, device_specific=True)  # from here on each rank draws its own random numbers
    return model, optimizer


def build_data(cfg: Config, accelerator, info, splits: dict, band_indices: list[int], still_to_come: int = 0):
    """Training and validation sets, this rank's samplers, and the feeds that bring their batches to the device.
    `still_to_come`: bytes the optimizer will allocate at its first step, kept free when placing patches."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_set = PatchDataset(info, splits["train"], band_indices, cfg.data.in_memory, cfg.data.reader)
    val_set = train_set if splits["val"] == splits["train"] else PatchDataset(info, splits["val"], band_indices,
                                                                                cfg.data.in_memory, cfg.data.reader)
    batches = TrainBatches(len(train_set), cfg.train.batch_size, world, rank, cfg.train.seed, cfg.train.grad_accum_steps)
    if batches.steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_set)} patches, fewer than train.batch_size x processes x "
                        f"train.grad_accum_steps = {cfg.train.batch_size * world * cfg.train.grad_accum_steps}")
    if cfg.data.in_memory:
        where = place_in_memory([train_set, val_set], device, cfg.data.memory_device, still_to_come)
        size = train_set.nbytes + (val_set.nbytes if val_set is not train_set else 0)
        accelerator.print(f"patches in memory on the {'device' if where == 'device' else 'host'} ({size / 2**30:.2f} GiB)")
    train_loader = feed(train_set, batches, device, cfg.data.num_workers, cfg.train.seed, rank, cfg.train.channels_last)
    val_loader = feed(val_set, EvalBatches(len(val_set), cfg.train.batch_size, world, rank), device,
                      cfg.data.num_workers, cfg.train.seed, rank, cfg.train.channels_last)
    return train_set, val_set, batches, train_loader, val_loader


def open_run(accelerator, cfg: Config, resume: Path | None, splits: dict, given: dict, info):
    """The run directory and identity. A new run is named and created by the main process and broadcast; a resumed
    run is read by everyone from its `last` checkpoint. Returns (run_dir, run_name, run_id, meta or None)."""
    from accelerate.utils import broadcast_object_list

    if resume is not None:
        last = resume / "checkpoints" / "last"
        if not (last / "meta.json").is_file():
            raise UserError(f"{resume} has no complete checkpoint to resume from (checkpoints/last is missing)")
        meta = read_meta(last)
        if accelerator.is_main_process:
            (resume / "config.toml").write_text(dump_toml(cfg))  # the --set changes allowed on resume
        if meta.get("world_size") != accelerator.num_processes:
            accelerator.print(f"note: the run used {meta.get('world_size')} process(es), this one uses "
                              f"{accelerator.num_processes}; the data order changes, so the continuation is not exact")
        return resume, meta["run_name"], meta["run_id"], meta
    payload = [None, None, None]
    if accelerator.is_main_process:
        try:
            payload = create_run_dir(cfg, splits, accelerator.num_processes, given, info)
        except (UserError, OSError) as error:
            payload = [None, None, f"{error}" if isinstance(error, UserError) else
                       f"cannot create the run directory under {cfg.log.artifact_dir}: {error}"]
    broadcast_object_list(payload)  # every rank calls it, also when the main process failed
    if payload[0] is None:
        raise UserError(payload[2])
    return Path(payload[0]), payload[1], payload[2], None


def create_run_dir(cfg: Config, splits: dict, world_size: int, given: dict, info) -> list:
    """Main process: a new run directory with its config, split manifest and identity; [path, name, id]."""
    from smptrain.checkpoint import now

    artifact_dir = Path(cfg.log.artifact_dir)
    name = cfg.log.run_name or new_run_name(artifact_dir)
    run_dir = artifact_dir / name
    if run_dir.exists():
        raise UserError(f"run directory {run_dir} already exists; continue it with --resume {run_dir} or choose "
                        f"another log.run_name")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "previews").mkdir()
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    (run_dir / "splits.json").write_text(json.dumps(splits) + "\n")
    run_id = new_run_id()
    (run_dir / "run.json").write_text(json.dumps({"run_name": name, "run_id": run_id, "created": now(),
                                                  "world_size": world_size, **identity(cfg, given, info, run_dir)},
                                                 indent=2) + "\n")
    return [str(run_dir), name, run_id]


def restore(accelerator, run_dir: Path, run_name: str, state: TrainState) -> None:
    """Weights, optimizer, grad scaler and every rank's RNG of `last`, loaded weights-only by Accelerate."""
    state_dir = run_dir / "checkpoints" / "last" / "state"
    try:
        accelerator.load_state(str(state_dir))
    except Exception as error:  # weights-only loading refuses pickled objects; a damaged file lands here too
        raise UserError(f"{state_dir} cannot be loaded safely (weights-only): {str(error).splitlines()[0][:200]}") from None
    accelerator.print(f"resuming {run_name} at epoch {state.epoch}, step {state.step}")


def determinism_note(arch: str, encoder: str, in_channels: int, patch_size: int, device_type: str,
                     deterministic: bool) -> str | None:
    """The one warning a train.deterministic run on CUDA gets when its model uses a backward kernel that has no
    deterministic CUDA implementation (PyTorch would otherwise warn per operator, without saying what it means)."""
    if not deterministic or device_type != "cuda":
        return None  # on the CPU every kernel smptrain uses is deterministic
    inexact = nondeterministic_on_cuda(arch, encoder, in_channels, patch_size)
    if inexact == []:
        return None
    import warnings

    # Said once here; PyTorch's own per-operator warnings would repeat it without the consequence.
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    what = (f"uses {' and '.join(inexact)} in its backward pass, which has no deterministic CUDA kernel"
            if inexact else "could not be checked for kernels without a deterministic CUDA implementation")
    return (f"warning: train.deterministic: {arch} with {encoder} {what}; this run and its resumed continuation are "
            f"not bitwise exact on CUDA (Unet, UnetPlusPlus, MAnet and Linknet are)")


def pick_previews(info, val_rows: list[int], positives: int = 4, negatives: int = 2) -> list[int]:
    """Fixed preview samples: the first few validation patches with and without positives (positions in val)."""
    empty = info.metadata.loc[val_rows, "empty"].astype(bool).to_numpy()
    pos = [i for i, e in enumerate(empty) if not e][:positives]
    neg = [i for i, e in enumerate(empty) if e][:negatives]
    return pos + neg


def train_one_epoch(run: Run, epoch: int) -> bool:
    """One pass over the training split (from `state.micro_step` when resuming mid-epoch), logging every
    `log.log_every_n_steps` steps. Returns False when the ranks agreed to stop (a signal), True at the epoch's end."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    lr = cfg.train.lr * cfg.train.gamma ** epoch  # DARTS' ExponentialLR, stepped once per epoch
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.batches.set_epoch(epoch, start=state.micro_step)
    run.model.train()
    window = Window(accelerator.device)
    bar = tqdm(total=run.batches.steps_per_epoch * cfg.train.grad_accum_steps, initial=state.micro_step,
               desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process, leave=False)
    for x, y, _ in run.train_loader:
        window.arrived()
        step(run, epoch, x, y, window)
        bar.update(1)
        if accelerator.sync_gradients and state.step % cfg.log.log_every_n_steps == 0:
            if log_window(run, epoch, lr, window, bar):
                bar.close()
                return False
        window.fetching()
    bar.close()
    state.epoch, state.micro_step = epoch + 1, 0
    run.recorder.log({"epoch": epoch, "learning_rate": lr}, state.step)
    return not reduce_window(run, window, epoch)[1]


def step(run: Run, epoch: int, x: torch.Tensor, y: torch.Tensor, window: "Window") -> None:
    """One micro-batch: augment on the device, forward, backward, and (on the last micro-batch of an accumulation
    group) clip, guard and step. Nothing here waits for the device."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if cfg.train.augment:
        generator = augment_generator(accelerator.device, cfg.train.seed, epoch, state.micro_step, accelerator.process_index)
        x, y = augment(x, y, cfg.train.augment, generator)
    with accelerator.accumulate(run.model):  # no_sync on micro-steps; the loss is scaled by 1/grad_accum_steps
        loss = run.loss_fn(segmentation_logits(run.model, x), y)
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.guard is not None:
            run.guard.arm(gradient_norm(accelerator, run.model, cfg.train.grad_clip_norm))
        elif accelerator.sync_gradients and cfg.train.grad_clip_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.micro_step += 1
    run.stop.armed = True  # from here on a signal stops at the next logging step and writes checkpoints/last
    window.add(loss)
    if accelerator.sync_gradients:
        state.step += 1
        if run.precision == "fp16":
            count_fp16_skips(run, epoch)


def count_fp16_skips(run: Run, epoch: int) -> None:
    """The grad scaler skips overflowing steps (and lowers its scale); many in a row means divergence."""
    skipped = run.optimizer.step_was_skipped
    run.skipped_in_row = run.skipped_in_row + 1 if skipped else 0
    run.skipped_total += int(skipped)
    if run.skipped_in_row >= MAX_SKIPPED_FP16_STEPS:
        raise diverged(run.state.step - run.skipped_in_row + 1, run.run_dir, epoch,
                       f"the loss scale collapsed: {run.skipped_in_row} consecutive fp16 steps overflowed;")


def log_window(run: Run, epoch: int, lr: float, window: "Window", bar) -> bool:
    """A `train/loss` record for the steps since the last one; returns whether the ranks agreed to stop."""
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    mean_loss, stopping = reduce_window(run, window, epoch)
    samples = window.count * run.cfg.train.batch_size * run.accelerator.num_processes
    record = {"epoch": epoch, "train/loss": mean_loss, "learning_rate": lr, "perf/samples_per_s": samples / elapsed,
              "perf/data_wait_share": window.wait / elapsed,
              **({"perf/fp16_skipped_steps": run.skipped_total} if run.precision == "fp16" else {})}
    run.recorder.log(record, run.state.step)
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['perf/samples_per_s']:.1f}",
                    data=f"{record['perf/data_wait_share']:.0%}")
    window.reset()
    return stopping


def validate_and_keep(run: Run, epoch: int) -> None:
    """Validate the model every rank will save, pick top-k and best, decide early stopping, save, write previews."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    average_buffers(accelerator, run.model)  # every rank validates, and saves, the same BatchNorm statistics
    evaluation = evaluate(run.model, run.val_loader, accelerator, len(run.val_set), run.loss_fn, "val")
    metrics, value = evaluation.metrics, evaluation.metrics[MONITOR]
    name = checkpoint_name(epoch, state.step, value)
    improved = run.keeper.select(value, name)
    if not math.isfinite(value) or (0 < cfg.train.early_stopping_patience <= state.bad_validations):
        state.early_stopped = True
    run.last = metrics
    run.best = metrics if improved else run.best
    # per-region IoU when validation spans several regions (logged, not selected on)
    run.recorder.log({"epoch": epoch, **metrics, **validation_regions(evaluation, run.val_regions)}, state.step)
    accelerator.print(
        f"epoch {epoch} step {state.step} | val/loss {metrics['val/loss']:.4f} | {MONITOR} {value:.4f}"
        f"{' (best)' if improved else f' (best {state.best:.4f})'} | val/F1Score {metrics['val/F1Score']:.4f}"
        f" | val/AUROC {metrics['val/AUROC']:.4f}")
    run.keeper.save(run.model, epoch, metrics, name)
    every = cfg.log.preview_every_n_val
    if accelerator.is_main_process and every and (state.validations == 1 or state.validations % every == 0):
        write_previews(run, evaluation)
    if state.early_stopped:
        accelerator.print(f"early stopping: {MONITOR} has not improved for {state.bad_validations} validation(s)"
                          if math.isfinite(value) else f"stopping: {MONITOR} is {value}")


def write_previews(run: Run, evaluation) -> None:
    """Main process: curves and the fixed preview samples of this validation, to files and wandb."""
    previews, step_tag = run.run_dir / "previews", f"_step{run.state.step:06d}"
    label = f"{run.keeper.describe['run_name']}, step {run.state.step}"
    figures = write_curves(evaluation, previews, "val", tag=step_tag, label=label)
    if run.previews:
        figures["samples"] = sample_figure(
            run.accelerator.unwrap_model(run.model), run.val_set, run.previews, evaluation.pixel, run.accelerator.device,
            run.keeper.describe["bands"]["bands"], previews / f"val{step_tag}.png",
            f"{label}: validation preview", run.cfg.train.channels_last)
    for key, path in figures.items():
        run.recorder.image(f"val/{key}", path, run.state.step)


def stop_interrupted(run: Run, epoch: int) -> RunResult:
    """Ctrl-C / SIGTERM: write `last` at the current step (mid-epoch if need be) and close the trackers."""
    run.keeper.save_interrupted(run.model, epoch)
    run.recorder.finish()
    return RunResult("interrupted", run.run_dir, run.best, run.last, run.state.epoch, run.state.step,
                     f"stopped at step {run.state.step} (epoch {epoch}); saved {run.run_dir / 'checkpoints' / 'last'}")


def discard_if_nothing_saved(run: Run | None) -> None:
    """Remove a new run's directory when it stopped before writing any checkpoint: it holds nothing to resume,
    and leaving it would make the corrected re-run fail ("already exists") and --resume fail too."""
    if run is None or run.stop.undo is None or (run.run_dir / "checkpoints" / "last").exists():
        return
    run.recorder.finish()
    run.stop.undo()
    run.stop.undo = None


def end(run: Run | None, status: str, message: str = "") -> RunResult:
    """Close the trackers and say how the run ended."""
    if run is None:
        raise TrainingStopped(message)
    state = run.state
    if status != "diverged":
        run.recorder.summary({"best/" + MONITOR: state.best, "steps": state.step, "epochs": state.epoch})
    run.recorder.finish()
    if status in ("finished", "early-stopped", "pruned"):
        best = run.keeper.best_name
        run.accelerator.print(
            f"{'finished' if status != 'pruned' else message} after {state.epoch} epoch(s), {state.step} step(s); "
            f"best {MONITOR} = {state.best if state.best is None else round(state.best, 4)}"
            f"{f' ({best})' if best else ''}\ncheckpoints: {run.run_dir / 'checkpoints'} (last, best)\n"
            f"run directory: {run.run_dir}")
    return RunResult(status, run.run_dir, run.best, run.last, state.epoch, state.step, message)


# --- what the phases use ------------------------------------------------------------------------------------------


class Window:
    """The train loss and timers between two logging steps; the loss stays on the device until they are reduced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.count, self.wait = torch.zeros((), device=self.device), 0, 0.0
        self.start = self.fetch_start = time.perf_counter()

    def arrived(self) -> None:
        self.wait += time.perf_counter() - self.fetch_start

    def fetching(self) -> None:
        self.fetch_start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.count += 1


def average_buffers(accelerator, model) -> None:
    """Average float buffers (BatchNorm running statistics) over ranks, as timm's distribute_bn: each rank updated
    its own from its own batches, so without this rank 1 would validate a model that is not the one saved."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buffer in accelerator.unwrap_model(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(accelerator.reduce(buffer.detach().clone(), "mean"))


def gradient_norm(accelerator, model, clip: float) -> torch.Tensor:
    if clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class NonFiniteGuard:
    """Skips optimizer steps on the device once a gradient norm is not finite, without the host waiting for the GPU.

    Every step adds to a device counter when its norm is not finite or an earlier one was (so the weights stay
    those of the last good step), and hands the fused AdamW that count as its `found_inf` flag, the way the fp16
    grad scaler skips steps. The host reads the counter with the other logging numbers (`reduce_window`) and then
    stops every rank: gradients are averaged over ranks first, so all of them see the same norm.
    """

    def __init__(self, optimizer, device: torch.device):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)

    def arm(self, norm: torch.Tensor) -> None:
        self.skipped += ((~torch.isfinite(norm)) | (self.skipped > 0)).float()
        self.optimizer.found_inf = (self.skipped > 0).float()


def diverged(first_step: int, run_dir: Path, epoch: int, what: str) -> TrainingStopped:
    last = run_dir / "checkpoints" / "last"
    if not (last / "meta.json").is_file():
        return TrainingStopped(
            f"training stopped at step {first_step} (epoch {epoch}): {what} the weights were not updated from then "
            f"on. No checkpoint was written yet, so {run_dir} is removed; lower train.lr (or set "
            f"train.grad_clip_norm) or fix the data, then run the same command again")
    return TrainingStopped(
        f"training stopped at step {first_step} (epoch {epoch}): {what} the weights were not updated from then on. "
        f"The last good checkpoint is {last} (step {read_meta(last)['step']}); lower train.lr (or set "
        f"train.grad_clip_norm) or fix the data, then resume with --resume {run_dir}"
    )


def reduce_window(run: Run, window: Window, epoch: int) -> tuple[float, bool]:
    """Mean train loss over all ranks' micro-batches since the last record, and whether any rank was signalled.
    The one place the host waits for the device: it also reads the non-finite guard and stops on it."""
    device = window.loss_sum.device
    skipped = run.guard.skipped if run.guard is not None else torch.zeros((), device=device)
    packed = torch.stack([window.loss_sum.float(), torch.tensor(float(window.count), device=device),
                          torch.tensor(float(run.stop.raised), device=device), skipped.float()])
    packed = run.accelerator.reduce(packed, "sum").tolist()
    if packed[3] > 0:  # every rank has the same count: gradients were averaged before the norm
        skipped_steps = round(packed[3] / run.accelerator.num_processes)
        raise diverged(run.state.step - skipped_steps + 1, run.run_dir, epoch, "the gradient norm is not finite;")
    return packed[0] / max(packed[1], 1), packed[2] > 0


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """A signal ended the run where no checkpoint could be written (before the first step, or a second signal)."""

    def __init__(self, message: str, undo=None):
        super().__init__(message)
        self.undo = undo


class StopSignal:
    """SIGINT and SIGTERM (what SLURM sends before SIGKILL), in three phases.

    Before the first optimizer step (loading data, a cold `torch.compile`) there is nothing to save: the signal
    raises `Interrupted` at once, and a new run's directory is removed. Once armed, it sets a flag that all ranks
    agree on at the next logging step, which writes `checkpoints/last` and stops. A second signal raises
    `Interrupted` at once, without saving. `restore()` puts the previous handlers back.

    A launcher that passes a terminal's Ctrl-C on (torch elastic's agent, `smptrain-launch` when signalled alone)
    delivers it a second time to processes that already got it from the terminal: the same signal again within
    `SAME_REQUEST_S` counts as that one request, not as the second one that aborts.
    """

    SAME_REQUEST_S = 1.5

    def __init__(self):
        self.raised = False
        self.first = (None, 0.0)  # the first signal's number and time
        self.armed = False
        self.undo = None  # what to remove if interrupted before the first step
        self.previous = {}
        if sys.platform != "win32" and _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first[0] == signum and now - self.first[1] < self.SAME_REQUEST_S:
            return  # the same request, passed on by a launcher
        if self.first[0] is None:
            self.first = (signum, now)
        if not self.armed:
            raise Interrupted(f"{name} before the first training step finished: stopped, nothing to save", self.undo)
        if self.raised:
            raise Interrupted(f"{name} again: aborted without saving; checkpoints/last is the one written before")
        self.raised = True
        if _local_main():  # one message per machine, not one per process
            print(f"\n{name}: stopping at the next logging step, writing checkpoints/last "
                  f"(send it again to abort without saving)", file=sys.stderr, flush=True)


def _local_main() -> bool:
    """The first process on this machine (launchers set LOCAL_RANK; a process started alone is the first)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow model.weights_from to be a DARTS Lightning .ckpt (a pickle, which can run code).")
@config_options
@report_user_errors
def main(resume, trust_pickle, config_path, overrides, debug):
    """Train an smp binary segmentation model on a DARTS dataset."""
    if resume is not None:
        resume = Path(resume)
        if config_path:
            raise UserError("--resume takes the run's own config.toml; drop --config (use --set for "
                            f"{', '.join(sorted(RESUMABLE))})")
        if not (resume / "config.toml").is_file():
            raise UserError(f"{resume} is not a run directory (no config.toml)")
        changed = [o.partition("=")[0].strip() for o in overrides if o.partition("=")[0].strip() not in RESUMABLE]
        if changed:
            raise UserError(f"--set {changed[0]} cannot change on resume; only {', '.join(sorted(RESUMABLE))} can")
        cfg = resolve_config(str(resume / "config.toml"), overrides, debug)
    else:
        if config_path is None:
            raise UserError("--config is required to start a run (e.g. --config configs/base.toml)")
        cfg = resolve_config(config_path, overrides, debug)
    result = train(cfg, resume, trust_pickle=trust_pickle)
    end_processes()
    exit_for(result)


def exit_for(result: RunResult) -> None:
    """The CLI's exit status: 0 finished (or stopped early, or pruned), 2 diverged (a sentence), 130 interrupted."""
    if result.status == "diverged":
        raise TrainingStopped(result.message)
    if result.status == "interrupted":
        if os.environ.get("SMPTRAIN_DEBUG"):
            print(f"debug: {result}", file=sys.stderr)
        hint = (f"\ncontinue with: python -m smptrain.train --resume {result.run_dir}"
                if result.run_dir is not None and (result.run_dir / "checkpoints" / "last").exists() else "")
        if _local_main():
            print(f"\n{result.message}{hint}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
