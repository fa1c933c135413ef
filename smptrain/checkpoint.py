"""smptrain's checkpoint format: one directory per checkpoint, written atomically, found through `last` and `best`.

    RUN_DIR/checkpoints/
        epoch=0012-step=000480-val_JaccardIndex=0.7312/
            model.safetensors   unwrapped fp32 weights, keys without module./_orig_mod. prefixes
            meta.json           resolved config, model and band description, epoch, step, metrics, versions, train state
            state/              Accelerate save_state: model, optimizer, grad scaler, per-process RNG
        last -> epoch=...        symlink to the newest checkpoint (written after every validation and on Ctrl-C)
        best -> epoch=...        symlink to the best val/JaccardIndex among the save_top_k kept

A checkpoint is assembled in a hidden temporary directory and renamed into place, and a symlink is replaced with
`os.replace`; a crash at any moment leaves `last` pointing to a complete checkpoint. Nothing here is unpickled:
weights are safetensors, metadata JSON, and Accelerate loads optimizer and RNG state weights-only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from smptrain.errors import UserError

PREFIXES = ("module.", "_orig_mod.", "model.")
MONITOR = "val/JaccardIndex"


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


def save_checkpoint(accelerator, model, run_dir: Path, name: str, meta: dict) -> Path:
    """Write checkpoint `name` (all ranks call this: save_state is collective). Returns its directory."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "state").mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        weights = clean_state_dict(accelerator.unwrap_model(model, keep_torch_compile=False).state_dict())
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a validation)
            shutil.rmtree(final)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final


def point(run_dir: Path, link: str, name: str | None) -> None:
    """Atomically make checkpoints/<link> point to checkpoint `name` (or remove it when name is None)."""
    root = Path(run_dir) / "checkpoints"
    target = root / link
    if name is None:
        if target.is_symlink():
            target.unlink()
        return
    tmp = root / f".{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, target)


def prune(run_dir: Path, keep: set[str]) -> None:
    """Delete checkpoint directories that neither `last`, `best` nor the top-k list refer to, and stale temporaries."""
    root = Path(run_dir) / "checkpoints"
    for link in ("last", "best"):
        if (root / link).is_symlink():
            keep.add(os.readlink(root / link))
    for path in root.iterdir():
        if path.is_dir() and not path.is_symlink() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from a run directory (+ best/last) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        return path
    root = path / "checkpoints"
    if root.is_dir():
        for link in ([which] if which == "last" else [which, "last"]):
            candidate = root / link
            if (candidate / "meta.json").is_file():
                return candidate.resolve()
            if candidate.is_symlink():
                raise UserError(f"{candidate} points to a missing checkpoint; the run directory is damaged")
        raise UserError(f"run directory {path} has no '{which}' checkpoint yet (no validation has finished)")
    raise UserError(f"{path} is neither a run directory nor a checkpoint directory (expected meta.json and model.safetensors)")


def read_meta(checkpoint: Path) -> dict:
    try:
        meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{checkpoint}/meta.json is not a readable smptrain checkpoint description: {error}") from None
    for key in ("model", "bands", "config"):
        if key not in meta:
            raise UserError(f"{checkpoint}/meta.json lacks '{key}'; is this an smptrain checkpoint?")
    return meta


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint directory, from safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
