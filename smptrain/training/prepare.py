"""Everything a run needs before its first step, built once by `set_up()`: the `Run` the loop in `train.py` shares.

In order: the accelerator and precision; the data as it is on disk and the split manifest; model and optimizer;
the training and validation feeds; every remaining check of config and data; and only then the run directory (new,
or the one being resumed), the resumed state and the trackers. A mistake found before the run directory exists
leaves nothing behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smptrain.config import Config, to_dict
from smptrain.core.errors import UserError
from smptrain.core.labels import OUTPUT_CLASSES
from smptrain.core.processes import is_main_process, on_main
from smptrain.core.runtime import choose_precision, make_accelerator, start_accelerator
from smptrain.core.storage import free_space, human
from smptrain.data.batches import TrainBatches
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset
from smptrain.data.feed import evaluation_feed, feed, optimizer_state_to_come, place_in_memory
from smptrain.data.scan import check_labels
from smptrain.data.splits import make_splits
from smptrain.model.losses import Loss, loss_from_config
from smptrain.model.network import build_model, check_forward, check_patch_size, determinism_note
from smptrain.training.checkpoint import CheckpointKeeper, TrainState, buffer_owners, checkpoint_bytes
from smptrain.training.collectives import stop_group
from smptrain.training.divergence import NonFiniteGuard
from smptrain.training.layout import LAST, STATE, TRACKERS_OPEN, checkpoint_link
from smptrain.training.loading import restore_rank_buffers, warm_start
from smptrain.training.runs import Opening, open_run, remover
from smptrain.training.signals import StopSignal
from smptrain.training.summary import SessionClock
from smptrain.training.tracking import Recorder, tracked_run

if TYPE_CHECKING:
    from timm.utils.model_ema import ModelEmaV3


@dataclass
class Run:
    """Everything a run's phases share; built once by `set_up()`."""

    cfg: Config
    accelerator: object
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: "ModelEmaV3 | None"  # the moving average of the weights (train.ema_decay), or None
    loss_fn: Loss
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
    clock: SessionClock | None = None  # the wall time of every session of the run, for summary.json
    followed: object | None = None  # a resumed run's TrainConfig until now (its schedule may change here)
    resumed_at: int = 0  # the step this session began at


