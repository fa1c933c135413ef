"""`smptrain-cv --config FILE`: cross-validation, folds x seeds (smptrain.search.cv)."""

from __future__ import annotations

from pathlib import Path

import click

from smptrain.cli import config_options, given_or, interrupted, plain_name, read_options, report_user_errors, require_config
from smptrain.search.cv import CVResult, cross_validate, cv_plan
from smptrain.search.scoring import DEFAULT_SCORING, STRATEGIES, Scoring


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
@click.option("--task", type=int, default=None,
              help="Run only the K-th run of the plan (seeds outer, folds inner), e.g. --task $SLURM_ARRAY_TASK_ID; "
                   "without it, every run no other worker holds.")
@config_options
@report_user_errors
def main(folds, seeds, n_randoms, name, scoring, strategy, score_on, task, config_path, overrides, debug):
    """Cross-validate a configuration: every fold x seed, scored as DARTS scores them. A DARTS [darts] table gives
    n-folds, n-randoms, scoring-metric, multi-score-strategy and cv-name where the command line does not."""
    from smptrain.core.runtime import end_processes
    from smptrain.training.signals import exit_on_further_signals
    from smptrain.training.tracking import new_run_name

    exit_on_further_signals()  # between runs and after a stopped one: a late signal must not turn 130 into 143
    loaded = read_options(require_config(config_path), overrides, debug)
    cfg, plan = loaded.config, cv_plan(loaded, folds, seeds, n_randoms, scoring, strategy, score_on, task)
    name = plain_name(given_or(name, loaded, "cv_name") or new_run_name(Path(cfg.log.artifact_dir)))
    result = cross_validate(cfg, Path(cfg.log.artifact_dir) / name, plan)
    end_processes()
    if result.status == "interrupted":
        interrupted(f"continue with the same command and --name {name}")
    print_result(result, plan.scoring)


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
    if result.missing:
        done = len(result.rows) - sum(row["run_name"] in result.missing for row in result.rows)
        click.echo(f"missing {len(result.missing)} run(s), being run by other workers or not run yet: "
                   f"{', '.join(result.missing)}; the score covers the {done} finished run(s); run smptrain-cv again "
                   f"(same --name) when they are done to score them all")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)



if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.cv
    main()
