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

from smptrain.choices import (AUGMENTATIONS, FOLD_METHODS, LOSSES, MEMORY_DEVICES, PRECISION_CHOICES, READERS,
                              RECIPES, SCHEDULES, SPLIT_METHODS, TRACKERS)
from smptrain.darts_config import DARTS_KEYS, Reading, darts_override, merge_darts
from smptrain.recipes import with_recipe
from smptrain.errors import UserError

def setting(default, *, one_of: tuple | None = None, at_least: float | None = None, rule=None):
    """A config field with its constraint beside it: `one_of` (each element, for a list), `at_least`, or `rule` =
    (predicate, "what it must be"). Checked by `from_dict` after the types; combinations of keys are checked in
    `_check_combinations`."""
    metadata = {"one_of": one_of, "at_least": at_least, "rule": rule}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _unit(value) -> bool:
    return 0 <= value <= 1


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/demo"  # dataset root holding data.zarr, metadata.parquet and config.toml
    bands: tuple[str, ...] = ()  # band subset by name, kept in the dataset's order; empty = all bands
    band_normalisation: dict[str, tuple[float, ...]] = setting({}, rule=(  # {name = [factor, offset]}: overrides config.toml and DARTS' band table
        lambda table: all(len(p) == 2 and all(math.isfinite(v) for v in p) and p[0] != 0 for p in table.values()),
        "{name = [factor, offset]} with finite values and a non-zero factor"))
    subsample: int = setting(0, at_least=0)  # train on this many patches of the training split (drawn with random_state 42); 0 = all
    split_method: str = setting("none", one_of=SPLIT_METHODS)  # test split: random | region | sample | none (none = test on everything)
    split_by: tuple[str | float, ...] = ()  # random: [test fraction]; region: region names; sample: sample ids
    fold_method: str = setting("kfold", one_of=FOLD_METHODS)  # train/val split of the non-test part: kfold | shuffle | stratified | region | region-stratified | none
    total_folds: int = setting(5, at_least=1)  # number of folds the fold generator makes (at least 2 unless fold_method = none)
    fold: int = 0  # which fold is the validation set (0-based, below total_folds)
    num_workers: int = setting(2, at_least=0)  # zarr readers: tensorstore decoding threads in-process (0 = all cores), or zarr-python worker processes
    in_memory: bool = False  # read the train/val/test patches into RAM once instead of from zarr every epoch
    memory_device: str = setting("auto", one_of=MEMORY_DEVICES)  # with in_memory, where patches live: auto (the GPU when they fit) | device | cpu
    reader: str = setting("auto", one_of=READERS)  # zarr decoder: auto (tensorstore, else zarr-python) | tensorstore | zarr
    positive_fraction: float = setting(0.0, rule=(_unit, "in [0, 1]"))  # share of every training batch drawn from patches with positive pixels (metadata `empty` false), as nnU-Net oversamples foreground; 0 = off
    accept_empty_mismatch: bool = False  # train although some patches' labels contradict their metadata `empty` flag (a half-copied dataset reads as zeros)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "Unet"  # smp architecture name, as for smp.create_model (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)
    encoder: str = "dpn107"  # smp or timm (tu-...) encoder name; DARTS' default
    encoder_weights: str = "none"  # "none" (random init), weights by name (imagenet, ssl, a timm tag), or a local file
    weights_from: str = ""  # start from the weights of a checkpoint (a run or checkpoint directory; a DARTS .ckpt needs --trust-pickle)


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = setting(100, at_least=1)  # number of passes over the training set
    batch_size: int = setting(8, at_least=1)  # samples per process and step (also used for validation)
    lr: float = setting(1e-3, rule=(lambda v: v > 0 and math.isfinite(v), "a positive number"))  # AdamW learning rate of epoch 0
    weight_decay: float = setting(0.01, rule=(lambda v: v >= 0, "not negative"))  # AdamW decoupled weight decay (torch default)
    gamma: float = setting(0.9, rule=(lambda v: 0 < v <= 1, "in (0, 1]"))  # exponential schedule: the learning rate of epoch e is lr * gamma**e
    schedule: str = setting("exponential", one_of=SCHEDULES)  # exponential (DARTS': lr * gamma**epoch) | cosine (to 0 over the run's steps) | constant
    cosine_epochs: int = setting(0, at_least=0)  # cosine schedule: epochs it spans (fix it to extend a run by resuming); 0 = train.max_epochs
    freeze_encoder_epochs: int = setting(0, at_least=0)  # train only decoder and head for the first n epochs (encoder weights and BatchNorm statistics fixed)
    encoder_lr_scale: float = setting(1.0, rule=(lambda v: v > 0 and math.isfinite(v), "a positive number"))  # the encoder's learning rate as a multiple of the schedule's
    recipe: str = setting("darts", one_of=RECIPES)  # a named recipe (smptrain/recipes.toml) whose keys fill in those the configuration does not set
    warmup_steps: int = setting(0, at_least=0)  # optimizer steps of linear warmup, (step + 1) / warmup_steps times the schedule; 0 = none
    warmup_epochs: int = setting(0, at_least=0)  # linear warmup over this many epochs (instead of warmup_steps); 0 = none
    ema_decay: float = setting(0.0, rule=(lambda v: 0 <= v < 1, "in [0, 1)"))  # exponential moving average of the weights (timm's ModelEmaV3), which validation, best, test and convert use; 0 = off
    ema_warmup: bool = False  # with ema_decay: timm's EMA warmup, decay min(ema_decay, 1 - (1 + step) ** -2/3), so early steps forget the initial weights
    loss: str | dict[str, float] = "focal"  # focal | bce | dice | jaccard | tversky | lovasz, or a weighted sum {focal = 1.0, dice = 0.5}
    focal_alpha: float | None = setting(None, rule=(lambda v: v is None or _unit(v), "none or in [0, 1]"))  # focal loss positive-class weight; none = no class weighting
    focal_gamma: float = 2.0  # focal loss focusing exponent
    pos_weight: float = setting(1.0, rule=(lambda v: v > 0 and math.isfinite(v), "a positive number"))  # bce: weight of the positive pixels' term (torch's pos_weight); 1 = unweighted
    tversky_alpha: float = setting(0.5, rule=(_unit, "in [0, 1]"))  # Tversky loss weight of false positives (0.5 and 0.5 = Dice)
    tversky_beta: float = setting(0.5, rule=(_unit, "in [0, 1]"))  # Tversky loss weight of false negatives
    augment: tuple[str, ...] = setting((), one_of=AUGMENTATIONS)  # train-only augmentations in order, from the DARTS list (see README)
    val_every_n_epochs: int = setting(3, at_least=1)  # validate after every n-th epoch (and after the last one)
    early_stopping_patience: int = setting(5, at_least=0)  # stop after this many validations without a better val/JaccardIndex; 0 = off
    save_top_k: int = setting(1, at_least=0)  # how many best checkpoints (by val/JaccardIndex) to keep besides last
    mixed_precision: str = setting("auto", one_of=PRECISION_CHOICES)  # auto (bf16 where the hardware has it, else fp32) | no | bf16 | fp16 (CUDA only); `accelerate launch --mixed_precision` wins
    grad_accum_steps: int = setting(1, at_least=1)  # micro-batches per optimizer step
    grad_clip_norm: float = setting(0.0, rule=(lambda v: v >= 0, "not negative"))  # clip the global gradient norm to this value; 0 = off
    seed: int = 42  # seeds python, numpy, torch, the data order and the augmentations
    channels_last: bool = False  # NHWC memory format for model and inputs (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile the model (exported weights stay prefix-free)
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS kernels, so a resumed run is bitwise exact (slower)
    threads: int = setting(0, at_least=0)  # CPU threads per process for torch; 0 = this machine's cores divided among its processes


