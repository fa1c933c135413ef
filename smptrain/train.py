"""Training: `accelerate launch -m smptrain.train --config configs/base.toml [--set k=v ...] [--resume RUN_DIR]`.

`train()` reads top to bottom: accelerator -> data and splits -> run directory -> model, optimizer -> resume ->
epochs of (train steps, validation, checkpoint, previews) -> summary. Progress is counted in optimizer steps;
DARTS' cadence (learning-rate decay, validation, patience) in epochs and validations.

Exact resume: the data order is a function of (seed, epoch), augmentations of (seed, epoch, micro-step, rank), the
learning rate of the epoch; weights, optimizer, scaler and RNG come back from Accelerate's state. So training 4
epochs equals training 2, stopping, and resuming to 4.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

import smptrain
from smptrain.augment import augment, augment_generator
from smptrain.checkpoint import MONITOR, checkpoint_name, point, prune, read_meta, save_checkpoint
from smptrain.cli import config_options, resolve_config
from smptrain.config import Config, dump_toml, to_dict
from smptrain.dataset import EvalBatches, PatchDataset, TrainBatches, make_loader, open_dataset
from smptrain.errors import UserError, report_user_errors
from smptrain.evaluate import evaluate, predict, write_curves
from smptrain.model import build_model, check_patch_size, focal_loss, segmentation_logits
from smptrain.runtime import make_accelerator, resolve_precision, to_device
from smptrain.splits import make_splits
from smptrain.tracking import Recorder, new_run_id, new_run_name

# Keys a resumed run may change with --set; anything else would make the continuation a different experiment.
RESUMABLE = {"train.max_epochs", "train.early_stopping_patience", "train.val_every_n_epochs", "data.num_workers",
             "data.in_memory", "log.log_every_n_steps", "log.preview_every_n_val"}
MAX_SKIPPED_FP16_STEPS = 25  # consecutive fp16 overflow skips before we call the loss diverged


class TrainingStopped(UserError):
    """Training cannot go on (non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class TrainState:
    """Counters that make a run resumable; stored as JSON in every checkpoint's meta.json."""

    epoch: int = 0  # epoch in progress (or next to run)
    micro_step: int = 0  # micro-batches of `epoch` already done (non-zero only for a mid-epoch checkpoint)
    step: int = 0  # optimizer steps so far
    validations: int = 0
    best: float | None = None  # best val/JaccardIndex
    bad_validations: int = 0  # validations since the best one
    top_k: list = field(default_factory=list)  # [[val/JaccardIndex, checkpoint name]], best first
    early_stopped: bool = False


def train(cfg: Config, resume: Path | None = None) -> Path:
    """Train a model as `cfg` says (or continue the run in `resume`); returns the run directory."""
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(precision, "wandb" if cfg.log.wandb_project else None, cfg.train.grad_accum_steps)
    rank, world, device, say = accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.print

    # Data as it is on disk and the split manifest (make_splits refuses empty sets; a resumed run keeps its own).
    info = open_dataset(cfg.data.dir)
    band_indices = info.band_indices(cfg.data.bands)
    splits = (json.loads((resume / "splits.json").read_text()) if resume
              else make_splits(info.metadata, cfg.data, cfg.train.seed))

    # The model is initialised from the same seed on every rank; afterwards each rank gets its own stream.
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, len(band_indices), cfg.model.encoder_weights)
    check_patch_size(model, cfg.model.arch, info.patch_size)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.compile:
        model = torch.compile(model)
    # prepare: DDP across processes, autocast for mixed precision, a grad scaler for fp16.
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.train.seed, device_specific=True)

    train_set = PatchDataset(info, splits["train"], band_indices, cfg.data.in_memory)
    val_set = train_set if splits["val"] == splits["train"] else PatchDataset(info, splits["val"], band_indices, cfg.data.in_memory)
    batches = TrainBatches(len(train_set), cfg.train.batch_size, world, rank, cfg.train.seed, cfg.train.grad_accum_steps)
    if batches.steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_set)} patches, fewer than train.batch_size x processes x "
                        f"train.grad_accum_steps = {cfg.train.batch_size * world * cfg.train.grad_accum_steps}")
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, batches, cfg.data.num_workers, pin, cfg.train.seed, rank)
    val_loader = make_loader(val_set, EvalBatches(len(val_set), cfg.train.batch_size, world, rank),
                             cfg.data.num_workers, pin, cfg.train.seed, rank)
    preview_positions = pick_previews(info, splits["val"])

    # Only now, with data and model checked, the run directory (named once by the main process).
    run_dir, run_name, run_id, meta = open_run(accelerator, cfg, resume, splits)
    state = TrainState(**meta["train_state"]) if meta else TrainState()
    say(f"run directory: {run_dir}")
    if meta:
        # Weights, optimizer, grad scaler and every rank's RNG, loaded weights-only by Accelerate.
        state_dir = run_dir / "checkpoints" / "last" / "state"
        try:
            accelerator.load_state(str(state_dir))
        except Exception as error:  # weights-only loading refuses pickled objects; a damaged file lands here too
            raise UserError(f"{state_dir} cannot be loaded safely (weights-only): {str(error).splitlines()[0][:200]}") from None
        say(f"resuming {run_name} at epoch {state.epoch}, step {state.step}")
    try:
        recorder = Recorder(accelerator, run_dir, cfg.log.wandb_project, cfg.log.wandb_entity, run_name, run_id,
                            to_dict(cfg), Path(cfg.log.artifact_dir), resume_step=state.step if meta else None)
    except UserError:
        if not meta and accelerator.is_main_process:
            shutil.rmtree(run_dir)  # made a moment ago by this run (config and splits only): leave no debris
        raise
    stop = StopSignal()
    describe = dict(run_name=run_name, run_id=run_id, world_size=world, mixed_precision=precision,
                    model={"arch": cfg.model.arch, "encoder_name": cfg.model.encoder, "in_channels": len(band_indices),
                           "classes": 1},
                    bands=info.band_meta(band_indices), config=to_dict(cfg))
    if state.early_stopped and state.bad_validations < cfg.train.early_stopping_patience:
        state.early_stopped = False  # the patience was raised on resume
    skipped_in_row = skipped_total = 0

    while state.epoch < cfg.train.max_epochs and not state.early_stopped:
        epoch = state.epoch
        lr = cfg.train.lr * cfg.train.gamma ** epoch  # DARTS' ExponentialLR, stepped once per epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches.set_epoch(epoch, start=state.micro_step)
        model.train()
        loss_sum, loss_count, wait, window_start = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
        bar = tqdm(total=batches.steps_per_epoch * cfg.train.grad_accum_steps, initial=state.micro_step,
                   desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process, leave=False)
        fetch_start = time.perf_counter()
        for batch in train_loader:
            wait += time.perf_counter() - fetch_start
            x, y, _ = to_device(batch, device, cfg.train.channels_last)
            if cfg.train.augment:
                x, y = augment(x, y, cfg.train.augment, augment_generator(device, cfg.train.seed, epoch, state.micro_step, rank))
            with accelerator.accumulate(model):  # no_sync on micro-steps; the loss is scaled by 1/grad_accum_steps
                loss, _, _ = focal_loss(segmentation_logits(model, x), y, cfg.train.focal_alpha, cfg.train.focal_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and precision != "fp16":
                    # Gradients are already averaged over ranks, so every rank sees the same norm and stops together.
                    norm = gradient_norm(accelerator, model, cfg.train.grad_clip_norm)
                    if not math.isfinite(norm.item()):
                        raise diverged(state, run_dir, epoch, "the gradient norm", x, batch, train_set)
                elif accelerator.sync_gradients and cfg.train.grad_clip_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.micro_step += 1
            loss_sum += loss.detach()
            loss_count += 1
            bar.update(1)
            if accelerator.sync_gradients:
                state.step += 1
                if precision == "fp16":  # the scaler skips overflowing steps; many in a row means divergence
                    skipped_in_row = skipped_in_row + 1 if optimizer.step_was_skipped else 0
                    skipped_total += int(optimizer.step_was_skipped)
                    if skipped_in_row >= MAX_SKIPPED_FP16_STEPS:
                        raise diverged(state, run_dir, epoch, f"{skipped_in_row} consecutive fp16 steps", x, batch, train_set)
                if state.step % cfg.log.log_every_n_steps == 0:
                    elapsed = time.perf_counter() - window_start
                    mean_loss, stopping = reduce_window(accelerator, loss_sum, loss_count, stop.raised)
                    record = {"epoch": epoch, "train/loss": mean_loss, "learning_rate": lr,
                              "perf/samples_per_s": loss_count * cfg.train.batch_size * world / max(elapsed, 1e-9),
                              "perf/data_wait_share": wait / max(elapsed, 1e-9),
                              **({"perf/fp16_skipped_steps": skipped_total} if precision == "fp16" else {})}
                    recorder.log(record, state.step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['perf/samples_per_s']:.1f}",
                                    data=f"{record['perf/data_wait_share']:.0%}")
                    loss_sum, loss_count, wait, window_start = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
                    if stopping:
                        bar.close()
                        return interrupted(accelerator, model, run_dir, state, describe, recorder, epoch)
            fetch_start = time.perf_counter()
        bar.close()
        state.epoch, state.micro_step = epoch + 1, 0
        recorder.log({"epoch": epoch, "learning_rate": lr}, state.step)
        if reduce_window(accelerator, loss_sum, loss_count, stop.raised)[1]:
            return interrupted(accelerator, model, run_dir, state, describe, recorder, epoch)

        if (epoch + 1) % cfg.train.val_every_n_epochs and epoch + 1 != cfg.train.max_epochs:
            continue
        average_buffers(accelerator, model)  # every rank validates, and saves, the same BatchNorm statistics
        evaluation = evaluate(model, val_loader, accelerator, len(val_set), cfg.train.focal_alpha,
                              cfg.train.focal_gamma, "val", channels_last=cfg.train.channels_last)
        value = evaluation.metrics[MONITOR]
        improved = update_selection(state, value, cfg.train.save_top_k, checkpoint_name(epoch, state.step, value))
        if not math.isfinite(value) or (0 < cfg.train.early_stopping_patience <= state.bad_validations):
            state.early_stopped = True
        recorder.log({"epoch": epoch, **evaluation.metrics}, state.step)
        say(f"epoch {epoch} step {state.step} | val/loss {evaluation.metrics['val/loss']:.4f} | {MONITOR} {value:.4f}"
            f"{' (best)' if improved else f' (best {state.best:.4f})'} | val/F1Score {evaluation.metrics['val/F1Score']:.4f}"
            f" | val/AUROC {evaluation.metrics['val/AUROC']:.4f}")
        name = checkpoint_name(epoch, state.step, value)
        save_checkpoint(accelerator, model, run_dir, name,
                        {**describe, "epoch": epoch, "step": state.step, "metrics": evaluation.metrics,
                         **checkpoint_info(accelerator, model, state)})
        if accelerator.is_main_process:
            point(run_dir, "last", name)
            point(run_dir, "best", state.top_k[0][1] if state.top_k else None)
            prune(run_dir, {entry[1] for entry in state.top_k})
            every = cfg.log.preview_every_n_val
            if every and (state.validations == 1 or state.validations % every == 0):
                write_previews(accelerator, model, val_set, preview_positions, evaluation, run_dir, state.step,
                               recorder, describe["bands"]["bands"], cfg.train.channels_last)
        if state.early_stopped:
            say(f"early stopping: {MONITOR} has not improved for {state.bad_validations} validation(s)"
                if math.isfinite(value) else f"stopping: {MONITOR} is {value}")

    finish(accelerator, run_dir, state, recorder)
    accelerator.end_training()  # every rank: closes the process group
    return run_dir


