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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smptrain.cli import given_or
from smptrain.config import Config, plain, replace, to_dict
from smptrain.core.errors import UserError
from smptrain.core.processes import on_main
from smptrain.core.storage import replacing, write_text
from smptrain.search.scoring import DEFAULT_SCORING, Scoring, score_runs
from smptrain.search.slots import CLAIMS, claim, in_turn
from smptrain.training.layout import has_checkpoint

DEFAULT_SEEDS = (42, 21, 69)  # DARTS' first three; more come from random.Random(42)
DONE = ("finished", "early-stopped", "diverged", "pruned")  # statuses a continued CV does not run again
ROWS = "rows"  # {cv_dir}/rows/{run name}.json: each run's row, written by the worker that ran it


def darts_seeds(count: int) -> list[int]:
    """DARTS' `--n-randoms`: 42, 21, 69, then `random.Random(42).sample(range(9999), count - 3)`."""
    extra = random.Random(42).sample(range(9999), count - 3) if count > 3 else []
    return [*DEFAULT_SEEDS[:count], *extra]


@dataclass(frozen=True)
class Plan:
    """The runs of a cross-validation, how they are scored, and which of them this worker may run."""

    folds: list[int]
    seeds: list[int]
    scoring: Scoring = Scoring()
    task: int | None = None  # run only this slot of the plan (e.g. $SLURM_ARRAY_TASK_ID); None = every missing run
    claims: bool = True  # claim each run on the filesystem, so that several workers share the plan

    @property
    def slots(self) -> list[tuple[int, int]]:
        """(seed, fold) of every run, in DARTS' order: seeds outer, folds inner."""
        return [(seed, fold) for seed in self.seeds for fold in self.folds]


@dataclass
class CVResult:
    cv_dir: Path
    status: str  # finished | incomplete (runs missing: another worker's, or not run yet) | interrupted | pruned
    score: float
    is_unstable: bool
    rows: list[dict]
    summary: dict  # per-metric mean and std over runs
    missing: list[str] = field(default_factory=list)  # runs of the plan without a finished row


def cross_validate(cfg: Config, cv_dir: Path, plan: Plan, on_validation=None, extra: dict | None = None,
                   say=print) -> CVResult:
    """Run (or continue) the missing runs of `plan` under `cv_dir` that no other worker holds, then score what is
    there; every rank calls it. A model that cannot be built raises `CannotBuild` before anything is written.
    `on_validation(validations_so_far_in_this_cv, metrics)` is called after each validation of each run; True
    prunes the CV (tuning's pruner). `extra` is recorded in cv.json (a tuning trial's parameters).
    """
    from smptrain.training.prepare import check_model_of

    check_model_of(cfg)  # a model that cannot be built, or cannot take these patches, stops here: nothing written
    definition = {"config": to_dict(cfg), "folds": list(plan.folds), "seeds": list(plan.seeds), **(extra or {})}
    rows = open_cv(cv_dir, definition)
    counted = [0]

    def report(validations: int, metrics: dict) -> bool:
        counted[0] += 1
        return bool(on_validation and on_validation(counted[0], metrics))

    status = "finished"
    for seed, fold in chosen_slots(plan):
        run_name = f"{cv_dir.name}-f{fold}s{seed}"
        # what other workers finished meanwhile, as the main process read it: ranks reading the shared filesystem
        # each for itself could see different rows, and one would train while the other skipped
        rows.update(on_main(lambda: read_rows(cv_dir), cv_dir / ROWS))
        if rows.get(run_name, {}).get("status") in DONE:
            continue
        held = take(cv_dir, run_name, plan.claims, say)
        if held is None:
            continue
        try:
            rows[run_name] = run_one(cfg, cv_dir, run_name, (fold, seed), report, say)
        finally:
            held.release()
        on_main(lambda: record(cv_dir, rows[run_name]), cv_dir / ROWS / f"{run_name}.json")
        if rows[run_name]["status"] in ("interrupted", "pruned"):
            status = rows[run_name]["status"]
            break
    return score_cv(cv_dir, plan, status, definition)


