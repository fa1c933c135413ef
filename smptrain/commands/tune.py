"""`smptrain-tune --config FILE --space SPACE.toml`: hyper-parameter search on Optuna (smptrain.search.tune)."""

from __future__ import annotations

import click

from smptrain.cli import config_options, given_or, interrupted, read_options, report_user_errors, require_config
from smptrain.core.errors import UserError
from smptrain.search.cv import cv_plan
from smptrain.search.scoring import DEFAULT_SCORING, STRATEGIES
from smptrain.search.space import SAMPLERS
from smptrain.search.tune import space_of, tune


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--space", "space_path", type=click.Path(dir_okay=False), default=None,
              help="The search space: a DARTS hpconfig TOML with a [hyperparameters] table [default: DARTS' hpconfig, "
                   "else the --config file when it holds one].")
@click.option("--trials", type=int, default=None, help="Trials in the study (default: DARTS' n-trials, else 100; grid: "
                                                       "every combination).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="random and grid: DARTS' plan (sklearn, random_state 42); tpe: Optuna's TPE [default: random; "
                   "DARTS' n-trials = \"grid\": grid].")
@click.option("--study", "study_name", default=None, help="Study name, the directory {log.artifact_dir}/NAME.")
@click.option("--storage", default=None,
              help="Optuna storage shared by the workers (default: a journal file in the study directory).")
@click.option("--single-run", is_flag=True, help="Each trial is one run (data.fold, train.seed) instead of a CV.")
@click.option("--folds", type=int, default=None, help="Folds per trial's CV (default: DARTS' n-folds, else all).")
@click.option("--seeds", default=None, help="Seeds per trial's CV [default: 42,21,69].")
@click.option("--n-randoms", type=int, default=None, help="DARTS' --n-randoms instead of --seeds, as smptrain-cv.")
@click.option("--scoring", default=None, help=f"As smptrain-cv [default: {','.join(DEFAULT_SCORING)}].")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="How several scoring metrics combine per run, as smptrain-cv [default: harmonic].")
@click.option("--score-on", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Score each run's last validation (DARTS) or its best one.")
@click.option("--prune", is_flag=True, help="Stop hopeless trials early (Optuna's median pruner on the first "
                                            "scoring metric, reported at every validation).")
@click.option("--heartbeat", type=float, default=60.0, show_default=True,
              help="Seconds between a worker's heartbeats; a trial without one for 3 intervals is taken as dead.")
@click.option("--retrain-and-test/--no-retrain-and-test", default=None,
              help="Retrain the best configuration on train + val and test it [default: DARTS' retrain-and-test, "
                   "else no].")
@config_options
@report_user_errors
def main(space_path, trials, sampler, study_name, storage, single_run, folds, seeds, n_randoms, scoring, strategy,
         score_on, prune, heartbeat, retrain_and_test, config_path, overrides, debug):
    """Search hyper-parameters on Optuna, with every trial a cross-validation scored as DARTS scores it. A DARTS
    [darts] table gives hpconfig, n-trials, tune-name, retrain-and-test and the CV options where the command line
    does not."""
    from smptrain.core.processes import process_state
    from smptrain.core.runtime import end_processes

    loaded = read_options(require_config(config_path), overrides, debug)
    if process_state().num_processes > 1:
        raise UserError("smptrain-tune runs one process per worker; start one worker per GPU (CUDA_VISIBLE_DEVICES) "
                        "with the same --study and --storage instead of accelerate launch")
    result = tune(loaded.config, given_or(space_path, loaded, "space") or space_of(config_path),
                  cv_plan(loaded, folds, seeds, n_randoms, scoring, strategy, score_on),
                  trials=given_or(trials, loaded, "trials"), sampler=sampler or loaded.darts.options.get("sampler", "random"),
                  study=given_or(study_name, loaded, "study"), storage=storage, single_run=single_run, prune=prune,
                  heartbeat=heartbeat, retrain_and_test=given_or(retrain_and_test, loaded, "retrain_and_test", False))
    end_processes()
    if result.status == "interrupted":
        interrupted("the study continues when a worker runs the same command")
    click.echo(f"study {result.study_dir.name}: {len(result.rows)} trial(s) recorded in {result.study_dir / 'trials.csv'}")
    if result.best is None:
        click.echo("no stable trial with a score above 0 yet")
        return
    click.echo(f"best: trial {result.best['number']}, score {result.best['score']:.4f}; configuration in "
               f"{result.study_dir / 'best.toml'}")


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.tune
    main()
