"""Inference as the DARTS pipeline does it: load a converted file, normalise bands, predict a tile in patches.

`load_converted` follows `SMPSegmenter.__init__` (darts-contract §6.3): a weights-only `torch.load`,
`smp.create_model(**config["model"], encoder_weights=None)` (no activation: the model returns logits) and a strict
`load_state_dict`. `predict_in_patches` has the semantics of DARTS' function of the same name: reflect padding by
1 + `reflection` pixels, a grid with step `patch_size - overlap` whose last row and column are moved inward, a
batch of patches predicted as 0 when some pixel is NaN in all of its patches (other NaNs become 0), the sigmoid of
the logits, overlaps blended as a weighted mean with a separable linear ramp of width `overlap`, padding cropped.

    smptrain-predict CONVERTED.ckpt TILE.npy OUT.npy [--patch-size 1024] [--overlap 16] [--batch-size 8]
                     [--tta none|flips|d4] [--binarize [--threshold T]]

TILE.npy holds raw band values (C, H, W) in the file's band order; OUT.npy gets probabilities (H, W), or with
--binarize a uint8 mask at the file's `config.smptrain.threshold` (0.5 unless smptrain-convert stored another).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smptrain.core.errors import UserError
from smptrain.core.storage import replacing
from smptrain.data.grid import patch_origins
from smptrain.evaluation.tta import averaged
from smptrain.model.network import described_model


def load_converted(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) from a converted file, loaded without unpickling any object."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"converted checkpoint {path} does not exist") from None
    except Exception as error:
        raise UserError(f"{path} cannot be loaded weights-only as a converted checkpoint: {str(error)[:200]}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "statedict" not in ckpt:
        raise UserError(f"{path} is not a converted checkpoint (expected the keys 'config' and 'statedict')")
    config = ckpt["config"]
    model = described_model(config["model"], ckpt["statedict"], str(path))  # strict, as SMPSegmenter
    return model.to(device).eval(), config


def normalise(raw: np.ndarray | torch.Tensor, bands: dict) -> torch.Tensor:
    """clip(raw * factor + offset, 0, 1) per band; raw is (C, H, W) or (B, C, H, W) in the config's band order.
    NaN stays NaN (predict_in_patches handles it)."""
    x = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    factors = torch.tensor(bands["band_factors"], dtype=torch.float32).view(-1, 1, 1)
    offsets = torch.tensor(bands["band_offsets"], dtype=torch.float32).view(-1, 1, 1)
    if x.shape[-3] != len(factors):
        raise UserError(f"the tile has {x.shape[-3]} bands but the model expects {len(factors)}: {bands['bands']}")
    return (x * factors + offsets).clamp(0, 1)


def soft_margin(patch_size: int, overlap: int) -> torch.Tensor:
    """(P, P) blending weights: a linear ramp 0 -> 1 over `overlap` pixels at every edge, 1 inside."""
    ramp = torch.cat([torch.linspace(0, 1, overlap), torch.ones(patch_size - 2 * overlap), torch.linspace(1, 0, overlap)])
    return ramp.view(patch_size, 1) * ramp.view(1, patch_size)


@torch.no_grad()
def predict_in_patches(model, tiles: torch.Tensor, patch_size: int, overlap: int, batch_size: int = 8,
                       reflection: int = 0, device: str | torch.device = "cpu", tta: str = "none") -> torch.Tensor:
    """Probabilities (B, H, W) of normalised tiles (B, C, H, W), blended from overlapping patches. With `tta`
    ("flips" or "d4") each patch's probabilities are averaged over its symmetries, inside the sliding window."""
    raw = getattr(model, "takes_raw", False)  # an ONNX file: raw bands in (it normalises), probabilities out

    def probabilities_of(batch):
        out = model(batch.to(device))
        return (out if raw else torch.sigmoid(out)).squeeze(1).float().to(tiles.device)

    if tiles.dim() != 4:
        raise UserError(f"tiles must be (B, C, H, W), got shape {tuple(tiles.shape)}")
    pad = 1 + reflection
    tiles = torch.nn.functional.pad(tiles, (pad,) * 4, mode="reflect")
    b, c, h, w = tiles.shape
    if not (h > patch_size > overlap and w > patch_size > overlap):
        raise UserError(f"a padded tile of {h}x{w} needs height and width > patch_size ({patch_size}) > overlap ({overlap})")
    ys, xs = patch_origins(h, patch_size, overlap), patch_origins(w, patch_size, overlap)
    coords = [(t, y, x) for t in range(b) for y in ys for x in xs]  # DARTS' patch order: tile, row, column
    margin = soft_margin(patch_size, overlap).to(tiles.device)
    prediction = torch.zeros(b, h, w, device=tiles.device)
    weights = torch.zeros(b, h, w, device=tiles.device)
    # Batches are consecutive runs of that order, which matters for the NaN rule.
    for start in range(0, len(coords), batch_size):
        chosen = coords[start:start + batch_size]
        batch = torch.stack([tiles[t, :, y:y + patch_size, x:x + patch_size] for t, y, x in chosen])
        if torch.isnan(batch).all(0).any():
            probs = torch.zeros(len(chosen), patch_size, patch_size, device=tiles.device)
        else:
            batch = batch if raw else torch.nan_to_num(batch, nan=0.0)  # the ONNX graph zeroes NaN after normalising
            probs = averaged(probabilities_of, batch, tta) if tta != "none" else probabilities_of(batch)
        for (t, y, x), p in zip(chosen, probs):
            prediction[t, y:y + patch_size, x:x + patch_size] += p * margin
            weights[t, y:y + patch_size, x:x + patch_size] += margin
    prediction = prediction / torch.where(weights == 0, torch.ones_like(weights), weights)
    return prediction[:, pad:-pad, pad:-pad]


