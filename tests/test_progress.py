"""Progress as a log file keeps it: the mode chosen (a bar only in a terminal), and the lines' form."""

from __future__ import annotations

import io
import re

import pytest

from smptrain.core import progress as P


@pytest.fixture
def stderr(monkeypatch):
    import types

    captured = io.StringIO()
    monkeypatch.setattr(P, "sys", types.SimpleNamespace(stderr=captured))  # where the module writes
    for key in ("SMPTRAIN_PROGRESS", "TQDM_DISABLE", "TQDM_MININTERVAL"):
        monkeypatch.delenv(key, raising=False)
    P.configure("auto")
    yield captured
    P.configure("auto")


def test_auto_writes_lines_where_stderr_is_not_a_terminal(stderr, monkeypatch):
    assert P.mode() == "lines"  # a StringIO, as a file or a pipe: not a terminal
    monkeypatch.setattr(stderr, "isatty", lambda: True, raising=False)
    assert P.mode() == "bar"
    P.configure("off")
    assert P.mode() == "off"
    monkeypatch.setenv("SMPTRAIN_PROGRESS", "lines")  # a job script's choice wins over the configuration
    assert P.mode() == "lines"
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch is honoured
    assert P.mode() == "off" and isinstance(P.progress(10, "x"), P.Off)


def test_lines_are_whole_lines_with_what_the_bar_shows(stderr, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    with P.progress(8, "epoch 2/12", unit="step", initial=2) as bar:
        bar.update(1)
        bar.set_postfix(**{"loss": "0.1234", "img/s": "31.2", "data wait": "1%"})
    lines = stderr.getvalue().splitlines()
    assert "\r" not in stderr.getvalue() and lines
    assert re.fullmatch(r"epoch 2/12: step 3/8 \(38%\) \| loss 0\.1234 \| img/s 31\.2 \| data wait 1% \| "
                        r"\d+:\d\d elapsed(, \d+:\d\d left)?", lines[-1]), lines


def test_records_are_said_at_most_every_interval(stderr, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "3600")
    bar = P.progress(100, "epoch 1/1", unit="step")
    for step in range(50):
        bar.update(1)
        bar.set_postfix(loss=f"{step}")
    assert len(stderr.getvalue().splitlines()) == 1  # the first record, then nothing within the hour