# --- helpers of train(), in the order train() uses them -------------------------------------------------------


def open_run(accelerator, cfg: Config, resume: Path | None, splits: dict):
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
                                                          "world_size": accelerator.num_processes}, indent=2) + "\n")
            payload = [str(run_dir), name, run_id]
        except (UserError, OSError) as error:
            payload = [None, None, f"{error}" if isinstance(error, UserError) else
                       f"cannot create the run directory under {cfg.log.artifact_dir}: {error}"]
    broadcast_object_list(payload)  # every rank calls it, also when the main process failed
    if payload[0] is None:
        raise UserError(payload[2])
    return Path(payload[0]), payload[1], payload[2], None


def pick_previews(info, val_rows: list[int], positives: int = 4, negatives: int = 2) -> list[int]:
    """Fixed preview samples: the first few validation patches with and without positives (positions in val)."""
    empty = info.metadata.loc[val_rows, "empty"].astype(bool).to_numpy()
    pos = [i for i, e in enumerate(empty) if not e][:positives]
    neg = [i for i, e in enumerate(empty) if e][:negatives]
    return pos + neg


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


def diverged(state: TrainState, run_dir: Path, epoch: int, what: str, x, batch, dataset) -> TrainingStopped:
    bad = (~torch.isfinite(x.flatten(1)).all(1)).nonzero().flatten().cpu()
    rows = [int(dataset.rows[int(batch[2][i])]) for i in bad]
    last = run_dir / "checkpoints" / "last"
    where = f"{last} (step {read_meta(last)['step']})" if (last / "meta.json").is_file() else "none yet"
    cause = f" the batch holds non-finite inputs in zarr rows {rows[:10]};" if rows else ""
    return TrainingStopped(
        f"training stopped at step {state.step + 1} (epoch {epoch}): {what} is not finite;{cause} the weights were not "
        f"updated. The last good checkpoint is {where}; lower train.lr or fix the data, then "
        f"resume with --resume {run_dir}"
    )


