"""Hyper-parameter search on Optuna: `smptrain-tune --config FILE --space SPACE.toml`.

    smptrain-tune --config FILE --space SPACE.toml [--trials N] [--sampler random|grid|tpe] [--study NAME]
                  [--storage URL] [--single-run | --folds N --seeds 42,21,69] [--prune] [--retrain-and-test]

The space file is DARTS' hpconfig, read as it is (`smptrain.search.space`).

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from smptrain.config import Config, dump_toml, replace
from smptrain.core.errors import CannotBuild, UserError
from smptrain.core.storage import write_text
from smptrain.search.cv import Plan, cross_validate, write_frame
from smptrain.search.slots import me
from smptrain.search.space import SAMPLERS, Param, apply_values, optuna_distributions, plan, plan_sampler, read_space, to_optuna, values_of
from smptrain.search.study import Heartbeat, fresh_slots, open_study, recover_dead_trials


@dataclass(frozen=True)
class Search:
    """This worker's share of a study, built once: the base configuration, the space and DARTS' plan of it (None
    for TPE), the Optuna distributions, how each trial runs (its CV plan, pruning, heartbeat), and the study with its
    directory. Every trial reads it."""

    cfg: Config
    params: list[Param]
    planned: list[dict] | None  # random and grid: the plan's entries, one per slot; TPE: None
    trials: int  # the slots of the study
    cv: Plan  # each trial's cross-validation (claims off: the study gives a trial one worker)
    prune: bool
    heartbeat: float  # seconds between heartbeats; a trial without one for 3 intervals is taken as dead
    study_dir: Path
    study: object
    distributions: dict = field(default_factory=dict)


def work(search: Search, say=print) -> str:
    """This worker's share of the study: trials until every slot is taken. Returns 'finished' or 'interrupted'."""
    import optuna
    from optuna.trial import TrialState

    study, planned = search.study, search.planned
    study.sampler = (plan_sampler([to_optuna(search.params, entry) for entry in planned]) if planned is not None
                     else optuna.samplers.TPESampler(seed=42))
    reseeded = planned is not None
    study.pruner = optuna.pruners.MedianPruner() if search.prune else optuna.pruners.NopPruner()
    grace = 3 * search.heartbeat
    while True:
        recover_dead_trials(study, grace, say)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if fresh_slots(study) >= search.trials and not waiting:
            return "finished"
        trial = study.ask()
        if "slot" not in trial.user_attrs:  # a fresh trial: the next slot, in the order the storage numbered them
            earlier = [t for t in study.get_trials(deepcopy=False) if "retry_of" not in t.user_attrs
                       and t.number < trial.number and (t.user_attrs.get("slot") is not None or t.state != TrialState.WAITING)]
            slot = len(earlier)
            trial.set_user_attr("slot", slot)
            if slot >= search.trials:  # another worker took the last slot a moment ago
                trial.set_user_attr("failure", "surplus: every slot was already taken")
                study.tell(trial, state=TrialState.FAIL)
                continue
            if not reseeded:  # TPE: seeded by this worker's first slot, so workers do not draw the same points
                study.sampler, reseeded = optuna.samplers.TPESampler(seed=42 + slot), True
        trial.set_user_attr("worker", me())
        trial.set_user_attr("heartbeat", time.time())
        if run_trial(search, trial, say) == "interrupted":
            return "interrupted"


def suggest(trial, name: str, distribution):
    import optuna.distributions as D

    if isinstance(distribution, D.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, D.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def run_trial(search: Search, trial, say) -> str:
    """One trial: its parameters (a retry's own, the plan's slot, or TPE's), then a CV of them, told to the study."""
    from optuna.trial import TrialState

    from smptrain.training.prepare import check_model_of

    cfg, params, planned, study, study_dir = search.cfg, search.params, search.planned, search.study, search.study_dir
    distributions = search.distributions
    optuna_params = {name: suggest(trial, name, distribution) for name, distribution in distributions.items()}
    # The exact values: a retry's own, the plan's (no round trip through n - x), or what TPE suggested.
    if "values" in trial.user_attrs:
        values = json.loads(trial.user_attrs["values"])
    else:
        values = planned[trial.user_attrs["slot"]] if planned is not None else values_of(params, optuna_params)
    trial.set_user_attr("values", json.dumps(values))
    say(f"trial {trial.number} (slot {trial.user_attrs['slot']}): "
        + ", ".join(f"{k} = {v}" for k, v in values.items()))
    trial_cfg = apply_values(cfg, values, f"trial {trial.number}")
    trial_cfg = replace(trial_cfg, **{"log.wandb_group": study.study_name})
    try:  # a model these values cannot build fails the trial, not the worker, and leaves no directory
        check_model_of(trial_cfg)
    except CannotBuild as error:
        trial.set_user_attr("failure", str(error))
        study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number}: failed, {error}")
        return "failed"
    directory = trial.user_attrs.get("directory") or f"trial-{trial.number:04d}"
    trial.set_user_attr("directory", directory)
    metric = search.cv.scoring.first

    def report(step: int, metrics: dict) -> bool:
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            return False
        trial.report(value, step)
        return trial.should_prune()

    beat = Heartbeat(trial, search.heartbeat)
    try:
        result = cross_validate(trial_cfg, study_dir / directory, search.cv, report,
                                {"trial": trial.number, "values": values}, say=say)
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


