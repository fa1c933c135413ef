"""Progress as a terminal shows it and as a log file keeps it: a tqdm bar, plain lines, or nothing.

`log.progress` (or the environment variable `SMPTRAIN_PROGRESS`, which wins: a job script sets it for every command
it runs) is one of `PROGRESS_MODES`: `auto` draws a bar when stderr is a terminal and writes lines otherwise (a
scheduler's log file, a pipe); `bar`, `lines` and `off` force one. A bar in a file is a line of `\\r`-separated
fragments per epoch, which `less`, an editor, a web log viewer and `grep` show as noise.

Lines are whole lines on stderr with what the bar shows: `epoch 2/12: step 13/16 (81%) | loss 0.1487 | 26.8 img/s |
data 0% | 0:02 elapsed, 0:00 left`. A record (a training logging step) writes one, at most every `TQDM_MININTERVAL`
seconds (10 s when unset; 0 = every record), and plain counting (evaluation, a value scan) one every 30 s (or
`TQDM_MININTERVAL`). tqdm's own environment variables are honoured: `TQDM_DISABLE=1` turns bars and lines off,
and the others reach the bar.
"""

from __future__ import annotations

import os
import sys
import time

from smptrain.core.choices import PROGRESS_MODES

ENVIRONMENT = "SMPTRAIN_PROGRESS"
_configured = "auto"


def configure(mode: str) -> None:
    """The mode a configuration asks for (`log.progress`); `SMPTRAIN_PROGRESS` still wins."""
    global _configured
    _configured = mode


def mode() -> str:
    """bar, lines or off, as this process shows progress now."""
    chosen = os.environ.get(ENVIRONMENT, "").strip().lower() or _configured
    if chosen not in PROGRESS_MODES:
        chosen = "auto"
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return "off"
    if chosen == "auto":
        try:
            return "bar" if sys.stderr.isatty() else "lines"
        except (AttributeError, ValueError):  # a closed or replaced stderr
            return "lines"
    return chosen


def progress(total: int | None, desc: str, *, initial: int = 0, unit: str = "it", show: bool = True):
    """A progress display of `total` units, as the mode says; `show=False` (not the machine's first process) shows
    nothing. It has tqdm's `update(n)`, `set_postfix(**values)` and `close()`, and is a context manager."""
    chosen = mode() if show else "off"
    if chosen == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    if chosen == "lines":
        return Lines(total, desc, initial, unit)
    return Off()


def _interval(default: float) -> float:
    try:
        return max(0.0, float(os.environ["TQDM_MININTERVAL"]))
    except (KeyError, ValueError):
        return default


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Lines:
    """Progress as whole lines on stderr: one per record (`set_postfix`, throttled), and while counting, one every
    interval; a finished count says nothing more (what follows it is the result)."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, unit: str = "it"):
        self.total, self.desc, self.n, self.unit, self.postfix = total, desc, initial, unit, {}
        self.start = self.last = time.monotonic()
        self.first = initial
        self.record_every, self.count_every = _interval(10.0), _interval(30.0)
        self.said = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.count_every and (self.total is None or self.n < self.total):
            self.emit()

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if not self.said or time.monotonic() - self.last >= self.record_every:
            self.emit()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {self.unit} {done}", *(f"{k} {v}" for k, v in self.postfix.items())]
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0
        left = f", {clock((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        return " | ".join(parts) + f" | {clock(elapsed)} elapsed{left}"

    def emit(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last, self.said = time.monotonic(), True

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Off:
    """No progress at all (`off`, `TQDM_DISABLE=1`, or a process that is not its machine's first)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
