"""Training: `accelerate launch -m smptrain.train --config configs/base.toml [--set k=v ...] [--resume RUN_DIR]`.

`train()` reads top to bottom: `set_up()` (accelerator, data, model, run directory, resumed state), then for each
epoch `train_one_epoch()` and, on DARTS' cadence, `validate_and_keep()`. It returns a `RunResult` (finished,
early-stopped, pruned, interrupted or diverged) instead of ending the process, so cross-validation and tuning call
it like any function; `main()` turns the result into an exit status. Progress is counted in optimizer steps;
DARTS' cadence (learning-rate decay, validation, patience) in epochs and validations.

Exact resume: the data order is a function of (seed, epoch), augmentations of (seed, epoch, micro-step, rank), the
learning rate of the step; weights (and their moving average), optimizer, scaler and RNG come back from Accelerate's
state. So training 4 epochs equals training 2, stopping, and resuming to 4 (on CUDA with train.deterministic).
"""

from __future__ import annotations

from smptrain.training.signals import Interrupted, StopSignal, exit_on_further_signals

if __name__ == "__main__":  # `python -m smptrain.train`: a signal while torch and the rest load (seconds) ends the
    exit_on_further_signals()  # command as an interrupted run would, 130, instead of "killed by SIGTERM"

import math  # noqa: E402 (the signals first)
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from smptrain.config import Config  # noqa: E402
from smptrain.core.failpoints import failpoint  # noqa: E402
from smptrain.core.progress import configure as configure_progress  # noqa: E402
from smptrain.core.progress import progress  # noqa: E402
from smptrain.core.runtime import end_processes  # noqa: E402
from smptrain.core.storage import WriteFailed  # noqa: E402
from smptrain.data.augment import augment, augment_generator  # noqa: E402
from smptrain.evaluation import plots  # noqa: E402
from smptrain.evaluation.breakdown import validation_regions  # noqa: E402
from smptrain.evaluation.evaluate import evaluate, sample_figure, write_curves  # noqa: E402
from smptrain.model.network import segmentation_logits  # noqa: E402
from smptrain.training.checkpoint import MONITOR, checkpoint_name  # noqa: E402
from smptrain.training.collectives import average_buffers, keep_window, reduce_window, stop_agreed  # noqa: E402
from smptrain.training.divergence import TrainingStopped, Window, diverged, gradient_norm  # noqa: E402
from smptrain.training.layout import CURVES_PLOT, PREVIEWS, SCHEDULE_PLOT  # noqa: E402
from smptrain.training.ending import (RunResult, already_finished, discard_if_nothing_saved, end,  # noqa: E402
                                      stop_interrupted, summarise)
from smptrain.training.prepare import Run, set_up  # noqa: E402
from smptrain.training.runs import begin, requested  # noqa: E402
from smptrain.training.schedule import describe as describe_schedule  # noqa: E402
from smptrain.training.schedule import changed_on_resume, learning_rate, planned, warmup_of  # noqa: E402

MAX_SKIPPED_FP16_STEPS = 25  # consecutive fp16 overflow skips before we call the loss diverged