@dataclass(frozen=True)
class Tuned:
    """How a worker's share of a study ended, and the study as it stands (every worker's trials)."""

    study_dir: Path
    status: str  # finished | interrupted
    rows: list[dict]  # trials.csv's rows
    best: dict | None  # the best stable trial's row (DARTS: the highest stable score above 0), or None yet
    retrained: Path | None = None  # the best configuration retrained on train + val and tested (retrain_and_test)


def tune(cfg: Config, space: str | Path, cv: Plan, *, trials: int | None = None, sampler: str = "random",
         study: str | None = None, storage: str | None = None, single_run: bool = False, prune: bool = False,
         heartbeat: float = 60.0, retrain_and_test: bool = False, say=print) -> Tuned:
    """Search `space` (a DARTS hpconfig file) around `cfg` on Optuna: this worker takes slots of the study until
    every one of `trials` is taken (grid: the whole grid; random and TPE: 100 unless given), each trial a
    cross-validation by `cv` (or, `single_run`, one run at cfg's fold and seed) scored as DARTS scores it. The study
    is `{log.artifact_dir}/{study}` (default: the space file's name), shared through `storage` (default: a journal
    file there) with any other worker started the same way. One process per worker; writes trials.csv,
    trials.parquet, best.toml and the figures, and with `retrain_and_test` retrains and tests the best
    configuration."""
    if trials is not None and trials < 1:
        raise UserError(f"--trials (DARTS' n-trials) must be at least 1, got {trials}")
    if sampler not in SAMPLERS:
        raise UserError(f"the sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    space = Path(space)
    params = read_space(space, cfg)  # every entry is checked before any training starts
    if sampler != "grid" and trials is None:
        trials = 100  # DARTS' default
    planned = plan(params, sampler, trials) if sampler != "tpe" else None  # a grid of non-lists fails here
    name = study or space.stem
    study_dir = Path(cfg.log.artifact_dir) / name
    each = Plan([cfg.data.fold] if single_run else cv.folds, [cfg.train.seed] if single_run else cv.seeds,
                cv.scoring, claims=False)
    search = Search(cfg, params, planned, len(planned) if planned is not None else trials, each, prune, heartbeat,
                    study_dir, open_study(name, storage, study_dir), optuna_distributions(params))
    status = work(search, say)
    best = write_results(cfg, params, search.study, study_dir)
    retrained = retrain_best(study_dir, say) if status == "finished" and best is not None and retrain_and_test else None
    return Tuned(study_dir, status, trials_table(search.study), best, retrained)


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
                     "directory": t.user_attrs.get("directory"), "failure": t.user_attrs.get("failure"),
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
        header = f"# the best stable trial of study {study.study_name}: trial {best['number']}, score {best['score']:.6f}\n"
        write_text(study_dir / "best.toml", header + dump_toml(apply_values(cfg, values, "best")))
    plots.tuning(rows, [p.key for p in params if p.kind != "constant"], study_dir, study.study_name)
    return best


def retrain_best(study_dir: Path, say=print) -> Path:
    """DARTS' --retrain-and-test: the best configuration on train + validation (fold_method none, seed 42), with its
    bands (DARTS drops them), then smptrain-test on it."""
    from smptrain.config import load_config
    from smptrain.evaluation.assess import assess_checkpoint
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




def space_of(config_path: str) -> str:
    """DARTS' fallback for the hpconfig: the config file itself, when it holds a [hyperparameters] table."""
    import tomllib

    try:
        holds = isinstance(tomllib.loads(Path(config_path).read_text()).get("hyperparameters"), dict)
    except (OSError, tomllib.TOMLDecodeError):
        holds = False
    if not holds:
        raise UserError(f"--space is required: neither the command line, nor DARTS' hpconfig in {config_path}, nor a "
                        f"[hyperparameters] table in it gives the search space")
    return config_path
