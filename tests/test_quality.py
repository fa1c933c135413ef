"""tools/quality.py: the recipe benchmark's bookkeeping, and one small run of it end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
from helpers import ROOT, run


def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "tools" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of(values: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Benchmark rows from {recipe: [(test IoU, best val IoU) per seed]}."""
    return [{"recipe": recipe, "seed": seed, "changes": recipe, "test/JaccardIndex": test, "test/F1Score": test,
             "best/val/JaccardIndex": val} for recipe, runs in values.items() for seed, (test, val) in enumerate(runs)]


def test_the_summary_is_mean_and_sample_std_and_the_combination_is_chosen_on_validation():
    q = quality()
    rows = rows_of({"darts": [(0.5, 0.6), (0.7, 0.8)], "ema": [(0.9, 0.7), (0.9, 0.8)],
                    "cosine": [(0.1, 0.71), (0.1, 0.71)], "positives": [(0.99, 0.5), (0.99, 0.5)]})
    summary = {entry["recipe"]: entry for entry in q.summarise(rows)}
    assert summary["darts"]["test/JaccardIndex mean"] == pytest.approx(0.6)
    assert summary["darts"]["test/JaccardIndex std"] == pytest.approx(math.sqrt(0.02))  # sample std, n - 1
    # ema (0.75) and cosine (0.71) beat darts (0.70) on validation; positives' better test score does not count
    assert q.combination(list(summary.values())) == ["ema", "cosine"]
    assert q.combination(q.summarise(rows_of({"darts": [(0.5, 0.9)], "ema": [(0.9, 0.8)]}))) == list(q.CHANGES)
    assert "| darts | 0.600 +- 0.141 |" in q.table(list(summary.values()))


@pytest.mark.slow
def test_a_small_benchmark_runs_tests_on_the_held_out_region_and_writes_its_files(tmp_path):
    out = tmp_path / "quality"
    result = run(["python", "tools/quality.py", "--out", str(out), "--seeds", "0,1", "--epochs", "1",
                  "--patches", "96", "--recipes", "darts"], check=True)
    assert " cores" in result.stdout and "| darts |" in result.stdout
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["recipe"], r["seed"]) for r in rows] == [("darts", "0"), ("darts", "1")]
    for row in rows:
        tested = json.loads((out / "runs" / f"darts-seed{row['seed']}" / "test" / "metrics.json").read_text())
        assert tested["precision"] == "fp32" and float(row["test/JaccardIndex"]) == tested["metrics"]["test/JaccardIndex"]
        splits = json.loads((out / "runs" / f"darts-seed{row['seed']}" / "splits.json").read_text())
        assert tested["test_patches"] == len(splits["test"]) == 24  # Lena Delta, a quarter of the patches
    assert (out / "summary.csv").is_file() and (out / "quality.png").stat().st_size > 0
    # the same benchmark again continues: its finished runs are kept, not trained again
    weights = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.safetensors")}
    again = run(["python", "tools/quality.py", "--out", str(out), "--seeds", "0,1", "--epochs", "1",
                 "--patches", "96", "--recipes", "darts"], check=True)
    assert "continuing in" in again.stdout and "| darts |" in again.stdout
    assert weights and {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.safetensors")} == weights
    other = run(["python", "tools/quality.py", "--out", str(out), "--recipes", "darts"])  # --patches 256
    assert other.returncode != 0 and "holds 96 patches, not --patches 256" in other.stderr
    assert "Traceback" not in other.stderr
    unknown = run(["python", "tools/quality.py", "--out", str(tmp_path / "other"), "--recipes", "swa"])
    assert unknown.returncode != 0 and "'swa' is not one of" in unknown.stderr and "Traceback" not in unknown.stderr
