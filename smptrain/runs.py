"""A run directory's identity: where its data is, and whether a dataset is the one it was trained on.

A run records its paths absolute (so test, convert and resume work from any working directory) and, in `run.json`,
the paths as they were given, where the dataset lies relative to the run directory, and a fingerprint of the
dataset. When the data has moved, a resumed or tested run finds it again next to the run (both moved together), or
takes `--set data.dir=NEW` if the dataset there has the same fingerprint; a different dataset is refused for
resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from smptrain.config import Config
from smptrain.errors import UserError

PATH_KEYS = (("data", "dir"), ("log", "artifact_dir"), ("model", "encoder_weights"), ("model", "weights_from"))


def absolute_paths(cfg: Config) -> tuple[Config, dict]:
    """cfg with its paths made absolute, and the paths as given ({section.key: value})."""
    given, sections = {}, {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not value or (key == "encoder_weights" and value.lower() == "none"):
            continue
        given[f"{section}.{key}"] = value
        sections.setdefault(section, {})[key] = str(Path(value).expanduser().absolute())
    changed = {s: dataclasses.replace(getattr(cfg, s), **values) for s, values in sections.items()}
    return dataclasses.replace(cfg, **changed), given


def fingerprint(info) -> dict:
    """What makes a dataset the same one: rows, patch size, band names and a checksum of the training metadata."""
    columns = info.metadata.sort_index()[["sample_id", "region", "empty"]]
    digest = hashlib.sha256(columns.to_csv().encode()).hexdigest()
    return {"rows": int(info.num_rows), "patch_size": int(info.patch_size), "bands": list(info.bands),
            "metadata_sha256": digest}


def identity(cfg: Config, given: dict, info, run_dir: Path) -> dict:
    """What run.json records about the data, next to the run's name and id."""
    return {"paths_as_given": given, "data_fingerprint": fingerprint(info),
            "data_dir_from_run": os.path.relpath(Path(cfg.data.dir).absolute(), Path(run_dir).absolute())}


def read_identity(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def find_data(run_dir: Path, cfg: Config) -> Config:
    """cfg whose data.dir is where the run's dataset is now: as configured, or (when that path is gone) where it
    lies relative to the run directory, for data and runs moved together."""
    if Path(cfg.data.dir).is_dir():
        return cfg
    relative = read_identity(run_dir).get("data_dir_from_run")
    moved = (Path(run_dir).absolute() / relative).resolve() if relative else None
    if moved is not None and moved.is_dir():
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(moved)))
    raise UserError(f"the dataset of run {run_dir} is not at {cfg.data.dir} any more; if it moved, give its new "
                    f"place with --set data.dir=NEW")


def is_same_data(run_dir: Path, info) -> bool | None:
    """Whether `info` is the dataset the run was trained on (None when the run predates fingerprints)."""
    expected = read_identity(run_dir).get("data_fingerprint")
    return None if expected is None else expected == fingerprint(info)


def require_same_data(run_dir: Path, info) -> None:
    expected = read_identity(run_dir).get("data_fingerprint")
    if expected is None:
        return
    found = fingerprint(info)
    if found != expected:
        differing = next(key for key in expected if expected[key] != found.get(key))
        raise UserError(f"{info.root} is not the dataset run {Path(run_dir).name} was trained on (its {differing} "
                        f"differs); resuming needs the same dataset: give its place with --set data.dir=PATH")
