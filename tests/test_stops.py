"""One Ctrl-C under each launcher a user types, as a terminal sends it: SIGINT to the whole foreground process group.

Each command is started in a process group of its own with SIGINT at its default disposition (a non-interactive
shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: a test
started that way would test something no user does). One SIGINT goes to the group at a known step; the run must
write `checkpoints/last` at that step or a later one, inside the launcher's grace period (Accelerate's one-process
launcher sends SIGTERM at once and SIGKILL 5 s later; torch elastic's agent waits 30 s), exit 130 with one message,
and the same command with `--resume auto` must end bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, cli_env, run, tiny_config
from test_train import assert_same_weights, logged_steps, val_records, wait_for

pytestmark = pytest.mark.slow  # real launchers, real process groups

FLAGS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--num_cpu_threads_per_process", "1"]
LAUNCHERS = {  # how a user types it, for one process and for two (gloo on the CPU)
    "accelerate launch": lambda n: [str(BIN / "accelerate"), "launch", *(["--multi_gpu"] if n > 1 else []),
                                    "--num_processes", str(n), *FLAGS],
    "smptrain-launch": lambda n: [str(BIN / "smptrain-launch"), *(["--multi_gpu"] if n > 1 else []),
                                  "--num_processes", str(n), *FLAGS],
}


def foreground(args: list[str]) -> subprocess.Popen:
    """A command as a shell runs a foreground job: its own process group, SIGINT at its default."""
    return subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def training(launcher: str, processes: int, config: Path, name: str) -> list[str]:
    return [*LAUNCHERS[launcher](processes), "-m", "smptrain.train", "--config", str(config), "--set",
            f"log.run_name={name}", "--resume", "auto"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, demo_dir):
    """Uninterrupted runs with one process and with two (their data orders differ), one CPU thread each (as the
    launchers below give every process), a record every 3 steps so that a stop falls between records."""
    tmp = tmp_path_factory.mktemp("stops")
    config = tiny_config(tmp, demo_dir, train={"max_epochs": 2, "threads": 1},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 3})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight1"], check=True)
    done = subprocess.run(training("accelerate launch", 2, config, "straight2"), env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, config


@pytest.mark.parametrize("launcher, processes", [("accelerate launch", 1), ("accelerate launch", 2),
                                                 ("smptrain-launch", 1)])
def test_one_ctrl_c_saves_at_that_step_and_the_run_resumes_exactly(references, launcher, processes):
    tmp, config = references
    name = f"{launcher.split()[0]}{processes}"
    run_dir = tmp / "artifacts" / name
    process = foreground(training(launcher, processes, config, name))
    wait_for(lambda: logged_steps(run_dir) >= 3, what="the first record")  # written at step 3, read soon after
    pressed = logged_steps(run_dir)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "exitcode" not in err, err[-3000:]
    # Accelerate's one-process launcher copies the process's stderr and stops copying for a moment when its own
    # KeyboardInterrupt arrives: the line said at the signal itself can be lost there (its SIGTERM may also come first)
    said = re.findall(r"SIG(?:INT|TERM): stopping after this step", err)
    assert len(said) == 1 or (launcher == "accelerate launch" and processes == 1 and not said), err[-3000:]
    assert err.count("continue with:") == 1 and err.count("stopped at step") == 1, err[-3000:]
    assert "aborted" not in err
    saved = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert saved["step"] >= pressed and saved["train_state"]["micro_step"] > 0  # at a step, mid-epoch
    if processes == 1:  # the same process count and threads: how it is launched does not change a number
        again = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", f"log.run_name={name}",
                     "--resume", "auto"])
    else:
        again = subprocess.run(training(launcher, processes, config, name), env=cli_env(), capture_output=True,
                               text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    straight = tmp / "artifacts" / f"straight{processes}"
    assert_same_weights(straight, run_dir)
    assert val_records(straight) == val_records(run_dir)
    assert [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r] \
        and train_losses(run_dir) == train_losses(straight)  # the window cut by the stop is logged as it would be


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def test_a_launchers_sigterm_after_the_ctrl_c_is_the_same_request_and_a_later_press_aborts():
    """Accelerate's one-process launcher answers the terminal's SIGINT with a SIGTERM of its own a moment later: that
    is the request already taken, not the second one that aborts. A press later than SAME_REQUEST_S aborts."""
    script = (
        "import os, signal, time\n"
        "from smptrain.training.signals import Interrupted, StopSignal\n"
        "stop = StopSignal(); stop.armed = True\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"  # the launcher's copy
        "assert stop.raised\n"
        "print('one request', flush=True)\n"
        "time.sleep(StopSignal.SAME_REQUEST_S)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
        "except Interrupted as error:\n"
        "    print(error, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=cli_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["one request", "SIGINT again: aborted without saving; checkpoints/last is the "
                                                       "one written before"]
    assert done.stderr.count("SIGINT: stopping after this step") == 1
