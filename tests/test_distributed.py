"""Two real CPU processes through `accelerate launch` (gloo): sync, exact metrics, schedule, files, stopping."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import check_patience_one, launch_two, run, tiny_config

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    # with a moving average of the weights, a frozen first epoch and an encoder rate of its own: what is validated,
    # saved and converted must agree over process counts with these too
    config = tiny_config(tmp, demo_dir, train={"max_epochs": 3, "gamma": 0.5, "ema_decay": 0.8, "freeze_encoder_epochs": 1,
                                               "encoder_lr_scale": 0.5},
                         log={"run_name": "ddp", "wandb_project": "smptrain-tests"})
    result = launch_two(["-m", "smptrain.train", "--config", str(config)])
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "artifacts" / "ddp"


def test_two_processes_are_used_and_stay_identical(ddp_run):
    meta = json.loads((ddp_run / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2
    checksums = meta["parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert meta["weights"] == "ema" and meta["ema_checksums"][0] == meta["ema_checksums"][1]


def test_only_the_main_process_writes(ddp_run):
    artifacts = ddp_run.parent
    assert sorted(p.name for p in artifacts.iterdir()) == ["ddp", "wandb"]
    run_id = json.loads((ddp_run / "run.json").read_text())["run_id"]
    assert len(list((artifacts / "wandb").glob("offline-run-*"))) == 1
    assert len(list((artifacts / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    lines = [json.loads(text) for text in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "train/loss" in r]
    assert len(train_steps) == len(set(train_steps)) > 0


def test_learning_rate_of_epoch_e_is_lr_gamma_e(ddp_run):
    lines = [json.loads(text) for text in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["epoch"]: r["learning_rate"] for r in lines if "learning_rate" in r}
    assert lrs == {0: 1e-3, 1: 5e-4, 2: 2.5e-4}


def test_two_process_validation_equals_one_process_evaluation(ddp_run):
    """The metrics the 2-process run logged equal a 1-process evaluation of the same checkpoint, exactly."""
    from smptrain.core.runtime import make_accelerator
    from smptrain.data.batches import EvalBatches
    from smptrain.data.darts import open_dataset
    from smptrain.data.dataset import PatchDataset
    from smptrain.data.feed import feed
    from smptrain.evaluation.evaluate import evaluate
    from smptrain.model.losses import Loss
    from smptrain.model.network import build_model
    from smptrain.training.loading import load_weights, read_meta

    last = (ddp_run / "checkpoints" / "last").resolve()
    meta = read_meta(last)
    info = open_dataset(meta["config"]["data"]["dir"])
    val_rows = json.loads((ddp_run / "splits.json").read_text())["val"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process ran
    try:
        accelerator = make_accelerator()
        model = build_model("Unet", "resnet18", 7)
        model.load_state_dict(load_weights(last))
        dataset = PatchDataset(info, val_rows, list(range(7)), in_memory=True)
        loader = feed(dataset, EvalBatches(len(dataset), 4), accelerator.device, 0, 0, 0)
        result = evaluate(accelerator.prepare(model), loader, accelerator, len(dataset), Loss("focal"), "val")
    finally:
        torch.set_num_threads(threads)
    assert result.metrics == meta["metrics"]


def test_two_process_test_equals_one_process_test(trained_run, tmp_path):
    """With TTA and a threshold chosen on validation too: every count is reduced exactly, in the same order."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    extra = ["--tta", "flips", "--threshold", "val-best", "--figures", str(tmp_path / "figures")]
    run(["smptrain-test", str(trained_run), "--json", str(one), *extra], check=True, OMP_NUM_THREADS="1")
    result = launch_two(["-m", "smptrain.commands.test", str(trained_run), "--json", str(two), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["test_patches"] == b["test_patches"] and a["metrics"] == b["metrics"]
    assert a["threshold"] == b["threshold"] and a["reliability"] == b["reliability"]
    assert {"test_tta/JaccardIndex", "test_at_threshold/JaccardIndex", "test/ExpectedCalibrationError"} <= set(a["metrics"])


def test_early_stopping_stops_both_ranks_and_the_launcher_sets_precision(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, log={"run_name": "patient"},
                         train={"lr": 1e-12, "max_epochs": 6, "early_stopping_patience": 1, "mixed_precision": "no"})
    result = launch_two(["-m", "smptrain.train", "--config", str(config)], timeout=400, precision="bf16")
    assert result.returncode == 0, result.stderr[-4000:]
    check_patience_one(tmp_path / "artifacts" / "patient", 6, result.stdout + result.stderr)
    meta = json.loads((tmp_path / "artifacts" / "patient" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["mixed_precision"] == "bf16"  # accelerate launch --mixed_precision wins over the config


def test_non_finite_loss_stops_both_ranks_without_hanging(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, log={"run_name": "diverge"}, train={"lr": 1e30, "max_epochs": 3})
    result = launch_two(["-m", "smptrain.train", "--config", str(config)], timeout=400)
    assert result.returncode != 0
    assert "not finite" in result.stderr


def test_two_process_checkpoint_converts_to_the_same_keys(ddp_run, trained_run, tmp_path):
    run(["smptrain-convert", str(ddp_run), "--out-dir", str(tmp_path / "ddp"), "--name", "ddp"], check=True)
    run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path / "one"), "--name", "one"], check=True)
    ddp = torch.load(next((tmp_path / "ddp").glob("*.ckpt")), weights_only=True)["statedict"]
    one = torch.load(next((tmp_path / "one").glob("*.ckpt")), weights_only=True)["statedict"]
    assert ddp.keys() == one.keys()


def launched(config, name: str, processes: int):
    """`smptrain-launch` in a process group of its own, as a shell runs a foreground job."""
    import subprocess

    from helpers import BIN, cli_env

    multi = ["--multi_gpu"] if processes > 1 else []
    return subprocess.Popen([str(BIN / "smptrain-launch"), *multi, "--num_processes", str(processes), "--num_machines",
                             "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process",
                             "1", "-m", "smptrain.train", "--config", str(config), "--set", f"log.run_name={name}"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("processes, target", [(1, "launcher")])  # the whole group: tests/test_stops.py
def test_ctrl_c_under_the_launcher_stops_in_order_and_returns_after_the_training(demo_dir, tmp_path, processes, target):
    """Ctrl-C in a terminal signals the whole process group; a scheduler may signal only the launcher. Either way the
    training processes stop as they do alone (one message, checkpoints/last, exit 130) and the launcher returns only
    after them, without a traceback."""
    import signal

    from test_train import logged_steps, wait_for

    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 50}, log={"log_every_n_steps": 1})
    run_dir = tmp_path / "artifacts" / "stopped"
    process = launched(config, "stopped", processes)
    wait_for(lambda: logged_steps(run_dir) >= 2, what="step 2")
    if target == "group":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    name = "SIGINT" if target == "group" else "SIGTERM"
    assert process.returncode == 130, err[-3000:]
    assert group_is_gone(process.pid)  # nothing of the job is left running when the prompt returns
    assert "Traceback" not in err and "exitcode" not in err, err[-3000:]
    assert err.count(f"{name}: stopping after this step") == 1 and err.count("continue with:") == 1
    assert json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["step"] >= 2


def test_a_cv_table_the_main_process_cannot_write_stops_both_ranks_in_one_sentence(demo_dir, tmp_path):
    """Only the main process writes a CV's rows and table; when the filesystem refuses, the other rank must stop
    with it instead of waiting in the next run's first collective for ever."""
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 1}, log={"preview_every_n_val": 0})
    row = tmp_path / "artifacts" / "stuck" / "rows" / "stuck-f0s42.json"
    (row / "in-the-way").mkdir(parents=True)  # a directory where the finished run's row is to be renamed
    result = run(["smptrain-launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                  "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m", "smptrain.commands.cv",
                  "--config", str(config), "--name", "stuck", "--folds", "2", "--seeds", "42"], timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cannot write {row}" in result.stderr
    assert (tmp_path / "artifacts" / "stuck" / "stuck-f0s42" / "checkpoints" / "last").exists()  # the run is kept
    assert not (tmp_path / "artifacts" / "stuck" / "stuck-f1s42").exists()  # and no rank went on to the next one
