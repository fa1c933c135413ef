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


# --- after kills: every tracker read back with its own reader against metrics.jsonl ---------------------------------


def wandb_directories(run_dir: Path) -> list[Path]:
    """The offline directories of the run's wandb id, oldest first (one per session: started, resumed, tested)."""
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    return sorted((run_dir.parent / "wandb").glob(f"offline-run-*-{run_id}"), key=lambda d: (d.name, d.stat().st_mtime))


def wandb_points(directory: Path) -> dict:
    """{(key, step): value} of the history a wandb offline directory holds, read from its `.wandb` file: LevelDB's log
    format (wandb's transaction log) of records decoded with wandb's own protobuf schema. wandb 0.31 has no Python
    reader of its own any more (its Go core reads the file); wandb's internal keys (_step, _runtime, _timestamp)
    aside. Steps must rise from row to row, as wandb requires."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(directory.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, position, chunks, partial = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's trailer
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        else:
            chunks.append(partial + chunk)
    points, last = {}, -1
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        assert record.history.step.num > last, "wandb history rows out of step order"
        last = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                points[key, record.history.step.num] = json.loads(item.value_json)
    return points


def jsonl_points(run_dir: Path) -> dict:
    points = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and value is not None:
                assert points.setdefault((key, record["step"]), value) == value  # a key logged twice at one step
    return points


KILLS = [  # each a sequence of runs of the same --resume auto command, killed (or stopped) at these points in turn
    ("metrics.after_append#3", "epoch.before_validation:term", "checkpoint.after_link#1"),
    ("epoch.before_validation:term", "checkpoint.after_link#2"),  # killed after the last checkpoint: a finished run
]


@pytest.mark.parametrize("kills", KILLS, ids=[" then ".join(k) for k in KILLS])
def test_after_kills_and_resumes_every_tracker_holds_what_metrics_jsonl_holds(demo_dir, tmp_path, kills):
    """wandb (offline), TensorBoard and MLflow's SQLite store after a sequence of SIGKILLs and stops, each read with
    its own reader: TensorBoard holds exactly metrics.jsonl; the newest wandb directory holds every point of it (the
    resumed session replays what the earlier ones had not saved: wandb cannot merge offline directories), and the
    older directories nothing else; MLflow holds every point, redone steps twice with equal values (it cannot drop
    one), timings aside."""
    from helpers import run, tiny_config

    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16}, train={"max_epochs": 2},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2, "run_name": "killed",
                              "wandb_project": "kills", "trackers": ["wandb", "tensorboard", "mlflow"]})
    command = ["python", "-m", "smptrain.train", "--config", str(config), "--resume", "auto"]
    for point in kills:
        stopped = run(command, SMPTRAIN_FAILPOINT=point)
        assert stopped.returncode in (-9, 130), stopped.stderr[-3000:]
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("already finished" in done.stdout) == (kills[-1] == "checkpoint.after_link#2")
    run_dir = tmp_path / "artifacts" / "killed"
    expected = jsonl_points(run_dir)
    board = tensorboard_series(run_dir)
    assert board == {key: [(step, float(np.float32(v))) for step, v in values]
                     for key, values in jsonl_series(run_dir).items()}
    directories = wandb_directories(run_dir)
    assert len(directories) >= 2 and not (run_dir / ".trackers-open").exists()  # every session's trackers closed
    assert wandb_points(directories[-1]) == expected
    for older in directories[:-1]:
        held = {k: v for k, v in wandb_points(older).items() if not k[0].startswith("perf/")}
        assert held.items() <= expected.items()
    client, mlflow = mlflow_run(run_dir)
    renamed = {key: values for key, values in jsonl_series(run_dir, mlflow_key).items() if not key.startswith("perf/")}
    logged = mlflow_series(client, mlflow, renamed)
    assert {key: set(values) for key, values in logged.items()} == {key: set(v) for key, v in renamed.items()}
    assert all(len({v for s, v in values if s == step}) == 1 for values in logged.values() for step, _ in values)