@dataclass(frozen=True)
class LogConfig:
    artifact_dir: str = "artifacts"  # runs are written to {artifact_dir}/{run_name}
    run_name: str = setting("", rule=(lambda v: "/" not in v and v not in (".", ".."), "a plain directory name"))  # empty = a readable generated name
    log_every_n_steps: int = setting(10, at_least=1)  # optimizer steps between train/loss records
    preview_every_n_val: int = setting(5, at_least=0)  # write a preview grid every n-th validation; 0 = never
    wandb_project: str = ""  # log to this Weights & Biases project; empty = no wandb (WANDB_MODE is honoured)
    wandb_entity: str = ""  # wandb entity (team or user); empty = your default entity
    wandb_group: str = ""  # group of the run in wandb and MLflow (cross-validation and tuning set it); empty = none
    trackers: tuple[str, ...] = setting((), one_of=TRACKERS, rule=(lambda v: len(set(v)) == len(v), "without a tracker named twice"))  # any of wandb, tensorboard, mlflow; empty = wandb when wandb_project is set
    mlflow_experiment: str = setting("smptrain", rule=(bool, "not empty"))  # MLflow experiment (MLFLOW_TRACKING_URI, else a file store in {artifact_dir}/mlruns)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def replace(cfg: Config, **changes) -> Config:
    """`cfg` with dotted keys changed: `replace(cfg, **{"data.fold": 2, "train.seed": 21})` (frozen dataclasses,
    so every section that changes is rebuilt)."""
    sections = {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)
                                       for section, values in sections.items()})


