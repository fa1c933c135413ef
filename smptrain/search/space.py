"""The search space of `smptrain-tune`: DARTS' hpconfig read as it is, and the plan of trials drawn from it.

A `[hyperparameters]` table whose entries are a list (a choice), a scalar (a constant), `{low, high}` (both
integers: integer uniform, high inclusive; both floats: uniform), or an explicit `{distribution = "uniform" |
"loguniform" | "intuniform" | "choice" | "constant" | "reversed_loguniform", ...}`. Names are DARTS'
(`learning_rate`, `gamma`, `focal_loss_alpha`, `model_encoder`, `augment`, `bands`, ...) or smptrain's own keys
(`"train.lr"`, or a `[hyperparameters.train]` table). `random` and `grid` draw the whole plan up front exactly as
DARTS does (sklearn's `ParameterSampler` with `random_state=42` over the file's entries, in DARTS' order); Optuna
samples the rest (`optuna_distributions`, `to_optuna`, `values_of`).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smptrain.config import Config, from_dict, plain, to_dict
from smptrain.config.darts import DARTS_KEYS
from smptrain.core.errors import UserError

SAMPLERS = ("random", "grid", "tpe")
DISTRIBUTIONS = ("uniform", "loguniform", "reversed_loguniform", "intuniform", "choice", "constant")
# The DARTS Hyperparameters fields a hpconfig may name, and our keys for them (DARTS' own keys for those fields).
DARTS_HYPERPARAMETERS = {name: DARTS_KEYS[name] for name in (
    "model_arch", "model_encoder", "model_encoder_weights", "augment", "learning_rate", "gamma", "focal_loss_alpha",
    "focal_loss_gamma", "batch_size", "bands")}
SECTIONS = ("data", "model", "train", "log")


# --- the space file ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One entry of the space: its name in the file, our config key, and how it is drawn."""

    name: str  # as in the file (hyphens as underscores): DARTS' sampling order is by this name
    key: str  # section.key
    kind: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    n: float = 1.0  # reversed_loguniform's upper bound
    choices: tuple = ()


class ReversedLogUniform:
    """DARTS' reversed log-uniform: n - Y with Y log-uniform on [n - high, n - low], dense near n (e.g. gamma)."""

    def __init__(self, low: float, high: float, n: float = 1.0):
        self.low, self.high, self.n = low, high, n

    def rvs(self, random_state=None):
        import scipy.stats

        return self.n - scipy.stats.loguniform.rvs(self.n - self.high, self.n - self.low, random_state=random_state)


