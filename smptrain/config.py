"""Configuration: frozen dataclasses with one commented default each, loaded from TOML plus `--set` overrides.

A TOML file sets only what differs from the defaults below; `configs/base.toml` lists every key. Overrides are
dotted and strict: `--set train.lr=3e-4`. An unknown section or key, or a value of the wrong type, is a
`UserError` that names the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.augment import AUGMENTATIONS
from smptrain.dataset import READERS
from smptrain.errors import UserError
from smptrain.feed import MEMORY_DEVICES
from smptrain.losses import LOSSES
from smptrain.runtime import PRECISION_CHOICES
from smptrain.splits import FOLD_METHODS, SPLIT_METHODS
# DARTS train-smp flag names (hyphens as underscores) -> our section.key, for "did you mean" messages.
DARTS_NAMES = {
    "train_data_dir": "data.dir", "data_split_method": "data.split_method", "data_split_by": "data.split_by",
    "fold_method": "data.fold_method", "total_folds": "data.total_folds", "num_workers": "data.num_workers",
    "model_arch": "model.arch", "model_encoder": "model.encoder", "model_encoder_weights": "model.encoder_weights",
    "learning_rate": "train.lr", "focal_loss_alpha": "train.focal_alpha", "focal_loss_gamma": "train.focal_gamma",
    "check_val_every_n_epoch": "train.val_every_n_epochs", "random_seed": "train.seed",
    "plot_every_n_val_epochs": "log.preview_every_n_val", "run_name": "log.run_name", "artifact_dir": "log.artifact_dir",
    "max_epochs": "train.max_epochs", "batch_size": "train.batch_size", "augment": "train.augment",
    "early_stopping_patience": "train.early_stopping_patience", "log_every_n_steps": "log.log_every_n_steps",
    "wandb_project": "log.wandb_project", "wandb_entity": "log.wandb_entity", "bands": "data.bands",
    "subsample": "data.subsample", "weights_from_checkpoint": "model.weights_from", "name": "log.run_name",
}


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/demo"  # dataset root holding data.zarr, metadata.parquet and config.toml
    bands: tuple[str, ...] = ()  # band subset by name, kept in the dataset's order; empty = all bands
    band_normalisation: dict[str, tuple[float, ...]] = field(default_factory=dict)  # {name = [factor, offset]}: overrides config.toml and DARTS' band table
    subsample: int = 0  # train on this many patches of the training split (drawn with random_state 42); 0 = all
    split_method: str = "none"  # test split: random | region | sample | none (none = test on everything)
    split_by: tuple[str | float, ...] = ()  # random: [test fraction]; region: region names; sample: sample ids
    fold_method: str = "kfold"  # train/val split of the non-test part: kfold | shuffle | stratified | region | region-stratified | none
    total_folds: int = 5  # number of folds the fold generator makes
    fold: int = 0  # which fold is the validation set (0-based)
    num_workers: int = 2  # zarr readers: tensorstore decoding threads in-process (0 = all cores), or zarr-python worker processes
    in_memory: bool = False  # read the train/val/test patches into RAM once instead of from zarr every epoch
    memory_device: str = "auto"  # with in_memory, where patches live: auto (the GPU when they fit) | device | cpu
    reader: str = "auto"  # zarr decoder: auto (tensorstore, else zarr-python) | tensorstore | zarr


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "Unet"  # smp architecture name, as for smp.create_model (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)
    encoder: str = "dpn107"  # smp or timm (tu-...) encoder name; DARTS' default
    encoder_weights: str = "none"  # "none" (random init) or the path of a local encoder state dict (.safetensors/.pth)
    weights_from: str = ""  # start from the weights of a checkpoint (a run or checkpoint directory; a DARTS .ckpt needs --trust-pickle)


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 100  # number of passes over the training set
    batch_size: int = 8  # samples per process and step (also used for validation)
    lr: float = 1e-3  # AdamW learning rate of epoch 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay (torch default)
    gamma: float = 0.9  # the learning rate of epoch e is lr * gamma**e
    loss: str | dict[str, float] = "focal"  # focal | bce | dice | jaccard | tversky | lovasz, or a weighted sum {focal = 1.0, dice = 0.5}
    focal_alpha: float | None = None  # focal loss positive-class weight in [0, 1]; none = no class weighting
    focal_gamma: float = 2.0  # focal loss focusing exponent
    tversky_alpha: float = 0.5  # Tversky loss weight of false positives (0.5 and 0.5 = Dice)
    tversky_beta: float = 0.5  # Tversky loss weight of false negatives
    augment: tuple[str, ...] = ()  # train-only augmentations in order, from the DARTS list (see README)
    val_every_n_epochs: int = 3  # validate after every n-th epoch (and after the last one)
    early_stopping_patience: int = 5  # stop after this many validations without a better val/JaccardIndex; 0 = off
    save_top_k: int = 1  # how many best checkpoints (by val/JaccardIndex) to keep besides last
    mixed_precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | no | bf16 | fp16 (CUDA only); `accelerate launch --mixed_precision` wins
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip_norm: float = 0.0  # clip the global gradient norm to this value; 0 = off
    seed: int = 42  # seeds python, numpy, torch, the data order and the augmentations
    channels_last: bool = False  # NHWC memory format for model and inputs (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile the model (exported weights stay prefix-free)
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS kernels, so a resumed run is bitwise exact (slower)
    threads: int = 0  # CPU threads per process for torch; 0 = this machine's cores divided among its processes


@dataclass(frozen=True)
class LogConfig:
    artifact_dir: str = "artifacts"  # runs are written to {artifact_dir}/{run_name}
    run_name: str = ""  # empty = a readable generated name
    log_every_n_steps: int = 10  # optimizer steps between train/loss records
    preview_every_n_val: int = 5  # write a preview grid every n-th validation; 0 = never
    wandb_project: str = ""  # log to this Weights & Biases project; empty = no wandb (WANDB_MODE is honoured)
    wandb_entity: str = ""  # wandb entity (team or user); empty = your default entity
    wandb_group: str = ""  # wandb group of the run (cross-validation and tuning set it); empty = none


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), base: dict | None = None,
                base_source: str = "the defaults") -> Config:
    """Read a TOML config (or start from `base`, a nested dict, or the defaults when `path` is None) and apply
    `section.key=value` overrides."""
    import copy

    raw: dict = copy.deepcopy(base) if base is not None and path is None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"config file {path} is not valid TOML: {error}") from None
    source = str(path) if path is not None else base_source
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        section, _, name = key.strip().partition(".")
        value = _parse_value(text.strip())
        # Check the key and its type here, so the error names --set rather than the file it would land in.
        from_dict({section: {name: value}}, f"--set {section}.{name}", choices=False)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"[{section}] in {source} must be a table")
        raw[section][name] = value
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "config", choices: bool = True) -> Config:
    """Build a Config from nested plain values, checking every section, key and type (and, with `choices`, the
    values' ranges and combinations)."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise UserError(f"unknown section [{section}] in {source}{_suggest(section, sections)}")
        if not isinstance(values, dict):
            raise UserError(f"[{section}] in {source} must be a table of keys")
        cls = hints[section]
        field_types = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in field_types:
                where = " (given with --set)" if source.startswith("--set") else f" in {source}"
                raise UserError(f"unknown key {section}.{key}{where}{_suggest(key, field_types, section)}")
            kwargs[key] = _coerce(value, field_types[key], f"{section}.{key}", source)
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    if choices:
        _check_choices(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (lists, not tuples), suitable for TOML, JSON and the wandb config."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {
        section.name: {f.name: plain(getattr(getattr(cfg, section.name), f.name))
                       for f in dataclasses.fields(getattr(cfg, section.name))}
        for section in dataclasses.fields(cfg)
    }


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config (None is written as "none")."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _parse_value(text: str):
    """An override value is read as a TOML value; anything TOML rejects is taken as a bare string (region=East)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value, annotation, key: str, source: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except UserError as error:
                errors.append(error)
        names = " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise UserError(f"{key} in {source} must be {names}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} in {source} must be a table such as {{name = value}}, got {value!r}")
        key_type, value_type = args
        return {_coerce(k, key_type, key, source): _coerce(v, value_type, f"{key}.{k}", source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} in {source} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key, source) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"{key} in {source} must be {'a' if name != 'int' else 'an'} {name}, got {value!r}")


# Words people type for our keys (besides DARTS' flag names), for "did you mean".
SYNONYMS = {
    "learning_rate": "train.lr", "lr": "train.lr", "epochs": "train.max_epochs", "n_epochs": "train.max_epochs",
    "batch": "train.batch_size", "bs": "train.batch_size", "seed": "train.seed", "workers": "data.num_workers",
    "precision": "train.mixed_precision", "amp": "train.mixed_precision", "encoder_name": "model.encoder",
    "architecture": "model.arch", "data_dir": "data.dir", "dataset": "data.dir", "loss_fn": "train.loss",
    "patience": "train.early_stopping_patience", "accumulate": "train.grad_accum_steps",
}


def _suggest(name: str, valid, section: str | None = None) -> str:
    """'; did you mean X?' for an unknown key: DARTS' flag names and common synonyms first (also misspelt), then
    the most similar key name in any section, this section winning ties."""
    name = name.replace("-", "_")
    darts = DARTS_NAMES.get(name)
    if darts and section is not None:
        return f"; did you mean {darts} (DARTS' --{name.replace('_', '-')})?"
    if section is None:
        close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
        return f"; did you mean {close[0]}?" if close else f"; valid: {', '.join(valid)}"
    known = {**SYNONYMS, **DARTS_NAMES}
    word = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
    if word:
        return f"; did you mean {known[word[0]]}?"
    hints = typing.get_type_hints(Config)
    candidates = {f"{s}.{k}": k for s in hints for k in typing.get_type_hints(hints[s])}
    ranked = sorted(candidates, key=lambda full: (-difflib.SequenceMatcher(None, name, candidates[full]).ratio(),
                                                  not full.startswith(f"{section}.")))
    best = ranked[0]
    if difflib.SequenceMatcher(None, name, candidates[best]).ratio() < 0.6:
        return f"; valid in [{section}]: {', '.join(valid)}"
    return f"; did you mean {best}?"


def _check_choices(cfg: Config, source: str) -> None:
    """Value checks that need no data: choices, ranges and combinations."""

    def choice(key: str, value, options):
        if value not in options:
            raise UserError(f"{key} in {source} must be one of {', '.join(options)}, got {value!r}")

    def positive(key: str, value, minimum=1):
        if value < minimum:
            raise UserError(f"{key} in {source} must be at least {minimum}, got {value!r}")

    choice("data.split_method", cfg.data.split_method, SPLIT_METHODS)
    choice("data.fold_method", cfg.data.fold_method, FOLD_METHODS)
    choice("train.mixed_precision", cfg.train.mixed_precision, PRECISION_CHOICES)
    losses = {cfg.train.loss: 1.0} if isinstance(cfg.train.loss, str) else cfg.train.loss
    for name, weight in losses.items():
        choice("train.loss", name, LOSSES)
        if not (weight >= 0 and math.isfinite(weight)):
            raise UserError(f"train.loss.{name} in {source} must be a non-negative weight, got {weight!r}")
    if not any(losses.values()):
        raise UserError(f"train.loss in {source} needs at least one loss with a positive weight")
    for key in ("tversky_alpha", "tversky_beta"):
        if not 0 <= getattr(cfg.train, key) <= 1:
            raise UserError(f"train.{key} in {source} must be in [0, 1], got {getattr(cfg.train, key)!r}")
    choice("data.memory_device", cfg.data.memory_device, MEMORY_DEVICES)
    choice("data.reader", cfg.data.reader, READERS)
    for name in cfg.train.augment:
        choice("train.augment", name, AUGMENTATIONS)
    positive("data.total_folds", cfg.data.total_folds, 2 if cfg.data.fold_method != "none" else 1)
    positive("data.num_workers", cfg.data.num_workers, 0)
    positive("data.subsample", cfg.data.subsample, 0)
    for name, pair in cfg.data.band_normalisation.items():
        if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] == 0:
            raise UserError(f"data.band_normalisation.{name} in {source} must be [factor, offset] with a non-zero "
                            f"factor, got {list(pair)}")
    positive("train.max_epochs", cfg.train.max_epochs)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.val_every_n_epochs", cfg.train.val_every_n_epochs)
    positive("train.early_stopping_patience", cfg.train.early_stopping_patience, 0)
    positive("train.save_top_k", cfg.train.save_top_k, 0)
    positive("train.grad_accum_steps", cfg.train.grad_accum_steps)
    positive("train.threads", cfg.train.threads, 0)
    positive("log.log_every_n_steps", cfg.log.log_every_n_steps)
    positive("log.preview_every_n_val", cfg.log.preview_every_n_val, 0)
    if not 0 <= cfg.data.fold < cfg.data.total_folds and cfg.data.fold_method != "none":
        raise UserError(
            f"data.fold in {source} must be between 0 and data.total_folds - 1 = {cfg.data.total_folds - 1}, "
            f"got {cfg.data.fold}"
        )
    if not (cfg.train.lr > 0 and math.isfinite(cfg.train.lr)):
        raise UserError(f"train.lr in {source} must be a positive number, got {cfg.train.lr!r}")
    if not 0 < cfg.train.gamma <= 1:
        raise UserError(f"train.gamma in {source} must be in (0, 1], got {cfg.train.gamma!r}")
    if cfg.train.focal_alpha is not None and not 0 <= cfg.train.focal_alpha <= 1:
        raise UserError(f"train.focal_alpha in {source} must be none or in [0, 1], got {cfg.train.focal_alpha!r}")
    if cfg.train.grad_clip_norm < 0 or cfg.train.weight_decay < 0:
        raise UserError(f"train.grad_clip_norm and train.weight_decay in {source} must not be negative")
    if cfg.log.run_name and ("/" in cfg.log.run_name or cfg.log.run_name in (".", "..")):
        raise UserError(f"log.run_name in {source} must be a plain directory name, got {cfg.log.run_name!r}")
