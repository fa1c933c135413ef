"""Files from others run no code: a pickle that would create a marker file is fed to every reader."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from helpers import run

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"

    def write(path):
        torch.save({"config": Payload(marker), "statedict": Payload(marker)}, path)
        return path

    return marker, write


def test_the_payload_really_runs_when_unpickled(evil, tmp_path):
    marker, write = evil
    path = write(tmp_path / "evil.ckpt")
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # so the checks below are meaningful
    marker.unlink()
    run(["smptrain-convert", str(path), "--out-dir", str(tmp_path / "o"), "--name", "x", "--trust-pickle"])
    assert marker.exists()  # --trust-pickle is the only way in


def test_convert_refuses_lightning_pickles_without_trust(evil, tmp_path):
    marker, write = evil
    result = run(["smptrain-convert", str(write(tmp_path / "darts.ckpt")), "--out-dir", str(tmp_path / "o"), "--name", "x"])
    assert result.returncode == 2 and not marker.exists()


def test_predict_loads_converted_files_weights_only(evil, tmp_path):
    marker, write = evil
    (tmp_path / "tile.npy").write_bytes(b"")
    result = run(["smptrain-predict", str(write(tmp_path / "model.ckpt")), str(tmp_path / "tile.npy"), str(tmp_path / "o.npy")])
    assert result.returncode == 2 and "weights-only" in result.stderr and not marker.exists()


def test_test_and_resume_never_unpickle(evil, trained_run, tmp_path):
    marker, write = evil
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, symlinks=True)
    last = (copy / "checkpoints" / "last").resolve()
    for name in ("optimizer.bin", "random_states_0.pkl"):
        write(last / "state" / name)
    resumed = run(["python", "-m", "smptrain.train", "--resume", str(copy), "--set", "train.max_epochs=3"])
    assert resumed.returncode == 2 and "weights-only" in resumed.stderr and "Traceback" not in resumed.stderr
    write(last / "model.safetensors")
    tested = run(["smptrain-test", str(copy), "--checkpoint", "last"])
    assert tested.returncode == 2 and "safetensors" in tested.stderr
    converted = run(["smptrain-convert", str(copy), "--which", "last", "--out-dir", str(tmp_path / "o"), "--name", "x"])
    assert converted.returncode == 2
    assert not marker.exists()


def test_encoder_weights_are_read_weights_only(evil, tmp_path, demo_dir):
    from helpers import tiny_config

    marker, write = evil
    config = tiny_config(tmp_path, demo_dir, model={"encoder_weights": str(write(tmp_path / "encoder.pth"))})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)])
    assert result.returncode == 2 and "state dict" in result.stderr and not marker.exists()