def train(cfg: Config, resume: Path | None = None, on_validation: Callable[[int, dict], bool] | None = None,
          trust_pickle: bool = False) -> RunResult:
    """Train a model as `cfg` says (or continue the run in `resume`). Every rank calls it.

    `on_validation(validations, metrics)` is called after each validation (on every rank, with the same numbers);
    returning True ends the run there as "pruned" (how tuning drops hopeless trials).
    """
    stop = StopSignal()  # before the first step a signal ends the run at once: there is nothing to save yet
    run = None
    try:
        failpoint("startup")
        opening = begin(cfg, resume)  # new, or resumed: decided here, once
        configure_progress(opening.cfg.log.progress)
        if opening.finished:
            return already_finished(opening)
        run = set_up(opening, stop, trust_pickle)
        write_schedule(run)
        if run.state.validation_owed:  # a stop came between the last step of an epoch and its validation
            run.stop.armed = True  # work worth keeping: a signal during it stops once its checkpoint is written
            if validate(run, run.state.epoch - 1, on_validation):
                return end(run, "pruned", f"pruned after validation {run.state.validations}")
        while run.state.epoch < cfg.train.max_epochs and not run.state.early_stopped:
            epoch = run.state.epoch
            # A signal during the validation just done: its checkpoint is `last`, so stop here, not a few steps on.
            if stop_agreed(run):
                return stop_interrupted(run, epoch, saved=True)
            # One pass over the training split; False when the ranks agreed to stop for a signal.
            if not train_one_epoch(run, epoch):
                return stop_interrupted(run, epoch)
            # DARTS' cadence (train_one_epoch says whether it is owed): validate, select, preview and save.
            if run.state.validation_owed and validate(run, epoch, on_validation):
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


# --- the phases of train(), in the order it uses them (set_up: smptrain.training.prepare) ---------------------------------


def train_one_epoch(run: Run, epoch: int) -> bool:
    """One pass over the training split (from `state.micro_step` when resuming mid-epoch), logging every
    `log.log_every_n_steps` steps. Returns False when the ranks agreed to stop (a signal), True at the epoch's end."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    run.batches.set_epoch(epoch, start=state.micro_step)
    run.model.train()
    if epoch < cfg.train.freeze_encoder_epochs:
        encoder(run).eval()  # its BatchNorm statistics stay as they are too
    window = Window(accelerator.device)
    if state.window:  # a stop cut the window short: this rank's share of it, as summed before the stop
        if len(state.window) == accelerator.num_processes:
            window.carry(*state.window[accelerator.process_index])
        state.window = []
    bar = progress(run.batches.steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.max_epochs}", unit="step",
                   initial=state.micro_step // cfg.train.grad_accum_steps, show=accelerator.is_local_main_process)
    for x, y, _ in run.train_loader:
        window.arrived()
        step(run, epoch, x, y, window)
        if accelerator.sync_gradients:
            bar.update(1)
            failpoint("step.done")
            if state.step % cfg.log.log_every_n_steps == 0:
                log_window(run, epoch, window, bar)
            if stop_agreed(run):  # a signal: stop at this step, whichever rank got it
                keep_window(run, window, epoch)
                bar.close()
                return False
        window.fetching()
    bar.close()
    state.epoch, state.micro_step = epoch + 1, 0
    # Owed until done: a stop before it saves `last` with the debt, and the resumed run pays it first.
    state.validation_owed = (epoch + 1) % cfg.train.val_every_n_epochs == 0 or epoch + 1 == cfg.train.max_epochs
    run.recorder.log({"epoch": epoch, "learning_rate": current_lr(run)}, state.step)
    failpoint("epoch.before_validation")
    reduce_window(run, window, epoch)  # the guard of the steps since the last record
    return not stop_agreed(run)  # a signal since the last step: stop now, the validation owed (not a validation long)


def validate(run: Run, epoch: int, on_validation: Callable[[int, dict], bool] | None) -> bool:
    """The validation owed after `epoch`, then the caller's verdict: whether it prunes the run there."""
    validate_and_keep(run, epoch)
    return on_validation is not None and on_validation(run.state.validations, run.last)


