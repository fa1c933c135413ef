"""The trackers read back from what they wrote: TensorBoard event files and the MLflow file store hold exactly the
records of metrics.jsonl (the shared run logs to wandb, TensorBoard and MLflow at once)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from smptrain.training.tracking import MLFLOW_STORE, RUN_TAG, TENSORBOARD_DIR, mlflow_key

pytestmark = pytest.mark.slow


def jsonl_series(run_dir: Path, rename=lambda key: key) -> dict:
    """{key: [(step, value), ...]} in the order metrics.jsonl has them."""
    series = defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and value is not None:
                series[rename(key)].append((record["step"], value))
    return dict(series)


def tensorboard_series(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard reads the run's event files (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(run_dir: Path):
    """(client, run) of the run's id in the default store next to the run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / MLFLOW_STORE}")
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    experiment = client.get_experiment_by_name("smptrain")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'")
    assert len(found) == 1, found
    return client, found[0]


def mlflow_series(client, run, keys) -> dict:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in keys}


def test_tensorboard_and_mlflow_hold_exactly_the_metrics_of_the_run(trained_run):
    expected = jsonl_series(trained_run)
    assert any("/region/" in key for key in expected)  # region names have spaces: MLflow keeps them
    board = tensorboard_series(trained_run)
    training_tags = {tag for tag in board if not tag.startswith("test")}  # smptrain-test may have appended
    assert training_tags == set(expected)
    for key, values in expected.items():  # TensorBoard stores float32
        assert board[key] == [(step, float(np.float32(value))) for step, value in values], key
    client, run = mlflow_run(trained_run)
    renamed = jsonl_series(trained_run, mlflow_key)
    assert mlflow_series(client, run, renamed) == renamed
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.encoder"] == "resnet18"
    assert run.data.tags["mlflow.runName"] == "shared"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "val")}
    assert any(path.startswith("val/val_step") for path in artifacts), artifacts


def test_a_tracker_that_cannot_start_is_one_sentence_and_leaves_no_run(demo_dir, tmp_path):
    from helpers import run, tiny_config
    from test_errors import assert_clear_error

    config = tiny_config(tmp_path, demo_dir, log={"trackers": ["tensorboard", "mlflow"], "run_name": "nowhere"})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)], MLFLOW_TRACKING_URI="nosuchscheme://x")
    assert_clear_error(result, "mlflow could not start", "nosuchscheme://x")
    assert not (tmp_path / "artifacts" / "nowhere").exists()
    wrong = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", 'log.trackers=["wandb"]'])
    assert_clear_error(wrong, "log.trackers", "log.wandb_project is empty")
