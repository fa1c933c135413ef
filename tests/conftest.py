"""Shared fixtures: real zarr/parquet datasets on disk and one trained run, and the order the test files are handed to
the pytest workers. The helpers the tests import live in `helpers.py`, the zygote in `zygote.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import THREADS, run, tiny_config, write_foreign_dataset


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from smptrain.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", patches=64, patch_size=64, seed=3)


@pytest.fixture(scope="session")
def foreign_dir(tmp_path_factory) -> Path:
    return write_foreign_dataset(tmp_path_factory.mktemp("foreign") / "dataset")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_dir) -> Path:
    """One finished 2-epoch run on the demo data, logged to wandb (offline), TensorBoard and MLflow (a file store);
    shared by test/convert tests."""
    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp, demo_dir, log={"run_name": "shared", "wandb_project": "smptrain-tests",
                                             "artifact_dir": str(tmp / "artifacts"),
                                             "trackers": ["wandb", "tensorboard", "mlflow"]})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    return tmp / "artifacts" / "shared"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # in-process torch work of each worker: one thread too
        import torch

        torch.set_num_threads(int(THREADS))


LONGEST_FIRST = ("test_cluster.py", "test_train.py", "test_distributed.py", "test_cv_tune.py", "test_failpoints.py", "test_commands.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
