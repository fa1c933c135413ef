"""A kill at any moment: the real training command is killed at each named failpoint (`smptrain.core.failpoints`), the
same `--resume auto` command is run again, and what it leaves is compared with an uninterrupted run's: every weight
file bitwise, `last` and `best`, metrics.jsonl record by record (timings aside), the run directory's files, and no
temporaries left anywhere. And a requeue of a finished run changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import run, tiny_config
from safetensors.torch import load_file

from smptrain.core.failpoints import POINTS

pytestmark = pytest.mark.slow  # end to end: real processes killed and run again


def command(config: Path, name: str) -> list[str]:
    return ["python", "-m", "smptrain.train", "--config", str(config), "--set", f"log.run_name='{name}'",
            "--resume", "auto"]


def uninterrupted(tmp: Path, demo_dir: Path, previews: int) -> tuple[Path, Path]:
    """The run every killed one is compared with: 2 epochs of 4 steps, a validation after each (and previews with
    `previews`), the top 1 kept (so checkpoints are pruned), a record every 2 steps."""
    config = tiny_config(tmp, demo_dir, data={"subsample": 16}, train={"max_epochs": 2, "save_top_k": 1},
                         log={"preview_every_n_val": previews, "log_every_n_steps": 2})
    run(command(config, "reference"), check=True)
    return config, tmp / "artifacts" / "reference"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    return uninterrupted(tmp_path_factory.mktemp("failpoints"), demo_dir, previews=0)


@pytest.fixture(scope="module")
def reference_with_previews(tmp_path_factory, demo_dir):
    """For the points met while drawing a preview (drawing costs more than the training itself here)."""
    return uninterrupted(tmp_path_factory.mktemp("previews"), demo_dir, previews=1)


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() or p.is_symlink())


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines]


def assert_same_run(reference: Path, other: Path) -> None:
    assert files(other) == files(reference)
    for link in ("last", "best"):
        assert os.readlink(other / "checkpoints" / link) == os.readlink(reference / "checkpoints" / link)
    weights = [p.relative_to(reference) for p in (reference / "checkpoints").rglob("*.safetensors")
               if not p.parent.is_symlink()]
    assert weights
    for relative in weights:
        a, b = load_file(str(reference / relative)), load_file(str(other / relative))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), relative
    assert records(other) == records(reference)


def assert_no_leftovers(artifacts: Path) -> None:
    hidden = [str(p) for p in artifacts.rglob(".*") if p.name != ".table.lock"]
    assert not hidden, hidden


def finishes_as_the_uninterrupted_run(config: Path, straight: Path, name: str) -> None:
    """The same command once more, to the end: the run equals the uninterrupted one, and nothing is left over. The
    run is then removed, so the next case starts from nothing."""
    import shutil

    again = run(command(config, name))
    assert again.returncode == 0, f"{again.stdout[-2000:]}\n{again.stderr[-3000:]}"
    assert_same_run(straight, straight.parent / name)
    assert_no_leftovers(straight.parent)
    shutil.rmtree(straight.parent / name)


def preview(reference: Path) -> str:
    return sorted(p.name for p in (reference / "previews").glob("val_step*.png"))[-1]


# (failpoint, its signal): a SIGKILL at each point, and the SIGTERMs that scheduler and Ctrl-C send.
CASES = [
    ("startup:term", 130),
    ("step.done#3:term", 130),  # a stop between logging steps: the window so far travels in the checkpoint
    ("step.done#3", -9),
    ("run_dir.created", -9),
    ("epoch.before_validation:term", 130),
    ("epoch.before_validation#2", -9),
    ("checkpoint.before_rename#2", -9),
    ("checkpoint.after_rename#2", -9),
    ("checkpoint.after_link#2", -9),
    ("write.before_rename@last#2", -9),
    ("write.after_rename@last#2", -9),
    ("write.before_rename@PREVIEW", -9),
    ("write.after_rename@PREVIEW", -9),
    ("metrics.before_append#5", -9),
    ("metrics.after_append#5", -9),
    ("metrics.after_append#3:term", 130),
]


def test_every_failpoint_has_a_case():
    named = {case.split(":")[0].split("#")[0].split("@")[0] for case, _ in CASES}
    assert named == set(POINTS)


@pytest.mark.parametrize("armed, status", CASES, ids=[case for case, _ in CASES])
def test_a_kill_at_a_failpoint_then_the_same_command_gives_the_uninterrupted_run(request, armed, status):
    config, straight = request.getfixturevalue("reference_with_previews" if "PREVIEW" in armed else "reference")
    if "PREVIEW" in armed:
        armed = armed.replace("PREVIEW", preview(straight))
    name = "killed"
    first = run(command(config, name), SMPTRAIN_FAILPOINT=armed)
    assert first.returncode == status, f"{first.stdout[-2000:]}\n{first.stderr[-3000:]}"
    finishes_as_the_uninterrupted_run(config, straight, name)


def test_a_stop_between_the_last_step_and_its_validation_leaves_the_validation_owed(reference):
    config, straight = reference
    stopped = run(command(config, "owed"), SMPTRAIN_FAILPOINT="epoch.before_validation:term")
    assert stopped.returncode == 130
    run_dir = straight.parent / "owed"
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["train_state"]["validation_owed"] and meta["train_state"]["validations"] == 0
    assert not any("val/JaccardIndex" in r for r in records(run_dir))
    resumed = run(command(config, "owed"), check=True)
    assert "resuming owed at step 4, the validation of epoch 1/2 first" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in records(run_dir) if "val/JaccardIndex" in r] == \
        [r["step"] for r in records(straight) if "val/JaccardIndex" in r]


# Kills one after another, each rerun killed again, the last run left to finish. Found by a random kill campaign:
# a stop saved `last` at the step of an owed validation, the run resumed from it was killed after appending that
# validation's record and before its checkpoint, and the next resume kept the record (it was of `last`'s own step)
# and wrote it again.
SEQUENCES = [
    [("metrics.after_append#2:term", 130), ("metrics.after_append#1", -9)],
    [("epoch.before_validation:term", 130), ("write.after_rename@metrics.jsonl", -9), ("checkpoint.before_rename", -9)],
]


@pytest.mark.parametrize("kills", SEQUENCES, ids=[" then ".join(k for k, _ in kills) for kills in SEQUENCES])
def test_kills_one_after_another_then_the_same_command_gives_the_uninterrupted_run(reference, kills):
    config, straight = reference
    name = "killed-again"
    for armed, status in kills:
        killed = run(command(config, name), SMPTRAIN_FAILPOINT=armed)
        assert killed.returncode == status, f"{armed}: {killed.stdout[-2000:]}\n{killed.stderr[-3000:]}"
    finishes_as_the_uninterrupted_run(config, straight, name)


@pytest.mark.parametrize("before", [None, "epoch.before_validation:term"], ids=["validating", "owed"])
def test_a_signal_during_a_validation_stops_right_after_its_checkpoint(reference, before):
    """SIGTERM while validating (the 4th record of a run is its first validation's; a resumed run that owes one
    appends it first): the validation is finished and saved, and the run stops there instead of training on to the
    next logging step, or, for the owed one, instead of ending at once and losing it."""
    config, straight = reference
    name = f"during-{before is not None}"
    if before is not None:
        assert run(command(config, name), SMPTRAIN_FAILPOINT=before).returncode == 130
    stopped = run(command(config, name), SMPTRAIN_FAILPOINT=f"metrics.after_append#{1 if before else 4}:term")
    assert stopped.returncode == 130, f"{stopped.stdout[-2000:]}\n{stopped.stderr[-3000:]}"
    run_dir = straight.parent / name
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["train_state"]["validations"] == 1 and not meta["train_state"]["validation_owed"]
    assert "val_JaccardIndex" in os.readlink(run_dir / "checkpoints" / "last")
    finishes_as_the_uninterrupted_run(config, straight, name)


def test_a_requeued_finished_run_changes_nothing_and_says_so(reference):
    config, straight = reference
    before = {path: ((straight / path).read_bytes() if not (straight / path).is_symlink()
                     else os.readlink(straight / path), (straight / path).lstat().st_mtime_ns)
              for path in files(straight)}
    again = run(command(config, "reference"), check=True)
    assert "already finished" in again.stdout and "nothing to do" in again.stdout
    after = {path: ((straight / path).read_bytes() if not (straight / path).is_symlink()
                    else os.readlink(straight / path), (straight / path).lstat().st_mtime_ns)
             for path in files(straight)}
    assert after == before


def test_a_signal_at_any_moment_of_start_up_ends_with_130_and_leaves_nothing(demo_dir, tmp_path):
    """Fresh interpreters (not the zygote: their imports are part of start-up), each sent SIGTERM at another moment
    of its first seconds: while Python loads torch and the rest, while tensorstore is imported (an exception
    raised there used to become an ImportError, and the next import of it aborted the process: SIGABRT), while the
    model is built. Every one ends with 130, and none leaves a run directory."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT, cli_env

    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16, "in_memory": False}, train={"max_epochs": 1})
    for delay in (0.3, 1.2, 2.5, 3.5, 4.5):
        process = subprocess.Popen([sys.executable, "-m", "smptrain.train", "--config", str(config), "--set",
                                    f"log.run_name='at{delay}'"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 130, f"SIGTERM after {delay} s: exit {process.returncode}\n{output[-2000:]}"
        if "stopping after this step" not in output:  # still starting (a fast machine may be training)
            assert not (tmp_path / "artifacts" / f"at{delay}").exists()
    if (tmp_path / "artifacts").exists():
        assert_no_leftovers(tmp_path / "artifacts")
