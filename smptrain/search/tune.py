"""Hyper-parameter search on Optuna: `smptrain-tune --config FILE --space SPACE.toml`.

    smptrain-tune --config FILE --space SPACE.toml [--trials N] [--sampler random|grid|tpe] [--study NAME]
                  [--storage URL] [--single-run | --folds N --seeds 42,21,69] [--prune] [--retrain-and-test]

The space file is DARTS' hpconfig, read as it is: a `[hyperparameters]` table whose entries are a list (a choice),
a scalar (a constant), `{low, high}` (both integers: integer uniform, high inclusive; both floats: uniform), or an
explicit `{distribution = "uniform" | "loguniform" | "intuniform" | "choice" | "constant" |
"reversed_loguniform", ...}`. Names are DARTS' (`learning_rate`, `gamma`, `focal_loss_alpha`, `model_encoder`,
`augment`, `bands`, ...) or smptrain's own keys (`"train.lr"`, or a `[hyperparameters.train]` table).

Samplers. `random` (DARTS' default) and `grid` draw the whole plan up front exactly as DARTS does (sklearn's
`ParameterSampler` with `random_state=42` over the file's entries, in DARTS' order), and trial slot k runs plan
entry k, whichever worker takes it: a DARTS user's search gets the same parameters, and many workers never run the
same entry twice. `tpe` is Optuna's TPE (seeded 42 for the first worker; TPE adapts to the finishing order, so
several workers are not reproducible).

Many workers, one study. Every worker started with the same `--study` and `--storage` (by default a journal file
`{artifact_dir}/{study}/study.journal`, which works on a shared filesystem; any Optuna RDB URL such as
`postgresql://...` works too) takes the next free slot until `--trials` slots exist. A worker records its host, pid
and a heartbeat on its running trial; one that dies is found (its pid gone on the same host, or no heartbeat for
three intervals) by the next worker that looks, which marks the trial FAIL and queues a retry with the same
parameters, which continues the dead trial's cross-validation directory (finished runs kept, the last one
resumed). Optuna's storage makes each of those transitions happen once.

Outputs in `{artifact_dir}/{study}/`: `trials.csv` and `trials.parquet` (number, slot, state, parameters, score,
stability, directories), `best.toml` (the best stable configuration, ready for `python -m smptrain.train --config`),
`history.png` and `parameters.png`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from smptrain.cli import config_options, resolve_config
from smptrain.config import DARTS_NAMES, Config, dump_toml, from_dict, replace, to_dict
from smptrain.search.cv import (DEFAULT_SCORING, STRATEGIES, cross_validate, fold_count, parse_scoring, parse_seeds,
                         write_frame)
from smptrain.errors import UserError, report_user_errors

SAMPLERS = ("random", "grid", "tpe")
DISTRIBUTIONS = ("uniform", "loguniform", "reversed_loguniform", "intuniform", "choice", "constant")
# The DARTS Hyperparameters fields a hpconfig may name, and our keys for them.
DARTS_HYPERPARAMETERS = {
    "model_arch": "model.arch", "model_encoder": "model.encoder", "model_encoder_weights": "model.encoder_weights",
    "augment": "train.augment", "learning_rate": "train.lr", "gamma": "train.gamma",
    "focal_loss_alpha": "train.focal_alpha", "focal_loss_gamma": "train.focal_gamma", "batch_size": "train.batch_size",
    "bands": "data.bands",
}
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
            _apply(cfg, {param.key: value}, f"space file {path}, entry {param.name!r}")
    return params


def _is_spec(spec: dict) -> bool:
    return "distribution" in spec or ("low" in spec and "high" in spec)


def _param(name: str, spec, path: Path) -> Param:
    where = f"space file {path}, entry {name!r}"
    key = DARTS_HYPERPARAMETERS.get(name) or (name if "." in name else None)
    if key is None:
        hint = DARTS_NAMES.get(name)
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


def _apply(cfg: Config, values: dict, source: str) -> Config:
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
    return [{by_name[n].key: _plain(v) for n, v in entry.items()} for entry in drawn]


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


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


# --- the study ---------------------------------------------------------------------------------------------------


def open_study(name: str, storage: str | None, study_dir: Path):
    """The study, created by whichever worker comes first. `storage`: None (a journal file in the study directory),
    a file path (a journal file, e.g. on a shared filesystem) or an Optuna RDB URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        if storage is None or "://" not in storage:
            journal = Path(storage) if storage else study_dir / "study.journal"
            journal.parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(journal)))
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    except Exception as error:  # a URL Optuna cannot open (driver missing, server down), an unwritable path
        raise UserError(f"--storage {storage!r} cannot be opened: {str(error).splitlines()[0][:200]}") from None


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_stale(trial, grace: float) -> bool:
    owner = str(trial.user_attrs.get("worker", ":"))
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - float(trial.user_attrs.get("heartbeat", time.time())) > grace


