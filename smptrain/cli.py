"""What every command shares: its options (`--config FILE`, repeatable `--set section.key=value`, `--debug`), reading
the configuration they name, and how it ends (`report_user_errors`: a user's mistake is one sentence and exit
status 2; `leave`: the exit itself)."""

from __future__ import annotations

import functools
import os
import sys

import click

from smptrain.config import Loaded, read_config
from smptrain.core.errors import UserError
from smptrain.core.processes import is_main_process
from smptrain.core.storage import REASONS, free_space, human


def config_options(command):
    """Add --config, --set and --debug to a click command."""
    command = click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")(command)
    command = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", callback=_overrides,
                           help="Override one config value, e.g. --set train.lr=3e-4 or DARTS' --set learning-rate=3e-4 "
                                "(repeatable).")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                           help="TOML config file: smptrain's sections (see configs/base.toml) and/or a DARTS "
                                "[darts] table.")(command)
    return command


def _overrides(ctx, param, values):
    """`--set train.lr 1e-3` (a space for the =) would reach click as a stray argument and end in its usage text:
    said here instead, in the project's one line, with what was meant."""
    for item in values:
        if "=" not in item:
            argv = sys.argv[1:]
            at = next((i for i in range(len(argv) - 1) if argv[i] == "--set" and argv[i + 1] == item), None)
            value = argv[at + 2] if at is not None and at + 2 < len(argv) and not argv[at + 2].startswith("-") else None
            meant = f"--set {item}={value}" if value is not None else f"--set {item}=VALUE"
            print(f"error: --set {item!r} must look like section.key=value: write {meant} (no space around the =)",
                  file=sys.stderr, flush=True)
            leave(2)
    return values


def read_options(config_path, overrides, debug: bool, base: dict | None = None, base_source: str = "") -> Loaded:
    """The configuration as read, with the `[darts]` keys this command does not use named once (main process)."""
    if debug:
        os.environ["SMPTRAIN_DEBUG"] = "1"
    loaded = read_config(config_path, overrides, base=base, base_source=base_source or "the defaults")
    line = loaded.darts.ignored_line(loaded.source)
    if line and is_main_process():
        print(line, file=sys.stderr, flush=True)
    return loaded


def require_config(config_path, purpose: str = "") -> str:
    """`--config`'s value, or the one sentence every command says when it is missing."""
    if config_path is None:
        raise UserError(f"--config is required{' ' + purpose if purpose else ''} (e.g. --config configs/base.toml)")
    return config_path


def plain_name(name: str, option: str = "--name") -> str:
    """A name that becomes one directory (of a CV, a comparison, a study), or the sentence that refuses it."""
    if "/" in name or name in ("", ".", ".."):
        raise UserError(f"{option} must be a plain directory name, got {name!r}")
    return name


def interrupted(how_to_continue: str) -> None:
    """End a command whose work a signal stopped: one line saying how to continue, exit status 130."""
    print(f"\ninterrupted; {how_to_continue}", file=sys.stderr, flush=True)
    sys.exit(130)


def given_or(value, loaded: Loaded, option: str, default=None):
    """A command option: as given on the command line, else as the `[darts]` table says, else `default`."""
    if value is not None:
        return value
    return loaded.darts.options.get(option, default)


def report_user_errors(main):
    """Wrap a CLI entry point: a `UserError` becomes one line on stderr and exit code 2.

    `SMPTRAIN_DEBUG=1` (or the `--debug` flag the CLIs set it from) re-raises to show the traceback. A command that
    ends (normally, by `sys.exit` or with a user error) leaves through `leave()`; a bug keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            main(*args, **kwargs)
            code = 0
        except UserError as error:
            if os.environ.get("SMPTRAIN_DEBUG"):
                raise
            _close_progress_bars()
            text = str(error)
            if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own sentence
                text = text.strip().splitlines()[-1].split("Error: ", 1)[-1]
            print(f"error: {text}", file=sys.stderr, flush=True)
            code = 2
        except OSError as error:  # a refusal of the filesystem that no writer turned into a sentence of its own
            if error.errno not in REASONS or os.environ.get("SMPTRAIN_DEBUG"):
                raise
            _close_progress_bars()
            where = error.filename or "a file"
            print(f"error: {where}: {error.strerror} ({human(free_space(where if error.filename else '.'))} free there)",
                  file=sys.stderr, flush=True)
            code = 2
        except SystemExit as stop:
            code = stop.code
        leave(code)

    return wrapper


def leave(code) -> None:
    """Exit with `code` (as `sys.exit` takes it) without the interpreter's module teardown.

    With torch, timm and sklearn loaded, tearing the modules down took 2 s after every command (measured on the
    2-core test machine). Everything that must happen at exit still does: output is flushed and the `atexit`
    handlers run (wandb's, multiprocessing's, ours that stops DataLoader workers); every file smptrain writes is
    closed when written.
    """
    import atexit

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    _flush()
    atexit._run_exitfuncs()
    _flush()  # what the handlers printed
    os._exit(code or 0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe
            pass


def _close_progress_bars() -> None:
    """Clear open tqdm bars so the error starts on its own line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
