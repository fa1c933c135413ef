"""DARTS configuration files read as they are: the `[darts]` table and what each of its keys becomes here.

DARTS (`darts/utils/config.py`) flattens `[darts]` (sub-table names such as `[darts.training.hyperparameters]` are
only for people; of two equal leaf keys the last wins) and matches every leaf key to a flag of the command it runs,
hyphenated (`learning-rate = 4e-4`); a key the command lacks is ignored, so one file serves every command. Here:

- a key of `train-smp`, `test-smp`, `cross-validation-smp` or `tune-smp` becomes its config key (`DARTS_KEYS`) or
  the command option it is (`DARTS_OPTIONS`: `--folds` of smptrain-cv for `n-folds`, ...);
- a training key that smptrain handles otherwise (`device`: Accelerate places the processes) is ignored with its
  reason (`HANDLED_OTHERWISE`); a key of another DARTS command (preprocessing, Earth Engine, inference, paths) is
  ignored (`OTHER_COMMANDS`); both are named in one line;
- any other key is an error naming it and the closest training key when it is close to one (a misspelling), and
  otherwise ignored and named in the same line (a key of a DARTS command newer than this list).

Hyphens and underscores are the same. The module loads no torch (`smptrain.config` uses it).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.core.errors import UserError

# DARTS flag (hyphens as underscores) -> our config key. DARTS' `None` defaults have no TOML spelling; the strings
# "none"/"None" mean them where our key has a spelling of its own (`_NONE_AS`).
DARTS_KEYS = {
    "train_data_dir": "data.dir", "data_split_method": "data.split_method", "data_split_by": "data.split_by",
    "fold_method": "data.fold_method", "total_folds": "data.total_folds", "fold": "data.fold", "bands": "data.bands",
    "subsample": "data.subsample", "in_memory": "data.in_memory", "num_workers": "data.num_workers",
    "model_arch": "model.arch", "model_encoder": "model.encoder", "model_encoder_weights": "model.encoder_weights",
    "weights_from_checkpoint": "model.weights_from",
    "learning_rate": "train.lr", "gamma": "train.gamma", "focal_loss_alpha": "train.focal_alpha",
    "focal_loss_gamma": "train.focal_gamma", "batch_size": "train.batch_size", "max_epochs": "train.max_epochs",
    "augment": "train.augment", "check_val_every_n_epoch": "train.val_every_n_epochs",
    "early_stopping_patience": "train.early_stopping_patience", "save_top_k": "train.save_top_k",
    "random_seed": "train.seed",
    "artifact_dir": "log.artifact_dir", "run_name": "log.run_name", "name": "log.run_name",
    "log_every_n_steps": "log.log_every_n_steps", "plot_every_n_val_epochs": "log.preview_every_n_val",
    "wandb_project": "log.wandb_project", "wandb_entity": "log.wandb_entity",
}
_NONE_AS = {"data.split_method": "none", "model.encoder_weights": "none", "train.focal_alpha": None,
            "data.subsample": 0, "data.split_by": [], "data.bands": [], "train.augment": [], "log.run_name": ""}

# DARTS flag -> (our option's name in `Reading.options`, how it is written on our command line). `name` also names
# the cross-validation (HEAD's crossval-smp --name) and the study (tune-smp --name).
DARTS_OPTIONS = {
    "n_folds": ("folds", "--folds of smptrain-cv and smptrain-tune"),
    "n_randoms": ("n_randoms", "--n-randoms of smptrain-cv and smptrain-tune"),
    "scoring_metric": ("scoring", "--scoring of smptrain-cv and smptrain-tune"),
    "multi_score_strategy": ("strategy", "--strategy of smptrain-cv and smptrain-tune"),
    "n_trials": ("trials", "--trials of smptrain-tune ('grid': --sampler grid)"),
    "retrain_and_test": ("retrain_and_test", "--retrain-and-test of smptrain-tune"),
    "hpconfig": ("space", "--space of smptrain-tune"),
    "cv_name": ("cv_name", "--name of smptrain-cv"),
    "tune_name": ("study", "--study of smptrain-tune"),
}

# Keys of DARTS' training commands that smptrain does not take from a file, and why.
HANDLED_OTHERWISE = {
    "device": "accelerate launch places the processes", "devices": "accelerate launch places the processes",
    "accelerator": "accelerate launch places the processes", "num_nodes": "accelerate launch places the processes",
    "strategy": "accelerate launch places the processes (tuning workers: one smptrain-tune per GPU)",
    "continue_from_checkpoint": "smptrain resumes its own runs: --resume RUN_DIR",
    "run_id": "smptrain-test takes the run directory", "model_ckp": "smptrain-test takes the run directory",
    "lightning_checkpoint": "smptrain-convert takes it as its argument",
    "out_directory": "smptrain-convert --out-dir", "checkpoint_name": "smptrain-convert --name",
    "framework": "smptrain-convert --framework", "advanced_profiler": "unsupported in DARTS too",
    "darts_dir": "smptrain takes train-data-dir and artifact-dir as given",
    "fast_dir": "smptrain takes train-data-dir and artifact-dir as given",
    "large_dir": "smptrain takes train-data-dir and artifact-dir as given",
    "config_file": "the file is --config", "log_dir": "smptrain logs into the run directory",
    "verbose": "a launcher option", "very_verbose": "a launcher option", "log_plain": "a launcher option",
    "tracebacks_show_locals": "a launcher option (smptrain: --debug)",
}

# The keys of DARTS' other commands (training-data preparation, inference pipelines, Earth Engine and AWS access,
# shared paths), from the command signatures of darts-nextgen a59af6f to 1d2746d (which added aux-dir, tcvis-year,
# tcvis-lag, arcticdem-resolution and zoom-factor). DARTS keeps adding keys: one that is none of these and not close
# to a training key is ignored too (`read_darts`).
OTHER_COMMANDS = frozenset("""
    aux_dir tcvis_year tcvis_lag arcticdem_resolution zoom_factor
    admin_dir aoi_file aoi_shapefile append arcticdem_dir arcticdem_elevation_vrt arcticdem_slope_vrt aws_profile_name
    bands_mapping binarization_threshold cache_dir dask_worker data_dir debug_data dem_data_dir disk_dtype
    edge_erosion_size ee_project ee_use_highvolume end_date exclude_nan exclude_nopositive export_bands force
    force_preprocess image_ids include_allzero include_nan_edges input_cache labels_dir mask_erosion_size
    matching_cache matching_day_range matching_max_cloud_cover matching_min_intersects max_cloud_cover max_snow_cover
    memory_dtype metadata_dir min_object_size model_dir model_file model_files months mosaic_id_file mosaic_ids
    no_matching_cache no_raw_data_store notcvis_model_name num_cpus offline orthotiles_dir output_data_dir overlap
    overwrite patch_size periods pipeline_name planet_data_dir prep_data_mosaic_id_file prep_data_scene_id_file
    preprocess_cache quality_level quarters raw_data_source raw_data_store reflection s2_download_cache scale_factor
    scene_id_file scene_ids scenes_dir sentinel2_dir sentinel2_grid_dir start_date sweep_config sweep_db sweep_id
    tcvis_dir tcvis_model_name test_regions test_val_split tile_id tile_ids tpi_inner_radius tpi_outer_radius
    use_band_manager use_highvolume use_quality_mask viz_dir vrt_target_dir wandb_group write_model_outputs years