def reduce_window(accelerator, loss_sum: torch.Tensor, count: int, stop: bool) -> tuple[float, bool]:
    """Mean train loss over all ranks' micro-batches since the last record, and whether any rank was signalled."""
    packed = torch.stack([loss_sum.float(), torch.tensor(float(count), device=loss_sum.device),
                          torch.tensor(float(stop), device=loss_sum.device)])
    packed = accelerator.reduce(packed, "sum").tolist()
    return packed[0] / max(packed[1], 1), packed[2] > 0


def update_selection(state: TrainState, value: float, top_k: int, name: str) -> bool:
    """Early-stopping and top-k bookkeeping after a validation; returns whether the value is a new best."""
    state.validations += 1
    finite = math.isfinite(value)
    improved = finite and (state.best is None or value > state.best)  # strictly better, as Lightning's EarlyStopping
    if improved:
        state.best, state.bad_validations = value, 0
    else:
        state.bad_validations += 1
    if finite and top_k > 0 and (len(state.top_k) < top_k or value > state.top_k[-1][0]):
        state.top_k = sorted([*state.top_k, [value, name]], key=lambda entry: -entry[0])[:top_k]
    return improved


def checkpoint_info(accelerator, model, state: TrainState) -> dict:
    return {"train_state": asdict(state), "time": now(), "smptrain_version": smptrain.__version__,
            "versions": library_versions(), "parameter_checksums": parameter_checksums(accelerator, model)}


