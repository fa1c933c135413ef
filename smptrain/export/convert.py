"""`smptrain-convert`: compile a checkpoint into the file the DARTS inference pipeline (`SMPSegmenter`) loads.

    smptrain-convert CHECKPOINT --out-dir DIR --name NAME [--framework smp] [--which best|last] [--overwrite]
                     [--trust-pickle] [--bands-from DATASET_DIR] [--threshold 0.5|NUMBER|val-best]
                     [--format darts|onnx|onnx-dynamic] [--resolution CM_PER_PIXEL]

CHECKPOINT is a run directory (its `best` checkpoint, or `--which last`), a checkpoint directory, or a DARTS
Lightning `.ckpt`. The output `DIR/NAME_YYYY-MM-DD.ckpt` is a `torch.save` of

    {"config": {"model": {"arch", "encoder_name", "in_channels", "classes": 1},
                "bands": {"bands": [...], "band_factors": [...], "band_offsets": [...]},
                "time": "YYYY-MM-DD", "name": NAME, "model_framework": "smp", "smptrain": {...extra, ignored by DARTS}},
     "statedict": fp32 CPU state dict, no model./module./_orig_mod. prefixes}

holding only plain Python types and tensors, so `torch.load(path, weights_only=True)` reads it. After writing,
the file is reloaded the way the consumer does and its logits are compared with the source's on a patch of the
size the run trained on (a MaxViT or Swin model takes no other); a mismatch removes the file and fails. Lightning
checkpoints are pickles that can run code when loaded: they are read only with `--trust-pickle`.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click
import torch

import smptrain
from smptrain.config import plain
from smptrain.core.errors import UserError
from smptrain.core.labels import OUTPUT_CLASSES
from smptrain.core.storage import replacing
from smptrain.evaluation.calibration import parse_threshold
from smptrain.export.onnx import first_sentence
from smptrain.export.predict import load_converted
from smptrain.model.network import described_model
from smptrain.training.checkpoint import clean_state_dict
from smptrain.training.layout import BEST, TEST, THRESHOLD, run_of
from smptrain.training.loading import load_weights, read_lightning, read_meta, resolve

MODEL_KEYS = ("arch", "encoder_name", "in_channels", "classes")
LIGHTNING_SIZES = (256, 224, 512, 384, 1024, 64)  # DARTS' usual patch sizes, tried for a checkpoint that does not say
SELF_CHECK_TOLERANCE = 1e-5


def from_smptrain(path: Path, which: str, threshold: float | str = 0.5) -> tuple[dict, dict, dict, dict]:
    """(model config, bands, state dict, extra metadata) of one of our checkpoints; safetensors only."""
    checkpoint = resolve(path, which)
    meta = read_meta(checkpoint)
    chosen = recorded_threshold(checkpoint, meta) if threshold == "val-best" else {"threshold": threshold}
    extra = {"smptrain_version": meta.get("smptrain_version", smptrain.__version__), "run_id": meta.get("run_id"),
             "run_name": meta.get("run_name"), "checkpoint": checkpoint.name, "epoch": meta.get("epoch"),
             "step": meta.get("step"), "metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if v is not None},
             "patch_size": meta.get("patch_size"), "dataset_dir": (meta.get("config") or {}).get("data", {}).get("dir"),
             "threshold": chosen["threshold"], "tta": chosen.get("tta", "none")}
    return dict(meta["model"]), dict(meta["bands"]), load_weights(checkpoint), extra


def recorded_threshold(checkpoint: Path, meta: dict) -> dict:
    """The threshold `smptrain-test --threshold val-best` chose on validation for this checkpoint."""
    run_dir = run_of(checkpoint)
    path = run_dir / TEST / THRESHOLD
    hint = f"run `smptrain-test {run_dir} --checkpoint {checkpoint.name} --threshold val-best` first"
    try:
        chosen = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"--threshold val-best needs {path}, which is missing or unreadable; {hint}") from None
    if Path(chosen.get("checkpoint", "")).name != checkpoint.name or chosen.get("checkpoint_step") != meta.get("step"):
        raise UserError(f"{path} holds the threshold of checkpoint {Path(chosen.get('checkpoint', '?')).name}, not of "
                        f"{checkpoint.name}; {hint}")
    return chosen


def from_lightning(path: Path, bands_from: Path | None) -> tuple[dict, dict, dict, dict]:
    """The same from a DARTS Lightning checkpoint (a pickle: call only when the user trusts the file)."""
    ckpt, state = read_lightning(path)
    try:
        config = ckpt["hyper_parameters"]["config"]
        model = {k: config["model"][k] for k in MODEL_KEYS}
    except (KeyError, TypeError) as error:
        raise UserError(f"{path} lacks {error} (expected a DARTS train-smp checkpoint with hyper_parameters.config)") from None
    bands = config.get("bands")
    if isinstance(bands, dict) and all(k in bands for k in ("bands", "band_factors", "band_offsets")):
        bands = {k: list(bands[k]) for k in ("bands", "band_factors", "band_offsets")}
    else:
        names = list(bands.names if hasattr(bands, "names") else bands or [])
        if bands_from is None:
            raise UserError(f"{path} stores band names {names} without factors and offsets; pass --bands-from with the "
                            f"training dataset directory whose config.toml holds them")
        from smptrain.data.darts import open_dataset

        info = open_dataset(bands_from)
        idx = info.indices_of(names, f"{path} was trained on")
        bands = {"bands": names, "band_factors": [float(info.band_factors[i]) for i in idx],
                 "band_offsets": [float(info.band_offsets[i]) for i in idx]}
    # DARTS keeps the run's identity at the top of hyper_parameters (older files inside its config).
    identity = {key: ckpt["hyper_parameters"].get(key, config.get(key)) for key in ("run_id", "run_name")}
    return model, bands, state, {"source": "lightning", **{k: str(v) if v else None for k, v in identity.items()}}


def build_converted(model: dict, bands: dict, state: dict, name: str, framework: str, extra: dict) -> dict:
    """The converted dictionary, with plain Python values only."""
    return {
        "config": {
            "model": {"arch": str(model["arch"]), "encoder_name": str(model["encoder_name"]),
                      "in_channels": int(model["in_channels"]), "classes": OUTPUT_CLASSES},
            "bands": {"bands": [str(b) for b in bands["bands"]],
                      "band_factors": [float(f) for f in bands["band_factors"]],
                      "band_offsets": [float(o) for o in bands["band_offsets"]]},
            "time": datetime.date.today().isoformat(),
            "name": name,
            "model_framework": framework,
            "smptrain": plain(extra),
        },
        "statedict": clean_state_dict(state),
    }


def self_check(path: Path, model_config: dict, state: dict, patch: int) -> float:
    """Largest |logit difference| between the source weights and the file loaded as the consumer loads it, on one
    patch of the size the model was trained on (a MaxViT or Swin model takes no other); any failure is one
    sentence."""
    try:
        source = described_model(model_config, clean_state_dict(state), str(path)).eval()
        loaded, _ = load_converted(path)
        x = torch.rand(1, int(model_config["in_channels"]), patch, patch, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return float((source(x) - loaded(x)).abs().max())
    except UserError:
        raise
    except Exception as error:  # the library's own reason (a timm assert, an out-of-memory)
        raise UserError(f"self-check failed: model.arch = {model_config['arch']!r} with model.encoder = "
                        f"{model_config['encoder_name']!r} cannot run a {patch} x {patch} patch: "
                        f"{first_sentence(error)}; nothing was written") from None


def patch_of(extra: dict, model_config: dict) -> int:
    """The patch size the checks run: the run's, else (a Lightning checkpoint, which does not record it) the first
    of DARTS' usual sizes that the model takes."""
    if extra.get("patch_size"):
        return int(extra["patch_size"])
    model = described_model(model_config, None, "the checkpoint").eval()
    for size in LIGHTNING_SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, int(model_config["in_channels"]), size, size))
            return size
        except Exception:
            continue
    raise UserError(f"model.arch = {model_config['arch']!r} with model.encoder = {model_config['encoder_name']!r} "
                    f"takes none of the patch sizes {LIGHTNING_SIZES}; nothing was written")