@dataclass(frozen=True)
class Loaded:
    """A configuration as read: the Config, and what a DARTS `[darts]` table in the file said (its command options
    and how each key was read; empty without one)."""

    config: Config
    darts: Reading = field(default_factory=Reading)
    source: str = "the defaults"
    from_recipe: tuple[str, ...] = ()  # the keys train.recipe filled in (section.key)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), base: dict | None = None,
                base_source: str = "the defaults") -> Config:
    """Read a TOML config (or start from `base`, a nested dict, or the defaults when `path` is None) and apply
    `section.key=value` overrides."""
    return read_config(path, overrides, base, base_source).config


def read_config(path: str | Path | None, overrides: typing.Sequence[str] = (), base: dict | None = None,
                base_source: str = "the defaults") -> Loaded:
    """`load_config` with what a `[darts]` table said. Precedence: defaults < `[darts]` < our own sections <
    `--set`. A `[hyperparameters]` table (DARTS' tuning space, read by smptrain-tune) is left to its reader."""
    import copy

    raw: dict = copy.deepcopy(base) if base is not None and path is None else {}
    darts = Reading()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"config file {path} is not valid TOML: {error}") from None
        if isinstance(raw.get("hyperparameters"), dict):
            raw.pop("hyperparameters")
        if "darts" in raw:
            darts = merge_darts(raw, path, _SECTIONS, _check_one)
    source = str(path) if path is not None else base_source
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        key = key.strip()
        if "." not in key or key.startswith("darts."):  # a DARTS name: --set learning-rate=4e-4
            key = darts_override(key.removeprefix("darts."))
        section, _, name = key.partition(".")
        name = name.replace("-", "_")
        value = _parse_value(text.strip())
        # Check the key and its type here, so the error names --set rather than the file it would land in.
        from_dict({section: {name: value}}, f"--set {section}.{name}", choices=False)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"[{section}] in {source} must be a table")
        raw[section][name] = value
    raw, from_recipe = with_recipe(raw, source)
    return Loaded(from_dict(raw, source), darts, source, tuple(from_recipe))


