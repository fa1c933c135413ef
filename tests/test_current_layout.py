"""Datasets in today's DARTS layout (names-only bands, DARTS' band table), warm starts, subsampling, Posterize and
converted files on a shared cluster."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CURRENT_BANDS, run, tiny_config, write_current_dataset

from smptrain.data.bands import TABLE, VALID_RANGES
from smptrain.data.darts import open_dataset

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out


@pytest.fixture(scope="module")
def current_dir(tmp_path_factory) -> Path:
    return write_current_dataset(tmp_path_factory.mktemp("current") / "dataset")


def table_factors(bands):
    return ([1 / (VALID_RANGES[b][1] - VALID_RANGES[b][0]) for b in bands],
            [-VALID_RANGES[b][0] / (VALID_RANGES[b][1] - VALID_RANGES[b][0]) for b in bands])


def test_a_names_only_dataset_takes_the_band_table(current_dir):
    info = open_dataset(current_dir)
    assert info.convention == TABLE and info.bands == tuple(CURRENT_BANDS)
    factors, offsets = table_factors(CURRENT_BANDS)
    assert info.band_factors == pytest.approx(factors) and info.band_offsets == pytest.approx(offsets)
    assert "z_idx" not in info.metadata.columns  # only what training needs is kept; geometry is ignored
    overridden = open_dataset(current_dir, {"slope": (0.01, 0.1)})
    assert overridden.band_factors[-1] == 0.01 and overridden.band_offsets[-1] == 0.1
    inspected = run(["smptrain-inspect", "--config", str(tiny_config(current_dir.parent, current_dir,
                     data={"split_method": "region", "split_by": ["Taymyr"]}))], check=True)
    assert TABLE in inspected.stdout and "relative_elevation" in inspected.stdout and "factor 0.01," in inspected.stdout


@pytest.fixture(scope="module")
def current_run(tmp_path_factory, current_dir) -> Path:
    tmp = tmp_path_factory.mktemp("current-run")
    config = tiny_config(tmp, current_dir, data={"split_method": "region", "split_by": ["Taymyr"]},
                         train={"max_epochs": 1}, log={"run_name": "now", "preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    return tmp / "artifacts" / "now"


def test_train_test_convert_and_predict_on_todays_layout(current_run, tmp_path):
    meta = json.loads((current_run / "checkpoints" / "best" / "meta.json").read_text())
    factors, offsets = table_factors(CURRENT_BANDS)
    assert meta["bands"]["band_factors"] == pytest.approx(factors)
    tested = run(["smptrain-test", str(current_run)], check=True)
    assert "test/JaccardIndex" in tested.stdout
    previous = os.umask(0o022)
    try:
        run(["smptrain-convert", str(current_run), "--out-dir", str(tmp_path), "--name", "now"], check=True)
    finally:
        os.umask(previous)
    converted = next(tmp_path.glob("now_*.ckpt"))
    assert stat.S_IMODE(converted.stat().st_mode) == 0o644  # readable by an inference job of another user
    loaded = torch.load(converted, weights_only=True)
    assert loaded["config"]["bands"]["band_factors"] == pytest.approx(factors)
    assert loaded["config"]["bands"]["band_offsets"] == pytest.approx(offsets)
    # the model input smptrain (and the DARTS pipeline) makes from decoded values is the band table's
    from smptrain.export.predict import normalise

    decoded = np.stack([np.linspace(*VALID_RANGES[b], 5) for b in CURRENT_BANDS])[:, :, None].repeat(3, 2)
    expected = np.stack([(decoded[i] - VALID_RANGES[b][0]) / (VALID_RANGES[b][1] - VALID_RANGES[b][0])
                         for i, b in enumerate(CURRENT_BANDS)])
    assert torch.allclose(normalise(decoded.astype(np.float32), loaded["config"]["bands"]),
                          torch.from_numpy(expected).float(), atol=1e-6)
    np.save(tmp_path / "tile.npy", decoded.repeat(20, 1).repeat(30, 2).astype(np.float32))
    run(["smptrain-predict", str(converted), str(tmp_path / "tile.npy"), str(tmp_path / "p.npy"), "--patch-size", "64",
         "--overlap", "8"], check=True)
    assert np.load(tmp_path / "p.npy").shape == (100, 90)


def test_a_band_outside_the_table_is_one_sentence_and_can_be_given(tmp_path):
    """Refused before the run directory exists, so the corrected command (same run name) runs; inspect exits 2."""
    root = write_current_dataset(tmp_path / "swir", n=24, bands=["red", "swir16"])
    config = tiny_config(tmp_path, root, data={"split_method": "region", "split_by": ["Taymyr"]},
                         train={"max_epochs": 1}, log={"run_name": "swir"})
    result = run(["python", "-m", "smptrain.train", "--config", str(config)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "swir16" in lines[-1] and "data.band_normalisation" in lines[-1] and "relative_elevation" in lines[-1]
    assert "run directory" not in result.stdout + result.stderr and not (tmp_path / "artifacts").exists()

    inspected = run(["smptrain-inspect", "--config", str(config)])
    assert inspected.returncode == 2 and "Traceback" not in inspected.stderr
    assert "swir16" in inspected.stdout and "unknown (give data.band_normalisation)" in inspected.stdout  # the report
    assert "swir16" in inspected.stderr.strip().splitlines()[-1]  # then the sentence training would end with

    given = ["--set", "data.band_normalisation={swir16=[2.0, 0.0]}"]
    assert run(["smptrain-inspect", "--config", str(config), *given]).returncode == 0
    run(["python", "-m", "smptrain.train", "--config", str(config), *given], check=True)
    meta = json.loads((tmp_path / "artifacts" / "swir" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["bands"]["band_factors"][1] == 2.0


def test_warm_start_loads_the_source_weights(trained_run, tmp_path, demo_dir):
    from smptrain.model.network import build_model
    from smptrain.training.loading import load_weights, warm_start

    model = build_model("Unet", "resnet18", 7)
    warm_start(model, str(trained_run))
    source = load_weights(trained_run / "checkpoints" / "best")
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in source)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.items()}}, tmp_path / "darts.ckpt")
    config = tiny_config(tmp_path, demo_dir, model={"weights_from": str(tmp_path / "darts.ckpt")},
                         train={"max_epochs": 1}, log={"run_name": "warm", "preview_every_n_val": 0})
    refused = run(["python", "-m", "smptrain.train", "--config", str(config)])
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "Traceback" not in refused.stderr
    run(["python", "-m", "smptrain.train", "--config", str(config), "--trust-pickle"], check=True)
    wrong = run(["python", "-m", "smptrain.train", "--config", str(config), "--trust-pickle", "--set",
                 "model.encoder=resnet34", "--set", "log.run_name=wrong"])
    assert wrong.returncode == 2 and "model.weights_from" in wrong.stderr


def test_subsample_is_deterministic_and_of_the_requested_size(demo_dir):
    from smptrain.config import load_config
    from smptrain.core.errors import UserError
    from smptrain.data.splits import make_splits

    info = open_dataset(demo_dir)
    cfg = load_config(None, ["data.split_method=region", "data.split_by=['Yamal']"])
    full = make_splits(info.metadata, cfg.data, 42)
    small = load_config(None, ["data.split_method=region", "data.split_by=['Yamal']", "data.subsample=10"])
    a, b = make_splits(info.metadata, small.data, 42), make_splits(info.metadata, small.data, 7)
    assert len(a["train"]) == 10 and a["train"] == b["train"] and set(a["train"]) <= set(full["train"])
    assert a["val"] == full["val"] and a["test"] == full["test"]
    stored = info.metadata[info.metadata.index.isin(full["train"])]  # the training rows in stored order, as DARTS
    expected = stored.sample(10, random_state=42).index
    assert a["train"] == sorted(int(i) for i in expected)
    too_many = load_config(None, ["data.split_method=region", "data.split_by=['Yamal']", "data.subsample=1000"])
    with pytest.raises(UserError, match="data.subsample"):
        make_splits(info.metadata, too_many.data, 42)


def test_posterize_keeps_six_bits():
    from smptrain.data.augment import augment

    x = torch.tensor([0.0, 0.01, 0.5, 0.999, 1.0]).view(1, 1, 1, 5)
    out, _ = augment(x, torch.zeros(1, 1, 5, dtype=torch.uint8), ["Posterize"], None)
    assert (out * 255).round().flatten().tolist() == [0, 0, 124, 252, 252]


def test_a_converted_darts_checkpoint_keeps_its_run_id_and_name(trained_run, tmp_path):
    from smptrain.data.demo import BANDS, FACTORS, OFFSETS
    from smptrain.training.loading import load_weights

    weights = load_weights(trained_run / "checkpoints" / "best")
    torch.save({"hyper_parameters": {"config": {"model": {"arch": "Unet", "encoder_name": "resnet18",
                                                          "in_channels": 7, "classes": 1},
                                                "bands": {"bands": list(BANDS), "band_factors": list(FACTORS),
                                                          "band_offsets": list(OFFSETS)}},
                                     "run_id": "x7k2", "run_name": "thawing-slump-7"},
                "state_dict": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "darts.ckpt")
    run(["smptrain-convert", str(tmp_path / "darts.ckpt"), "--out-dir", str(tmp_path / "out"), "--name", "d",
         "--trust-pickle"], check=True)
    converted = torch.load(next((tmp_path / "out").glob("d_*.ckpt")), weights_only=True)
    assert converted["config"]["smptrain"]["run_id"] == "x7k2"
    assert converted["config"]["smptrain"]["run_name"] == "thawing-slump-7"
