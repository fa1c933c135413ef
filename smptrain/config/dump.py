"""A configuration written out: plain values (JSON, the trackers' configuration, a weights-only torch load), dotted
keys, and TOML that `smptrain.config.load_config` reads back to an equal Config."""

from __future__ import annotations

import dataclasses
import math

from smptrain.config.schema import Config


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
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    """One value as TOML writes it (None as "none", the spelling smptrain's keys read as None)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
