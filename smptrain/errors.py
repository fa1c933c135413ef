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


def report_user_errors(main):
    """Wrap a CLI entry point: a `UserError` becomes one line on stderr and exit code 2.

    `SMPTRAIN_DEBUG=1` (or the `--debug` flag the CLIs set it from) re-raises to show the traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get("SMPTRAIN_DEBUG"):
                raise
            _close_progress_bars()
            text = str(error)
            if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own sentence
                text = text.strip().splitlines()[-1].split("Error: ", 1)[-1]
            print(f"error: {text}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _close_progress_bars() -> None:
    """Clear open tqdm bars so the error starts on its own line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