def set_up(opening: Opening, stop: StopSignal, trust_pickle: bool = False) -> Run:
    """Accelerator, data, model and optimizer, then (only once all of them are checked) the run directory, the
    resumed state and the trackers, for the run `runs.begin` opened (new or resumed)."""
    cfg = opening.cfg
    precision, why = choose_precision(cfg.train.mixed_precision)
    accelerator = start_accelerator(precision, why, cfg.train.threads, cfg.train.grad_accum_steps,
                                    cfg.train.deterministic)
    stop_group()  # made now, by every rank: the stop flag goes through it after every step
    # Data as it is on disk and the split manifest (make_splits refuses empty sets; a resumed run keeps its own).
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    opening.require_data(info)
    band_indices = info.band_indices(cfg.data.bands)
    # Every check of config and data comes before anything is written: a mistake found once the run directory
    # exists would leave it behind, and the corrected command would then stop with "already exists".
    bands = info.band_meta(band_indices)  # a band without normalisation is refused here
    loss_fn = loss_from_config(cfg.train)
    splits = opening.splits or make_splits(info.metadata, cfg.data, cfg.train.seed)
    fold = f"fold {cfg.data.fold + 1} of {cfg.data.total_folds} ({cfg.data.fold_method})" \
        if cfg.data.fold_method != "none" else "no folds"
    accelerator.print(f"data: {info.root}, {len(info.metadata)} patches of {info.patch_size} x {info.patch_size}, "
                      f"{len(band_indices)} band(s); train {len(splits['train'])}, validation {len(splits['val'])}, "
                      f"test {len(splits['test'])} (test split: {cfg.data.split_method}; {fold})")
    check_labels(info, sorted(set(splits["train"]) | set(splits["val"])), cfg.data.accept_empty_mismatch)
    model, optimizer, ema = build_for_training(cfg, accelerator, precision, len(band_indices), info.patch_size,
                                               trust_pickle, opening.resumed)
    val_set, batches, train_loader, val_loader = build_data(cfg, accelerator, info, splits, band_indices,
                                                            optimizer_state_to_come(optimizer))
    note = determinism_note(cfg.model.arch, cfg.model.encoder, len(band_indices), info.patch_size,
                            accelerator.device.type, cfg.train.deterministic)
    if note:
        accelerator.print(note)

    # Only now the run directory: a new run's is created (named once by the main process).
    opening = open_run(accelerator, opening, splits, info)
    warn_if_short_of_space(accelerator, opening.run_dir, checkpoint_bytes(model, ema), cfg.train.save_top_k)
    recorder = start_recording(accelerator, opening, stop, buffer_owners(accelerator, model, ema.module if ema else None))
    describe = dict(run_name=opening.run_name, run_id=opening.run_id, world_size=accelerator.num_processes,
                    mixed_precision=precision, patch_size=info.patch_size,
                    model={"arch": cfg.model.arch, "encoder_name": cfg.model.encoder, "in_channels": len(band_indices),
                           "classes": OUTPUT_CLASSES},
                    bands=bands, config=to_dict(cfg))
    state = opening.state
    run = Run(cfg=cfg, accelerator=accelerator, precision=precision, model=model, optimizer=optimizer, ema=ema,
              loss_fn=loss_fn, val_set=val_set, batches=batches, train_loader=train_loader, val_loader=val_loader,
              run_dir=opening.run_dir, recorder=recorder,
              keeper=CheckpointKeeper(accelerator, opening.run_dir, describe, cfg.train.save_top_k, state,
                                      ema.module if ema is not None else None), state=state,
              stop=stop, guard=NonFiniteGuard(optimizer, accelerator.device) if precision != "fp16" else None,
              previews=pick_previews(info, splits["val"]),
              val_regions=info.metadata.loc[val_set.rows, "region"].astype(str).tolist(),
              best=opening.best, last=opening.last, clock=SessionClock(opening.run_dir), followed=opening.followed)
    accelerator.print(f"loss: {run.loss_fn.describe()}")
    return run


def warn_if_short_of_space(accelerator, run_dir: Path, one: int, top_k: int) -> None:
    """Once, before the first checkpoint: will the checkpoints the run keeps (top-k, `last`, and the one being
    written) fit in the free space?"""
    count = top_k + 2
    free = free_space(run_dir)
    if 0 <= free < one * count:
        accelerator.print(f"warning: {run_dir} has {human(free)} free, but the run keeps up to {count} checkpoints "
                          f"of about {human(one)} (train.save_top_k = {top_k}, last, and the one being written): "
                          f"{human(one * count)}; a checkpoint that does not fit ends the run")


def check_model_of(cfg: Config) -> None:
    """What `set_up` checks of the model, alone: cfg's model built and a zero batch passed through it at the
    dataset's patch size on this process's device (fp32), so that a cross-validation or tuning trial that cannot be
    built fails before its directory exists. Raises `CannotBuild` with the reason."""
    from smptrain.core.processes import process_state

    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    channels = len(info.band_indices(cfg.data.bands))
    model = build_model(cfg.model.arch, cfg.model.encoder, channels, "none")
    check_patch_size(model, cfg.model.arch, info.patch_size)
    device = process_state().device
    check_forward(model.to(device), cfg.model.arch, cfg.model.encoder, channels, info.patch_size, device)


def start_recording(accelerator, opening: Opening, stop: StopSignal, owners: dict) -> Recorder:
    """A resumed run's weights, optimizer and RNG back from its `last` checkpoint, and the trackers. A new run that
    fails here, or ends before its first checkpoint, leaves no directory."""
    if not opening.resumed:
        stop.undo = remover(accelerator, opening.run_dir)
    try:
        accelerator.print(f"run directory: {opening.run_dir}")
        if opening.resumed:
            restore(accelerator, opening, owners)
        return Recorder(accelerator, opening.run_dir, tracked_run(to_dict(opening.cfg), opening.run_name, opening.run_id),
                        resume_step=opening.state.step if opening.resumed else None, resume_bytes=opening.records)
    except Exception:
        if stop.undo is not None:
            stop.undo()
            stop.undo = None
        raise


