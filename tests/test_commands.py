"""smptrain-test, smptrain-convert, smptrain-inspect and smptrain-predict on real runs and datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from helpers import run, tiny_config

from smptrain.config import load_config
from smptrain.data.darts import open_dataset
from smptrain.data.splits import make_splits
from smptrain.training.loading import load_weights

pytestmark = pytest.mark.slow  # end to end: real subprocesses and trainings; -m 'not slow' leaves them out

TEST_KEYS = ["Accuracy", "Precision", "Specificity", "Recall", "F1Score", "JaccardIndex", "CohenKappa",
             "HammingDistance", "AUROC", "AveragePrecision", "loss", "InstanceAccuracy", "InstancePrecision",
             "InstanceRecall", "InstanceF1Score", "InstanceAveragePrecision", "BoundaryIoU", "ExpectedCalibrationError"]


def test_smptrain_test_needs_no_split_flags(trained_run, tmp_path):
    result = run(["smptrain-test", str(trained_run)], check=True)
    report = json.loads((trained_run / "test" / "metrics.json").read_text())
    assert sorted(report["metrics"]) == sorted(f"test/{k}" for k in TEST_KEYS)
    assert report["split"].endswith("splits.json")
    assert report["test_patches"] == len(json.loads((trained_run / "splits.json").read_text())["test"])
    assert "test/JaccardIndex" in result.stdout and "test/InstanceF1Score" in result.stdout
    for figure in ("confusion_matrix.png", "roc.png", "precision_recall.png", "samples_best.png", "samples_worst.png",
                   "regions.png", "reliability.png", "by_region.csv", "by_sample_id.csv"):
        assert (trained_run / "test" / figure).is_file(), figure
    # appended to the training run in wandb: a second offline run directory with the same id
    run_id = json.loads((trained_run / "run.json").read_text())["run_id"]
    assert len(list((trained_run.parent / "wandb").glob(f"offline-run-*-{run_id}"))) >= 2


def test_smptrain_test_computes_in_fp32_whatever_the_run_trained_with(demo_dir, tmp_path):
    """A bf16-trained checkpoint is tested in fp32 (what the DARTS pipeline computes) unless --precision says
    otherwise, so its test metrics equal an independent fp32 torchmetrics computation on any CPU or GPU, with or
    without native bf16."""
    import zarr
    from safetensors.torch import load_file
    from test_metrics import torchmetrics_values

    config = tiny_config(tmp_path, demo_dir, data={"subsample": 8}, train={"mixed_precision": "bf16", "max_epochs": 1},
                         log={"run_name": "bf16", "preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    run_dir = tmp_path / "artifacts" / "bf16"
    best = run_dir / "checkpoints" / "best"
    assert json.loads((best / "meta.json").read_text())["mixed_precision"] == "bf16"
    result = run(["smptrain-test", str(run_dir), "--json", str(tmp_path / "fp32.json")], check=True)
    report = json.loads((tmp_path / "fp32.json").read_text())
    assert report["precision"] == "fp32" and "patches, fp32)" in result.stdout

    rows = json.loads((run_dir / "splits.json").read_text())["test"]
    group = zarr.open_group(str(demo_dir / "data.zarr"), mode="r")
    x, y = torch.from_numpy(group["x"].oindex[rows]), torch.from_numpy(group["y"].oindex[rows])
    model = smp.create_model("Unet", encoder_name="resnet18", encoder_weights=None, in_channels=x.shape[1], classes=1)
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    with torch.inference_mode():
        probs = torch.sigmoid(model.eval()(x).squeeze(1))
    for name, value in torchmetrics_values(probs, y).items():
        assert report["metrics"][f"test/{name}"] == pytest.approx(value, abs=1e-6), name

    from smptrain.evaluation.assess import precision_for_test

    assert precision_for_test("bf16")[0] == "bf16" and precision_for_test("fp32")[0] == "no"  # --precision


@pytest.mark.parametrize("which", ["best", "last"])
def test_smptrain_test_reports_the_chosen_checkpoint(trained_run, tmp_path, which):
    out = tmp_path / f"{which}.json"
    run(["smptrain-test", str(trained_run), "--checkpoint", which, "--json", str(out)], check=True)
    report = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # figures go to the run, never next to --json
    assert os.path.basename(report["checkpoint"]) == os.readlink(trained_run / "checkpoints" / which)


def test_smptrain_test_recomputes_a_changed_split(trained_run, tmp_path):
    out = tmp_path / "east.json"
    run(["smptrain-test", str(trained_run), "--set", "data.split_method=region", "--set", "data.split_by=['Lena Delta']",
         "--json", str(out)], check=True)
    report = json.loads(out.read_text())
    assert report["split"] == "recomputed from the data.* settings" and report["test_patches"] > 0


def test_inspect_on_a_foreign_dataset_reports_and_writes_the_manifest(foreign_dir, tmp_path):
    for method, by in (("region", ["East"]), ("sample", ["201903_PS", "201905_PS"]), ("random", [0.25]), ("none", [])):
        config = tiny_config(tmp_path, foreign_dir, name=f"{method}.toml",
                             data={"split_method": method, "split_by": by, "fold_method": "stratified"})
        out = tmp_path / f"{method}.json"
        result = run(["smptrain-inspect", "--config", str(config), "--json", str(out)], check=True)
        assert "40 zarr rows" in result.stdout and "fold 2" in result.stdout
        manifest = json.loads(out.read_text())
        info = open_dataset(foreign_dir)
        assert manifest == make_splits(info.metadata, load_config(config).data, 42)
        if method == "region":
            assert set(info.metadata.loc[manifest["test"], "region"]) == {"East"} and len(manifest["test"]) == 10
        if method == "random":
            assert len(manifest["test"]) == 10
        if method == "none":
            assert manifest["test"] == list(range(40))


def test_training_on_a_foreign_dataset(foreign_dir, tmp_path):
    import pandas as pd

    config = tiny_config(tmp_path, foreign_dir, log={"run_name": "foreign"},
                         data={"in_memory": False, "num_workers": 2, "split_method": "sample",
                               "split_by": ["201900_PS", "201901_PS"], "bands": ["nir", "red"]})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    run_dir = tmp_path / "artifacts" / "foreign"
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["bands"]["bands"] == ["red", "nir"]  # the dataset's order
    assert meta["bands"]["band_factors"] == [0.0003333, 0.0003333]
    # validation spans several regions: their IoU is logged beside the whole split's
    metadata = open_dataset(foreign_dir).metadata
    splits = json.loads((run_dir / "splits.json").read_text())
    val_regions = set(metadata.loc[splits["val"], "region"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records if "val/JaccardIndex" in r for k in r if k.startswith("val/region/")}
    assert len(val_regions) > 1 and logged == {f"val/region/{r}/JaccardIndex" for r in val_regions}
    result = run(["smptrain-test", str(run_dir)], check=True)
    # the test split (two sample ids) spans two regions; their counts add up to the whole split's metrics
    by_region = pd.read_csv(run_dir / "test" / "by_region.csv")
    by_sample = pd.read_csv(run_dir / "test" / "by_sample_id.csv")
    assert sorted(by_region["region"]) == ["North", "South"] and sorted(by_sample["sample_id"]) == ["201900_PS", "201901_PS"]
    whole = json.loads((run_dir / "test" / "metrics.json").read_text())["metrics"]
    tp, fp, fn = (int(by_region[c].sum()) for c in ("tp", "fp", "fn"))
    assert tp / (tp + fp + fn) == pytest.approx(whole["test/JaccardIndex"], abs=1e-12)
    assert (by_sample[["tn", "fp", "fn", "tp"]].sum() == by_region[["tn", "fp", "fn", "tp"]].sum()).all()
    assert by_region["patches"].sum() == len(splits["test"]) and "per region, worst first" in result.stdout


def test_convert_produces_the_darts_file(trained_run, tmp_path):
    result = run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts-v1"], check=True)
    files = list(tmp_path.glob("rts-v1_*.ckpt"))
    assert len(files) == 1 and str(files[0]) in result.stdout
    ckpt = torch.load(files[0], weights_only=True)  # plain types and tensors only
    config = ckpt["config"]
    assert config["model"] == {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 7, "classes": 1}
    assert set(config["bands"]) == {"bands", "band_factors", "band_offsets"} and len(config["bands"]["bands"]) == 7
    assert config["name"] == "rts-v1" and config["model_framework"] == "smp" and len(config["time"]) == 10
    # what SMPSegmenter does: create_model with encoder_weights None, strict load, logits
    model = smp.create_model(**config["model"], encoder_weights=None)
    model.load_state_dict(ckpt["statedict"])
    reference = smp.create_model(**config["model"], encoder_weights=None)
    reference.load_state_dict(load_weights(trained_run / "checkpoints" / "best"))
    x = torch.rand(2, 7, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)
    again = run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts-v1"])
    assert again.returncode == 2 and "--overwrite" in again.stderr
    run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts-v1", "--overwrite"], check=True)


def fake_lightning_checkpoint(path, trained_run, bands):
    """A DARTS train-smp checkpoint: hyper_parameters.config and a state_dict with the model. prefix."""
    weights = load_weights(trained_run / "checkpoints" / "best")
    torch.save({
        "epoch": 3, "global_step": 40,
        "hyper_parameters": {"config": {"model": {"arch": "Unet", "encoder_name": "resnet18", "encoder_weights": None,
                                                  "in_channels": 7, "classes": 1}, "bands": bands},
                             "learning_rate": 1e-3, "run_id": "abcd1234"},
        "state_dict": {f"model.{k}": v for k, v in weights.items()},
    }, path)
    return weights


def test_convert_lightning_checkpoints_only_with_trust(trained_run, demo_dir, tmp_path):
    from smptrain.data.demo import BANDS, FACTORS, OFFSETS

    source = tmp_path / "darts.ckpt"
    weights = fake_lightning_checkpoint(source, trained_run, {"bands": list(BANDS), "band_factors": list(FACTORS),
                                                              "band_offsets": list(OFFSETS)})
    refused = run(["smptrain-convert", str(source), "--out-dir", str(tmp_path / "out"), "--name", "old"])
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "Traceback" not in refused.stderr
    run(["smptrain-convert", str(source), "--out-dir", str(tmp_path / "out"), "--name", "old", "--trust-pickle"],
        check=True)
    converted = torch.load(next((tmp_path / "out").glob("old_*.ckpt")), weights_only=True)
    assert converted["statedict"].keys() == weights.keys()
    # HEAD-style bands (names only) need factors from a dataset
    names_only = tmp_path / "head.ckpt"
    fake_lightning_checkpoint(names_only, trained_run, list(BANDS))
    missing = run(["smptrain-convert", str(names_only), "--out-dir", str(tmp_path / "o2"), "--name", "h", "--trust-pickle"])
    assert missing.returncode == 2 and "--bands-from" in missing.stderr
    run(["smptrain-convert", str(names_only), "--out-dir", str(tmp_path / "o2"), "--name", "h", "--trust-pickle",
         "--bands-from", str(demo_dir)], check=True)
    head = torch.load(next((tmp_path / "o2").glob("h_*.ckpt")), weights_only=True)
    assert head["config"]["bands"]["band_factors"] == list(FACTORS)


def test_a_threshold_chosen_on_validation_travels_to_the_converted_file_and_predict(trained_run, demo_dir, tmp_path):
    """--threshold val-best, TTA, convert --threshold val-best, predict --binarize; and predict's patch size."""
    import shutil

    import zarr

    from smptrain.evaluation import calibration as C

    out = tmp_path / "val-best.json"
    result = run(["smptrain-test", str(trained_run), "--threshold", "val-best", "--tta", "flips", "--json", str(out),
                  "--figures", str(tmp_path / "figures")], check=True)
    report = json.loads(out.read_text())
    chosen = json.loads((trained_run / "test" / "threshold.json").read_text())
    metrics = report["metrics"]
    # reproducible from the validation counts it records, and applied to the test split beside 0.5
    assert C.best_threshold(np.array(chosen["histogram"]))["threshold"] == chosen["threshold"]
    assert chosen["chosen_on"] == "val" and chosen["tta"] == "flips"
    assert metrics["test_tta_at_threshold/threshold"] == chosen["threshold"] and "test/JaccardIndex" in metrics
    # the plain probabilities get the threshold chosen for them
    plain = chosen["without_tta"]
    assert C.best_threshold(np.array(plain["histogram"]))["threshold"] == plain["threshold"]
    assert metrics["test_at_threshold/threshold"] == plain["threshold"]
    assert {"test_tta/JaccardIndex", "test_tta/InstanceF1Score", "test_at_threshold/JaccardIndex"} <= set(metrics)
    assert "TTA changes test IoU by" in result.stdout and "per region, worst first" in result.stdout
    assert (tmp_path / "figures" / "by_region_tta.csv").is_file()

    # the test data cannot move it: change every test label in a copy of the dataset and choose again
    copy = tmp_path / "changed"
    shutil.copytree(demo_dir, copy)
    test_rows = json.loads((trained_run / "splits.json").read_text())["test"]
    labels = zarr.open_group(str(copy / "data.zarr"), mode="r+")["y"]
    for row in test_rows:
        labels[row] = 1 - np.minimum(labels[row], 1)
    changed = tmp_path / "changed.json"
    run(["smptrain-test", str(trained_run), "--threshold", "val-best", "--tta", "flips", "--set", f"data.dir={copy}",
         "--json", str(changed), "--figures", str(tmp_path / "figures2")], check=True)
    again = json.loads((trained_run / "test" / "threshold.json").read_text())
    assert again["threshold"] == chosen["threshold"] and again["histogram"] == chosen["histogram"]
    assert again["without_tta"] == chosen["without_tta"]
    assert json.loads(changed.read_text())["metrics"]["test/JaccardIndex"] != metrics["test/JaccardIndex"]

    # into the converted file; smptrain-predict computes what the DARTS pipeline computes from it (no TTA, 0.5),
    # and applies the stored TTA and threshold only with --stored
    run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "tile", "--threshold", "val-best"],
        check=True)
    converted = next(tmp_path.glob("tile_*.ckpt"))
    extra = torch.load(converted, weights_only=True)["config"]["smptrain"]
    assert extra["threshold"] == chosen["threshold"] and extra["tta"] == "flips" and extra["patch_size"] == 64
    raw = np.random.default_rng(0).uniform(0, 3000, (7, 150, 170)).astype(np.float32)
    np.save(tmp_path / "tile.npy", raw)
    window = ["--patch-size", "64", "--overlap", "16"]

    def predict(out, *flags):
        return run(["smptrain-predict", str(converted), str(tmp_path / "tile.npy"), str(tmp_path / out), *window,
                    *flags], check=True).stdout

    assert "TTA none" in predict("darts.npy")
    assert "TTA flips" in predict("probs.npy", "--stored")
    predict("mask.npy", "--binarize", "--stored")
    predict("darts_mask.npy", "--binarize")
    from smptrain.export.predict import load_converted, normalise, predict_in_patches

    model, config = load_converted(converted, "cpu")
    expected = predict_in_patches(model, normalise(raw, config["bands"])[None], 64, 16, 8, 0, "cpu", "none")[0]
    darts, probs, mask = np.load(tmp_path / "darts.npy"), np.load(tmp_path / "probs.npy"), np.load(tmp_path / "mask.npy")
    assert np.array_equal(darts, expected.numpy()) and not np.array_equal(darts, probs)
    assert (np.load(tmp_path / "darts_mask.npy") == (darts > 0.5)).all()
    assert probs.shape == mask.shape == (150, 170) and probs.min() >= 0 and probs.max() <= 1
    assert mask.dtype == np.uint8 and (mask == (probs > chosen["threshold"])).all()
    # without --patch-size: the training patch size stored in the file; a patch too large names the option to change
    np.save(tmp_path / "small.npy", raw[:, :100, :90])
    run(["smptrain-predict", str(converted), str(tmp_path / "small.npy"), str(tmp_path / "p.npy")], check=True)
    assert np.load(tmp_path / "p.npy").shape == (100, 90)
    too_big = run(["smptrain-predict", str(converted), str(tmp_path / "small.npy"), str(tmp_path / "q.npy"),
                   "--patch-size", "512"])
    assert too_big.returncode == 2 and "--patch-size" in too_big.stderr and "Traceback" not in too_big.stderr
    # a threshold file of another checkpoint is refused in one sentence
    missing = run(["smptrain-convert", str(trained_run), "--which", "last", "--out-dir", str(tmp_path / "x"),
                   "--name", "t", "--threshold", "val-best"])
    same = os.readlink(trained_run / "checkpoints" / "last") == os.readlink(trained_run / "checkpoints" / "best")
    assert same or (missing.returncode == 2 and "--threshold val-best" in missing.stderr)