def read_space(path: Path, cfg: Config) -> list[Param]:
    """Parse and check a DARTS hpconfig (or one with our keys); every problem is one sentence naming the entry."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"space file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"space file {path} is not valid TOML: {error}") from None
    table = raw.get("hyperparameters")
    if not isinstance(table, dict) or not table:
        raise UserError(f"space file {path} needs a [hyperparameters] table with at least one entry")
    entries = []
    for name, spec in table.items():
        if name in SECTIONS and isinstance(spec, dict) and not _is_spec(spec):
            entries += [(f"{name}.{k}", v) for k, v in spec.items()]  # [hyperparameters.train] lr = ...
        else:
            entries.append((name, spec))
    params = [_param(name.replace("-", "_"), spec, path) for name, spec in entries]
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise UserError(f"space file {path} names {sorted({k for k in keys if keys.count(k) > 1})[0]} twice")
    for param in params:  # every value the entry can take must be a valid value of its key
        for value in _corners(param):
            apply_values(cfg, {param.key: value}, f"space file {path}, entry {param.name!r}")
    return params


def _is_spec(spec: dict) -> bool:
    return "distribution" in spec or ("low" in spec and "high" in spec)


def _param(name: str, spec, path: Path) -> Param:
    where = f"space file {path}, entry {name!r}"
    key = DARTS_HYPERPARAMETERS.get(name) or (name if "." in name else None)
    if key is None:
        hint = DARTS_KEYS.get(name)
        raise UserError(f"{where}: unknown hyper-parameter; use a DARTS name ({', '.join(DARTS_HYPERPARAMETERS)}) or "
                        f"a config key such as \"train.lr\"{f' (did you mean {hint}?)' if hint else ''}")
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list of choices")
        return Param(name, key, "choice", choices=tuple(_freeze(v) for v in spec))
    if not isinstance(spec, dict):
        return Param(name, key, "constant", choices=(_freeze(spec),))
    if "distribution" not in spec:
        if not ("low" in spec and "high" in spec):
            raise UserError(f"{where}: a table needs low and high, or a distribution ({', '.join(DISTRIBUTIONS)})")
        low, high = spec["low"], spec["high"]
        if _is_int(low) and _is_int(high):
            return _ranged(Param(name, key, "intuniform", low, high), where)
        if isinstance(low, float) and isinstance(high, float):
            return _ranged(Param(name, key, "uniform", low, high), where)
        raise UserError(f"{where}: low and high must both be integers or both be floats, got {low!r} and {high!r}")
    kind = spec["distribution"]
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise UserError(f"{where}: a choice needs a non-empty list 'choices'")
        return Param(name, key, "choice", choices=tuple(_freeze(v) for v in spec["choices"]))
    if kind == "constant":
        if "value" not in spec:
            raise UserError(f"{where}: a constant needs 'value'")
        return Param(name, key, "constant", choices=(_freeze(spec["value"]),))
    for bound in ("low", "high"):
        if not _is_number(spec.get(bound)):
            raise UserError(f"{where}: {kind} needs a number '{bound}', got {spec.get(bound)!r}")
    if kind == "intuniform" and not (_is_int(spec["low"]) and _is_int(spec["high"])):
        raise UserError(f"{where}: intuniform needs integer low and high, got {spec['low']!r} and {spec['high']!r}")
    param = _ranged(Param(name, key, kind, spec["low"], spec["high"], float(spec.get("n", 1.0))), where)
    if kind == "loguniform" and param.low <= 0:
        raise UserError(f"{where}: loguniform needs low > 0, got {param.low!r}")
    if kind == "reversed_loguniform" and not (0 <= param.low and param.high < param.n):
        raise UserError(f"{where}: reversed_loguniform needs 0 <= low < high < n = {param.n:g}")
    return param


def _ranged(param: Param, where: str) -> Param:
    if not param.low < param.high:
        raise UserError(f"{where}: low must be less than high, got low = {param.low!r}, high = {param.high!r}")
    return param


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _corners(param: Param) -> list:
    if param.kind in ("choice", "constant"):
        return [_thaw(v) for v in param.choices]
    return [param.low, param.high]


def apply_values(cfg: Config, values: dict, source: str) -> Config:
    """cfg with `values` ({section.key: value}) set, checked like any config."""
    raw = to_dict(cfg)
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in raw or name not in raw[section]:
            raise UserError(f"{source}: {key} is not a config key")
        raw[section][name] = _thaw(value)
    return from_dict(raw, source)


# --- trials: what each slot runs -----------------------------------------------------------------------------------


def plan(params: list[Param], sampler: str, trials: int | None) -> list[dict]:
    """Random or grid: every slot's parameters, drawn as DARTS draws them (sklearn, random_state=42)."""
    from sklearn.model_selection import ParameterSampler

    distributions = {}
    for p in params:
        if p.kind in ("choice", "constant"):
            distributions[p.name] = list(p.choices)
        elif sampler == "grid":
            raise UserError(f"a grid search needs every entry to be a list of choices; {p.name!r} is {p.kind}")
        elif p.kind == "uniform":
            import scipy.stats

            distributions[p.name] = scipy.stats.uniform(p.low, p.high - p.low)
        elif p.kind == "loguniform":
            import scipy.stats

            distributions[p.name] = scipy.stats.loguniform(p.low, p.high)
        elif p.kind == "intuniform":
            import scipy.stats

            distributions[p.name] = scipy.stats.randint(p.low, p.high + 1)
        else:
            distributions[p.name] = ReversedLogUniform(p.low, p.high, p.n)
    size = int(np.prod([len(v) for v in distributions.values()])) if sampler == "grid" else None
    count = size if trials is None or (size is not None and trials > size) else trials
    by_name = {p.name: p for p in params}
    drawn = ParameterSampler(distributions, n_iter=count, random_state=42)
    return [{by_name[n].key: plain(v) for n, v in entry.items()} for entry in drawn]


def optuna_distributions(params: list[Param]) -> dict:
    """Optuna's view of the space (constants are not searched): name -> distribution."""
    import optuna.distributions as D

    found = {}
    for p in params:
        if p.kind == "choice":
            found[p.key] = D.CategoricalDistribution([_categorical(v) for v in p.choices])
        elif p.kind == "uniform":
            found[p.key] = D.FloatDistribution(p.low, p.high)
        elif p.kind == "loguniform":
            found[p.key] = D.FloatDistribution(p.low, p.high, log=True)
        elif p.kind == "intuniform":
            found[p.key] = D.IntDistribution(p.low, p.high)
        elif p.kind == "reversed_loguniform":  # searched as n - value, log-uniform
            found[f"{p.n:g}-{p.key}"] = D.FloatDistribution(p.n - p.high, p.n - p.low, log=True)
    return found


def _categorical(value):
    """Optuna stores None, bool, int, float and str; lists (augmentations, bands) travel as JSON."""
    return json.dumps(_thaw(value)) if isinstance(value, (tuple, list)) else value


def values_of(params: list[Param], optuna_params: dict) -> dict:
    """Config values from a trial's Optuna parameters (and the constants)."""
    values = {}
    for p in params:
        if p.kind == "constant":
            values[p.key] = _thaw(p.choices[0])
        elif p.kind == "reversed_loguniform":
            values[p.key] = p.n - optuna_params[f"{p.n:g}-{p.key}"]
        else:
            value = optuna_params[p.key]
            values[p.key] = json.loads(value) if p.kind == "choice" and isinstance(value, str) and \
                any(isinstance(c, tuple) for c in p.choices) else value
    return values


def to_optuna(params: list[Param], values: dict) -> dict:
    """The inverse of `values_of`: Optuna parameters of planned config values."""
    found = {}
    for p in params:
        if p.kind == "constant":
            continue
        if p.kind == "reversed_loguniform":
            found[f"{p.n:g}-{p.key}"] = p.n - values[p.key]
        else:
            found[p.key] = _categorical(values[p.key]) if p.kind == "choice" else values[p.key]
    return found


def plan_sampler(planned: list[dict]):
    """An Optuna sampler that answers each `suggest` with the trial slot's planned value."""
    import optuna

    class PlanSampler(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return planned[trial.user_attrs["slot"]][name]

    return PlanSampler()
