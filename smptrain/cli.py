"""Options every command shares: `--config FILE`, repeatable `--set section.key=value`, and `--debug`."""

from __future__ import annotations

import os
import sys

import click

from smptrain.config import Config, Loaded, read_config


def config_options(command):
    """Add --config, --set and --debug to a click command."""
    command = click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")(command)
    command = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                           help="Override one config value, e.g. --set train.lr=3e-4 or DARTS' --set learning-rate=3e-4 "
                                "(repeatable).")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                           help="TOML config file: smptrain's sections (see configs/base.toml) and/or a DARTS "
                                "[darts] table.")(command)
    return command


def resolve(config_path, overrides, debug: bool, base: dict | None = None, base_source: str = "") -> Loaded:
    """The configuration as read, with the `[darts]` keys this command does not use named once (main process)."""
    if debug:
        os.environ["SMPTRAIN_DEBUG"] = "1"
    loaded = read_config(config_path, overrides, base=base, base_source=base_source or "the defaults")
    line = loaded.darts.ignored_line(loaded.source)
    if line and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    return loaded


def resolve_config(config_path, overrides, debug: bool, base: dict | None = None, base_source: str = "") -> Config:
    return resolve(config_path, overrides, debug, base, base_source).config


def given_or(value, loaded: Loaded, option: str, default=None):
    """A command option: as given on the command line, else as the `[darts]` table says, else `default`."""
    if value is not None:
        return value
    return loaded.darts.options.get(option, default)
