"""Options every command shares: `--config FILE`, repeatable `--set section.key=value`, and `--debug`."""

from __future__ import annotations

import os

import click

from smptrain.config import Config, load_config


def config_options(command):
    """Add --config, --set and --debug to a click command."""
    command = click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")(command)
    command = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                           help="Override one config value, e.g. --set train.lr=3e-4 (repeatable).")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                           help="TOML config file (see configs/base.toml).")(command)
    return command


def resolve_config(config_path, overrides, debug: bool, base: dict | None = None, base_source: str = "") -> Config:
    if debug:
        os.environ["SMPTRAIN_DEBUG"] = "1"
    return load_config(config_path, overrides, base=base, base_source=base_source or "the defaults")
