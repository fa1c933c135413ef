"""The configuration's schema: frozen dataclasses with one commented default each, every field's constraint beside
it (`setting`), and the checks of keys that only make sense together.

Reading a file and `--set` overrides: `smptrain.config.reading`; writing a configuration out: `smptrain.config.dump`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from smptrain.core.choices import (
    AUGMENTATIONS,
    FOLD_METHODS,
    LOSSES,
    MEMORY_DEVICES,
    PRECISION_CHOICES,
    PROGRESS_MODES,
    READERS,
    RECIPES,
    SCHEDULES,
    SPLIT_METHODS,
    TRACKERS,
)
from smptrain.core.errors import UserError


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
    recipe: str = setting("darts", one_of=RECIPES)  # a named recipe (smptrain/config/recipes.toml) whose keys fill in those the configuration does not set
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
    progress: str = setting("auto", one_of=PROGRESS_MODES)  # auto (a bar in a terminal, plain lines in a log file) | bar | lines | off; SMPTRAIN_PROGRESS wins
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



SECTIONS = tuple(f.name for f in dataclasses.fields(Config))



def replace(cfg: Config, **changes) -> Config:
    """`cfg` with dotted keys changed: `replace(cfg, **{"data.fold": 2, "train.seed": 21})` (frozen dataclasses,
    so every section that changes is rebuilt)."""
    sections = {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)
                                       for section, values in sections.items()})



def check_settings(cfg: Config, source: str) -> None:
    """Each field's own constraint (`setting`), then the combinations of keys."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            check_field(f"{section.name}.{f.name}", getattr(values, f.name), f.metadata, source)
    check_combinations(cfg, source)


def check_field(key: str, value, rule, source: str) -> None:
    if rule.get("one_of"):
        for item in value if isinstance(value, tuple) else (value,):
            if item not in rule["one_of"]:
                raise UserError(f"{key} in {source} must be one of {', '.join(rule['one_of'])}, got {item!r}")
    if rule.get("at_least") is not None and value < rule["at_least"]:
        raise UserError(f"{key} in {source} must be at least {rule['at_least']}, got {value!r}")
    if rule.get("rule") is not None and not rule["rule"][0](value):
        shown = {k: list(v) for k, v in value.items()} if isinstance(value, dict) else value
        raise UserError(f"{key} in {source} must be {rule['rule'][1]}, got {shown!r}")


def check_combinations(cfg: Config, source: str) -> None:
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