def finish_trackers_left_open(opening: Opening) -> None:
    """A finished run whose last session was killed after its last checkpoint, before its trackers were closed
    (their mark is still in the run directory): they get what metrics.jsonl holds and are closed. Every rank calls
    it; a tidy finished run is left as it is."""
    left_open = on_main(lambda: (opening.run_dir / TRACKERS_OPEN).exists(), opening.run_dir / TRACKERS_OPEN)
    if not left_open:
        return
    tracked = tracked_run(to_dict(opening.cfg), opening.run_name, opening.run_id)
    if tracked is None:  # the trackers were taken out of the configuration since
        if is_main_process():
            (opening.run_dir / TRACKERS_OPEN).unlink(missing_ok=True)
        return
    recorder = Recorder(make_accelerator(), opening.run_dir, tracked, resume_step=opening.state.step,
                        resume_bytes=opening.records)
    recorder.finish()


def build_for_training(cfg: Config, accelerator, precision: str, in_channels: int, patch_size: int,
                       trust_pickle: bool = False, resumed: bool = False):
    """The model (same initial weights on every rank, or those of `model.weights_from`), AdamW, and
    (train.ema_decay) the moving average of the weights, prepared by Accelerate. A resumed run skips
    `model.weights_from` and the encoder weights: its own checkpoint comes back afterwards (so a resumed run needs
    neither the file nor the download cache)."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    # Every rank builds its own (no barrier to hang on if the download fails: each says the same sentence); the hub
    # library's file locks make one of them download named weights and the others read them from the cache.
    model = build_model(cfg.model.arch, cfg.model.encoder, in_channels, "none" if resumed else cfg.model.encoder_weights)
    check_patch_size(model, cfg.model.arch, patch_size)
    if cfg.model.weights_from and not resumed:
        warm_start(model, cfg.model.weights_from, trust_pickle)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_forward(model.to(accelerator.device), cfg.model.arch, cfg.model.encoder, in_channels, patch_size,
                  accelerator.device, accelerator.autocast, cfg.train.channels_last)
    # The fused AdamW can skip a step on a device-side flag (NonFiniteGuard); under fp16 Accelerate's grad scaler
    # does the skipping and counts it, which only works with the unfused optimizer.
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train.encoder_lr_scale), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay, fused=precision != "fp16")
    ema = moving_average(model, cfg.train) if cfg.train.ema_decay > 0 else None  # of the plain module, on the device
    if cfg.train.compile:
        model = torch.compile(model)
    # prepare: DDP across processes, autocast for mixed precision, a grad scaler for fp16.
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        # autocast as the model has it, no DDP; registered second, so save_state and load_state carry it as
        # state/model_1.safetensors (weights-only, like the rest of the state): resume restores it exactly
        accelerator.prepare_model(ema.module, evaluation_mode=True)
    set_seed(cfg.train.seed, device_specific=True)  # from here on each rank draws its own random numbers
    return model, optimizer, ema


def moving_average(model: torch.nn.Module, train) -> "ModelEmaV3":
    """timm's ModelEmaV3 of `model`: every float parameter and buffer (BatchNorm statistics too), updated after each
    optimizer step with decay `train.ema_decay` (and timm's warmup with `train.ema_warmup`). Its copy takes no
    gradients."""
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(model, decay=train.ema_decay, use_warmup=train.ema_warmup)
    ema.module.requires_grad_(False)
    return ema


def parameter_groups(model: torch.nn.Module, encoder_lr_scale: float) -> list[dict]:
    """AdamW's parameter groups: one, or (with `train.encoder_lr_scale` != 1) the encoder's and the rest's, each with
    the `lr_scale` the training step multiplies the schedule's rate by. One group keeps the optimizer state of
    earlier runs loadable."""
    if encoder_lr_scale == 1:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    encoder = {id(p) for p in model.encoder.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) in encoder], "lr_scale": encoder_lr_scale},
            {"params": [p for p in model.parameters() if id(p) not in encoder], "lr_scale": 1.0}]


def build_data(cfg: Config, accelerator, info, splits: dict, band_indices: list[int], still_to_come: int = 0):
    """Training and validation sets, this rank's samplers, and the feeds that bring their batches to the device.
    `still_to_come`: bytes the optimizer will allocate at its first step, kept free when placing patches."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_set = PatchDataset(info, splits["train"], band_indices, cfg.data.in_memory, cfg.data.reader)
    val_set = train_set if splits["val"] == splits["train"] else PatchDataset(info, splits["val"], band_indices,
                                                                                cfg.data.in_memory, cfg.data.reader)
    positives, slots = positive_sampling(cfg, info, train_set, world)
    batches = TrainBatches(len(train_set), cfg.train.batch_size, world, rank, cfg.train.seed, cfg.train.grad_accum_steps,
                           positives, slots)
    if batches.steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_set)} patches, fewer than train.batch_size x processes x "
                        f"train.grad_accum_steps = {cfg.train.batch_size * world * cfg.train.grad_accum_steps}")
    if slots:
        accelerator.print(f"positive sampling: {slots} of every batch's {cfg.train.batch_size} patches from the "
                          f"{len(positives)} of {len(train_set)} training patches with positive pixels")
    if cfg.data.in_memory:
        where = place_in_memory([train_set, val_set], device, cfg.data.memory_device, still_to_come)
        size = train_set.nbytes + (val_set.nbytes if val_set is not train_set else 0)
        accelerator.print(f"patches in memory on the {'device' if where == 'device' else 'host'} ({size / 2**30:.2f} GiB)")
    train_loader = feed(train_set, batches, device, cfg.data.num_workers, cfg.train.seed, rank, cfg.train.channels_last)
    val_loader = evaluation_feed(val_set, cfg.train.batch_size, accelerator, cfg.data, cfg.train.channels_last)
    return val_set, batches, train_loader, val_loader