def parameter_checksums(accelerator, model) -> list[float]:
    """Every rank's sum of its parameters and buffers (one small gather, all ranks): equal values prove the
    replicas agree."""
    with torch.no_grad():
        tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        total = torch.stack([t.detach().double().sum() for t in tensors]).sum().view(1)
    return [float(v) for v in accelerator.gather(total.to(accelerator.device)).cpu()]


def write_previews(accelerator, model, val_set, positions, evaluation, run_dir: Path, step: int, recorder, bands,
                   channels_last: bool) -> None:
    from smptrain import metrics as M
    from smptrain import plots

    previews = run_dir / "previews"
    figures = write_curves(evaluation, previews, "val", tag=f"_step{step:06d}")
    if positions:
        xs, ys, probs = predict(accelerator.unwrap_model(model), val_set, positions, accelerator.device, channels_last)
        iou = M.sample_iou(evaluation.pixel[positions])
        titles = [f"row {val_set.rows[p]}\nIoU {v:.3f}" for p, v in zip(positions, iou)]
        figures["samples"] = plots.sample_grid(xs, ys, probs, bands, titles, previews / f"val_step{step:06d}.png",
                                               f"validation preview at step {step}")
    for key, path in figures.items():
        recorder.image(f"val/{key}", path, step)


def interrupted(accelerator, model, run_dir: Path, state: TrainState, describe: dict, recorder, epoch: int):
    """Ctrl-C / SIGTERM: write `last` at the current step (mid-epoch), close wandb, say how to continue."""
    name = checkpoint_name(epoch, state.step, None)
    save_checkpoint(accelerator, model, run_dir, name,
                    {**describe, "epoch": epoch, "step": state.step, "metrics": {}, **checkpoint_info(accelerator, model, state)})
    if accelerator.is_main_process:
        point(run_dir, "last", name)
        prune(run_dir, {entry[1] for entry in state.top_k})
    recorder.finish()
    accelerator.end_training()
    accelerator.print(f"stopped at step {state.step} (epoch {epoch}); saved {run_dir / 'checkpoints' / 'last'}.\n"
                      f"continue with: python -m smptrain.train --resume {run_dir}")
    raise SystemExit(130)


def finish(accelerator, run_dir: Path, state: TrainState, recorder) -> None:
    summary = {"best/" + MONITOR: state.best, "steps": state.step, "epochs": state.epoch}
    recorder.summary(summary)
    recorder.finish()
    best = state.top_k[0][1] if state.top_k else None
    accelerator.print(f"finished after {state.epoch} epoch(s), {state.step} step(s); best {MONITOR} = "
                      f"{state.best if state.best is None else round(state.best, 4)}"
                      f"{f' ({best})' if best else ''}\ncheckpoints: {run_dir / 'checkpoints'} (last, best)\n"
                      f"run directory: {run_dir}")


class StopSignal:
    """SIGINT/SIGTERM set a flag that all ranks agree on at the next log step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.raised = False
        if sys.platform != "win32" and _in_main_thread():
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True
        print(f"\n{signal.Signals(signum).name}: stopping at the next logging step, writing checkpoints/last "
              f"(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "segmentation-models-pytorch", "timm", "accelerate", "numpy", "zarr"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@config_options
@report_user_errors
def main(resume, config_path, overrides, debug):
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
    train(cfg, resume)


if __name__ == "__main__":
    main()
