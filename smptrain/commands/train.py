"""`python -m smptrain.train`, `smptrain-train`, `accelerate launch -m smptrain.train`: train, or continue a run.

Light at import (click and the configuration reader only): the signal handlers are set before torch and the rest
load, so a Ctrl-C in those seconds ends the command with 130 like any interrupted run.
"""

from __future__ import annotations

import click

from smptrain.cli import config_options, report_user_errors
from smptrain.training.signals import exit_on_further_signals


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint. `auto` (with --config and "
                   "log.run_name): start the run, or continue it when its directory exists (a requeued job).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow model.weights_from to be a DARTS Lightning .ckpt (a pickle, which can run code).")
@config_options
@report_user_errors
def main(resume, trust_pickle, config_path, overrides, debug):
    """Train an smp binary segmentation model on a DARTS dataset."""
    exit_on_further_signals()  # outside train()'s own handling: a late signal must not turn exit 130 into 143
    from smptrain.train import train_from_options

    exit_for(train_from_options(config_path, overrides, resume, debug=debug, trust_pickle=trust_pickle))


def exit_for(result) -> None:
    """The command's exit status for a `RunResult`: 0 finished (or stopped early, or pruned), 2 diverged (its
    sentence), 130 interrupted (with the command that continues the run)."""
    import os
    import sys

    from smptrain.training.divergence import TrainingStopped
    from smptrain.training.layout import LAST, checkpoint_link
    from smptrain.training.signals import local_main

    if result.status == "diverged":
        raise TrainingStopped(result.message)
    if result.status == "interrupted":
        if os.environ.get("SMPTRAIN_DEBUG"):
            print(f"debug: {result}", file=sys.stderr)
        hint = (f"\ncontinue with: python -m smptrain.train --resume {result.run_dir}"
                if result.run_dir is not None and checkpoint_link(result.run_dir, LAST).exists() else "")
        if local_main():
            print(f"\n{result.message}{hint}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.train
    main()