def chosen_slots(plan: Plan) -> list[tuple[int, int]]:
    slots = plan.slots
    if plan.task is None:
        return slots
    if not 0 <= plan.task < len(slots):
        raise UserError(f"--task must be between 0 and {len(slots) - 1} (the plan has {len(plan.seeds)} seed(s) x "
                        f"{len(plan.folds)} fold(s)), got {plan.task}")
    return [slots[plan.task]]


class _Unclaimed:
    def release(self) -> None:
        pass


def take(cv_dir: Path, run_name: str, use_claims: bool, say):
    """A held claim on `run_name` (or a stand-in without claims), or None when another worker holds it. The main
    process claims and tells the other ranks (every rank calls this)."""
    if not use_claims:
        return _Unclaimed()
    holder = []  # the main process's claim (it touches its file from a thread, so it stays here)

    def claim_it() -> tuple[bool, str | None]:
        held, owner = claim(cv_dir, run_name)
        holder.append(held)
        return held is not None, owner

    taken, owner = on_main(claim_it, cv_dir / CLAIMS / run_name)
    if not taken:
        say(f"cv {cv_dir.name}: {run_name} is being run by {owner}; skipped")
        return None
    return holder[0] if holder else _Unclaimed()


def run_one(cfg: Config, cv_dir: Path, run_name: str, fold_seed: tuple[int, int], report, say) -> dict:
    """Train (or resume) one run of the plan; its row for the table."""
    from smptrain.train import train

    fold, seed = fold_seed
    run_cfg = replace(cfg, **{"data.fold": fold, "train.seed": seed, "log.artifact_dir": str(cv_dir),
                              "log.run_name": run_name, "log.wandb_group": cv_dir.name})
    run_dir = cv_dir / run_name
    resume = run_dir if has_checkpoint(run_dir) else None
    if run_dir.exists() and resume is None:  # started but never saved a checkpoint: nothing worth keeping
        on_main(lambda: shutil.rmtree(run_dir), run_dir)
    say(f"cv {cv_dir.name}: fold {fold}, seed {seed}{' (resuming)' if resume else ''}")
    started = time.perf_counter()
    result = train(run_cfg, resume, on_validation=report)
    return {"fold": fold, "seed": seed, "status": result.status, "run_name": run_name, "run_dir": str(run_dir),
            "duration_s": time.perf_counter() - started, "epochs": result.epochs, "steps": result.steps,
            **result.last, **{f"best/{k}": v for k, v in result.best.items()}}


def score_cv(cv_dir: Path, plan: Plan, status: str, definition: dict) -> CVResult:
    """DARTS' score over the plan's runs that are there, and which are missing. The main process reads every row
    on disk and writes cv.json, the table and the figure from them, in turn with other workers (`in_turn`): a
    worker's own view of the rows could lack one another worker finished a moment ago. Every rank calls it."""

    def tabulate() -> CVResult:
        with in_turn(cv_dir):
            rows = earlier_rows(cv_dir)
            result = outcome_of(cv_dir, plan, rows, status)
            write_outcome(result, definition, plan.scoring)
            if rows:
                write_table(cv_dir, rows)
        return result

    return on_main(tabulate, cv_dir)


def outcome_of(cv_dir: Path, plan: Plan, rows: dict, status: str) -> CVResult:
    names = [f"{cv_dir.name}-f{fold}s{seed}" for seed, fold in plan.slots]
    ordered = [rows[name] for name in names if name in rows]
    missing = [name for name in names if rows.get(name, {}).get("status") not in DONE]
    if status == "finished" and missing:
        status = "incomplete"
    scoring = plan.scoring
    score, unstable, _ = score_runs(ordered, [(key, higher) for key, (_, higher) in zip(scoring.keys, scoring.metrics)],
                                    scoring.strategy)
    return CVResult(cv_dir, status, score, unstable, ordered, summarise(ordered), missing)


