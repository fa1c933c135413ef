"""Training end to end, through the real CLI in subprocesses: run layout, exact resume, signals, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import check_patience_one, cli_env, run, tiny_config
from safetensors.torch import load_file

from smptrain.data.darts import open_dataset

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out

PIXEL_KEYS = ["Accuracy", "Precision", "Specificity", "Recall", "F1Score", "JaccardIndex", "CohenKappa",
              "HammingDistance", "AUROC", "AveragePrecision", "loss"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, link: str = "last") -> dict:
    return load_file(str(run_dir / "checkpoints" / link / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= 1e-6, f"weights differ by {worst}"


def assert_identical_weights(a: Path, b: Path, file: str = "model.safetensors"):
    """Bitwise: every tensor of `last`'s `file` (or e.g. state/model.safetensors) equal."""
    wa, wb = (load_file(str(run_dir / "checkpoints" / "last" / file)) for run_dir in (a, b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def val_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "val/JaccardIndex" in r]


def test_run_directory_holds_everything(trained_run):
    for name in ("config.toml", "splits.json", "run.json", "metrics.jsonl"):
        assert (trained_run / name).is_file(), name
    splits = json.loads((trained_run / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"} and all(splits.values())
    lines = records(trained_run)
    train_lines = [r for r in lines if "train/loss" in r]
    assert train_lines and all({"step", "epoch", "learning_rate"} <= set(r) for r in train_lines)
    val = val_records(trained_run)
    assert len(val) == 2 and all(f"val/{k}" in val[0] for k in PIXEL_KEYS)
    last = (trained_run / "checkpoints" / "last").resolve()
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == val[-1]["step"] and meta["metrics"]["val/JaccardIndex"] == val[-1]["val/JaccardIndex"]
    assert meta["model"] == {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 7, "classes": 1}
    assert meta["bands"]["bands"][0] == "blue" and len(meta["bands"]["band_factors"]) == 7
    assert meta["world_size"] == 1 and meta["config"]["model"]["encoder"] == "resnet18" and meta["versions"]["torch"]
    assert not any(k.startswith(("module.", "_orig_mod.", "model.")) for k in weights(trained_run))
    assert (trained_run / "checkpoints" / "best" / "meta.json").is_file()
    assert list((trained_run / "previews").glob("val_step*.png")) and list((trained_run / "previews").glob("roc_*.png"))
    # wandb ran offline with the run's id (smptrain-test tests may have appended more runs with the same id)
    offline = list((trained_run.parent / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(meta["run_id"]) for p in offline)


def test_demo_config_learns(tmp_path):
    """configs/demo.toml on the demo data beats the all-background baseline (IoU 0) by far, in half its epochs."""
    from smptrain.data.demo import make_demo

    data = make_demo(tmp_path / "data")
    run(["python", "-m", "smptrain.train", "--config", "configs/demo.toml", "--set", f"data.dir='{data}'",
         "--set", f"log.artifact_dir='{tmp_path / 'artifacts'}'", "--set", "log.run_name=learns",
         "--set", "train.max_epochs=6", "--set", "train.val_every_n_epochs=3", "--set", "log.preview_every_n_val=0"],
        check=True)
    assert val_records(tmp_path / "artifacts" / "learns")[-1]["val/JaccardIndex"] > 0.5


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, demo_dir):
    """An uninterrupted 4-epoch run with augmentations (the reference for every resume test)."""
    tmp = tmp_path_factory.mktemp("resume")
    config = tiny_config(tmp, demo_dir, train={"max_epochs": 4, "augment": ["D4", "Blur", "MultiplicativeNoise"],
                                               "gamma": 0.7},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"], check=True)
    return tmp, config, tmp / "artifacts" / "straight"


def test_resume_is_exact(resume_setup):
    tmp, config, straight = resume_setup
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    split = tmp / "artifacts" / "split"
    result = run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    assert "resuming split at step 16, in epoch 3/4" in result.stdout + result.stderr
    assert_same_weights(straight, split)
    assert val_records(straight) == val_records(split)  # same metrics, same steps, metrics.jsonl appended
    assert json.loads((split / "checkpoints/last/meta.json").read_text())["run_id"] == \
        json.loads((split / "run.json").read_text())["run_id"]


def wait_for(predicate, timeout: float = 300, what: str = ""):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(config: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smptrain.train", "--config", str(config), "--set",
                             f"log.run_name={name}"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max([json.loads(text)["step"] for text in path.read_text().splitlines() if text.strip()] or [0]) if path.exists() else 0


def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(resume_setup):
    tmp, config, straight = resume_setup
    run_dir = tmp / "artifacts" / "interrupted"
    process = start(config, "interrupted")
    wait_for(lambda: logged_steps(run_dir) >= 11, what="step 11")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "continue with: python -m smptrain.train --resume" in out + err and "Traceback" not in err
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["train_state"]["micro_step"] > 0, "expected a mid-epoch checkpoint"
    run(["python", "-m", "smptrain.train", "--resume", str(run_dir)], check=True)
    assert_same_weights(straight, run_dir)
    assert val_records(straight) == val_records(run_dir)


def test_a_requeued_command_continues_its_run_exactly(resume_setup):
    """SLURM's --requeue re-runs the same command: with --resume auto it starts the run the first time and continues
    it after SIGTERM, exactly; a changed configuration is refused naming the key. (Under a real SLURM:
    tests/test_cluster.py; the trackers after kills and resumes: tests/test_trackers.py.)"""
    tmp, config, straight = resume_setup
    command = [sys.executable, "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=requeued",
               "--resume", "auto"]
    run_dir = tmp / "artifacts" / "requeued"
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(run_dir) >= 11, what="step 11")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    changed = run(["python", *command[1:], "--set", "train.lr=0.5"])
    assert changed.returncode == 2 and "train.lr = 0.001" in changed.stderr and "0.5" in changed.stderr
    again = run(["python", *command[1:]], check=True)
    assert "resuming requeued at step" in again.stdout + again.stderr
    assert_same_weights(straight, run_dir)
    assert val_records(straight) == val_records(run_dir)


def test_sigkill_during_checkpoint_write_loses_nothing(resume_setup):
    tmp, config, straight = resume_setup
    run_dir = tmp / "artifacts" / "killed"
    process = start(config, "killed")
    checkpoints = run_dir / "checkpoints"
    # kill while the second checkpoint is being assembled (a .tmp- directory exists), or as close to it as we see
    wait_for(lambda: (checkpoints / "last").is_symlink(), what="the first checkpoint")
    first = os.readlink(checkpoints / "last")
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
             or os.readlink(checkpoints / "last") != first, what="the second checkpoint write")
    process.kill()
    process.communicate()
    assert (checkpoints / "last" / "meta.json").is_file()  # last still points to a complete checkpoint
    run(["python", "-m", "smptrain.train", "--resume", str(run_dir)], check=True)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    assert_same_weights(straight, run_dir)


def test_diverging_loss_stops_with_a_clear_message(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, log={"run_name": "diverge"}, train={"lr": 1e30, "max_epochs": 3})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "not finite" in message and "training stopped at step" in message
    # it diverged before the first checkpoint: nothing to resume, so the directory is gone and the same command runs
    assert "run the same command again" in message and not (tmp_path / "artifacts" / "diverge").exists()


def test_early_stopping_counts_validations(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, log={"run_name": "patience"},
                         train={"lr": 1e-12, "max_epochs": 5, "early_stopping_patience": 1})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    check_patience_one(tmp_path / "artifacts" / "patience", 5, result.stdout + result.stderr)


def test_learning_rate_follows_gamma_per_epoch(trained_run):
    lrs = {r["epoch"]: r["learning_rate"] for r in records(trained_run) if "learning_rate" in r}
    assert lrs == {0: 1e-3, 1: 1e-3 * 0.9}


def test_torch_compile_wrapper_keys_are_cleaned():
    from smptrain.model.network import build_model
    from smptrain.training.checkpoint import clean_state_dict

    model = build_model("Unet", "resnet18", 3)
    compiled = torch.compile(model)  # lazy: nothing is compiled until a forward pass
    prefixed = {f"module.{k}": v for k, v in compiled.state_dict().items()}
    assert any(k.startswith("module._orig_mod.") for k in prefixed)
    assert clean_state_dict(prefixed).keys() == model.state_dict().keys()


def test_dataset_reader_sees_the_demo_layout(demo_dir):
    info = open_dataset(demo_dir)
    assert info.patch_size == 64 and len(info.bands) == 7 and info.num_rows == 64


def test_sigterm_during_a_cold_compile_ends_at_once_and_leaves_nothing(demo_dir, tmp_path):
    """Before the first step there is nothing to save: SIGTERM (SLURM's warning) must not wait for the compile."""
    config = tiny_config(tmp_path, demo_dir, train={"compile": True})
    process = start(config, "compiling")
    run_dir = tmp_path / "artifacts" / "compiling"
    wait_for(lambda: (run_dir / "splits.json").is_file(), what="the run directory")
    time.sleep(2)  # into the first forward pass, where torch.compile works for a minute or more on a CPU
    began = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and time.time() - began < 30, err[-2000:]
    assert "SIGTERM before the first training step finished" in err and "Traceback" not in err
    assert not run_dir.exists()  # a new run that never stepped leaves no directory to block the re-run


def test_a_late_signal_while_leaving_exits_130_not_killed():
    """After a stopped run has saved, the command only leaves; a signal arriving then (a launcher passing on the one
    the process already had) must end it with 130, not kill it with SIGTERM's default (143 to a shell), and a copy
    of the stop request within a moment is still that request."""
    script = (
        "import os, signal, sys, time\n"
        "from smptrain.training.signals import StopSignal, exit_on_further_signals\n"
        "exit_on_further_signals()\n"
        "stop = StopSignal(); stop.armed = True\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
        "assert stop.raised\n"
        "stop.restore()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"  # the same request again, at once: ignored
        "print('still here', flush=True)\n"
        "time.sleep(StopSignal.SAME_REQUEST_S)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"  # a later one: leave now, with 130
        "print('not reached', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=cli_env())
    assert done.returncode == 130, done.stderr[-2000:]
    assert "still here" in done.stdout and "not reached" not in done.stdout


def test_sigterm_to_the_whole_job_with_workers_saves_and_stops(demo_dir, tmp_path):
    """SLURM signals every process of the job, DataLoader workers included: they must not die before the main
    process has written checkpoints/last."""
    config = tiny_config(tmp_path, demo_dir, data={"in_memory": False, "num_workers": 2},
                         train={"max_epochs": 50}, log={"log_every_n_steps": 1})
    run_dir = tmp_path / "artifacts" / "job"
    process = subprocess.Popen([sys.executable, "-m", "smptrain.train", "--config", str(config), "--set",
                                "log.run_name=job"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for(lambda: logged_steps(run_dir) >= 12, what="step 12")
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "continue with: python -m smptrain.train --resume" in out + err
    assert json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["step"] >= 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_deterministic_resume_is_bitwise_exact_on_cuda(demo_dir, tmp_path, precision):
    """On CUDA, exactness needs train.deterministic (cuDNN's benchmark mode and atomics differ run to run)."""
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 4, "deterministic": True, "mixed_precision": precision,
                                                    "augment": ["D4", "Blur", "MultiplicativeNoise"]},
                         data={"in_memory": False, "num_workers": 2}, log={"preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"], check=True)
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    split = tmp_path / "artifacts" / "split"
    run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    a, b = weights(tmp_path / "artifacts" / "straight"), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ"
    assert val_records(tmp_path / "artifacts" / "straight") == val_records(split)


def test_a_moved_run_tests_converts_and_resumes_to_the_same_weights(resume_setup, demo_dir, foreign_dir, tmp_path):
    import shutil

    _, _, straight = resume_setup
    home = tmp_path / "project"
    shutil.copytree(demo_dir, home / "data")
    config = tiny_config(home, home / "data", train={"max_epochs": 4, "augment": ["D4", "Blur", "MultiplicativeNoise"],
                                                     "gamma": 0.7},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=moving",
         "--set", "train.max_epochs=2"], check=True)
    moved = tmp_path / "elsewhere"
    shutil.move(home, moved)  # data and run directory together
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    run_dir = moved / "artifacts" / "moving"
    run(["smptrain-test", str(run_dir)], cwd=elsewhere, check=True)
    run(["smptrain-convert", str(run_dir), "--out-dir", str(tmp_path / "out"), "--name", "m"], cwd=elsewhere, check=True)
    # the data moves on alone: resuming needs its new place, and refuses another dataset
    shutil.move(moved / "data", tmp_path / "data-now")
    lost = run(["python", "-m", "smptrain.train", "--resume", str(run_dir), "--set", "train.max_epochs=4"], cwd=elsewhere)
    assert lost.returncode == 2 and "--set data.dir" in lost.stderr and "Traceback" not in lost.stderr
    other = run(["python", "-m", "smptrain.train", "--resume", str(run_dir), "--set", f"data.dir='{foreign_dir}'"],
                cwd=elsewhere)
    assert other.returncode == 2 and "not the dataset" in other.stderr and "Traceback" not in other.stderr
    run(["python", "-m", "smptrain.train", "--resume", str(run_dir), "--set", "train.max_epochs=4",
         "--set", f"data.dir='{tmp_path / 'data-now'}'"], cwd=elsewhere, check=True)
    assert_same_weights(straight, run_dir)
    assert val_records(straight) == val_records(run_dir)


def test_schedules_are_pure_functions_of_the_step():
    from smptrain.config import TrainConfig
    from smptrain.training.schedule import learning_rate, planned

    darts = TrainConfig(lr=1e-3, gamma=0.7, max_epochs=4)
    assert [learning_rate(darts, s, s // 5, 5) for s in (0, 4, 5, 19)] == [1e-3, 1e-3, 1e-3 * 0.7, 1e-3 * 0.7 ** 3]
    cosine = TrainConfig(lr=1e-3, max_epochs=4, schedule="cosine", warmup_steps=4)
    steps, rates = planned(cosine, 5)
    assert len(steps) == 20 and rates[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3] and rates[4] == 1e-3
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and 0 < rates[-1] < 1e-5
    assert planned(TrainConfig(lr=2e-3, schedule="constant", max_epochs=2), 3)[1] == [2e-3] * 6
    longer = TrainConfig(lr=1e-3, max_epochs=2, schedule="cosine", cosine_epochs=4, warmup_steps=4)
    assert planned(longer, 5)[1] == rates[:10]  # 2 epochs of a 4-epoch cosine: the start of the 4-epoch run


def test_cosine_with_warmup_resumes_exactly(demo_dir, tmp_path):
    """4 epochs = 2 + resume to 4, bitwise, under a cosine with warmup (its span fixed by train.cosine_epochs)."""
    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16},
                         train={"max_epochs": 4, "schedule": "cosine", "cosine_epochs": 4, "warmup_steps": 5,
                                "augment": ["D4"]},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"], check=True)
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    split, straight = tmp_path / "artifacts" / "split", tmp_path / "artifacts" / "straight"
    run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    assert_identical_weights(straight, split)
    assert val_records(straight) == val_records(split)
    rates = [json.loads(line)["learning_rate"] for line in (straight / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert rates[0] < rates[2] and rates[-1] < rates[2]  # warming up, then decaying
    assert (straight / "schedule.png").stat().st_size > 0


def test_a_frozen_encoder_stays_as_built_and_resumes_exactly(demo_dir, tmp_path):
    """train.freeze_encoder_epochs: the encoder (weights and BatchNorm statistics) is the initial one after the frozen
    epochs while the decoder learned, under gradient accumulation; with a scaled encoder rate afterwards, 4 epochs =
    2 + resume to 4, bitwise."""
    from accelerate.utils import set_seed

    from smptrain.model.network import build_model

    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16},
                         train={"max_epochs": 4, "freeze_encoder_epochs": 2, "grad_accum_steps": 2,
                                "encoder_lr_scale": 0.1, "val_every_n_epochs": 2},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"], check=True)
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    split, straight = tmp_path / "artifacts" / "split", tmp_path / "artifacts" / "straight"
    set_seed(42)  # what training does before building the model
    initial = build_model("Unet", "resnet18", 7).state_dict()
    after_two = weights(split)
    encoder_keys = [k for k in initial if k.startswith("encoder.")]
    assert all(torch.equal(after_two[k], initial[k]) for k in encoder_keys)
    assert not all(torch.equal(after_two[k], initial[k]) for k in initial if k.startswith("decoder."))
    run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    assert_identical_weights(straight, split)
    final = weights(split)
    assert not all(torch.equal(final[k], initial[k]) for k in encoder_keys)  # unfrozen from epoch 2 on


def test_the_launcher_reports_a_training_it_stopped_as_interrupted():
    """smptrain-launch's status: a training process ended by the signal the launcher passed on is an interrupted run
    (130); any other signal or failure keeps its own status."""
    from smptrain.training.launcher import exit_status

    assert exit_status(subprocess.CalledProcessError(-signal.SIGTERM, "train"), {signal.SIGTERM}) == 130
    assert exit_status(subprocess.CalledProcessError(128 + signal.SIGTERM, "train"), {signal.SIGTERM}) == 130
    assert exit_status(subprocess.CalledProcessError(-signal.SIGTERM, "train")) == 143
    assert exit_status(subprocess.CalledProcessError(-signal.SIGKILL, "train"), {signal.SIGTERM}) == 137
    assert exit_status(subprocess.CalledProcessError(2, "train"), {signal.SIGINT}) == 2


def test_the_moving_average_is_validated_exported_and_resumed_exactly(demo_dir, tmp_path):
    """train.ema_decay: training itself is unchanged (the trained weights equal those of a run without it);
    model.safetensors holds the average, which validation measured, and state/ the trained weights; 4 epochs = 2 +
    resume to 4, bitwise; the converted file holds the average and loads as DARTS' SMPSegmenter loads a file."""
    import segmentation_models_pytorch as smp

    train = {"max_epochs": 4, "val_every_n_epochs": 2, "augment": ["D4"]}
    log = {"preview_every_n_val": 0, "log_every_n_steps": 2}
    data = {"subsample": 16}  # 4 steps an epoch: what is tested is exactness, not learning
    config = tiny_config(tmp_path, demo_dir, data=data, train={**train, "ema_decay": 0.9}, log=log)
    without = tiny_config(tmp_path, demo_dir, name="without.toml", data=data, train=train, log=log)
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"], check=True)
    run(["python", "-m", "smptrain.train", "--config", str(without), "--set", "log.run_name=without"], check=True)
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    artifacts = tmp_path / "artifacts"
    straight, split = artifacts / "straight", artifacts / "split"
    run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    assert_identical_weights(straight, split)
    assert_identical_weights(straight, split, "state/model.safetensors")  # the trained weights too
    assert val_records(straight) == val_records(split)

    last = straight / "checkpoints" / "last"
    average, trained = weights(straight), load_file(str(last / "state" / "model.safetensors"))
    assert json.loads((last / "meta.json").read_text())["weights"] == "ema"
    assert all(torch.equal(average[k], v) for k, v in load_file(str(last / "state" / "model_1.safetensors")).items())
    assert all(torch.equal(trained[k], v) for k, v in weights(artifacts / "without").items())  # the same training
    assert not all(torch.equal(average[k], trained[k]) for k in average)
    assert [r["val/loss"] for r in val_records(straight)] != [r["val/loss"] for r in val_records(artifacts / "without")]

    out = tmp_path / "converted"
    run(["smptrain-convert", str(straight), "--out-dir", str(out), "--name", "ema"], check=True)
    ckpt = torch.load(next(out.glob("ema_*.ckpt")), weights_only=True)
    model = smp.create_model(**ckpt["config"]["model"], encoder_weights=None)
    model.load_state_dict(ckpt["statedict"])  # strict, as SMPSegmenter loads it
    best = weights(straight, "best")
    assert all(torch.equal(ckpt["statedict"][k], best[k]) for k in best)


def test_positive_sampling_with_weighted_bce_trains_and_resumes_exactly(demo_dir, tmp_path):
    """data.positive_fraction with train.pos_weight: 4 epochs = 2 + resume to 4, bitwise; settings that cannot work
    are one sentence before anything is written."""
    from test_errors import assert_clear_error

    config = tiny_config(tmp_path, demo_dir, data={"positive_fraction": 0.5, "subsample": 16},
                         train={"max_epochs": 4, "val_every_n_epochs": 2, "loss": "bce", "pos_weight": 3.0},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    straight = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=straight"],
                   check=True)
    assert "positive sampling: 2 of every batch's 4 patches" in straight.stdout
    assert "loss: bce (pos_weight 3)" in straight.stdout
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=split",
         "--set", "train.max_epochs=2"], check=True)
    split = tmp_path / "artifacts" / "split"
    run(["python", "-m", "smptrain.train", "--resume", str(split), "--set", "train.max_epochs=4"], check=True)
    assert_identical_weights(tmp_path / "artifacts" / "straight", split)
    assert val_records(tmp_path / "artifacts" / "straight") == val_records(split)

    for setting, words in [("data.positive_fraction=0.1", ["data.positive_fraction = 0.1", "batch of 4", "0.125"]),
                           ("train.loss='focal'", ["train.pos_weight", "bce", "'focal'"])]:
        result = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=refused",
                      "--set", setting])
        assert_clear_error(result, *words)
    assert not (tmp_path / "artifacts" / "refused").exists()
