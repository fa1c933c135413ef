"""User-facing errors.

A `UserError` is a mistake the user can fix (a wrong key, a missing file, an impossible split). The command-line
entry points print its message as one sentence and exit with status 2, without a traceback; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input: its message names the file, key or value and what was expected."""


class CannotBuild(UserError):
    """The configured model cannot be built or cannot take the run's patches (architecture, encoder and patch size
    together); cross-validation and tuning record it as a failed trial and go on."""


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
            from smptrain.storage import REASONS, free_space, human

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
