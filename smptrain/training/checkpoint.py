"""smptrain's checkpoint format: one directory per checkpoint, written atomically, found through `last` and `best`.

    RUN_DIR/checkpoints/
        epoch=0012-step=000480-val_JaccardIndex=0.7312/
            model.safetensors   unwrapped fp32 weights, keys without module./_orig_mod. prefixes (with train.ema_decay
                                the moving average: what was validated, and what test and convert use)
            meta.json           resolved config, model and band description, epoch, step, metrics, versions, train state
            state/              Accelerate save_state: model, optimizer, grad scaler, per-process RNG (and the moving
                                average as model_1.safetensors)
        last -> epoch=...        symlink to the newest checkpoint (written after every validation and on Ctrl-C)
        best -> epoch=...        symlink to the best val/JaccardIndex among the save_top_k kept

A checkpoint is assembled in a hidden temporary directory and renamed into place, and a symlink is replaced with
`os.replace`; a crash at any moment leaves `last` pointing to a complete checkpoint. Nothing here is unpickled:
weights are safetensors, metadata JSON, and Accelerate loads optimizer and RNG state weights-only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import smptrain
from smptrain.config import plain
from smptrain.core.failpoints import failpoint
from smptrain.core.storage import WriteFailed, file_mode, replacing, writing
from smptrain.training.layout import BEST, LAST, META, METRICS, STATE, WEIGHTS, checkpoints_dir, now

PREFIXES = ("module.", "_orig_mod.", "model.")
RANK_BUFFERS = "rank_buffers.safetensors"  # in state/: every rank's own BatchNorm statistics (several processes)
MONITOR = "val/JaccardIndex"


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
    validation_owed: bool = False  # the epoch's last step is done and its validation due, not yet done
    window: list = field(default_factory=list)  # [[loss sum, micro-batches]] per rank of a logging window a stop cut short


class CheckpointKeeper:
    """A run's checkpoints, as timm's CheckpointSaver keeps them: which are kept (the top-k by val/JaccardIndex),
    which is `best` and which `last`, the metadata written with each, and the one save -> link -> prune sequence.

    All ranks call `save_*` (Accelerate's save_state and the checksum gather are collective); only the main process
    touches files. `exported`: the module whose weights go to model.safetensors when it is not the trained model
    (the moving average of its weights).
    """

    def __init__(self, accelerator, run_dir: Path, describe: dict, top_k: int, state: TrainState,
                 exported: torch.nn.Module | None = None):
        self.accelerator, self.run_dir, self.describe, self.top_k, self.state = accelerator, run_dir, describe, top_k, state
        self.exported = exported

    def select(self, value: float, name: str) -> bool:
        """Early-stopping and top-k bookkeeping after a validation; returns whether `value` is a new best."""
        state = self.state
        state.validations += 1
        finite = math.isfinite(value)
        improved = finite and (state.best is None or value > state.best)  # strictly, as Lightning's EarlyStopping
        if improved:
            state.best, state.bad_validations = value, 0
        else:
            state.bad_validations += 1
        if finite and self.top_k > 0 and (len(state.top_k) < self.top_k or value > state.top_k[-1][0]):
            state.top_k = sorted([*state.top_k, [value, name]], key=lambda entry: -entry[0])[:self.top_k]
        return improved

    def save_interrupted(self, model, epoch: int, pending: Exception | None = None) -> None:
        """`last` at the current step, mid-epoch if need be (Ctrl-C / SIGTERM)."""
        self.save(model, epoch, {}, checkpoint_name(epoch, self.state.step, None), pending)

    @property
    def best_name(self) -> str | None:
        return self.state.top_k[0][1] if self.state.top_k else None

    def save(self, model, epoch: int, metrics: dict, name: str, pending: Exception | None = None) -> None:
        """Write checkpoint `name` with its metadata, make it `last` (and `best` the top of the top-k), prune."""
        accelerator = self.accelerator
        records = self.run_dir / METRICS  # whole lines only: an append cut short is cut back at once
        meta = {**self.describe, "epoch": epoch, "step": self.state.step, "metrics": metrics,
                "train_state": asdict(self.state), "time": now(), "smptrain_version": smptrain.__version__,
                # what metrics.jsonl held at this checkpoint: a resumed run keeps exactly that (records of the same
                # step written after it, by a run killed later, are written again)
                "metrics_bytes": records.stat().st_size if records.exists() else 0,
                "versions": library_versions(), "parameter_checksums": parameter_checksums(accelerator, model),
                "weights": "trained" if self.exported is None else "ema",
                **({} if self.exported is None else {"ema_checksums": parameter_checksums(accelerator, self.exported)})}
        save_checkpoint(accelerator, model, self.run_dir, name, meta, pending, self.exported)
        if accelerator.is_main_process:
            point(self.run_dir, LAST, name)
            point(self.run_dir, BEST, self.best_name)
            failpoint("checkpoint.after_link")
            prune(self.run_dir, {entry[1] for entry in self.state.top_k})


def parameter_checksums(accelerator, model) -> list[float]:
    """Every rank's sum of its parameters and buffers (one small gather, all ranks): equal values prove the
    replicas agree."""
    with torch.no_grad():
        tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        total = torch.stack([t.detach().double().sum() for t in tensors]).sum().view(1)
    return [float(v) for v in accelerator.gather(total.to(accelerator.device)).cpu()]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "segmentation-models-pytorch", "timm", "accelerate", "numpy", "zarr", "tensorstore"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU tensors with wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, Lightning
    `model.`) removed from every key."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        value = value.detach().to("cpu")
        cleaned[key] = (value.float() if value.is_floating_point() else value).contiguous()
    return cleaned


def checkpoint_name(epoch: int, step: int, metric: float | None) -> str:
    name = f"epoch={epoch:04d}-step={step:06d}"
    return name if metric is None else f"{name}-val_JaccardIndex={metric:.4f}"


def save_checkpoint(accelerator, model, run_dir: Path, name: str, meta: dict, pending: Exception | None = None,
                    exported: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `name` (all ranks call this: save_state is collective). Returns its directory.

    Every rank catches its own failure, and the ranks agree on whether any failed before the main process renames
    the checkpoint into place: a disk that fills up on one rank ends every rank with the same `WriteFailed`, the
    partial temporary removed and `last` left on the previous complete checkpoint. `pending`: a write that failed
    earlier on the main process (metrics.jsonl, a figure), raised here on every rank. `exported`: the module
    model.safetensors holds, when not `model`."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / name, root / f".tmp-{name}"
    needed = checkpoint_bytes(model, exported)
    remove_tmp = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if accelerator.is_main_process else None
    failure = pending
    if failure is None and accelerator.is_main_process:
        failure = _attempt(lambda: (remove_tmp(), (tmp / STATE).mkdir(parents=True)), final, needed, remove_tmp)
    failed = _any_failed(accelerator, failure)  # every rank takes the same branch: the collectives stay paired
    if not failed:
        failure = _attempt(lambda: _write(accelerator, model, tmp, meta, exported), final, needed, remove_tmp)
        failed = _any_failed(accelerator, failure)
    if failed:
        if remove_tmp is not None:
            remove_tmp()
        if failure is not None and not isinstance(failure, WriteFailed):
            raise failure
        raise failure or WriteFailed(f"another process could not write checkpoint {final}")
    if accelerator.is_main_process:
        failpoint("checkpoint.before_rename")
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a validation)
            shutil.rmtree(final)
        os.rename(tmp, final)
        failpoint("checkpoint.after_rename")
    accelerator.wait_for_everyone()
    return final


def _write(accelerator, model, tmp: Path, meta: dict, exported: torch.nn.Module | None = None) -> None:
    accelerator.save_state(str(tmp / STATE))
    buffers = gathered_buffers(accelerator, buffer_owners(accelerator, model, exported))
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        if buffers:
            save_file(buffers, str(tmp / STATE / RANK_BUFFERS))
        weights = clean_state_dict(accelerator.unwrap_model(exported if exported is not None else model,
                                                            keep_torch_compile=False).state_dict())
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _share_weights(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=plain) + "\n")
        _settle_tree(tmp)


def buffer_owners(accelerator, model, exported: torch.nn.Module | None = None) -> dict[str, torch.nn.Module]:
    """The modules whose BatchNorm statistics each rank keeps for itself: the trained model and its moving average."""
    owners = {"model": accelerator.unwrap_model(model, keep_torch_compile=False)}
    if exported is not None:
        owners["ema"] = exported
    return owners


def float_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [buffer for buffer in module.buffers() if buffer.is_floating_point()]


def gathered_buffers(accelerator, owners: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every rank's float buffers, flat, by `{owner}.{rank}` (all ranks call it; {} for one process).

    Each rank updates BatchNorm's running statistics from its own batches, and they are averaged only before a
    validation; Accelerate's save_state keeps the main process's alone. A stop between validations would resume
    every rank with rank 0's statistics and validate other ones than an uninterrupted run. (float64 carries any
    float buffer exactly.)"""
    if accelerator.num_processes == 1:
        return {}
    found = {}
    for owner, module in owners.items():
        buffers = float_buffers(module)
        if buffers:
            flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
            for rank, values in enumerate(accelerator.gather(flat[None]).cpu()):
                found[f"{owner}.{rank}"] = values.contiguous()
    return found


def _attempt(write, final: Path, needed: int, cleanup) -> Exception | None:
    """Run `write`; a filesystem refusal comes back as `WriteFailed` naming the checkpoint, anything else as
    itself (raised once the ranks agree)."""
    last = final.parent / LAST
    resume = (f"the last complete checkpoint ({os.readlink(last)}) stays the resume point: free space, then "
              f"--resume {final.parent.parent}") if last.is_symlink() else "no checkpoint of this run was kept"
    try:
        with writing(final, needed, cleanup, then=resume):
            write()
    except Exception as error:
        return error
    return None


def _any_failed(accelerator, failure) -> bool:
    """Whether any rank failed (one small all-reduce; every rank calls it)."""
    if accelerator.num_processes == 1:
        return failure is not None
    flag = torch.tensor([1.0 if failure is not None else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def raise_pending(accelerator, failure: Exception | None) -> None:
    """Raise, on every rank, a write that failed on one (every rank calls this)."""
    if _any_failed(accelerator, failure):
        raise failure or WriteFailed("another process could not write its files")


def checkpoint_bytes(model, ema=None) -> int:
    """About what one checkpoint takes on disk: the fp32 weights (shared by model.safetensors and the state) and
    AdamW's two moment buffers, and the moving average's copy when there is one."""
    state = model.state_dict()
    copies = 3 if ema is None else 4
    return copies * sum(t.numel() * 4 for t in state.values() if t.is_floating_point()) + 2**20


def point(run_dir: Path, link: str, name: str | None) -> None:
    """Atomically make checkpoints/<link> point to checkpoint `name` (or remove it when name is None)."""
    root = checkpoints_dir(run_dir)
    target = root / link
    if name is None:
        if target.is_symlink():
            target.unlink()
        return
    with replacing(target, settle=False) as tmp:
        os.symlink(name, tmp)


def prune(run_dir: Path, keep: set[str]) -> None:
    """Delete checkpoint directories that neither `last`, `best` nor the top-k list refer to, and stale temporaries."""
    root = checkpoints_dir(run_dir)
    for link in (LAST, BEST):
        if (root / link).is_symlink():
            keep.add(os.readlink(root / link))
    for path in root.iterdir():
        if path.is_dir() and not path.is_symlink() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _share_weights(checkpoint: Path) -> None:
    """Accelerate's state/ holds the exported weights again (model.safetensors, or model_1.safetensors for the
    moving average); when its file is byte-identical to ours (an uncompiled model), make it a hard link, so the
    weights take disk space once. A filesystem without hard links keeps the copy; resume reads state/ either way."""
    import filecmp

    ours = checkpoint / WEIGHTS
    same = [theirs for theirs in (checkpoint / STATE / WEIGHTS, checkpoint / STATE / "model_1.safetensors")
            if theirs.is_file() and filecmp.cmp(ours, theirs, shallow=False)]
    if not same:
        return
    try:
        with replacing(same[0], settle=False) as link:  # state/model.safetensors is never missing
            os.link(ours, link)
    except (OSError, WriteFailed):
        pass


def _settle_tree(path: Path) -> None:
    """Give every file the mode the umask allows (safetensors writes 0600, which others on a shared cluster cannot
    read) and flush it to disk before the directory is renamed into place."""
    mode = file_mode()
    for file in path.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