class OnnxSegmenter:
    """An exported ONNX file as `predict_in_patches`' model: raw bands in the file's input order go in (the graph
    normalises them and zeroes NaN), probabilities come out."""

    takes_raw = True

    def __init__(self, session):
        self.session = session

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"raw": batch.detach().cpu().numpy().astype(np.float32)})[0])


def choose_patch_size(requested: int | None, config: dict, shape, overlap: int, reflection: int, tile: str,
                      say=print) -> int:
    """The patch size for a tile: as requested, else the training one (or DARTS' 1024) capped to the tile. The padded
    tile (1 + reflection pixels on each side) must be larger than the patch, which must be larger than the overlap."""
    fits = min(shape) + 2 * (1 + reflection) - 1  # the largest patch the padded tile takes
    if requested is not None:
        if not overlap < requested <= fits:
            raise UserError(f"--patch-size {requested} does not fit {tile} ({shape[0]}x{shape[1]} pixels) with "
                            f"--overlap {overlap}; use --patch-size between {overlap + 1} and {fits}")
        return requested
    preferred = int((config.get("smptrain") or {}).get("patch_size") or 1024)
    chosen = min(preferred, fits // 32 * 32)
    if chosen <= overlap:
        raise UserError(f"{tile} ({shape[0]}x{shape[1]} pixels) is too small for patches larger than --overlap "
                        f"{overlap}; lower --overlap or give --patch-size")
    if chosen != preferred:
        say(f"patch size {chosen} (the tile is smaller than {preferred}; set --patch-size to choose)")
    return chosen




@dataclass(frozen=True)
class Predicted:
    """What `predict_file` wrote: the file, its shape, and how it was computed."""

    path: Path
    shape: tuple[int, ...]
    binarized: bool
    threshold: float
    tta: str
    patch_size: int
    positive_share: float  # of the pixels above the threshold


def predict_file(model_path: str | Path, tile: str | Path, out: str | Path, *, onnx: bool = False,
                 patch_size: int | None = None, overlap: int = 16, batch_size: int = 8, reflection: int = 0,
                 tta: str | None = None, binarize: bool = False, threshold: float | None = None, stored: bool = False,
                 say=print) -> Predicted:
    """Predict a raw tile (`tile`: a .npy array, C x H x W, in the file's band order) with a converted file (or,
    `onnx`, an exported ONNX file) and write `out` (.npy): probabilities (H, W), or with `binarize` a uint8 mask
    above `threshold`. By default what the DARTS pipeline computes from the file: no TTA, threshold 0.5; `stored`
    takes the TTA and threshold smptrain-convert stored in it. The patch size defaults to the training one, capped
    to the tile."""
    model, config, device, tta, threshold = open_model(model_path, onnx, tta, threshold, stored)
    try:
        raw = np.load(tile, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{tile} is not a readable .npy array: {error}") from None
    if config.get("fixed_size") and patch_size is not None and patch_size != config["fixed_size"]:
        raise UserError(f"{model_path} takes {config['fixed_size']} x {config['fixed_size']} patches only (exported "
                        f"with --format onnx); drop --patch-size, or export with --format onnx-dynamic")
    patch_size = choose_patch_size(patch_size or config.get("fixed_size"), config, raw.shape[-2:], overlap, reflection,
                                   str(tile), say)
    tiles = inputs_of(raw, config, onnx).reshape(1, *raw.shape[-3:])
    check_patches(model, config, tiles.shape[1], patch_size, str(model_path))
    probs = predict_in_patches(model, tiles, patch_size, overlap, batch_size, reflection, device, tta)[0].cpu()
    values = (probs > threshold).numpy().astype(np.uint8) if binarize else probs.numpy()
    with replacing(Path(out)) as tmp:
        with open(tmp, "wb") as handle:  # np.save on a path would add .npy to the temporary's name
            np.save(handle, values)
    return Predicted(Path(out), tuple(values.shape), binarize, threshold, tta, patch_size,
                     float((probs > threshold).float().mean()))


def open_model(model_path, onnx: bool, tta: str | None, threshold: float | None, stored: bool):
    """(model, config, device, TTA, threshold) of a converted file (or an ONNX file): by default what the DARTS
    pipeline computes (no TTA, 0.5); `stored`: the TTA and threshold smptrain-convert stored in the file."""
    device = "cuda" if torch.cuda.is_available() and not onnx else "cpu"
    model, config = onnx_model(model_path) if onnx else load_converted(model_path, device)
    extra = (config.get("smptrain") or {}) if stored else {}
    tta = tta or extra.get("tta") or "none"
    threshold = threshold if threshold is not None else float(extra.get("threshold") or 0.5)
    if not 0 < threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    return model, config, device, tta, threshold


def onnx_model(path):
    """(OnnxSegmenter, a config shaped like a converted file's) of an exported ONNX file; `fixed_size` is the side
    of the patches a fixed-size file (--format onnx) takes, None for a dynamic one."""
    from smptrain.export.onnx import load_onnx

    session, description = load_onnx(Path(path))
    side = session.get_inputs()[0].shape[-1]
    return OnnxSegmenter(session), {"smptrain": {"patch_size": description["patch_size"],
                                                 "threshold": description["threshold"]},
                                    "input_bands": description["input_bands"],
                                    "fixed_size": side if isinstance(side, int) else None}


def check_patches(model, config: dict, channels: int, patch_size: int, source: str) -> None:
    """What training checks of a patch size, before a tile is cut: one zero patch through the model must come back
    as logits of the same size (Segformer turns 65 px into 64, a DeepLabV3Plus cannot take 100); one sentence."""
    from smptrain.core.errors import CannotBuild
    from smptrain.model.network import check_forward, check_patch_size

    description = config.get("model") or {}
    if isinstance(model, OnnxSegmenter):
        try:
            out = model(torch.zeros(1, channels, patch_size, patch_size))
            shape = tuple(out.shape[-2:])
        except Exception as error:
            raise UserError(f"{source} cannot take {patch_size} x {patch_size} patches: "
                            f"{str(error).strip().splitlines()[0][:200]}; give another --patch-size") from None
        if shape != (patch_size, patch_size):
            raise UserError(f"{source} turns {patch_size} x {patch_size} patches into {shape[0]} x {shape[1]} "
                            f"probabilities; give another --patch-size (a multiple of 32 is safe)")
        return
    try:
        check_patch_size(model, description["arch"], patch_size)
        check_forward(model, description["arch"], description["encoder_name"], channels, patch_size,
                      next(model.parameters()).device)
    except CannotBuild as error:
        raise UserError(f"--patch-size: {error}") from None


def inputs_of(raw: np.ndarray, config: dict, is_onnx: bool) -> torch.Tensor:
    """What the model takes: normalised bands (a converted file), or the raw input bands (an ONNX file)."""
    if not is_onnx:
        return normalise(raw, config["bands"])
    if raw.shape[-3] != len(config["input_bands"]):
        raise UserError(f"the tile has {raw.shape[-3]} bands but the ONNX file takes {len(config['input_bands'])}: "
                        f"{config['input_bands']}")
    return torch.as_tensor(np.asarray(raw), dtype=torch.float32)
