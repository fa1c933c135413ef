"""`smptrain-compare RUN_DIR...`: runs side by side (smptrain.evaluation.compare)."""

from __future__ import annotations

from pathlib import Path

import click

from smptrain.cli import report_user_errors
from smptrain.evaluation.compare import beside, compare, format_table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--metric", default="val/JaccardIndex", show_default=True,
              help="The validation metric to compare (its best and last value, and the same name on test).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for compare.csv and compare.png [default: next to the runs: the one RUN_DIR given, or "
                   "the folder the RUN_DIRs share].")
@report_user_errors
def main(run_dirs, metric, out_dir):
    """Compare runs side by side: config differences, best and last validation metric, test metric, steps, time.
    Each RUN_DIR is a run directory or one holding runs (a CV or a tuning study)."""
    out_dir = out_dir or beside(run_dirs)
    rows = compare(run_dirs, metric, Path(out_dir))
    click.echo(format_table(rows))
    click.echo(f"wrote {Path(out_dir) / 'compare.csv'} and {Path(out_dir) / 'compare.png'}")



if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.compare
    main()
