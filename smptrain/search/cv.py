"""Cross-validation: folds x seeds runs of one configuration, scored as DARTS scores them.

    smptrain-cv --config FILE [--set ...] [--folds N] [--seeds 42,21,69 | --n-randoms N] [--name NAME]
                [--scoring val/JaccardIndex,val/Recall] [--strategy harmonic] [--score-on last|best]

Every run is a normal run directory `{artifact_dir}/{name}/{name}-f{fold}s{seed}`, so it can be tested, converted
and resumed on its own. Runs are `train()` calls in this process, seeds outer and folds inner as in DARTS: under
`accelerate launch` every rank walks the same plan, so the process group and each GPU's CUDA context are kept from
run to run (a subprocess per run would need a launcher of its own and pay the start-up each time).

The CV directory holds `cv.json` (what was run, the score), `runs.csv` and `runs.parquet` (one row per run: fold,
seed, status, duration, the last validation metrics under their own names as DARTS records them, the best ones
under `best/...`, the run directory) and `cv_metrics.png`. Running the same command again continues: finished
runs are kept, an interrupted run resumes from its last checkpoint, a run that never saved one starts over.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from smptrain.runs import has_checkpoint
from smptrain.cli import config_options, given_or, resolve
from smptrain.config import Config, plain, replace, to_dict
from smptrain.storage import write_text, writing
from smptrain.errors import UserError, report_user_errors

DEFAULT_SEEDS = (42, 21, 69)  # DARTS' first three; more come from random.Random(42)
DEFAULT_SCORING = ("val/JaccardIndex", "val/Recall")
STRATEGIES = ("harmonic", "arithmetic", "geometric", "min")
DONE = ("finished", "early-stopped", "diverged", "pruned")  # statuses a continued CV does not run again


def darts_seeds(count: int) -> list[int]:
    """DARTS' `--n-randoms`: 42, 21, 69, then `random.Random(42).sample(range(9999), count - 3)`."""
    extra = random.Random(42).sample(range(9999), count - 3) if count > 3 else []
    return [*DEFAULT_SEEDS[:count], *extra]


@dataclass(frozen=True)
class Scoring:
    """How runs are scored, as DARTS scores them: the metrics ((key, higher is better), ...), the strategy that
    combines several per run, and which validation of each run counts (its last, as DARTS, or its best)."""

    metrics: tuple[tuple[str, bool], ...] = tuple((name, True) for name in DEFAULT_SCORING)
    strategy: str = "harmonic"
    score_on: str = "last"

    @classmethod
    def parse(cls, text: str, strategy: str = "harmonic", score_on: str = "last") -> "Scoring":
        """From the command line: `--scoring val/JaccardIndex,val/loss:lower --strategy ... --score-on ...`."""
        if strategy not in STRATEGIES:
            raise UserError(f"--strategy (DARTS' multi-score-strategy) must be one of {', '.join(STRATEGIES)}, "
                            f"got {strategy!r}")
        return cls(tuple(parse_scoring([s for s in str(text).split(",") if s.strip()])), strategy, score_on)

    @property
    def keys(self) -> list[str]:
        """The keys read from each run's row: its last validation's metrics, or its best's (`best/...`)."""
        prefix = "best/" if self.score_on == "best" else ""
        return [prefix + name for name, _ in self.metrics]

    @property
    def first(self) -> str:
        """The first scoring metric's name (what tuning's pruner watches)."""
        return self.metrics[0][0]


def parse_scoring(metrics) -> list[tuple[str, bool]]:
    """[(metric key, higher is better)] from DARTS' `name[:higher|:lower]` strings."""
    parsed = []
    for text in metrics:
        name, _, direction = str(text).strip().partition(":")
        if direction not in ("", "higher", "lower"):
            raise UserError(f"scoring metric {text!r} must be a metric name, optionally with :higher or :lower")
        parsed.append((name, direction != "lower"))
    if not parsed:
        raise UserError("at least one scoring metric is needed, e.g. val/JaccardIndex")
    return parsed


def run_is_unstable(values: list[float]) -> bool:
    """DARTS: a run is unstable when any of its scoring metrics is non-finite or 0."""
    return any(not math.isfinite(v) or v == 0 for v in values)


