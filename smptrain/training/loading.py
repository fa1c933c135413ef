"""A checkpoint read back: found from a run directory (`best`, `last`) or given itself, its description, its weights
(safetensors only: nothing here unpickles, but a DARTS Lightning `.ckpt` with --trust-pickle), the weights of a warm
start, and each rank's own BatchNorm statistics on resume. The format and its writing: `checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smptrain.core.errors import UserError
from smptrain.training.checkpoint import RANK_BUFFERS, float_buffers
from smptrain.training.layout import BEST, CONFIG, IDENTITY, LAST, META, WEIGHTS, checkpoints_dir, runs_beside


def resolve(path: str | Path, which: str = BEST) -> Path:
    """A checkpoint directory from a run directory (+ best/last) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (a run directory or a checkpoint directory); {runs_beside(path)}")
    if (path / META).is_file() and (path / WEIGHTS).is_file():
        return path
    root = checkpoints_dir(path)
    if root.is_dir():
        for link in ([which] if which == LAST else [which, LAST]):
            candidate = root / link
            if (candidate / META).is_file():
                return candidate.resolve()
            if candidate.is_symlink():
                raise UserError(f"{candidate} points to a missing checkpoint; the run directory is damaged")
        raise UserError(f"run directory {path} has no '{which}' checkpoint yet (no validation has finished)")
    if (path / CONFIG).is_file() or (path / IDENTITY).is_file():
        raise UserError(f"run directory {path} has no {root.name}/ folder: no checkpoint of it was saved, or the "
                        f"folder was moved or deleted")
    if (path / META).is_file():
        raise UserError(f"checkpoint directory {path} has meta.json but no {WEIGHTS}; it is incomplete")
    raise UserError(f"{path} is neither a run directory nor a checkpoint directory (expected config.toml and "
                    f"{root.name}/, or meta.json and {WEIGHTS})")


def read_lightning(path: Path) -> tuple[dict, dict]:
    """(the whole checkpoint, the model's weights without Lightning's `model.` prefix) of a DARTS Lightning `.ckpt`.
    It is a pickle, which can run code: call this only for a file the user said to trust (--trust-pickle)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    except Exception as error:
        raise UserError(f"{path} is not a readable Lightning checkpoint: {str(error)[:200]}") from None
    return ckpt, state


def read_meta(checkpoint: Path) -> dict:
    try:
        meta = json.loads((Path(checkpoint) / META).read_text())
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

    path = Path(checkpoint) / WEIGHTS
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        others = sorted(p.name for p in Path(checkpoint).parent.iterdir()
                        if p.is_dir() and not p.is_symlink() and p.name != Path(checkpoint).resolve().name
                        and (p / WEIGHTS).is_file()) if Path(checkpoint).parent.is_dir() else []
        instead = (f"; use another checkpoint of the run: --checkpoint last, or one of {', '.join(others[:4])} in "
                   f"{Path(checkpoint).parent}" if others else "; use another checkpoint (--checkpoint last)")
        raise UserError(f"{path} is not a readable safetensors file (damaged or cut short: {error}){instead}") from None


def warm_start(model: torch.nn.Module, source: str, trust_pickle: bool = False) -> None:
    """Load the weights of an earlier checkpoint into `model` before training (DARTS' --weights-from-checkpoint):
    an smptrain run or checkpoint directory (its `best`, safetensors), or a DARTS Lightning `.ckpt`, which is a
    pickle and is only read with `trust_pickle`. The architecture must match; the optimizer starts afresh."""
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt":
        if not trust_pickle:
            raise UserError(f"model.weights_from = {source!r} is a Lightning pickle, and loading a pickle can run code "
                            f"from its author; pass --trust-pickle if you trust where this file comes from")
        _, state = read_lightning(path)
    else:
        state = load_weights(resolve(path, BEST))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)[:200]
        raise UserError(f"model.weights_from = {source!r} does not fit model.arch/model.encoder/bands of this run: "
                        f"{first}") from None


def restore_rank_buffers(accelerator, owners: dict[str, torch.nn.Module], state_dir: Path) -> None:
    """This rank's own BatchNorm statistics back from a checkpoint written by as many processes."""
    path = Path(state_dir) / RANK_BUFFERS
    if accelerator.num_processes == 1 or not path.is_file():
        return
    from safetensors.torch import load_file

    saved = load_file(str(path))
    with torch.no_grad():
        for owner, module in owners.items():
            flat = saved.get(f"{owner}.{accelerator.process_index}")
            if flat is None:
                continue
            offset = 0
            for buffer in float_buffers(module):
                buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer).to(buffer.device, buffer.dtype))
                offset += buffer.numel()