def _check_one(section: str, name: str, value, source: str) -> None:
    """One key's type and its own constraint, with the error naming `source`."""
    cfg = from_dict({section: {name: value}}, source, choices=False)
    f = next(f for f in dataclasses.fields(getattr(cfg, section)) if f.name == name)
    _check_field(f"{section}.{name}", getattr(getattr(cfg, section), name), f.metadata, source)


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
            key = key.replace("-", "_")  # hyphenated as DARTS writes keys: max-epochs = max_epochs
            if key not in field_types:
                where = " (given with --set)" if source.startswith("--set") else f" in {source}"
                raise UserError(f"unknown key {section}.{key}{where}{_suggest(key, field_types, section)}")
            kwargs[key] = _coerce(value, field_types[key], f"{section}.{key}", source)
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    if choices:
        _check_settings(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (lists, not tuples), suitable for TOML, JSON and the wandb config."""
    return {
        section.name: {f.name: plain(getattr(getattr(cfg, section.name), f.name))
                       for f in dataclasses.fields(getattr(cfg, section.name))}
        for section in dataclasses.fields(cfg)
    }


def dotted_keys(config: dict, prefix: str = "") -> dict:
    """A configuration as a dict (`to_dict`, or config.toml read back) with dotted keys: {"train.lr": 0.001, ...}.
    The tables that are the value of one key (train.loss, data.band_normalisation) stay whole."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix and key in ("loss", "band_normalisation")):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def plain(value):
    """`value` as plain TOML/JSON values, which a weights-only torch load accepts too: dicts with str keys, lists for
    tuples, Python numbers for numpy and torch scalars, and str for paths and anything else."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


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
    darts = DARTS_KEYS.get(name)
    if darts and section is not None:
        return f"; did you mean {darts} (DARTS' --{name.replace('_', '-')})?"
    if section is None:
        close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
        return f"; did you mean {close[0]}?" if close else f"; valid: {', '.join(valid)}"
    known = {**SYNONYMS, **DARTS_KEYS}
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


def _check_settings(cfg: Config, source: str) -> None:
    """Each field's own constraint (`setting`), then the combinations of keys."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            _check_field(f"{section.name}.{f.name}", getattr(values, f.name), f.metadata, source)
    _check_combinations(cfg, source)


def _check_field(key: str, value, rule, source: str) -> None:
    if rule.get("one_of"):
        for item in value if isinstance(value, tuple) else (value,):
            if item not in rule["one_of"]:
                raise UserError(f"{key} in {source} must be one of {', '.join(rule['one_of'])}, got {item!r}")
    if rule.get("at_least") is not None and value < rule["at_least"]:
        raise UserError(f"{key} in {source} must be at least {rule['at_least']}, got {value!r}")
    if rule.get("rule") is not None and not rule["rule"][0](value):
        shown = {k: list(v) for k, v in value.items()} if isinstance(value, dict) else value
        raise UserError(f"{key} in {source} must be {rule['rule'][1]}, got {shown!r}")


def _check_combinations(cfg: Config, source: str) -> None:
    """What one field cannot check alone."""
    losses = {cfg.train.loss: 1.0} if isinstance(cfg.train.loss, str) else cfg.train.loss
    for name, weight in losses.items():
        if name not in LOSSES:
            raise UserError(f"train.loss in {source} must be one of {', '.join(LOSSES)}, got {name!r}")
        if not (weight >= 0 and math.isfinite(weight)):
            raise UserError(f"train.loss.{name} in {source} must be a non-negative weight, got {weight!r}")
    if not any(losses.values()):
        raise UserError(f"train.loss in {source} needs at least one loss with a positive weight")
    if cfg.train.pos_weight != 1 and "bce" not in losses:
        raise UserError(f"train.pos_weight in {source} weighs bce's positive pixels, but train.loss ({cfg.train.loss!r}) has no bce; add bce or leave train.pos_weight at 1")
    if 0 < cfg.data.positive_fraction * cfg.train.batch_size < 0.5:  # rounded half up to places of a batch
        raise UserError(f"data.positive_fraction = {cfg.data.positive_fraction:g} in {source} gives no positive patch in a batch "
                        f"of {cfg.train.batch_size} (train.batch_size); use at least {0.5 / cfg.train.batch_size:g}")
    if cfg.train.warmup_steps and cfg.train.warmup_epochs:
        raise UserError(f"train.warmup_steps and train.warmup_epochs in {source} both set a warmup; give one of them")
    if "wandb" in cfg.log.trackers and not cfg.log.wandb_project:
        raise UserError(f"log.trackers in {source} includes wandb but log.wandb_project is empty; set the project")
    if cfg.data.fold_method != "none":
        if cfg.data.total_folds < 2:
            raise UserError(f"data.total_folds in {source} must be at least 2, got {cfg.data.total_folds!r}")
        if not 0 <= cfg.data.fold < cfg.data.total_folds:
            raise UserError(f"data.fold in {source} must be between 0 and data.total_folds - 1 = "
                            f"{cfg.data.total_folds - 1}, got {cfg.data.fold}")