""".split())

ALL_KEYS = (*DARTS_KEYS, *DARTS_OPTIONS, *HANDLED_OTHERWISE, *sorted(OTHER_COMMANDS))
TRAINING_KEYS = (*DARTS_KEYS, *DARTS_OPTIONS)  # what a misspelling must not silently lose


@dataclass(frozen=True)
class Reading:
    """What a `[darts]` table says here: our config keys, the command options, and how each key was read."""

    config: dict = field(default_factory=dict)  # {section: {key: value}}
    options: dict = field(default_factory=dict)  # {option: value}, see DARTS_OPTIONS
    lines: tuple[tuple[str, object, str], ...] = ()  # (key as written, value, what it became)
    ignored: tuple[str, ...] = ()  # keys of other DARTS commands, as written (without their sub-tables)
    handled_otherwise: tuple[tuple[str, str], ...] = ()  # (key as written, why it is not read)
    unknown: tuple[str, ...] = ()  # keys no DARTS command known here has, far from every training key

    def ignored_line(self, source: str) -> str | None:
        """One line naming every key not read, or None."""
        parts = []
        if self.ignored:
            parts.append(f"{', '.join(self.ignored)} (other DARTS commands)")
        parts += [f"{key} ({why})" for key, why in self.handled_otherwise]
        if self.unknown:
            parts.append(f"{', '.join(self.unknown)} (unknown here: a newer DARTS command's, or a typo of a key "
                         f"that is not a training key)")
        return f"{source}: [darts] keys not used here: {'; '.join(parts)}" if parts else None


def flatten(table: dict) -> dict[str, tuple[str, object]]:
    """DARTS' flattening: {leaf key with underscores: (key as written with its sub-tables, value)}, the last of two
    equal leaf keys winning."""
    flat: dict[str, tuple[str, object]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            written = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{written}.")
            else:
                flat.pop(key.replace("-", "_"), None)  # re-inserted: the order of the file's last word
                flat[key.replace("-", "_")] = (written, value)

    walk(table, "")
    return flat


def read_darts(table: dict, source: str) -> Reading:
    """Translate a `[darts]` table; an unknown key is a UserError naming it and the closest DARTS name."""
    if not isinstance(table, dict):
        raise UserError(f"[darts] in {source} must be a table")
    config: dict = {}
    options: dict = {}
    lines, ignored, otherwise, unknown = [], [], [], []
    for name, (written, value) in flatten(table).items():
        shown = f"[darts] {written}"
        if name in DARTS_KEYS:
            key = DARTS_KEYS[name]
            value = none_value(key, value)
            section, _, leaf = key.partition(".")
            config.setdefault(section, {})[leaf] = value
            lines.append((shown, value, key))
            if name == "name":  # an explicit cv-name or tune-name wins, wherever it stands
                options.setdefault("cv_name", value)
                options.setdefault("study", value)
        elif name in DARTS_OPTIONS:
            option, spelled = DARTS_OPTIONS[name]
            value = option_value(option, value, f"{shown} in {source}")
            if option == "trials" and value == "grid":
                options["sampler"] = "grid"
            else:
                options[option] = value
            lines.append((shown, value, spelled))
        elif name in HANDLED_OTHERWISE:
            otherwise.append((written.rpartition(".")[2], HANDLED_OTHERWISE[name]))
            lines.append((shown, value, f"not read: {HANDLED_OTHERWISE[name]}"))
        elif name in OTHER_COMMANDS:
            ignored.append(written.rpartition(".")[2])
            lines.append((shown, value, "not read: a key of another DARTS command"))
        elif closest(name, TRAINING_KEYS):  # a misspelt training key must not pass unnoticed
            raise UserError(f"unknown key {shown} in {source}: no DARTS command has it{closest(name, TRAINING_KEYS)}")
        else:  # another DARTS command's key (DARTS keeps adding them): it does not change training
            unknown.append(written.rpartition(".")[2])
            lines.append((shown, value, "not read: unknown here"))
    return Reading(config, options, tuple(lines), tuple(ignored), tuple(otherwise), tuple(unknown))


def merge_darts(raw: dict, path: Path, sections: tuple[str, ...], check) -> Reading:
    """Put what `raw["darts"]` says under our own sections of `raw` (which win; the table is removed), each value
    checked by `check(section, key, value, source)` under its DARTS name."""
    darts = read_darts(raw.pop("darts"), str(path))
    lines = []
    for key, value, target in darts.lines:
        section, _, name = target.partition(".")
        if section in sections and name:
            theirs = _own_key(raw.get(section), name)
            if theirs is not None:
                lines.append((key, value, f"{target} (overridden by [{section}] {theirs})"))
                continue
            check(section, name, value, f"{path} (as {key})")
        lines.append((key, value, target))
    for section, values in darts.config.items():
        own = raw.get(section) if isinstance(raw.get(section), dict) else {}
        given = {k.replace("-", "_") for k in own}
        raw[section] = {**{k: v for k, v in values.items() if k not in given}, **own}
    return dataclasses.replace(darts, lines=tuple(lines))


def _own_key(table, name: str) -> str | None:
    """How `name` is written in one of our own sections of the file, or None."""
    if not isinstance(table, dict):
        return None
    return next((k for k in table if k.replace("-", "_") == name), None)


def none_value(key: str, value):
    """DARTS' None written as a string ("none"/"None") becomes our key's own spelling of it."""
    if isinstance(value, str) and value.lower() == "none" and key in _NONE_AS:
        return _NONE_AS[key]
    return value


def option_value(option: str, value, where: str):
    """A command option's value as our command line takes it (scoring: comma-separated, as --scoring)."""
    if option == "scoring":
        metrics = value if isinstance(value, list) else [value]
        if not metrics or not all(isinstance(m, str) for m in metrics):
            raise UserError(f"{where} must be a metric name or a list of them, got {value!r}")
        return ",".join(metrics)
    if option in ("folds", "n_randoms"):
        if isinstance(value, str) and value.lower() == "none":
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where} must be an integer, got {value!r}")
    if option == "trials" and not (value == "grid" or (isinstance(value, int) and not isinstance(value, bool))):
        raise UserError(f"{where} must be an integer or \"grid\", got {value!r}")
    if option == "retrain_and_test" and not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {value!r}")
    if option in ("space", "cv_name", "study", "strategy") and not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}")
    return value


def closest(name: str, among=ALL_KEYS) -> str:
    """'; did you mean X?' among DARTS keys (every one by default; hyphenated, as DARTS writes them), or ''."""
    match = difflib.get_close_matches(name, among, n=1, cutoff=0.6)
    return f"; did you mean {match[0].replace('_', '-')}?" if match else ""


def darts_override(name: str) -> str:
    """Our key for a DARTS name given to `--set` (hyphenated or not); a DARTS option or unused key is refused."""
    name = name.replace("-", "_")
    if name in DARTS_KEYS:
        return DARTS_KEYS[name]
    if name in DARTS_OPTIONS:
        raise UserError(f"--set {name.replace('_', '-')}: DARTS' {name.replace('_', '-')} is "
                        f"{DARTS_OPTIONS[name][1]}; give that option instead")
    if name in HANDLED_OTHERWISE or name in OTHER_COMMANDS:
        why = HANDLED_OTHERWISE.get(name, "a key of another DARTS command")
        raise UserError(f"--set {name.replace('_', '-')}: smptrain does not use this DARTS key ({why})")
    raise UserError(f"--set {name.replace('_', '-')}: neither section.key nor a DARTS key{closest(name)}")