def recover_dead_trials(study, grace: float, say) -> None:
    """Mark the trials of dead workers FAIL and queue each once more with its parameters and slot; the storage lets
    only one worker make a given trial FAIL, so each is queued once."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, grace):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another worker got there first
            continue
        study.enqueue_trial(trial.params, user_attrs={"slot": trial.user_attrs.get("slot"),
                                                      "retry_of": trial.number,
                                                      "directory": trial.user_attrs.get("directory"),
                                                      **({"values": trial.user_attrs["values"]}
                                                         if "values" in trial.user_attrs else {})})
        say(f"trial {trial.number} lost its worker ({trial.user_attrs.get('worker')}); queued again")


def fresh_slots(study) -> int:
    """How many slots have been handed out (retries reuse their slot)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if "retry_of" not in t.user_attrs
               and "slot" in t.user_attrs)


class Heartbeat:
    """Records, every `interval` seconds, that this worker is still running its trial."""

    def __init__(self, trial, interval: float):
        self.stop = threading.Event()

        def beat():
            while not self.stop.wait(interval):
                try:
                    trial.set_user_attr("heartbeat", time.time())
                except Exception:  # the trial was finished meanwhile
                    return

        self.thread = threading.Thread(target=beat, daemon=True, name="smptrain-heartbeat")
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@dataclass
class TuneOptions:
    trials: int | None
    sampler: str
    single_run: bool
    folds: list[int]
    seeds: list[int]
    scoring: list[str]
    strategy: str
    score_on: str
    prune: bool
    heartbeat: float


def work(cfg: Config, params: list[Param], study_dir: Path, study, options: TuneOptions, say=print) -> str:
    """This worker's share of the study: trials until every slot is taken. Returns 'finished' or 'interrupted'."""
    import optuna
    from optuna.trial import TrialState

    planned = plan(params, options.sampler, options.trials) if options.sampler != "tpe" else None
    total = len(planned) if planned is not None else options.trials
    study.sampler = (plan_sampler([to_optuna(params, entry) for entry in planned]) if planned is not None
                     else optuna.samplers.TPESampler(seed=42))
    reseeded = planned is not None
    distributions = optuna_distributions(params)
    pruner = optuna.pruners.MedianPruner() if options.prune else optuna.pruners.NopPruner()
    study.pruner = pruner
    grace = 3 * options.heartbeat
    while True:
        recover_dead_trials(study, grace, say)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if fresh_slots(study) >= total and not waiting:
            return "finished"
        trial = study.ask()
        if "slot" not in trial.user_attrs:  # a fresh trial: the next slot, in the order the storage numbered them
            earlier = [t for t in study.get_trials(deepcopy=False) if "retry_of" not in t.user_attrs
                       and t.number < trial.number and (t.user_attrs.get("slot") is not None or t.state != TrialState.WAITING)]
            slot = len(earlier)
            trial.set_user_attr("slot", slot)
            if slot >= total:  # another worker took the last slot a moment ago
                trial.set_user_attr("failure", "surplus: every slot was already taken")
                study.tell(trial, state=TrialState.FAIL)
                continue
            if not reseeded:  # TPE: seeded by this worker's first slot, so workers do not draw the same points
                study.sampler, reseeded = optuna.samplers.TPESampler(seed=42 + slot), True
        trial.set_user_attr("worker", me())
        trial.set_user_attr("heartbeat", time.time())
        status = run_trial(cfg, params, planned, study_dir, study, trial, distributions, options, say)
        if status == "interrupted":
            return status