def convert(source: Path, out_dir: Path, name: str, *, which: str = BEST, threshold: float | str = 0.5,
            file_format: str = "darts", framework: str = "smp", overwrite: bool = False, trust_pickle: bool = False,
            bands_from: Path | None = None, resolution: float | None = None) -> Path:
    """Write the converted file `out_dir/NAME_YYYY-MM-DD.ckpt` (or `.onnx`) and return its path (see the module
    docstring). `which`: the run's checkpoint (best or last); `threshold`: stored in config.smptrain.threshold, a
    number or val-best (smptrain-test's choice); `file_format`: darts (the file SMPSegmenter loads), onnx (raw
    bands in, probabilities out, the run's patch size: what QGIS Deepness loads) or onnx-dynamic (any height and
    width, for onnxruntime); `resolution`: cm per pixel, for Deepness; `framework`: config.model_framework;
    `trust_pickle`: read a DARTS Lightning `.ckpt`; `bands_from`: a dataset whose config.toml gives a names-only
    Lightning checkpoint its band factors."""
    if not name or "/" in name:
        raise UserError(f"--name must be a plain file name stem, got {name!r}")
    threshold = parse_threshold(threshold)
    if source.is_file() and source.suffix == ".ckpt":
        if not trust_pickle:
            raise UserError(f"{source} is a Lightning pickle, and loading a pickle can run code from its author; "
                            f"pass --trust-pickle if you trust where this file comes from")
        model, bands, state, extra = from_lightning(source, bands_from)
        if threshold == "val-best":
            raise UserError("--threshold val-best needs an smptrain run (smptrain-test chooses it); give a number")
        extra["threshold"] = threshold
    else:
        model, bands, state, extra = from_smptrain(source, which, threshold)
    dataset = extra.pop("dataset_dir", None)  # where the ONNX input's band order comes from
    patch = patch_of(extra, model)
    if file_format in ("onnx", "onnx-dynamic"):
        return to_onnx(model, bands, state, {**extra, "name": name, "patch_size": patch, "resolution": resolution},
                       out_dir, overwrite, dataset, dynamic=file_format == "onnx-dynamic")
    converted = build_converted(model, bands, state, name, framework, extra)
    target = out_dir / f"{name}_{converted['config']['time']}.ckpt"
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it or choose another --name")
    with replacing(target) as tmp:  # whole, checked, or not at all
        torch.save(converted, tmp)
        difference = self_check(tmp, converted["config"]["model"], state, patch)
        if not difference <= SELF_CHECK_TOLERANCE:
            raise UserError(f"self-check failed: the converted file's logits differ from the checkpoint's by "
                            f"{difference:.3g} (> {SELF_CHECK_TOLERANCE}); nothing was written")
    return target