def test_every_option_of_every_command_has_help_text():
    import importlib
    import pkgutil

    import click

    import smptrain.commands

    checked = 0
    for module in pkgutil.iter_modules(smptrain.commands.__path__):
        command = importlib.import_module(f"smptrain.commands.{module.name}").main
        if isinstance(command, click.Command):  # smptrain-launch takes accelerate's arguments, not options of its own
            missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
            assert not missing, f"smptrain.commands.{module.name}: {missing}"
            checked += 1
    assert checked >= 10


def test_every_file_of_a_run_honours_the_umask(trained_run):
    """A shared cluster: others in the group read checkpoints; safetensors alone would write them 0600."""
    import stat

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(trained_run): stat.S_IMODE(p.stat().st_mode)
             for p in trained_run.rglob("*") if p.is_file() and not p.is_symlink()}
    assert modes and {p: m for p, m in modes.items() if m != 0o666 & ~mask} == {}


def test_a_checkpoint_stores_the_weights_once(trained_run):
    """model.safetensors and Accelerate's state/model.safetensors are one file on disk (a hard link)."""
    for checkpoint in (trained_run / "checkpoints").glob("epoch=*"):
        ours, state = checkpoint / "model.safetensors", checkpoint / "state" / "model.safetensors"
        assert ours.stat().st_ino == state.stat().st_ino and ours.stat().st_nlink == 2


def test_bench_refuses_data_too_small_for_its_figures_in_one_sentence(demo_dir):
    """Too few logging windows, or fewer patches than a batch: one sentence naming what to raise, before any timing."""
    few_windows = run(["python", "tools/bench.py", "--data", str(demo_dir), "--epochs", "1", "--encoders", "resnet18"])
    assert few_windows.returncode != 0 and "Traceback" not in few_windows.stderr
    assert "raise --epochs to 2" in few_windows.stderr and "1 logging window(s)" in few_windows.stderr
    two_tiles = run(["python", "tools/bench.py", "--patches", "2", "--patch-size", "64", "--epochs", "1"])
    assert two_tiles.returncode != 0 and "Traceback" not in two_tiles.stderr
    assert "fewer than --batch-size 8" in two_tiles.stderr
