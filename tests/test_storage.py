"""A full disk and a half-copied dataset, for real: a size-limited tmpfs mounted by the test (skipped where this
machine does not allow mounting) and a dataset copy with chunk files removed."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from helpers import run, tiny_config

from smptrain.core.storage import WriteFailed, reason_of, write_text, writing


def test_refusals_of_the_filesystem_are_read_from_errors_and_messages(tmp_path):
    assert reason_of(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == errno.ENOSPC
    assert reason_of(RuntimeError("SafetensorError: I/O error: No space left on device (os error 28)"),
                     tmp_path) == errno.ENOSPC
    assert reason_of(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == errno.EDQUOT
    chained = RuntimeError("wrapped")
    chained.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert reason_of(chained, tmp_path) == errno.EROFS
    # torch's zip writer names no reason; with plenty of room here it is not taken for a full disk
    assert reason_of(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0"), tmp_path) is None
    assert reason_of(ValueError("a bug"), tmp_path) is None


def test_a_refused_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old\n")
    partial = tmp_path / "partial"

    def fail():
        partial.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed) as error:
        with writing(target, cleanup=lambda: partial.unlink(missing_ok=True)):
            fail()
    assert str(error.value).startswith(f"cannot write {target}: no space is left on its filesystem (")
    assert target.read_text() == "old\n" and not partial.exists()


@contextmanager
def small_filesystem(where: Path, size_mb: int):
    """A tmpfs of `size_mb` MiB at `where`, unmounted afterwards; the test is skipped where mounting is refused."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", f"smptrain-{uuid.uuid4().hex[:6]}",
                              str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()[:120]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def grow(where: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(where)], check=True, capture_output=True)


def one_sentence(result, start: str) -> str:
    assert result.returncode == 2, (result.stdout[-1500:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(start), line
    return line


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_sentence_and_resume_continues_exactly(demo_dir, tmp_path):
    # Unet-resnet18 on 7 bands: one checkpoint is about 173 MB, so on 300 MiB the second does not fit.
    disk = tmp_path / "disk"
    with small_filesystem(disk, 300):
        config = tiny_config(tmp_path, demo_dir, log={"artifact_dir": str(disk), "run_name": "full",
                                                      "preview_every_n_val": 0})
        result = run(["python", "-m", "smptrain.train", "--config", str(config)])
        line = one_sentence(result, f"error: cannot write {disk / 'full' / 'checkpoints'}/epoch=0001")
        assert "no space is left on its filesystem" in line and "needed" in line and "--resume" in line
        assert "warning:" in result.stdout and "checkpoints of about" in result.stdout  # said before the first
        checkpoints = disk / "full" / "checkpoints"
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")]
        assert (checkpoints / "last").resolve().name.startswith("epoch=0000")
        grow(disk, 800)
        resumed = run(["python", "-m", "smptrain.train", "--resume", str(disk / "full")])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        reference = tiny_config(tmp_path, demo_dir, name="reference.toml",
                                log={"artifact_dir": str(tmp_path / "reference"), "run_name": "full",
                                     "preview_every_n_val": 0})
        run(["python", "-m", "smptrain.train", "--config", str(reference)], check=True)
        continued, uninterrupted = weights(disk / "full"), weights(tmp_path / "reference" / "full")
        assert continued.keys() == uninterrupted.keys()
        assert all((continued[k] == uninterrupted[k]).all() for k in continued)


@pytest.mark.slow
def test_a_first_checkpoint_that_does_not_fit_leaves_nothing(demo_dir, tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, 150):
        config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 1}, log={"artifact_dir": str(disk)})
        line = one_sentence(run(["python", "-m", "smptrain.train", "--config", str(config)]), "error: cannot write ")
        assert "no checkpoint of this run was kept" in line
        assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_test_and_convert_on_a_full_disk_are_one_sentence_and_leave_no_partial_file(trained_run, tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, 1):
        (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # almost nothing left
        tested = run(["smptrain-test", str(trained_run), "--json", str(disk / "metrics.json"),
                      "--figures", str(disk / "figures")])
        one_sentence(tested, f"error: cannot write {disk}")
        assert not (disk / "metrics.json").exists()
        converted = run(["smptrain-convert", str(trained_run), "--out-dir", str(disk / "models"), "--name", "rts"])
        line = one_sentence(converted, f"error: cannot write {disk / 'models'}")
        assert "no space is left" in line
        assert not list((disk / "models").glob("*")) if (disk / "models").exists() else True
        assert not [p for p in disk.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def half_copied(demo_dir: Path, tmp_path: Path) -> tuple[Path, int, int]:
    """A copy of the demo data missing the label chunk of one positive patch and one band chunk of another."""
    copy = tmp_path / "half"
    shutil.copytree(demo_dir, copy)
    metadata = pd.read_parquet(copy / "metadata.parquet")
    positive = [int(r) for r in metadata.index[~metadata["empty"].astype(bool)]]
    label_row, band_row = positive[0], positive[1]
    shutil.rmtree(copy / "data.zarr" / "y" / "c" / str(label_row))
    shutil.rmtree(copy / "data.zarr" / "x" / "c" / str(band_row) / "2")
    return copy, label_row, band_row


@pytest.mark.slow
def test_a_half_copied_dataset_is_found_by_inspect_and_refused_by_training(demo_dir, tmp_path):
    copy, label_row, band_row = half_copied(demo_dir, tmp_path)
    config = tiny_config(tmp_path, copy, data={"split_method": "none", "fold_method": "kfold"})
    inspected = run(["smptrain-inspect", "--config", str(config)])
    line = one_sentence(inspected, "error: ")
    assert f"zarr row(s) {label_row} are positive in metadata.parquet but their labels hold no positive pixel" in line
    assert "a chunk file missing from a copy of the dataset reads as zeros" in line
    assert f"warning: band red is all zeros in 1 labelled patch(es): zarr rows [{band_row}]" in inspected.stdout
    trained = run(["python", "-m", "smptrain.train", "--config", str(config)])
    assert f"zarr row(s) {label_row} are positive" in one_sentence(trained, "error: ")
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())
    accepted = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "data.accept_empty_mismatch=true",
                    "--set", "train.max_epochs=1"])
    assert accepted.returncode == 0, accepted.stderr[-2000:]
