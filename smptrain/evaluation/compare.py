"""`smptrain-compare`: runs side by side, from what they wrote (no model is loaded, nothing is recomputed).

    smptrain-compare RUN_DIR... [--metric val/JaccardIndex] [--out DIR]

A RUN_DIR is a run directory (it has `run.json`), or a directory holding runs, such as a CV or a tuning study:
every run below it is compared. For each run: the configuration keys whose values differ between the runs, the
best and the last value of `--metric` in `metrics.jsonl` (with the step of the best), the same metric on the test
split when `smptrain-test` wrote `test/metrics.json`, the number of optimizer steps, and the wall time from the
run's creation to its last checkpoint. Writes `compare.csv` and `compare.png` (the metric over steps, one line per
run) next to the runs (the one RUN_DIR given, or the folder the RUN_DIRs share), or to --out.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import tomllib
from pathlib import Path

import click

from smptrain.config import dotted_keys
from smptrain.core.errors import UserError
from smptrain.training.layout import CONFIG, IDENTITY, LAST, META, METRICS, TEST, TEST_METRICS, checkpoint_link
from smptrain.training.summary import read_summary

LOWER_IS_BETTER = ("loss", "HammingDistance", "ExpectedCalibrationError")
NOT_COMPARED = ("log.run_name",)  # differs by construction


def find_runs(paths) -> list[Path]:
    runs = []
    for path in map(Path, paths):
        if (path / IDENTITY).is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob(IDENTITY))
        else:
            raise UserError(f"{path} is not a directory")
        if not found:
            raise UserError(f"{path} holds no run (no run.json in it or below it)")
        runs += [run for run in found if run not in runs]
    return runs


def read_run(run_dir: Path, metric: str) -> dict:
    """One run's record: its config (flattened), the metric's curve, best and last, test metrics, steps and time."""
    try:
        config = dotted_keys(tomllib.loads((run_dir / CONFIG).read_text()))
        identity = json.loads((run_dir / IDENTITY).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{run_dir} is not a readable run directory: {error}") from None
    curve, steps = [], 0
    metrics_file = run_dir / METRICS
    if metrics_file.is_file():
        for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{metrics_file} line {number} is not JSON") from None
            steps = max(steps, int(record.get("step") or 0))
            if isinstance(record.get(metric), (int, float)):
                curve.append((int(record["step"]), float(record[metric])))
    lower = metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER
    best = (min if lower else max)(curve, key=lambda point: point[1]) if curve else (None, math.nan)
    summary = read_summary(run_dir)  # the latest test and the wall time of every session, where training kept one
    test_file = run_dir / TEST / TEST_METRICS
    try:
        test = (summary.get("test") or {}).get("metrics") or (
            json.loads(test_file.read_text()).get("metrics", {}) if test_file.is_file() else {})
    except ValueError:
        raise UserError(f"{test_file} is not JSON; run smptrain-test {run_dir} again") from None
    test_key = "test/" + metric.split("/", 1)[-1]
    return {"run": identity.get("run_name", run_dir.name), "dir": run_dir, "config": config, "curve": curve,
            "best": best[1], "best_step": best[0], "last": curve[-1][1] if curve else math.nan,
            "test": test.get(test_key) if test.get(test_key) is not None else math.nan, "test_key": test_key,
            "steps": steps, "seconds": summary.get("wall_time_s") or wall_time(run_dir, identity)}


def wall_time(run_dir: Path, identity: dict) -> float | int:
    """Seconds from the run's creation to its last checkpoint (NaN when either is unknown)."""
    try:
        created = datetime.datetime.fromisoformat(identity["created"])
        saved = datetime.datetime.fromisoformat(
            json.loads((checkpoint_link(run_dir, LAST) / META).read_text())["time"])
    except (KeyError, OSError, ValueError):
        return math.nan
    return round((saved - created).total_seconds())


def differing_keys(runs: list[dict]) -> list[str]:
    keys = sorted({k for run in runs for k in run["config"]} - set(NOT_COMPARED))
    return [k for k in keys if len({json.dumps(run["config"].get(k), sort_keys=True) for run in runs}) > 1]


def table_rows(runs: list[dict], metric: str) -> list[dict]:
    differs = differing_keys(runs)
    test_key = runs[0]["test_key"]
    rows = []
    for run in runs:
        row = {"run": run["run"]}
        row.update({key: run["config"].get(key) for key in differs})
        row.update({f"best {metric}": run["best"], "best step": run["best_step"], f"last {metric}": run["last"],
                    test_key: run["test"], "steps": run["steps"], "time [s]": run["seconds"], "dir": str(run["dir"])})
        rows.append(row)
    return rows


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def format_table(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "dir"]
    cells = [[format_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def compare(paths, metric: str, out_dir: Path) -> list[dict]:
    runs = [read_run(run_dir, metric) for run_dir in find_runs(paths)]
    rows = table_rows(runs, metric)
    from smptrain.core.storage import write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: format_cell(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows)
    write_text(out_dir / "compare.csv", buffer.getvalue())
    from smptrain.evaluation import plots

    plots.runs_over_steps({run["run"]: run["curve"] for run in runs}, metric, out_dir / "compare.png")
    if not any(run["curve"] for run in runs):
        click.echo(f"note: no run has recorded {metric}", err=True)
    return rows


def beside(paths) -> Path:
    """Where the comparison of `paths` goes by default: the one directory given, or the folder they share."""
    import os

    absolute = [Path(p).absolute() for p in paths]
    return absolute[0] if len(absolute) == 1 else Path(os.path.commonpath(absolute))
