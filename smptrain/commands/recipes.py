"""`smptrain-recipes --config FILE`: training recipes compared on your data (smptrain.search.recipes)."""

from __future__ import annotations

from pathlib import Path

import click

from smptrain.cli import config_options, interrupted, plain_name, read_options, report_user_errors, require_config
from smptrain.core.choices import RECIPES
from smptrain.search.cv import DEFAULT_SEEDS, parse_seeds
from smptrain.search.recipes import Comparison, compare, named, table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipes", default=",".join(RECIPES[:2]), show_default=True,
              help=f"Comma-separated recipes ({', '.join(RECIPES)}); the first is the one the others are compared "
                   f"with.")
@click.option("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), show_default=True,
              help="Comma-separated seeds (train.seed) of every recipe.")
@click.option("--name", default=None, help="Comparison name, the directory {log.artifact_dir}/NAME; the same name "
                                           "continues it [default: recipes].")
@click.option("--task", type=int, default=None,
              help="Run only the K-th run of the plan (recipes outer, seeds inner), e.g. --task $SLURM_ARRAY_TASK_ID.")
@config_options
@report_user_errors
def main(recipes, seeds, name, task, config_path, overrides, debug):
    """Compare training recipes on your own data: each trained with each seed, chosen on validation, tested in fp32
    on the held-out split; a table of mean +- sample std and paired differences, and a figure."""
    from smptrain.core.runtime import end_processes
    from smptrain.training.signals import exit_on_further_signals

    exit_on_further_signals()
    cfg = read_options(require_config(config_path), overrides, debug).config
    name = plain_name(name or "recipes")
    plan = Comparison(named([r.strip() for r in recipes.split(",") if r.strip()]), parse_seeds(seeds), task)
    result = compare(config_path, overrides, plan, Path(cfg.log.artifact_dir) / name)
    end_processes()
    if result.status == "interrupted":
        interrupted(f"continue with the same command and --name {name}")
    first = next(iter(plan.variants))
    click.echo(f"\n{table(result.summary, first)}\n")
    click.echo(f"wrote {result.out_dir / 'summary.csv'}, runs.csv, comparison.json and comparison.png")
    if result.missing:
        click.echo(f"missing {len(result.missing)} run(s), being run by other workers or not run yet: "
                   f"{', '.join(result.missing)}; run the same command again when they are done")



if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.recipes
    main()