def positive_sampling(cfg: Config, info, train_set: PatchDataset, world: int) -> tuple[list[int], int]:
    """(positions of the training patches with positive pixels, places per micro-batch for them) for
    data.positive_fraction; ([], 0) when it is off. A step draws its positives without repeats, so the split must
    hold at least as many as one optimizer step of every rank takes."""
    slots = math.floor(cfg.data.positive_fraction * cfg.train.batch_size + 0.5)  # places per batch, rounded half up
    if not slots:
        return [], 0
    empty = info.metadata.loc[train_set.rows, "empty"].astype(bool).to_numpy()
    positives = [i for i, e in enumerate(empty) if not e]
    needed = slots * world * cfg.train.grad_accum_steps
    if len(positives) < needed:
        raise UserError(f"data.positive_fraction = {cfg.data.positive_fraction:g} draws {needed} different patches with "
                        f"positives per optimizer step ({slots} per batch x {world} process(es) x "
                        f"train.grad_accum_steps), but the training split has {len(positives)}")
    return positives, slots


def restore(accelerator, opening: Opening, owners: dict) -> None:
    """Weights, optimizer, grad scaler and every rank's RNG of `last`, loaded weights-only by Accelerate, and every
    rank's own BatchNorm statistics (`owners`: the modules that have them)."""
    state_dir = checkpoint_link(opening.run_dir, LAST) / STATE
    try:
        accelerator.load_state(str(state_dir))
    except Exception as error:  # weights-only loading refuses pickled objects; a damaged file lands here too
        raise UserError(f"{state_dir} cannot be loaded safely (weights-only): {str(error).splitlines()[0][:200]}") from None
    restore_rank_buffers(accelerator, owners, state_dir)
    state, epochs = opening.state, opening.cfg.train.max_epochs
    where = (f"the validation of epoch {state.epoch}/{epochs} first" if state.validation_owed
             else f"in epoch {state.epoch + 1}/{epochs}")
    accelerator.print(f"resuming {opening.run_name} at step {state.step}, {where}")


def pick_previews(info, val_rows: list[int], positives: int = 4, negatives: int = 2) -> list[int]:
    """Fixed preview samples: the first few validation patches with and without positives (positions in val)."""
    empty = info.metadata.loc[val_rows, "empty"].astype(bool).to_numpy()
    pos = [i for i, e in enumerate(empty) if not e][:positives]
    neg = [i for i, e in enumerate(empty) if e][:negatives]
    return pos + neg