def step(run: Run, epoch: int, x: torch.Tensor, y: torch.Tensor, window: "Window") -> None:
    """One micro-batch: augment on the device, forward, backward, and (on the last micro-batch of an accumulation
    group) clip, guard and step. Nothing here waits for the device."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    # the rate of the optimizer step this micro-batch belongs to (a pure function of it: resume stays exact)
    lr = learning_rate(cfg.train, state.step, epoch, run.batches.steps_per_epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if cfg.train.augment:
        generator = augment_generator(accelerator.device, cfg.train.seed, epoch, state.micro_step, accelerator.process_index)
        x, y = augment(x, y, cfg.train.augment, generator)
    with accelerator.accumulate(run.model):  # no_sync on micro-steps; the loss is scaled by 1/grad_accum_steps
        loss = run.loss_fn(segmentation_logits(run.model, x), y)
        accelerator.backward(loss)
        if accelerator.sync_gradients and epoch < cfg.train.freeze_encoder_epochs:
            # A frozen encoder: its (all-reduced, accumulated) gradients dropped before the norm and the step, so AdamW
            # leaves it untouched (no weight decay either) and every rank does the same; requires_grad stays as DDP
            # saw it when it was built.
            for parameter in encoder(run).parameters():
                parameter.grad = None
        if accelerator.sync_gradients and run.guard is not None:
            run.guard.arm(gradient_norm(accelerator, run.model, cfg.train.grad_clip_norm))
        elif accelerator.sync_gradients and cfg.train.grad_clip_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.micro_step += 1
    run.stop.armed = True  # from here on a signal stops after the current step and writes checkpoints/last
    window.add(loss)
    if accelerator.sync_gradients:
        state.step += 1
        if run.ema is not None:  # the same parameters on every rank; BatchNorm statistics are averaged at validation
            run.ema.update(accelerator.unwrap_model(run.model, keep_torch_compile=False), step=state.step)
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


def current_lr(run: Run) -> float:
    """The schedule's learning rate of the last optimizer step taken (the decoder's, with train.encoder_lr_scale)."""
    return run.optimizer.param_groups[-1]["lr"]


def validated(run: Run) -> torch.nn.Module:
    """What validation measures and checkpoints export: the moving average of the weights, or the model itself."""
    return run.ema.module if run.ema is not None else run.model


def encoder(run: Run) -> torch.nn.Module:
    return run.accelerator.unwrap_model(run.model).encoder


def write_schedule(run: Run) -> None:
    """The schedule said in one line, and (main process) `RUN_DIR/schedule.png`, the learning rate of every step the
    run takes (also on resume)."""
    train, per_epoch, step = run.cfg.train, run.batches.steps_per_epoch, run.state.step
    run.accelerator.print(describe_schedule(train, per_epoch))
    change = changed_on_resume(run.followed, train, step, per_epoch)
    if change:
        run.accelerator.print(change)
    if not run.accelerator.is_main_process:
        return
    # enough points for the figure and quick for any run length; as followed, where a resume changed the schedule
    run.followed = run.followed if change else None  # drawn as followed from here on, by curves.png too
    run.resumed_at = step
    steps, rates = planned(train, per_epoch, points=4000, before=run.followed, resumed_at=step)
    warmup = f", {warmup_of(train, per_epoch)} warmup steps" if warmup_of(train, per_epoch) else ""
    try:
        plots.learning_rate(steps, rates, per_epoch, run.run_dir / SCHEDULE_PLOT,
                            f"{run.keeper.describe['run_name']}: {train.schedule} schedule{warmup}, lr {train.lr:g} "
                            f"({per_epoch} steps per epoch)")
    except WriteFailed as error:  # main process only: raised on every rank at the next checkpoint or the end
        run.recorder.failure = run.recorder.failure or error


def log_window(run: Run, epoch: int, window: "Window", bar) -> None:
    """A `train/loss` record for the steps since the last one."""
    mean_loss = reduce_window(run, window, epoch)
    # Timed after the reduction, which waits for the device: the host runs steps ahead of a GPU, so a clock read
    # when the last step was merely queued overstated samples/s (by 1.4x for Unet-resnet18 on an H100).
    now = time.perf_counter()
    elapsed = max(now - window.start, 1e-9)
    samples = (window.count - window.carried) * run.cfg.train.batch_size * run.accelerator.num_processes
    record = {"epoch": epoch, "train/loss": mean_loss, "learning_rate": current_lr(run), "perf/samples_per_s": samples / elapsed,
              "perf/data_wait_share": window.wait / elapsed,
              **({"perf/fp16_skipped_steps": run.skipped_total} if run.precision == "fp16" else {})}
    run.recorder.log(record, run.state.step)
    bar.set_postfix(**{"loss": f"{mean_loss:.4f}", "img/s": f"{record['perf/samples_per_s']:.1f}",
                       "data wait": f"{record['perf/data_wait_share']:.0%}"})
    window.reset(now)  # the next window starts where this one ended: writing the record is part of a run's time


def validate_and_keep(run: Run, epoch: int) -> None:
    """Validate the model every rank will save (the moving average with train.ema_decay), pick top-k and best,
    decide early stopping, save, write previews."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    average_buffers(accelerator, run.model)  # every rank validates, and saves, the same BatchNorm statistics
    if run.ema is not None:
        average_buffers(accelerator, run.ema.module)  # the mean of the ranks' averages = the average of their mean
    evaluation = evaluate(validated(run), run.val_loader, accelerator, len(run.val_set), run.loss_fn, "val")
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
        f"epoch {epoch + 1}/{cfg.train.max_epochs} step {state.step} | val/loss {metrics['val/loss']:.4f} | {MONITOR} {value:.4f}"
        f"{' (best)' if improved else f' (best {state.best:.4f})'} | val/F1Score {metrics['val/F1Score']:.4f}"
        f" | val/AUROC {metrics['val/AUROC']:.4f}")
    every = cfg.log.preview_every_n_val
    if accelerator.is_main_process:  # before the checkpoint: a kill between the two makes the resumed run validate,
        try:  # and draw, again
            followed = planned(cfg.train, run.batches.steps_per_epoch, points=2000, until=state.step - 1,
                               before=run.followed, resumed_at=run.resumed_at)
            plots.training_curves(run.recorder.records(), run.run_dir / CURVES_PLOT,
                                  f"{run.keeper.describe['run_name']}: step {state.step}", schedule=followed)
            if every and (state.validations == 1 or state.validations % every == 0):
                write_previews(run, evaluation)
        except WriteFailed as error:  # main process only: raised on every rank at the next checkpoint or the end
            run.recorder.failure = run.recorder.failure or error
    state.validation_owed = False
    run.keeper.save(run.model, epoch, metrics, name, run.recorder.failure)
    summarise(run, "running")
    if state.early_stopped:
        accelerator.print(f"early stopping: {MONITOR} has not improved for {state.bad_validations} validation(s)"
                          if math.isfinite(value) else f"stopping: {MONITOR} is {value}")


