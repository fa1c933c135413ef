"""Bad input through the real command-line tools: exit code 2, one sentence naming the culprit, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import run, write_foreign_dataset
from helpers import tiny_config as _tiny_config

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out


def tiny_config(tmp, root, name="tiny.toml", **sections):
    """configs/tiny.toml for the foreign dataset's regions (North, South, West, East)."""
    sections["data"] = {"split_by": ["East"], **sections.get("data", {})}
    return _tiny_config(tmp, root, name, **sections)


def assert_clear_error(result, *words):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_foreign_dataset(tmp_path_factory.mktemp("bad") / "good", n=24)


def variant(base: Path, tmp: Path, change) -> Path:
    """A copy of the good dataset with one thing broken by `change(root)`."""
    root = tmp / "broken"
    shutil.copytree(base, root)
    change(root)
    return root


def rewrite_array(root: Path, name: str, transform):
    group = zarr.open_group(str(root / "data.zarr"), mode="r+")
    data = transform(group[name][:])
    del group[name]
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]))[:] = data


def rewrite_metadata(root: Path, transform):
    import pandas as pd

    frame = pd.read_parquet(root / "metadata.parquet")
    transform(frame).to_parquet(root / "metadata.parquet")


def train(config: Path, *extra):
    return run(["python", "-m", "smptrain.train", "--config", str(config), *extra])


def inspect(config: Path):
    return run(["smptrain-inspect", "--config", str(config)])


def test_missing_config_file(tmp_path):
    assert_clear_error(train(tmp_path / "nope.toml"), "nope.toml does not exist")


def test_toml_syntax_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_epochs = 3\nlr = 1e-3 x\n")
    assert_clear_error(train(bad), "bad.toml is not valid TOML", "line 3")


@pytest.mark.parametrize("override, words", [
    (["--set", "train.lrr=1e-3"], ["unknown key train.lrr", "did you mean train.lr"]),
    (["--set", "trainer.lr=1e-3"], ["unknown section [trainer]"]),
    (["--set", "train.batch_size='eight'"], ["train.batch_size", "int", "'eight'"]),
    (["--set", "data.fold=3"], ["data.fold", "between 0 and data.total_folds - 1 = 2"]),
    (["--set", "data.split_method=region", "--set", "data.split_by=['Atlantis']"], ["unknown region", "Atlantis"]),
    (["--set", "data.split_method=random", "--set", "data.split_by=[1.5]"], ["between 0 and 1"]),
    (["--set", "data.split_method=region", "--set", "data.split_by=['North', 'South', 'West', 'East']"],
     ["nothing is left for training"]),
    (["--set", "data.bands=['swir']"], ["['swir']", "config.toml"]),
    (["--set", "model.encoder_weights=imagenet21k"], ["model.encoder_weights", "'imagenet21k'", "imagenet, ssl, swsl"]),
    (["--set", "model.encoder_weights=weights/resnet.pth"], ["model.encoder_weights", "no such file"]),
    (["--set", "train.mixed_precision=fp16"], ["fp16", "CUDA"]),
])
def test_bad_settings(base, tmp_path, override, words):
    assert_clear_error(train(tiny_config(tmp_path, base), *override), *words)
    artifacts = tmp_path / "artifacts"
    assert not artifacts.exists() or not any(artifacts.iterdir())  # no half-made run directory left behind


@pytest.mark.parametrize("missing", ["data.zarr", "metadata.parquet", "config.toml"])
def test_dataset_files_missing(base, tmp_path, missing):
    root = variant(base, tmp_path, lambda r: shutil.rmtree(r / missing) if (r / missing).is_dir() else (r / missing).unlink())
    assert_clear_error(train(tiny_config(tmp_path, root)), f"has no {missing}")


def test_dataset_directory_missing(tmp_path):
    assert_clear_error(train(tiny_config(tmp_path, tmp_path / "nowhere")), "nowhere does not exist")


