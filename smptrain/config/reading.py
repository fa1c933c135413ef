"""Reading a configuration: a TOML file (smptrain's sections and/or a DARTS `[darts]` table), a named recipe's keys,
and `--set section.key=value` overrides, each checked as it is read.

A file sets only what differs from the defaults (`configs/base.toml` lists every key). An unknown section or key,
or a value of the wrong type, is a `UserError` that names the key and the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.config.darts import DARTS_KEYS, Reading, darts_override, merge_darts
from smptrain.config.recipes import with_recipe
from smptrain.config.schema import SECTIONS, Config, check_field, check_settings
from smptrain.core.errors import UserError


@dataclass(frozen=True)
class Loaded:
    """A configuration as read: the Config, and what a DARTS `[darts]` table in the file said (its command options
    and how each key was read; empty without one)."""

    config: Config
    darts: Reading = field(default_factory=Reading)
    source: str = "the defaults"
    from_recipe: tuple[str, ...] = ()  # the keys train.recipe filled in (section.key)
    given: tuple[str, ...] = ()  # the keys the file, its [darts] table or --set gave (section.key, hyphens as _)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), base: dict | None = None,
                base_source: str = "the defaults") -> Config:
    """Read a TOML config (or start from `base`, a nested dict, or the defaults when `path` is None) and apply
    `section.key=value` overrides."""
    return read_config(path, overrides, base, base_source).config


def read_config(path: str | Path | None, overrides: typing.Sequence[str] = (), base: dict | None = None,
                base_source: str = "the defaults") -> Loaded:
    """`load_config` with what a `[darts]` table said. Precedence: defaults < `[darts]` < our own sections <
    `--set`. A `[hyperparameters]` table (DARTS' tuning space, read by smptrain-tune) is left to its reader."""
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
            darts = merge_darts(raw, path, SECTIONS, _check_one)
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
    given = tuple(f"{s}.{k.replace('-', '_')}" for s, values in raw.items() if isinstance(values, dict) for k in values)
    raw, from_recipe = with_recipe(raw, source)
    return Loaded(from_dict(raw, source), darts, source, tuple(from_recipe), given)


def _check_one(section: str, name: str, value, source: str) -> None:
    """One key's type and its own constraint, with the error naming `source`."""
    cfg = from_dict({section: {name: value}}, source, choices=False)
    f = next(f for f in dataclasses.fields(getattr(cfg, section)) if f.name == name)
    check_field(f"{section}.{name}", getattr(getattr(cfg, section), name), f.metadata, source)


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
        check_settings(cfg, source)
    return cfg



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