def to_onnx(model: dict, bands: dict, state: dict, extra: dict, out_dir: Path, overwrite: bool,
            dataset: str | None, dynamic: bool = False) -> Path:
    """`DIR/NAME_YYYY-MM-DD.onnx` (see smptrain.export.onnx); the input bands are the run's dataset's when it is
    reachable, else the model's."""
    from smptrain.data.darts import DESCRIPTION, open_dataset
    from smptrain.export.onnx import export_onnx

    input_bands = list(bands["bands"])
    if dataset and Path(dataset, DESCRIPTION).is_file():
        try:
            input_bands = list(open_dataset(dataset).bands)
        except UserError:
            pass  # a dataset that moved or changed: the model's own bands
    target = out_dir / f"{extra['name']}_{datetime.date.today().isoformat()}.onnx"
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it or choose another --name")
    difference = export_onnx(model, bands, state, {**extra, "input_bands": input_bands}, target, dynamic)
    click.echo(f"onnxruntime self-check: probabilities within {difference:.2g} of PyTorch's")
    size = "any height and width (for onnxruntime; Deepness needs --format onnx)" if dynamic else \
        f"{extra['patch_size']} x {extra['patch_size']} pixels, any batch"
    click.echo(f"input: raw values of the bands {', '.join(input_bands)} in this order, {size}")
    if not extra.get("resolution") and not dynamic:
        click.echo("resolution: not recorded; give it with --resolution CM_PER_PIXEL (Deepness resamples the map to "
                   "it, e.g. 300 for PlanetScope's 3 m) or set it in the plugin")
    return target
