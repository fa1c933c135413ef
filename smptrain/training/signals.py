"""Ctrl-C and SIGTERM during training: what a signal does before the first step, after it, and a second time.

`StopSignal` is installed by `train()` for the length of a run; `Interrupted` is what it raises when nothing can be
saved. The trainer polls `StopSignal.raised` at logging steps, where all ranks agree on stopping.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """A signal ended the run where no checkpoint could be written (before the first step, or a second signal)."""

    def __init__(self, message: str, undo=None):
        super().__init__(message)
        self.undo = undo


class StopSignal:
    """SIGINT and SIGTERM (what SLURM sends before SIGKILL), in three phases.

    Before the first optimizer step (loading data, a cold `torch.compile`) there is nothing to save: a new run's
    directory is removed and, in a command (which installed `exit_on_further_signals`), the process ends at once
    with 130; called from Python (a notebook), the signal raises `Interrupted`. Once armed, it sets a flag that all ranks
    agree on after the step in progress (`collectives.stop_agreed`), which writes `checkpoints/last` and stops. A second signal raises
    `Interrupted` at once, without saving. `restore()` puts the previous handlers back.

    A launcher that passes a terminal's Ctrl-C on delivers it a second time to processes that already got it from
    the terminal: torch elastic's agent and `smptrain-launch` as SIGINT, Accelerate's one-process launcher (1.16) as
    SIGTERM, followed by SIGKILL 5 s later. Any stop signal within `SAME_REQUEST_S` of the first counts as that one
    request, not as the second one that aborts.
    """

    SAME_REQUEST_S = 1.5

    def __init__(self):
        self.raised = False
        self.first = (None, 0.0)  # the first signal's number and time
        self.armed = False
        self.undo = None  # what to remove if interrupted before the first step
        self.previous = {}
        if sys.platform != "win32" and _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        global _last_request
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first[0] is not None and now - self.first[1] < self.SAME_REQUEST_S:
            return  # the same request, passed on by a launcher (as itself, or as SIGTERM)
        if self.first[0] is None:
            self.first = _last_request = (signum, now)
        if not self.armed:
            message = f"{name} before the first training step finished: stopped, nothing to save"
            if getattr(self.previous.get(signum), "ends_the_command", False):
                # A command's own process: end it here. An exception raised at this arbitrary point could land in
                # a C extension's import (tensorstore's), which turns it into an ImportError and, imported again,
                # aborts the process (SIGABRT); nothing is there to unwind before the first step anyway.
                if local_main():
                    print(f"\n{message}", file=sys.stderr, flush=True)
                if self.undo is not None:
                    self.undo()
                _leave(130)
            raise Interrupted(message, self.undo)
        if self.raised:
            raise Interrupted(f"{name} again: aborted without saving; checkpoints/last is the one written before")
        self.raised = True
        if local_main():  # one message per machine, not one per process
            print(f"\n{name}: stopping after this step, writing checkpoints/last "
                  f"(send it again to abort without saving)", file=sys.stderr, flush=True)


_last_request = (None, 0.0)  # the signal a StopSignal last took as a request to stop, and when


def exit_on_further_signals(code: int = 130) -> None:
    """What SIGINT and SIGTERM do in a training command outside `train()`'s own handling (which puts these back).

    After a stopped run has written `checkpoints/last` the command is only leaving; a signal then arriving late
    (a launcher passing on the one this process already had, a second Ctrl-C) ends it at once with `code`, the
    status an interrupted run exits with, instead of the default action that leaves a shell seeing "killed by
    SIGTERM" (143). A copy of the stop request within `StopSignal.SAME_REQUEST_S` is still the same request.
    Before a run starts there is nothing to save either, and the same holds.
    """
    if sys.platform == "win32" or not _in_main_thread():
        return

    def leave_now(signum, frame):
        if _last_request[0] is not None and time.monotonic() - _last_request[1] < StopSignal.SAME_REQUEST_S:
            return  # the launcher passing on the request this process already took
        _leave(code)

    leave_now.ends_the_command = True  # what StopSignal recognises: this process is a command's, not a notebook's
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave_now)


def _leave(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def local_main() -> bool:
    """The first process on this machine (launchers set LOCAL_RANK; a process started alone is the first)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
