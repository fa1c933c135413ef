"""A newcomer's first hour through the real commands: the slips people make get one sentence with what was meant,
a run can be continued with the command that started it, and what a run did is in one file (summary.json)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import run, tiny_config
from test_errors import assert_clear_error

pytestmark = pytest.mark.slow  # real subprocesses and a training


def train(*args, **env):
    return run(["python", "-m", "smptrain.train", *map(str, args)], **env)


def test_the_usual_slips_are_one_sentence_with_what_was_meant(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, log={"run_name": "first"})
    assert_clear_error(train("--config", config, "--set", "train.lr", "1e-3"), "write --set train.lr=1e-3")
    assert_clear_error(train("--config", config, "--set", "model.encoder=resnet81"),
                       "model.encoder = 'resnet81' is not an encoder", "did you mean", "resnet18")
    (tmp_path / "artifacts" / "first-try" / "checkpoints").mkdir(parents=True)
    (tmp_path / "artifacts" / "first-try" / "config.toml").write_text("")
    assert_clear_error(run(["smptrain-test", str(tmp_path / "artifacts" / "first-tyr")]),
                       "does not exist", f"did you mean {tmp_path / 'artifacts' / 'first-try'}")
    assert_clear_error(train("--resume", tmp_path / "artifacts" / "frist-try"), "no such run directory",
                       "did you mean")
    assert not (tmp_path / "artifacts" / "first").exists()


def test_resume_with_the_starting_command_a_changed_schedule_said_and_the_summary(demo_dir, tmp_path):
    """`--resume RUN` added to the command that started the run continues it (a raised max_epochs is one of the
    keys that may change, and under a cosine schedule that moves the rate: said once); another setting is refused
    naming it; summary.json says how the run stands, and smptrain-test keeps an earlier result, never overwrites it."""
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 1, "schedule": "cosine"},
                         log={"run_name": "grow", "preview_every_n_val": 0})
    first = train("--config", config, check=True)
    assert "epoch 1/1" in first.stdout, first.stdout[-2000:]
    run_dir = tmp_path / "artifacts" / "grow"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"], summary["max_epochs"]) == ("finished", 1, 1)
    assert (run_dir / "checkpoints" / summary["best"]["checkpoint"]).is_dir() and summary["best"]["value"] is not None

    assert_clear_error(train("--config", config, "--resume", run_dir, "--set", "train.batch_size=8"),
                       "train.batch_size = 4", f"--resume {run_dir} continues only the same run")
    more = train("--config", config, "--resume", run_dir, "--set", "train.max_epochs=2", check=True)
    notes = [line for line in more.stdout.splitlines() if line.startswith("note: resumed with")]
    assert len(notes) == 1 and "train.max_epochs 1 -> 2" in notes[0] and "train.cosine_epochs = 1" in notes[0], \
        more.stdout[-3000:]
    assert "epoch 2/2" in more.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"], summary["max_epochs"]) == ("finished", 2, 2)
    assert summary["wall_time_s"] > 0 and summary["steps"] > 0

    run(["smptrain-test", str(run_dir)], check=True)
    first_test = json.loads((run_dir / "test" / "metrics.json").read_text())
    again = run(["smptrain-test", str(run_dir), "--checkpoint", "last"], check=True)
    earlier = list((run_dir / "test" / "earlier").iterdir())
    assert len(earlier) == 1 and json.loads(earlier[0].read_text()) == first_test and str(earlier[0]) in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["checkpoint"] == json.loads((run_dir / "test" / "metrics.json").read_text())["checkpoint"]
    assert "test/JaccardIndex" in summary["test"]["metrics"] and summary["status"] == "finished"
    shutil.rmtree(run_dir / "test")
