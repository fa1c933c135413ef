"""Named crash points, armed only by `SMPTRAIN_FAILPOINT`, so tests can kill a real command at an exact moment.

    SMPTRAIN_FAILPOINT=NAME[@FILE][#N][:term]

kills the process with SIGKILL (or, with `:term`, sends it SIGTERM and goes on, as a scheduler's signal would) the
N-th time (default: the first) that the code reaches point NAME, counting only the times it concerns a file named
FILE when `@FILE` is given. Unset, `failpoint()` returns at once. The points (see `POINTS`) sit where a kill must
not lose or corrupt anything: around every rename, link and append, at the creation of a run directory, between an
epoch's last step and its validation, and during start-up; tests/test_failpoints.py kills a training at each of them
and compares what the same command, run again, leaves behind with an uninterrupted run's files.
"""

from __future__ import annotations

import os
import signal

POINTS = {
    "startup": "train(): the process has started, no data is read yet",
    "run_dir.created": "a new run directory is being made, none of its files written yet",
    "step.done": "an optimizer step is done (count them with #N), before the ranks ask whether to stop",
    "epoch.before_validation": "an epoch's last step is done, its validation not yet",
    "checkpoint.before_rename": "a checkpoint is complete under its temporary name",
    "checkpoint.after_rename": "a checkpoint is in place, `last` and `best` not yet pointing to it",
    "checkpoint.after_link": "`last` and `best` point to the new checkpoint, older ones not yet pruned",
    "write.before_rename": "a file (text, table, figure, converted model) is whole under its temporary name",
    "write.after_rename": "a file has replaced the old one",
    "metrics.before_append": "a metrics.jsonl record is about to be appended",
    "metrics.after_append": "a metrics.jsonl record has been appended",
}
_reached: dict[str, int] = {}


def failpoint(name: str, file: str = "") -> None:
    """Die here if SMPTRAIN_FAILPOINT names this point (and file) and this is the time it counts."""
    armed = os.environ.get("SMPTRAIN_FAILPOINT")
    if not armed:
        return
    spec, _, how = armed.partition(":")
    spec, _, nth = spec.partition("#")
    point, _, wanted = spec.partition("@")
    if point not in POINTS:
        raise ValueError(f"SMPTRAIN_FAILPOINT names {point!r}, which is none of: {', '.join(POINTS)}")
    if point != name or (wanted and wanted != file):
        return
    _reached[armed] = _reached.get(armed, 0) + 1
    if _reached[armed] != int(nth or 1):
        return
    os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)