def score_runs(rows: list[dict], scoring: list[tuple[str, bool]], strategy: str) -> tuple[float, bool, list]:
    """DARTS' CV score (`scoring.py`): (score, any run unstable, each run's combined score or None if skipped).

    One metric: the mean over runs (the direction is ignored). Several: per run, skip it if it is unstable and the
    strategy is harmonic or geometric; otherwise invert `:lower` metrics and combine (harmonic, arithmetic,
    geometric or min); the score is the mean of the run scores (0 if none is left).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    table = [[float(row.get(name, math.nan)) if row.get(name) is not None else math.nan for name, _ in scoring]
             for row in rows]
    unstable = any(run_is_unstable(values) for values in table)
    if len(scoring) == 1:
        values = [v[0] for v in table]
        return (float(np.mean(values)) if values else 0.0), unstable, values
    per_run = []
    for values in table:
        if run_is_unstable(values) and strategy in ("harmonic", "geometric"):
            per_run.append(None)
            continue
        with np.errstate(divide="ignore"):
            oriented = np.array([v if higher else 1 / v for v, (_, higher) in zip(values, scoring)], np.float64)
        if strategy == "harmonic":
            per_run.append(float(len(oriented) / np.sum(1 / oriented)))
        elif strategy == "arithmetic":
            per_run.append(float(np.mean(oriented)))
        elif strategy == "geometric":
            per_run.append(float(np.prod(oriented) ** (1 / len(oriented))))
        else:
            per_run.append(float(np.min(oriented)))
    kept = [v for v in per_run if v is not None]
    return (float(np.mean(kept)) if kept else 0.0), unstable, per_run


@dataclass
class CVResult:
    cv_dir: Path
    status: str  # finished | interrupted | pruned
    score: float
    is_unstable: bool
    rows: list[dict]
    summary: dict  # per-metric mean and std over runs


def cross_validate(cfg: Config, cv_dir: Path, folds: list[int], seeds: list[int], scoring: Scoring = Scoring(),
                   on_validation=None, extra: dict | None = None, say=print) -> CVResult:
    """Run (or continue) every fold x seed of `cfg` under `cv_dir`; every rank calls it.

    A model that cannot be built raises `CannotBuild` before anything is written.
    `on_validation(validations_so_far_in_this_cv, metrics)` is called after each validation of each run; True
    prunes the CV (tuning's pruner). `extra` is recorded in cv.json (a tuning trial's parameters).
    """
    from accelerate import PartialState

    from smptrain.prepare import check_model_of
    from smptrain.train import train

    check_model_of(cfg)  # a model that cannot be built, or cannot take these patches, stops here: nothing written
    main_process = PartialState().is_main_process
    definition = {"config": to_dict(cfg), "folds": list(folds), "seeds": list(seeds), **(extra or {})}
    rows = open_cv(cv_dir, definition, main_process)
    name = cv_dir.name
    counted = [0]

    def report(validations: int, metrics: dict) -> bool:
        counted[0] += 1
        return bool(on_validation and on_validation(counted[0], metrics))

    status = "finished"
    for seed in seeds:  # DARTS' order: seeds outer, folds inner
        for fold in folds:
            run_name = f"{name}-f{fold}s{seed}"
            if rows.get(run_name, {}).get("status") in DONE:
                continue
            run_cfg = replace(cfg, **{"data.fold": fold, "train.seed": seed, "log.artifact_dir": str(cv_dir),
                                      "log.run_name": run_name, "log.wandb_group": name})
            run_dir = cv_dir / run_name
            resume = run_dir if has_checkpoint(run_dir) else None
            if run_dir.exists() and resume is None and main_process:
                shutil.rmtree(run_dir)  # started but never saved a checkpoint: nothing worth keeping
            say(f"cv {name}: fold {fold}, seed {seed}{' (resuming)' if resume else ''}")
            started = time.perf_counter()
            result = train(run_cfg, resume, on_validation=report)
            rows[run_name] = {"fold": fold, "seed": seed, "status": result.status, "run_name": run_name,
                              "run_dir": str(run_dir), "duration_s": time.perf_counter() - started,
                              "epochs": result.epochs, "steps": result.steps, **result.last,
                              **{f"best/{k}": v for k, v in result.best.items()}}
            if main_process:
                write_table(cv_dir, rows)
            if result.status in ("interrupted", "pruned"):
                status = result.status
                break
        if status != "finished":
            break
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (seeds.index(rows[k]["seed"]) if rows[k]["seed"] in seeds
                                                              else len(seeds), rows[k]["fold"]))]
    score, unstable, _ = score_runs(ordered, [(key, higher) for key, (_, higher) in zip(scoring.keys, scoring.metrics)],
                                    scoring.strategy)
    result = CVResult(cv_dir, status, score, unstable, ordered, summarise(ordered))
    if main_process:
        write_outcome(result, definition, scoring)
    return result


def write_outcome(result: CVResult, definition: dict, scoring: Scoring) -> None:
    """Main process: cv.json (the definition, the score, every metric's mean and std) and cv_metrics.png."""
    outcome = {**definition, "scoring": [f"{n}:{'higher' if h else 'lower'}" for n, h in scoring.metrics],
               "strategy": scoring.strategy, "score_on": scoring.score_on, "status": result.status,
               "score": result.score, "score_is_unstable": result.is_unstable, "runs": len(result.rows),
               "summary": result.summary}
    write_text(result.cv_dir / "cv.json", json.dumps(outcome, indent=2, default=plain) + "\n")
    if result.rows:
        from smptrain.evaluation import plots

        plots.cv_metrics(result.rows, scoring.keys, result.cv_dir / "cv_metrics.png",
                         f"cross-validation {result.cv_dir.name}: score {result.score:.4f} ({scoring.strategy}, "
                         f"{scoring.score_on} validation)")


def open_cv(cv_dir: Path, definition: dict, main_process: bool) -> dict[str, dict]:
    """The rows of a CV being continued (by run name), after checking that it is the same CV; {} for a new one."""
    from accelerate import PartialState

    state = cv_dir / "cv.json"
    if state.is_file():
        stored = json.loads(state.read_text())
        for key in ("config", "folds", "seeds"):
            if stored.get(key) != json.loads(json.dumps(definition[key], default=plain)):
                differing = _first_difference(stored.get(key), definition[key], key)
                raise UserError(f"{cv_dir} holds a cross-validation with a different {differing}; continue it with "
                                f"the same configuration, or choose another --name")
    elif main_process:
        cv_dir.mkdir(parents=True, exist_ok=True)
        write_text(state, json.dumps({**definition, "status": "running"}, indent=2, default=plain) + "\n")
    PartialState().wait_for_everyone()
    table = cv_dir / "runs.parquet"
    if not table.is_file():
        return {}
    import pandas as pd

    records = pd.read_parquet(table).to_dict("records")
    return {r["run_name"]: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in records}


def write_table(cv_dir: Path, rows: dict[str, dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(list(rows.values()))
    first = ["fold", "seed", "status", "duration_s", "epochs", "steps"]
    frame = frame[first + sorted(c for c in frame.columns if c not in first + ["run_name", "run_dir"])
                  + ["run_name", "run_dir"]]
    write_frame(frame, cv_dir / "runs")


def write_frame(frame, stem: Path) -> None:
    """`stem`.csv and `stem`.parquet, each written whole and renamed into place (several workers may write)."""
    import os

    for suffix, write in ((".csv", lambda p: frame.to_csv(p, index=False)),
                          (".parquet", lambda p: frame.to_parquet(p, index=False))):
        tmp = stem.with_name(f".{stem.name}.{os.getpid()}{suffix}")
        with writing(stem.with_suffix(suffix), cleanup=lambda: tmp.unlink(missing_ok=True)):
            write(tmp)
            os.replace(tmp, stem.with_suffix(suffix))


def summarise(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof 1) of every metric over the runs where it is finite."""
    keys = sorted({k for row in rows for k in row if k.startswith(("val/", "best/"))})
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows if isinstance(row.get(key), (int, float))
                           and math.isfinite(row[key])], np.float64)
        summary[key] = {"mean": float(values.mean()) if len(values) else None,
                        "std": float(values.std(ddof=1)) if len(values) > 1 else None, "runs": int(len(values))}
    return summary


def _first_difference(a, b, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if json.dumps(a.get(key), default=plain) != json.dumps(b.get(key), default=plain):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"{where} ({a!r} there, {b!r} now)"


def fold_count(cfg: Config, requested: int | None) -> list[int]:
    total = 1 if cfg.data.fold_method == "none" else cfg.data.total_folds
    count = total if requested is None else requested
    if not 1 <= count <= total:
        raise UserError(f"--folds must be between 1 and {total} (data.total_folds with data.fold_method = "
                        f"{cfg.data.fold_method!r}), got {count}")
    return list(range(count))


def parse_seeds(text: str, n_randoms: int | None = None) -> list[int]:
    """The seeds of `--seeds 42,21,69`, or DARTS' `--n-randoms N` seeds when given."""
    if n_randoms is not None:
        if n_randoms < 1:
            raise UserError(f"--n-randoms must be at least 1, got {n_randoms}")
        return darts_seeds(n_randoms)
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 42,21,69, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def print_result(result: CVResult, scoring: Scoring) -> None:
    click.echo(f"cross-validation {result.cv_dir.name}: {len(result.rows)} run(s), {result.status}")
    for row in result.rows:
        metrics = "  ".join(f"{n}={_fmt(row.get(n))}" for n, _ in scoring.metrics)
        click.echo(f"  fold {row['fold']} seed {row['seed']:<5} {row['status']:<13} {metrics}")
    for key, stats in result.summary.items():
        if not key.startswith("val/") or stats["mean"] is None:
            continue
        click.echo(f"  {key:<22} mean {stats['mean']:.4f}  std {_fmt(stats['std'])}")
    click.echo(f"score ({scoring.strategy}): {result.score:.4f}{' (unstable runs)' if result.is_unstable else ''}\n"
               f"wrote {result.cv_dir / 'runs.csv'}, runs.parquet, cv.json and cv_metrics.png")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--folds", type=int, default=None, help="Run folds 0..N-1 (default: DARTS' n-folds, else all data.total_folds).")
@click.option("--seeds", default=None, help="Comma-separated seeds (train.seed) per fold [default: 42,21,69].")
@click.option("--n-randoms", type=int, default=None,
              help="DARTS' --n-randoms instead of --seeds: 42, 21, 69, then random.Random(42).sample(range(9999), N - 3).")
@click.option("--name", default=None, help="CV name, the directory {log.artifact_dir}/NAME; the same name continues it.")
@click.option("--scoring", default=None, help="Comma-separated metrics, each optionally :higher or :lower "
                                              f"[default: {','.join(DEFAULT_SCORING)}].")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="How several scoring metrics combine per run [default: harmonic].")
@click.option("--score-on", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Score each run's last validation (DARTS) or its best one.")
@config_options
@report_user_errors
def main(folds, seeds, n_randoms, name, scoring, strategy, score_on, config_path, overrides, debug):
    """Cross-validate a configuration: every fold x seed, scored as DARTS scores them. A DARTS [darts] table gives
    n-folds, n-randoms, scoring-metric, multi-score-strategy and cv-name where the command line does not."""
    from smptrain.runtime import end_processes
    from smptrain.tracking import new_run_name

    if config_path is None:
        raise UserError("--config is required (e.g. --config configs/base.toml)")
    loaded = resolve(config_path, overrides, debug)
    cfg, plan = loaded.config, cv_plan(loaded, folds, seeds, n_randoms, scoring, strategy, score_on)
    name = given_or(name, loaded, "cv_name") or new_run_name(Path(cfg.log.artifact_dir))
    if "/" in name:
        raise UserError(f"--name must be a plain directory name, got {name!r}")
    result = cross_validate(cfg, Path(cfg.log.artifact_dir) / name, plan.folds, plan.seeds, plan.scoring)
    end_processes()
    if result.status == "interrupted":
        print(f"\ninterrupted; continue with the same command and --name {name}", file=sys.stderr)
        sys.exit(130)
    print_result(result, plan.scoring)


@dataclass(frozen=True)
class Plan:
    """The runs of a cross-validation and how they are scored."""

    folds: list[int]
    seeds: list[int]
    scoring: Scoring


def cv_plan(loaded, folds, seeds, n_randoms, scoring, strategy, score_on) -> Plan:
    """Folds, seeds and scoring from the command line, else the `[darts]` table, else DARTS' defaults. Seeds given
    on the command line win over the table's n-randoms."""
    if seeds is None and n_randoms is None:
        n_randoms = loaded.darts.options.get("n_randoms")
    return Plan(fold_count(loaded.config, given_or(folds, loaded, "folds")),
                parse_seeds(seeds or ",".join(map(str, DEFAULT_SEEDS)), n_randoms),
                Scoring.parse(given_or(scoring, loaded, "scoring", ",".join(DEFAULT_SCORING)),
                              given_or(strategy, loaded, "strategy", "harmonic"), score_on))


if __name__ == "__main__":
    main()