def write_previews(run: Run, evaluation) -> None:
    """Main process: curves and the fixed preview samples of this validation, to files and wandb."""
    previews, step_tag = run.run_dir / PREVIEWS, f"_step{run.state.step:06d}"
    label = f"{run.keeper.describe['run_name']}, step {run.state.step}"
    figures = write_curves(evaluation, previews, "val", tag=step_tag, label=label)
    if run.previews:
        figures["samples"] = sample_figure(
            run.accelerator.unwrap_model(validated(run)), run.val_set, run.previews, evaluation.pixel, run.accelerator.device,
            previews / f"val{step_tag}.png",
            f"{label}: validation preview", run.cfg.train.channels_last)
    for key, path in figures.items():
        run.recorder.image(f"val/{key}", path, run.state.step)


def train_from_options(config_path: str | None, overrides=(), resume: str | None = None, *, debug: bool = False,
                       trust_pickle: bool = False) -> RunResult:
    """What `python -m smptrain.train` does with its options: start the run `config_path` and `overrides` describe,
    or continue the one `resume` names (`auto`: the run `log.run_name` names, if it exists), then close the process
    group. Every rank calls it."""
    cfg, resume_dir = requested(config_path, overrides, resume, debug)
    result = train(cfg, resume_dir, trust_pickle=trust_pickle)
    end_processes()
    return result


if __name__ == "__main__":  # the command itself is smptrain.commands.train, the one place every command lives
    from smptrain.commands.train import main

    main()