BROKEN = {
    "x and y lengths": (lambda r: rewrite_array(r, "y", lambda y: y[:-2]), ["same N"]),
    "patch size": (lambda r: rewrite_array(r, "y", lambda y: y[:, :32, :32]), ["same N and patch size"]),
    "index outside rows": (lambda r: rewrite_metadata(r, lambda f: f.rename(index={int(f.index[0]): 99})),
                           ["point outside the 24 zarr rows"]),
    "missing column": (lambda r: rewrite_metadata(r, lambda f: f.drop(columns=["region"])), ["['region']"]),
    "bands vs channels": (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text().replace(
        'bands = ["red", "green", "blue", "nir"]', 'bands = ["red", "green", "blue"]')), ["band_factors", "3"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_malformed_dataset(base, tmp_path, name):
    change, words = BROKEN[name]
    assert_clear_error(inspect(tiny_config(tmp_path, variant(base, tmp_path, change))), *words)


def test_label_values_outside_0_1_2(base, tmp_path):
    def seven(y):
        y[2, 0, 0] = 7  # row 2 is in region West: a training patch
        return y

    root = variant(base, tmp_path, lambda r: rewrite_array(r, "y", seven))
    assert_clear_error(inspect(tiny_config(tmp_path, root)), "outside {0 background, 1 positive, 2 ignored}",
                       "zarr rows [2]")
    assert_clear_error(train(tiny_config(tmp_path, root)), "y holds the value(s) 7, outside {0 background, 1 positive, "
                       "2 ignored}", "smptrain-inspect lists every such patch")
    streamed = tiny_config(tmp_path, root, name="streamed.toml", data={"in_memory": False, "num_workers": 1})
    assert_clear_error(train(streamed), "outside {0 background, 1 positive, 2 ignored}", "zarr rows 2")
    # the run met the bad patch before any checkpoint: nothing is left to block the corrected re-run
    assert not list((tmp_path / "artifacts").glob("*/config.toml"))


def test_non_finite_inputs(base, tmp_path):
    def holes(x):
        x[[2, 5], 0, 0, 0] = np.nan
        x[9, 1, 3, 3] = np.inf
        return x

    root = variant(base, tmp_path, lambda r: rewrite_array(r, "x", holes))
    assert_clear_error(inspect(tiny_config(tmp_path, root)), "3 patch(es) hold NaN or inf", "[2, 5, 9]")
    assert_clear_error(train(tiny_config(tmp_path, root)), "NaN or inf")
    streamed = tiny_config(tmp_path, root, name="streamed.toml", data={"in_memory": False, "num_workers": 0})
    assert_clear_error(train(streamed), "NaN or inf", "zarr rows")  # met at the first batch holding one
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").iterdir())


def test_patch_size_the_architecture_cannot_take(tmp_path):
    root = write_foreign_dataset(tmp_path / "odd", n=12, patch=48)
    assert_clear_error(train(tiny_config(tmp_path, root)), "patch size 48 is not divisible by 32")
    assert not (tmp_path / "artifacts").exists()


def test_existing_run_directory_is_never_overwritten(base, tmp_path):
    config = tiny_config(tmp_path, base, log={"run_name": "taken"})
    (tmp_path / "artifacts" / "taken").mkdir(parents=True)
    (tmp_path / "artifacts" / "taken" / "notes.txt").write_text("keep me")
    assert_clear_error(train(config), "already exists", "--resume")
    assert (tmp_path / "artifacts" / "taken" / "notes.txt").read_text() == "keep me"
    assert_clear_error(run(["python", "-m", "smptrain.train", "--resume", str(tmp_path / "artifacts" / "taken")]),
                       "not a run directory")


def test_checkpoint_paths(tmp_path):
    assert_clear_error(run(["smptrain-test", str(tmp_path / "gone")]), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clear_error(run(["smptrain-test", str(tmp_path / "empty")]), "neither a run directory nor a checkpoint")
    assert_clear_error(run(["smptrain-convert", str(tmp_path / "empty"), "--out-dir", str(tmp_path), "--name", "x"]),
                       "neither a run directory nor a checkpoint")
    (tmp_path / "model.ckpt").write_bytes(b"not a pickle at all")
    assert_clear_error(run(["smptrain-convert", str(tmp_path / "model.ckpt"), "--out-dir", str(tmp_path), "--name", "x",
                            "--trust-pickle"]), "not a readable Lightning checkpoint")


def test_converting_to_an_unwritable_directory(trained_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    assert_clear_error(run(["smptrain-convert", str(trained_run), "--out-dir", str(blocker / "sub"), "--name", "x"]),
                       "cannot write to")


def test_debug_shows_the_traceback(tmp_path):
    result = run(["python", "-m", "smptrain.train", "--config", str(tmp_path / "nope.toml"), "--debug"])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_wandb_that_cannot_start_is_a_clear_error(base, tmp_path):
    config = tiny_config(tmp_path, base, log={"wandb_project": "needs-login", "run_name": "online"})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)], WANDB_MODE="online",
                 HOME=str(tmp_path), WANDB_API_KEY="", WANDB_DIR=str(tmp_path))
    assert_clear_error(result, "wandb could not start", "WANDB_MODE=offline")
    assert not (tmp_path / "artifacts" / "online").exists()  # no half-made run directory


def test_a_damaged_chunk_is_one_sentence_and_leaves_nothing_behind(base, tmp_path):
    """A truncated chunk file: inspect and training (in memory, streamed by tensorstore, and by zarr-python
    workers) name the array, the zarr row and the chunk; a run that met it before any checkpoint leaves no directory."""
    def truncate(root):
        chunk = root / "data.zarr" / "x" / "2.0.0.0"  # zarr v2: row 2 (a training patch), band 0
        chunk.write_bytes(chunk.read_bytes()[:40])

    root = variant(base, tmp_path, truncate)
    assert_clear_error(inspect(tiny_config(tmp_path, root)), "array x", "zarr row(s) 2", "x/2")
    assert_clear_error(train(tiny_config(tmp_path, root)), "array x", "zarr row(s) 2")
    for name, data in (("tensorstore.toml", {"in_memory": False, "num_workers": 0}),
                       ("workers.toml", {"in_memory": False, "num_workers": 1, "reader": "zarr"})):
        assert_clear_error(train(tiny_config(tmp_path, root, name=name, data=data)), "array x", "zarr row(s) 2")
    assert not list((tmp_path / "artifacts").glob("*/config.toml"))