def write_outcome(result: CVResult, definition: dict, scoring: Scoring) -> None:
    """Main process: cv.json (the definition, the score, every metric's mean and std) and cv_metrics.png."""
    outcome = {**definition, "scoring": [f"{n}:{'higher' if h else 'lower'}" for n, h in scoring.metrics],
               "strategy": scoring.strategy, "score_on": scoring.score_on, "status": result.status,
               "score": result.score, "score_is_unstable": result.is_unstable, "runs": len(result.rows),
               "missing": result.missing,
               "summary": result.summary}
    write_text(result.cv_dir / "cv.json", json.dumps(outcome, indent=2, default=plain) + "\n")
    if result.rows:
        from smptrain.evaluation import plots

        plots.cv_metrics(result.rows, scoring.keys, result.cv_dir / "cv_metrics.png",
                         f"cross-validation {result.cv_dir.name}: score {result.score:.4f} ({scoring.strategy}, "
                         f"{scoring.score_on} validation)")


def open_cv(cv_dir: Path, definition: dict) -> dict[str, dict]:
    """The rows of a CV being continued (by run name), after checking that it is the same CV; {} for a new one.
    Every rank calls it (a CV that exists is there for all of them; a new one is created by the main process)."""
    state = cv_dir / "cv.json"
    existed = state.is_file()
    if existed:
        stored = json.loads(state.read_text())
        for key in ("config", "folds", "seeds"):
            if stored.get(key) != json.loads(json.dumps(definition[key], default=plain)):
                differing = _first_difference(stored.get(key), definition[key], key)
                raise UserError(f"{cv_dir} holds a cross-validation with a different {differing}; continue it with "
                                f"the same configuration, or choose another --name")

    def create_or_read() -> dict[str, dict]:
        if not existed:
            cv_dir.mkdir(parents=True, exist_ok=True)
            write_text(state, json.dumps({**definition, "status": "running"}, indent=2, default=plain) + "\n")
        return earlier_rows(cv_dir)

    return on_main(create_or_read, state)  # one reading, the main process's, for every rank


def earlier_rows(cv_dir: Path) -> dict[str, dict]:
    """The rows already written, by run name: runs.parquet's (a CV from before rows/ existed), then rows/."""
    table = cv_dir / "runs.parquet"
    rows = {}
    if table.is_file():  # a CV written before rows/ existed keeps its table
        import pandas as pd

        records = pd.read_parquet(table).to_dict("records")
        rows = {r["run_name"]: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in records}
    return {**rows, **read_rows(cv_dir)}


def read_rows(cv_dir: Path) -> dict[str, dict]:
    """Every run's row that some worker wrote, by run name."""
    rows = {}
    for path in sorted((cv_dir / ROWS).glob("*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced this very moment: the next look finds it
            continue
        rows[row["run_name"]] = row
    return rows


def record(cv_dir: Path, row: dict) -> None:
    """Main process: a finished run's row, rows/NAME.json, which every worker's tabulation reads."""
    write_text(cv_dir / ROWS / f"{row['run_name']}.json", json.dumps(row, default=plain) + "\n")


def write_table(cv_dir: Path, rows: dict[str, dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(list(rows.values()))
    first = ["fold", "seed", "status", "duration_s", "epochs", "steps"]
    frame = frame[first + sorted(c for c in frame.columns if c not in first + ["run_name", "run_dir"])
                  + ["run_name", "run_dir"]]
    write_frame(frame, cv_dir / "runs")


def write_frame(frame, stem: Path) -> None:
    """`stem`.csv and `stem`.parquet, each written whole (several workers may write)."""
    for suffix, write in ((".csv", lambda p: frame.to_csv(p, index=False)),
                          (".parquet", lambda p: frame.to_parquet(p, index=False))):
        with replacing(stem.with_suffix(suffix)) as tmp:
            write(tmp)


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


def cv_plan(loaded, folds, seeds, n_randoms, scoring, strategy, score_on, task: int | None = None) -> Plan:
    """Folds, seeds and scoring from the command line, else the `[darts]` table, else DARTS' defaults. Seeds given
    on the command line win over the table's n-randoms."""
    if seeds is None and n_randoms is None:
        n_randoms = loaded.darts.options.get("n_randoms")
    return Plan(fold_count(loaded.config, given_or(folds, loaded, "folds")),
                parse_seeds(seeds or ",".join(map(str, DEFAULT_SEEDS)), n_randoms),
                Scoring.parse(given_or(scoring, loaded, "scoring", ",".join(DEFAULT_SCORING)),
                              given_or(strategy, loaded, "strategy", "harmonic"), score_on), task)
