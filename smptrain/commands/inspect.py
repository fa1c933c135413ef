"""`smptrain-inspect --config FILE [--set ...] [--json OUT] [--download-weights]`: validate a dataset and show every
split and fold (smptrain.training.inspection), or fill the weights cache for offline training nodes."""

from __future__ import annotations

import click

from smptrain.cli import config_options, read_options, report_user_errors
from smptrain.model.network import download_weights as fill_cache
from smptrain.training.inspection import inspect


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the split manifest {train, val, test} (sorted zarr rows) to this file.")
@click.option("--download-weights", is_flag=True,
              help="Only fill the download cache with the config's model.encoder_weights (e.g. imagenet) and say "
                   "where it is: run it where there is network, then train offline (HF_HUB_OFFLINE=1).")
@config_options
@report_user_errors
def main(json_out, download_weights, config_path, overrides, debug):
    """Validate the dataset of a config and print split and fold statistics."""
    loaded = read_options(config_path, overrides, debug)
    cfg = loaded.config
    if download_weights:
        cache = fill_cache(cfg.model.encoder, cfg.model.encoder_weights)
        click.echo(f"{cfg.model.encoder} weights {cfg.model.encoder_weights!r} are in {cache}")
        return
    inspect(loaded, json_out=json_out, say=click.echo)


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.inspect
    main()
