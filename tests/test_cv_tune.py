"""smptrain-cv and smptrain-tune through the real CLIs: DARTS' scoring, continuation, cooperating workers."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import BIN, cli_env, run, tiny_config

from smptrain.search.cv import darts_seeds, score_runs

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out


def harmonic(values):
    return len(values) / sum(1 / v for v in values)


def test_scoring_follows_darts_formulas():
    rows = [{"iou": 0.7, "recall": 0.8, "loss": 0.9}, {"iou": 0.6, "recall": 0.9, "loss": 0.5},
            {"iou": 0.0, "recall": 0.7, "loss": 0.4}, {"iou": 0.8, "recall": math.nan, "loss": 0.8}]
    stable = rows[:2]
    one, unstable, _ = score_runs(rows, [("iou", True)], "harmonic")  # one metric: the plain mean
    assert one == pytest.approx((0.7 + 0.6 + 0.0 + 0.8) / 4) and unstable
    two = [("iou", True), ("recall", True)]
    assert score_runs(rows, two, "harmonic")[0] == pytest.approx(
        sum(harmonic([r["iou"], r["recall"]]) for r in stable) / 2)
    lower = [("iou", True), ("recall", True), ("loss", False)]
    assert score_runs(rows, lower, "geometric")[0] == pytest.approx(
        sum((r["iou"] * r["recall"] / r["loss"]) ** (1 / 3) for r in stable) / 2)
    # arithmetic and min keep unstable runs (DARTS skips them only for harmonic and geometric)
    arithmetic = [(r["iou"] + r["recall"]) / 2 for r in rows]
    assert math.isnan(score_runs(rows, two, "arithmetic")[0]) == any(math.isnan(a) for a in arithmetic)
    assert score_runs(rows[:3], two, "min")[0] == pytest.approx((0.7 + 0.6 + 0.0) / 3)
    assert score_runs(rows[:2], two, "harmonic")[1] is False


def test_darts_seeds():
    assert darts_seeds(2) == [42, 21] and darts_seeds(3) == [42, 21, 69]
    assert darts_seeds(5) == [42, 21, 69, *random.Random(42).sample(range(9999), 2)]


def cv(config: Path, name: str, *extra: str, **kwargs):
    return run(["smptrain-cv", "--config", str(config), "--name", name, "--folds", "2", "--seeds", "42,21",
                *extra], **kwargs)


@pytest.fixture(scope="module")
def cv_setup(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("cv")
    config = tiny_config(tmp, demo_dir, train={"max_epochs": 1}, log={"preview_every_n_val": 0})
    result = cv(config, "folds", check=True)
    return tmp, config, tmp / "artifacts" / "folds", result


def test_cv_runs_every_fold_and_seed_and_scores_like_darts(cv_setup):
    _, _, cv_dir, result = cv_setup
    table = pd.read_csv(cv_dir / "runs.csv")
    assert sorted(zip(table["fold"], table["seed"])) == [(0, 21), (0, 42), (1, 21), (1, 42)]
    assert set(table["status"]) == {"finished"} and pd.read_parquet(cv_dir / "runs.parquet").shape == table.shape
    for run_dir in table["run_dir"]:  # each a normal run directory
        assert (Path(run_dir) / "checkpoints" / "best" / "meta.json").is_file()
        meta = json.loads((Path(run_dir) / "checkpoints" / "last" / "meta.json").read_text())
        row = table[table["run_dir"] == run_dir].iloc[0]
        assert meta["config"]["data"]["fold"] == row["fold"] and meta["config"]["train"]["seed"] == row["seed"]
        assert meta["metrics"]["val/JaccardIndex"] == pytest.approx(row["val/JaccardIndex"])
    # DARTS' harmonic score of val/JaccardIndex and val/Recall, recomputed from the table alone
    runs = [(r["val/JaccardIndex"], r["val/Recall"]) for _, r in table.iterrows()]
    kept = [harmonic(v) for v in runs if all(math.isfinite(x) and x != 0 for x in v)]
    expected = sum(kept) / len(kept) if kept else 0.0
    outcome = json.loads((cv_dir / "cv.json").read_text())
    assert outcome["score"] == pytest.approx(expected, rel=1e-9)
    assert outcome["score_is_unstable"] == (len(kept) < len(runs))
    assert outcome["summary"]["val/JaccardIndex"]["mean"] == pytest.approx(table["val/JaccardIndex"].mean())
    assert (cv_dir / "cv_metrics.png").stat().st_size > 0 and "score (harmonic)" in result.stdout


def test_running_a_finished_cv_again_trains_nothing(cv_setup):
    _, config, cv_dir, _ = cv_setup
    before = {p: p.stat().st_mtime for p in cv_dir.glob("*/metrics.jsonl")}
    again = cv(config, "folds", check=True)
    assert "fold 0, seed 42" not in again.stdout and {p: p.stat().st_mtime for p in before} == before
    changed = cv(config, "folds", "--set", "train.lr=0.01")
    assert changed.returncode == 2 and "train.lr" in changed.stderr and "Traceback" not in changed.stderr


def test_compare_prints_the_runs_of_a_cv_side_by_side(cv_setup, tmp_path):
    _, _, cv_dir, _ = cv_setup
    result = run(["smptrain-compare", str(cv_dir), "--out", str(tmp_path)], check=True)
    table = pd.read_csv(tmp_path / "compare.csv")
    runs = pd.read_csv(cv_dir / "runs.csv")
    assert sorted(table["dir"]) == sorted(runs["run_dir"]) and (tmp_path / "compare.png").stat().st_size > 0
    # only what differs between the runs: the fold and the seed
    assert [c for c in table.columns if "." in c] == ["data.fold", "train.seed"]
    for _, row in table.iterrows():  # checked against each run's own metrics.jsonl
        records = [json.loads(line) for line in (Path(row["dir"]) / "metrics.jsonl").read_text().splitlines()]
        values = [(r["step"], r["val/JaccardIndex"]) for r in records if "val/JaccardIndex" in r]
        assert row["best val/JaccardIndex"] == pytest.approx(max(v for _, v in values), rel=1e-12)
        assert row["last val/JaccardIndex"] == pytest.approx(values[-1][1], rel=1e-12)
        assert row["best step"] == max(values, key=lambda p: p[1])[0]
        assert row["steps"] == max(r["step"] for r in records)
        assert row["run"] in result.stdout
    missing = run(["smptrain-compare", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "nothing" in missing.stderr and "Traceback" not in missing.stderr


def test_an_interrupted_cv_continues_where_it_stopped(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 3}, log={"preview_every_n_val": 0,
                                                                           "log_every_n_steps": 1})
    cv_dir = tmp_path / "artifacts" / "stop"
    args = [str(BIN / "smptrain-cv"), "--config", str(config), "--name", "stop", "--folds", "2", "--seeds", "42"]
    process = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = cv_dir / "stop-f1s42" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (second.exists() and second.read_text().count("train/loss") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    table = pd.read_csv(cv_dir / "runs.csv")
    assert dict(zip(table["fold"], table["status"])) == {0: "finished", 1: "interrupted"}
    finished_log = (cv_dir / "stop-f0s42" / "metrics.jsonl").read_text()
    resumed = run(args[:1] + args[1:], check=True)
    assert "resuming stop-f1s42" in resumed.stdout + resumed.stderr
    assert (cv_dir / "stop-f0s42" / "metrics.jsonl").read_text() == finished_log  # not run again
    assert set(pd.read_csv(cv_dir / "runs.csv")["status"]) == {"finished"}


SPACE = """[hyperparameters]
learning_rate = {distribution = "loguniform", low = 1e-4, high = 1e-2}
gamma = {distribution = "reversed_loguniform", low = 0.8, high = 0.99}
augment = [[], ["D4"]]
"""


def tune_args(config: Path, space: Path, study: str, *extra: str) -> list[str]:
    return [str(BIN / "smptrain-tune"), "--config", str(config), "--space", str(space), "--study", study,
            "--single-run", *extra]


def trials(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "trials.csv")


def test_a_killed_worker_leaves_a_failed_trial_that_is_retried(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16}, train={"max_epochs": 4},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 1})
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    args = tune_args(config, space, "killed", "--trials", "2", "--heartbeat", "1")
    study_dir = tmp_path / "artifacts" / "killed"
    first = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = study_dir / "trial-0000" / "trial-0000-f0s42" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and "val/JaccardIndex" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    first.kill()
    first.communicate()
    second = run(args, check=True)
    assert "trial 0 lost its worker" in second.stdout
    table = trials(study_dir)
    failed, done = table[table["state"] == "FAIL"], table[table["state"] == "COMPLETE"]
    assert list(failed["number"]) == [0] and sorted(done["slot"]) == [0, 1]
    retry = done[done["retry_of"] == 0].iloc[0]
    assert retry["slot"] == 0 and retry["directory"] == "trial-0000"
    assert retry["train.lr"] == failed.iloc[0]["train.lr"]


@pytest.mark.parametrize("space, words", [
    ("[hyperparameters]\nlearning_rat = [1e-3]\n", ["learning_rat", "unknown"]),
    ("[hyperparameters]\nlearning_rate = {distribution = \"normal\", low = 0.1, high = 0.2}\n", ["normal", "distribution"]),
    ("[hyperparameters]\nlearning_rate = {low = 0.2, high = 0.1}\n", ["learning_rate", "low must be less than high"]),
    ("[hyperparameters]\nbatch_size = [4, \"eight\"]\n", ["batch_size", "train.batch_size"]),
    ("[hyperparameters]\ngamma = {low = 1, high = 0.5}\n", ["gamma", "integers", "floats"]),
    ("hyperparameters = 3\n", ["[hyperparameters]"]),
])
def test_a_bad_space_file_is_one_sentence_before_training(demo_dir, tmp_path, space, words):
    config = tiny_config(tmp_path, demo_dir)
    path = tmp_path / "bad.toml"
    path.write_text(space)
    result = run([*tune_args(config, path, "bad")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "artifacts").exists()  # nothing trained, no study created


def test_n_randoms_gives_darts_seeds_and_bad_seeds_are_sentences():
    from smptrain.core.errors import UserError
    from smptrain.search.cv import parse_seeds

    assert parse_seeds("42,21,69", 4) == darts_seeds(4) and parse_seeds("7,8") == [7, 8]
    for text, n in (("4x", None), ("1,1", None), ("42", 0)):
        with pytest.raises(UserError):
            parse_seeds(text, n)


def test_two_cv_workers_at_once_run_each_run_once_and_score_as_one(cv_setup):
    """Two workers started together on the same 4-run plan (one per GPU, or two array tasks) claim runs on the
    filesystem: each run is trained once, and the score equals the sequential CV's."""
    tmp, config, sequential, _ = cv_setup
    args = [str(BIN / "smptrain-cv"), "--config", str(config), "--name", "pair", "--folds", "2", "--seeds", "42,21"]
    workers = [subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    started = [line for out, _ in outputs for line in out.splitlines() if line.startswith("cv pair: fold")]
    assert len(started) == 4 and len(set(started)) == 4, started
    again = run(["smptrain-cv", *args[1:]], check=True)  # scores them all and trains nothing
    assert "cv pair: fold" not in again.stdout and "missing" not in again.stdout
    outcome = json.loads((tmp / "artifacts" / "pair" / "cv.json").read_text())
    assert outcome["missing"] == [] and outcome["runs"] == 4
    assert outcome["score"] == json.loads((sequential / "cv.json").read_text())["score"]


def test_a_killed_cv_workers_run_is_resumed_by_the_next_worker(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16}, train={"max_epochs": 3},
                         log={"preview_every_n_val": 0})
    plan = ["--folds", "2", "--seeds", "42"]
    run(["smptrain-cv", "--config", str(config), "--name", "sequential", *plan], check=True)
    worker = subprocess.Popen([str(BIN / "smptrain-cv"), "--config", str(config), "--name", "array", *plan,
                               "--task", "0"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "artifacts" / "array" / "array-f0s42" / "checkpoints" / "last"
    end = time.time() + 300
    while not last.exists() and time.time() < end and worker.poll() is None:
        time.sleep(0.05)
    worker.kill()  # SIGKILL after the first checkpoint: its claim stays behind, its run is half done
    worker.communicate(timeout=60)
    assert last.exists() and (tmp_path / "artifacts" / "array" / "claims" / "array-f0s42").exists()
    scored = run(["smptrain-cv", "--config", str(config), "--name", "array", *plan, "--task", "1"], check=True)
    assert "missing 1 run(s)" in scored.stdout and "array-f0s42" in scored.stdout  # scoring waits for nothing
    rest = run(["smptrain-cv", "--config", str(config), "--name", "array", *plan], check=True)
    assert "cv array: fold 0, seed 42 (resuming)" in rest.stdout and "cv array: fold 1" not in rest.stdout
    outcome = json.loads((tmp_path / "artifacts" / "array" / "cv.json").read_text())
    reference = json.loads((tmp_path / "artifacts" / "sequential" / "cv.json").read_text())
    assert outcome["missing"] == [] and outcome["score"] == reference["score"]


def test_the_cv_table_holds_every_row_on_disk_whoever_tabulates_last(tmp_path):
    """Two workers finish at the same moment: each wrote its run's row, and the one that scores last had seen only
    its own run. The table, cv.json and the score come from the rows on disk, so neither run is lost."""
    import pandas as pd

    from smptrain.search.cv import Plan, record, score_cv

    cv_dir = tmp_path / "cv"
    rows = [{"fold": 0, "seed": seed, "status": "finished", "run_name": f"cv-f0s{seed}", "run_dir": str(cv_dir / f"cv-f0s{seed}"),
             "duration_s": 1.0, "epochs": 1, "steps": 2, "val/JaccardIndex": 0.5 + seed / 1000, "val/Recall": 0.6}
            for seed in (42, 21)]
    record(cv_dir, rows[0])  # worker A's run
    record(cv_dir, rows[1])  # worker B's, a moment later
    result = score_cv(cv_dir, Plan([0], [42, 21]), "finished", {"config": {}, "folds": [0], "seeds": [42, 21]})
    assert result.status == "finished" and not result.missing and len(result.rows) == 2
    assert sorted(pd.read_csv(cv_dir / "runs.csv")["run_name"]) == ["cv-f0s21", "cv-f0s42"]
    assert len(pd.read_parquet(cv_dir / "runs.parquet")) == 2
    assert json.loads((cv_dir / "cv.json").read_text())["runs"] == 2


def test_tune_is_one_python_call_as_the_command_makes_it(demo_dir, tmp_path):
    """`smptrain.search.tune.tune`, the library call smptrain-tune makes: a 2-slot grid, each trial one run, every
    slot run once, the table and best.toml written, and the best row the highest stable score."""
    from smptrain.config import load_config
    from smptrain.search.cv import Plan
    from smptrain.search.tune import tune

    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16}, train={"max_epochs": 1},
                         log={"preview_every_n_val": 0})
    space = tmp_path / "grid.toml"
    space.write_text('[hyperparameters]\nlearning_rate = [1e-3, 3e-3]\n')
    said = []
    result = tune(load_config(config), space, Plan([0], [42]), sampler="grid", single_run=True, say=said.append)
    assert result.status == "finished" and result.study_dir == tmp_path / "artifacts" / "grid"
    assert sorted(row["slot"] for row in result.rows) == [0, 1]
    assert {row["train.lr"] for row in result.rows} == {1e-3, 3e-3}
    assert all(row["state"] == "COMPLETE" for row in result.rows)
    assert result.best["score"] == max(row["score"] for row in result.rows)
    assert (result.study_dir / "best.toml").is_file() and (result.study_dir / "trials.csv").is_file()
    assert any(line.startswith("trial 0 (slot 0)") for line in said)