def suggest(trial, name: str, distribution):
    import optuna.distributions as D

    if isinstance(distribution, D.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, D.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def run_trial(cfg: Config, params: list[Param], planned: list[dict] | None, study_dir: Path, study, trial,
              distributions: dict, options: TuneOptions, say) -> str:
    from optuna.trial import TrialState

    optuna_params = {name: suggest(trial, name, distribution) for name, distribution in distributions.items()}
    # The exact values: a retry's own, the plan's (no round trip through n - x), or what TPE suggested.
    if "values" in trial.user_attrs:
        values = json.loads(trial.user_attrs["values"])
    else:
        values = planned[trial.user_attrs["slot"]] if planned is not None else values_of(params, optuna_params)
    directory = trial.user_attrs.get("directory") or f"trial-{trial.number:04d}"
    trial.set_user_attr("directory", directory)
    trial.set_user_attr("values", json.dumps(values))
    say(f"trial {trial.number} (slot {trial.user_attrs['slot']}): "
        + ", ".join(f"{k} = {v}" for k, v in values.items()))
    trial_cfg = _apply(cfg, values, f"trial {trial.number}")
    trial_cfg = replace(trial_cfg, **{"log.wandb_group": study.study_name})
    metric = parse_scoring(options.scoring)[0][0]

    def report(step: int, metrics: dict) -> bool:
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            return False
        trial.report(value, step)
        return trial.should_prune()

    beat = Heartbeat(trial, options.heartbeat)
    try:
        result = cross_validate(trial_cfg, study_dir / directory, options.folds, options.seeds, options.scoring,
                                options.strategy, options.score_on, report, {"trial": trial.number, "values": values},
                                say=say)
    finally:
        beat.close()
    trial.set_user_attr("score_is_unstable", result.is_unstable)
    if result.status == "interrupted":  # the user stopped this worker: queue the trial for whoever runs next
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"slot": trial.user_attrs["slot"], "retry_of": trial.number,
                                                      "directory": directory, "values": json.dumps(values)})
        return "interrupted"
    try:
        if result.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, result.score)
    except ValueError:  # another worker took this trial for dead (a heartbeat missed); its retry finds the CV done
        say(f"trial {trial.number} was marked failed by another worker meanwhile; its retry reuses {directory}")
        return result.status
    say(f"trial {trial.number}: {result.status}, score {result.score:.4f}{' (unstable)' if result.is_unstable else ''}")
    return result.status


# --- results -----------------------------------------------------------------------------------------------------


def trials_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if str(t.user_attrs.get("failure", "")).startswith("surplus"):
            continue  # took a slot number past the end and never ran
        values = json.loads(t.user_attrs["values"]) if "values" in t.user_attrs else {}
        rows.append({"number": t.number, "slot": t.user_attrs.get("slot"), "state": t.state.name,
                     "score": t.value, "score_is_unstable": t.user_attrs.get("score_is_unstable"),
                     "retry_of": t.user_attrs.get("retry_of"), "worker": t.user_attrs.get("worker"),
                     "directory": t.user_attrs.get("directory"),
                     **{k: json.dumps(v) if isinstance(v, list) else v for k, v in values.items()}})
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """DARTS: the highest stable score above 0."""
    stable = [r for r in rows if r["state"] == "COMPLETE" and not r["score_is_unstable"] and (r["score"] or 0) > 0]
    return max(stable, key=lambda r: r["score"]) if stable else None


def write_results(cfg: Config, params: list[Param], study, study_dir: Path) -> dict | None:
    import pandas as pd

    from smptrain.evaluation import plots

    rows = trials_table(study)
    if not rows:
        return None
    write_frame(pd.DataFrame(rows), study_dir / "trials")
    best = best_row(rows)
    if best is not None:
        values = json.loads(next(t for t in study.get_trials(deepcopy=False)
                                 if t.number == best["number"]).user_attrs["values"])
        (study_dir / "best.toml").write_text(f"# the best stable trial of study {study.study_name}: trial "
                                             f"{best['number']}, score {best['score']:.6f}\n" + dump_toml(_apply(cfg, values, "best")))
    plots.tuning(rows, [p.key for p in params if p.kind != "constant"], study_dir, study.study_name)
    return best


def retrain_best(study_dir: Path, say=print) -> Path:
    """DARTS' --retrain-and-test: the best configuration on train + validation (fold_method none, seed 42), with its
    bands (DARTS drops them), then smptrain-test on it."""
    from smptrain.evaluation.test import assess_checkpoint
    from smptrain.config import load_config
    from smptrain.train import train

    best = load_config(study_dir / "best.toml")
    best = replace(best, **{"data.fold_method": "none", "data.fold": 0, "train.seed": 42,
                            "log.artifact_dir": str(study_dir), "log.run_name": f"{study_dir.name}-retrain"})
    result = train(best)
    if result.status not in ("finished", "early-stopped"):
        raise UserError(f"the retraining ended {result.status}: {result.message}")
    assess_checkpoint(result.run_dir)
    say(f"retrained and tested: {result.run_dir}")
    return result.run_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--space", "space_path", type=click.Path(dir_okay=False), required=True,
              help="The search space: a DARTS hpconfig TOML with a [hyperparameters] table.")
