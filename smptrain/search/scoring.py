"""How DARTS scores a cross-validation (`scoring.py` of darts-segmentation): the metrics and their directions, the
strategy that combines several per run, which runs are unstable, and the mean over runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from smptrain.core.errors import UserError

DEFAULT_SCORING = ("val/JaccardIndex", "val/Recall")
STRATEGIES = ("harmonic", "arithmetic", "geometric", "min")


@dataclass(frozen=True)
class Scoring:
    """How runs are scored, as DARTS scores them: the metrics ((key, higher is better), ...), the strategy that
    combines several per run, and which validation of each run counts (its last, as DARTS, or its best)."""

    metrics: tuple[tuple[str, bool], ...] = tuple((name, True) for name in DEFAULT_SCORING)
    strategy: str = "harmonic"
    score_on: str = "last"

    @classmethod
    def parse(cls, text: str, strategy: str = "harmonic", score_on: str = "last") -> "Scoring":
        """From the command line: `--scoring val/JaccardIndex,val/loss:lower --strategy ... --score-on ...`."""
        if strategy not in STRATEGIES:
            raise UserError(f"--strategy (DARTS' multi-score-strategy) must be one of {', '.join(STRATEGIES)}, "
                            f"got {strategy!r}")
        return cls(tuple(parse_scoring([s for s in str(text).split(",") if s.strip()])), strategy, score_on)

    @property
    def keys(self) -> list[str]:
        """The keys read from each run's row: its last validation's metrics, or its best's (`best/...`)."""
        prefix = "best/" if self.score_on == "best" else ""
        return [prefix + name for name, _ in self.metrics]

    @property
    def first(self) -> str:
        """The first scoring metric's name (what tuning's pruner watches)."""
        return self.metrics[0][0]


def parse_scoring(metrics) -> list[tuple[str, bool]]:
    """[(metric key, higher is better)] from DARTS' `name[:higher|:lower]` strings."""
    parsed = []
    for text in metrics:
        name, _, direction = str(text).strip().partition(":")
        if direction not in ("", "higher", "lower"):
            raise UserError(f"scoring metric {text!r} must be a metric name, optionally with :higher or :lower")
        parsed.append((name, direction != "lower"))
    if not parsed:
        raise UserError("at least one scoring metric is needed, e.g. val/JaccardIndex")
    return parsed


def run_is_unstable(values: list[float]) -> bool:
    """DARTS: a run is unstable when any of its scoring metrics is non-finite or 0."""
    return any(not math.isfinite(v) or v == 0 for v in values)


def score_runs(rows: list[dict], scoring: list[tuple[str, bool]], strategy: str) -> tuple[float, bool, list]:
    """DARTS' CV score (`scoring.py`): (score, any run unstable, each run's combined score or None if skipped).

    One metric: the mean over runs (the direction is ignored). Several: per run, skip it if it is unstable and the
    strategy is harmonic or geometric; otherwise invert `:lower` metrics and combine (harmonic, arithmetic,
    geometric or min); the score is the mean of the run scores (0 if none is left).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    table = [[float(row.get(name, math.nan)) if row.get(name) is not None else math.nan for name, _ in scoring]
             for row in rows]
    unstable = any(run_is_unstable(values) for values in table)
    if len(scoring) == 1:
        values = [v[0] for v in table]
        return (float(np.mean(values)) if values else 0.0), unstable, values
    per_run = []
    for values in table:
        if run_is_unstable(values) and strategy in ("harmonic", "geometric"):
            per_run.append(None)
            continue
        with np.errstate(divide="ignore"):
            oriented = np.array([v if higher else 1 / v for v, (_, higher) in zip(values, scoring)], np.float64)
        if strategy == "harmonic":
            per_run.append(float(len(oriented) / np.sum(1 / oriented)))
        elif strategy == "arithmetic":
            per_run.append(float(np.mean(oriented)))
        elif strategy == "geometric":
            per_run.append(float(np.prod(oriented) ** (1 / len(oriented))))
        else:
            per_run.append(float(np.min(oriented)))
    kept = [v for v in per_run if v is not None]
    return (float(np.mean(kept)) if kept else 0.0), unstable, per_run