@click.option("--trials", type=int, default=None, help="Trials in the study (default: 100; grid: every combination).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="random", show_default=True,
              help="random and grid: DARTS' plan (sklearn, random_state 42); tpe: Optuna's TPE.")
@click.option("--study", "study_name", default=None, help="Study name, the directory {log.artifact_dir}/NAME.")
@click.option("--storage", default=None,
              help="Optuna storage shared by the workers (default: a journal file in the study directory).")
@click.option("--single-run", is_flag=True, help="Each trial is one run (data.fold, train.seed) instead of a CV.")
@click.option("--folds", type=int, default=None, help="Folds per trial's CV (default: all).")
@click.option("--seeds", default="42,21,69", show_default=True, help="Seeds per trial's CV.")
@click.option("--n-randoms", type=int, default=None, help="DARTS' --n-randoms instead of --seeds, as smptrain-cv.")
@click.option("--scoring", default=",".join(DEFAULT_SCORING), show_default=True, help="As smptrain-cv.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="harmonic", show_default=True,
              help="How several scoring metrics combine per run, as smptrain-cv.")
@click.option("--score-on", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Score each run's last validation (DARTS) or its best one.")
@click.option("--prune", is_flag=True, help="Stop hopeless trials early (Optuna's median pruner on the first "
                                            "scoring metric, reported at every validation).")
@click.option("--heartbeat", type=float, default=60.0, show_default=True,
              help="Seconds between a worker's heartbeats; a trial without one for 3 intervals is taken as dead.")
@click.option("--retrain-and-test", is_flag=True, help="Retrain the best configuration on train + val and test it.")
@config_options
@report_user_errors
def main(space_path, trials, sampler, study_name, storage, single_run, folds, seeds, n_randoms, scoring, strategy,
         score_on, prune,
         heartbeat, retrain_and_test, config_path, overrides, debug):
    """Search hyper-parameters on Optuna, with every trial a cross-validation scored as DARTS scores it."""
    from accelerate import PartialState

    from smptrain.runtime import end_processes

    if config_path is None:
        raise UserError("--config is required (e.g. --config configs/base.toml)")
    if PartialState().num_processes > 1:
        raise UserError("smptrain-tune runs one process per worker; start one worker per GPU (CUDA_VISIBLE_DEVICES) "
                        "with the same --study and --storage instead of accelerate launch")
    cfg = resolve_config(config_path, overrides, debug)
    params = read_space(Path(space_path), cfg)  # every entry is checked before any training starts
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if sampler != "grid" and trials is None:
        trials = 100  # DARTS' default
    options = TuneOptions(trials, sampler, single_run,
                          [cfg.data.fold] if single_run else fold_count(cfg, folds),
                          [cfg.train.seed] if single_run else parse_seeds(seeds, n_randoms),
                          [s for s in scoring.split(",") if s.strip()], strategy, score_on, prune, heartbeat)
    parse_scoring(options.scoring)
    if sampler != "tpe":
        plan(params, sampler, trials)  # a grid of non-lists fails here, before any training
    name = study_name or Path(space_path).stem
    study_dir = Path(cfg.log.artifact_dir) / name
    study = open_study(name, storage, study_dir)
    status = work(cfg, params, study_dir, study, options)
    best = write_results(cfg, params, study, study_dir)
    end_processes()
    if status == "interrupted":
        print("\ninterrupted; the study continues when a worker runs the same command", file=sys.stderr)
        sys.exit(130)
    click.echo(f"study {name}: {len(trials_table(study))} trial(s) recorded in {study_dir / 'trials.csv'}")
    if best is None:
        click.echo("no stable trial with a score above 0 yet")
        return
    click.echo(f"best: trial {best['number']}, score {best['score']:.4f}; configuration in {study_dir / 'best.toml'}")
    if retrain_and_test:
        retrain_best(study_dir)

if __name__ == "__main__":
    main()
