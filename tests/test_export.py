"""Every model smptrain trains reaches every place it is used: a MaxViT trained at 224 px converts and loads as
DARTS' SMPSegmenter loads it; every smp architecture is exported to ONNX and checked in onnxruntime, or refused in
one sentence before anything is written; the exported file runs in QGIS Deepness' own parsing and processing
(reimplemented below from the plugin's source) with the model's mask; smptrain-predict and smptrain-convert say
what is wrong in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run, tiny_config, write_current_dataset

from smptrain.core.errors import UserError

pytestmark = pytest.mark.slow


def assert_one_sentence(result, *words):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_a_maxvit_model_trained_at_224_px_converts_and_loads_as_darts_loads_it(tmp_path):
    """DARTS' quickstart model (UPerNet + tu-maxvit_tiny_rw_224) takes only multiples of its 224 px window: the
    converted file's self-check runs at the run's own patch size."""
    import segmentation_models_pytorch as smp

    data = write_current_dataset(tmp_path / "data", n=12, patch=224)
    config = tiny_config(tmp_path, data, data={"split_method": "none", "split_by": [], "fold_method": "none",
                                               "subsample": 4},
                         model={"arch": "UPerNet", "encoder": "tu-maxvit_tiny_rw_224"},
                         train={"max_epochs": 1, "batch_size": 2},
                         log={"run_name": "maxvit", "preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    converted = run(["smptrain-convert", str(tmp_path / "artifacts" / "maxvit"), "--out-dir", str(tmp_path / "out"),
                     "--name", "rts"], check=True)
    assert "self-check passed" in converted.stdout
    path = next((tmp_path / "out").glob("rts_*.ckpt"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # as SMPSegmenter.__init__
    model = smp.create_model(**ckpt["config"]["model"], encoder_weights=None)
    model.load_state_dict(ckpt["statedict"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 7, 224, 224)).shape == (1, 1, 224, 224)


ARCHITECTURES = [  # (arch, encoder, a patch size it takes)
    ("Unet", "resnet18", 64), ("UnetPlusPlus", "resnet18", 64), ("MAnet", "resnet18", 64),
    ("Linknet", "resnet18", 64), ("FPN", "resnet18", 64), ("PSPNet", "resnet18", 64), ("PSPNet", "resnet18", 96),
    ("DeepLabV3", "resnet18", 64), ("DeepLabV3Plus", "resnet18", 64), ("PAN", "resnet18", 128),
    ("UPerNet", "resnet18", 64), ("Segformer", "mit_b0", 64), ("DPT", "tu-vit_tiny_patch16_224", 224),
]


@pytest.mark.parametrize("arch, encoder, patch", ARCHITECTURES, ids=[f"{a}-{p}" for a, _, p in ARCHITECTURES])
def test_every_architecture_is_exported_and_checked_or_refused_in_one_sentence(tmp_path, arch, encoder, patch):
    from smptrain.export.onnx import TOLERANCE, export_onnx
    from smptrain.model.network import described_model

    model = {"arch": arch, "encoder_name": encoder, "in_channels": 3, "classes": 1}
    torch.manual_seed(0)
    network = described_model(model, None, "test").eval()
    bands = {"bands": ["red", "green", "blue"], "band_factors": [1 / 3000] * 3, "band_offsets": [0.0] * 3}
    target = tmp_path / "m.onnx"
    try:
        difference = export_onnx(model, bands, network.state_dict(), {"patch_size": patch}, target)
    except UserError as error:
        assert (arch, patch) == ("PSPNet", 64), str(error)  # the one combination no export path takes
        assert str(error).startswith("model.arch = 'PSPNet' with model.encoder = 'resnet18' cannot be exported")
        assert "multiple of 48 px" in str(error) and str(error).endswith("nothing was written")
        assert list(tmp_path.iterdir()) == []
        return
    assert difference <= TOLERANCE and target.is_file()


def test_a_dynamic_export_of_pyramid_pooling_is_refused_before_exporting(tmp_path):
    from smptrain.export.onnx import export_onnx
    from smptrain.model.network import described_model

    model = {"arch": "UPerNet", "encoder_name": "resnet18", "in_channels": 3, "classes": 1}
    network = described_model(model, None, "test")
    bands = {"bands": ["red", "green", "blue"], "band_factors": [1 / 3000] * 3, "band_offsets": [0.0] * 3}
    with pytest.raises(UserError, match="needs a fixed height and width; use --format onnx"):
        export_onnx(model, bands, network.state_dict(), {"patch_size": 64}, tmp_path / "u.onnx", dynamic=True)
    assert list(tmp_path.iterdir()) == []


# --- QGIS Deepness, as its code reads and runs a model ------------------------------------------------------------
# Reimplemented from PUTvision/qgis-plugin-deepness (Apache-2.0), src/deepness/processing/models/model_base.py,
# segmentor.py, preprocessing_utils.py and processing/map_processor/map_processor_segmentation.py (_process_tile).


class DeepnessSegmentor:
    """What the plugin does with an ONNX file: one input; `model_type` parsed with json.loads and capitalised; the
    tile size taken from the input's shape (its spin box takes an int: a named dimension is a TypeError there);
    every metadata value parsed with json.loads; a tile of raster values (N, H, W, C) limited to the input's
    channels, divided by 255, standardised with the metadata's mean and std, made NCHW; a one-channel output
    thresholded at `seg_thresh` (values below it set to 0, the rest class 1; +1 as the plugin stores them)."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) > 1:
            raise Exception("ONNX model: unsupported number of inputs")
        self.input_shape, self.input_name = inputs[0].shape, inputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.model_type = str(json.loads(meta["model_type"])).capitalize()
        if not isinstance(self.input_shape[-1], int):  # QSpinBox.setValue(input_shape[-1])
            raise TypeError(f"setValue(self, val: int): argument 1 has unexpected type {type(self.input_shape[-1])}")
        self.tile_size = int(json.loads(meta["tile_size"])) if "tile_size" in meta else self.input_shape[-1]
        self.overlap = int(json.loads(meta["tiles_overlap"]))
        self.threshold = float(json.loads(meta["seg_thresh"]))
        channels = self.input_shape[-3]
        self.mean, self.std = np.zeros(channels, np.float32), np.ones(channels, np.float32)
        if "standardization_mean" in meta and "standardization_std" in meta:
            self.mean = np.array([float(x) for x in json.loads(meta["standardization_mean"])], np.float32)
            self.std = np.array([float(x) for x in json.loads(meta["standardization_std"])], np.float32)
        names = json.loads(meta["class_names"])
        self.class_names = [[v for _, v in sorted(names.items(), key=lambda kv: int(kv[0]))]]
        self.resolution = float(json.loads(meta["resolution"])) if "resolution" in meta else None

    def process(self, tiles_nhwc: np.ndarray) -> np.ndarray:
        x = tiles_nhwc[:, :, :, :self.input_shape[-3]]
        x = np.float32(x * 1. / 255.)
        x = (x - self.mean) / self.std
        x = np.transpose(x, (0, 3, 1, 2))
        result = self.session.run(None, {self.input_name: x})[0]
        result[result < self.threshold] = 0.0
        return ((result != 0).astype(int) + 1)[:, 0]


def test_the_onnx_file_loads_and_predicts_in_deepness_as_the_model_does(trained_run, tmp_path):
    from smptrain.export.convert import from_smptrain
    from smptrain.export.onnx import wrapped

    exported = run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts", "--format",
                    "onnx", "--resolution", "300"], check=True)
    assert "64 x 64 pixels" in exported.stdout
    segmentor = DeepnessSegmentor(next(tmp_path.glob("rts_*.onnx")))
    assert segmentor.model_type == "Segmentor" and segmentor.tile_size == 64 and segmentor.resolution == 300
    assert segmentor.input_shape[1:] == [7, 64, 64] and isinstance(segmentor.input_shape[0], str)  # any batch
    assert segmentor.class_names == [["rts"]] and segmentor.overlap == 25
    raw = np.random.default_rng(0).uniform(0, 3000, size=(3, 64, 64, 7)).astype(np.float32)  # a raster's values
    mask = segmentor.process(raw)
    model, bands, state, extra = from_smptrain(trained_run, "best")
    module = wrapped(model, bands, state, bands["bands"], "test")
    with torch.no_grad():
        probabilities = module(torch.from_numpy(raw).permute(0, 3, 1, 2)).numpy()[:, 0]
    expected = np.where(probabilities >= segmentor.threshold, 2, 1)
    near = np.abs(probabilities - segmentor.threshold) < 1e-5  # float rounding of x / 255 * 255 may flip these
    assert (mask[~near] == expected[~near]).all() and (mask == 2).any() and (mask == 1).any()


# --- one sentence, whatever the user gives --------------------------------------------------------------------------


def converted_file(tmp_path: Path, arch: str, encoder: str) -> Path:
    from smptrain.export.convert import build_converted
    from smptrain.model.network import described_model

    model = {"arch": arch, "encoder_name": encoder, "in_channels": 3, "classes": 1}
    bands = {"bands": ["red", "green", "blue"], "band_factors": [1 / 3000] * 3, "band_offsets": [0.0] * 3}
    network = described_model(model, None, "test")
    path = tmp_path / f"{arch}.ckpt"
    torch.save(build_converted(model, bands, network.state_dict(), arch, "smp", {"patch_size": 64}), path)
    return path


@pytest.mark.parametrize("arch, encoder, patch, words", [
    ("Segformer", "mit_b0", 65, ["patch size 65 is not divisible by 32", "use patches of 64 or 96"]),
    ("DeepLabV3Plus", "resnet18", 100, ["not divisible by"]),
])
def test_predict_refuses_a_patch_size_the_model_cannot_take_in_one_sentence(tmp_path, arch, encoder, patch, words):
    np.save(tmp_path / "tile.npy", np.random.default_rng(0).uniform(0, 3000, (3, 150, 150)).astype(np.float32))
    result = run(["smptrain-predict", str(converted_file(tmp_path, arch, encoder)), str(tmp_path / "tile.npy"),
                  str(tmp_path / "out.npy"), "--patch-size", str(patch)])
    assert_one_sentence(result, "--patch-size", *words)
    assert not (tmp_path / "out.npy").exists()


def test_predict_with_an_onnx_file_refuses_a_patch_size_it_would_shrink(tmp_path):
    """A dynamic ONNX Segformer given 65 px patches returned 64 x 64 probabilities without a word."""
    from smptrain.export.onnx import export_onnx
    from smptrain.model.network import described_model

    model = {"arch": "Segformer", "encoder_name": "mit_b0", "in_channels": 3, "classes": 1}
    bands = {"bands": ["red", "green", "blue"], "band_factors": [1 / 3000] * 3, "band_offsets": [0.0] * 3}
    target = tmp_path / "s.onnx"
    export_onnx(model, bands, described_model(model, None, "test").state_dict(), {"patch_size": 64}, target,
                dynamic=True)
    np.save(tmp_path / "tile.npy", np.random.default_rng(0).uniform(0, 3000, (3, 150, 150)).astype(np.float32))
    result = run(["smptrain-predict", "--onnx", str(target), str(tmp_path / "tile.npy"), str(tmp_path / "out.npy"),
                  "--patch-size", "65"])
    assert_one_sentence(result, "turns 65 x 65 patches into 64 x 64 probabilities", "--patch-size")


def test_convert_of_a_run_without_its_checkpoints_folder_says_so(trained_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    result = run(["smptrain-convert", str(run_dir), "--out-dir", str(tmp_path / "out"), "--name", "x"])
    assert_one_sentence(result, f"run directory {run_dir} has no checkpoints/ folder")


def test_a_failed_export_prints_one_whole_sentence_and_nothing_else(trained_run, tmp_path):
    """An exporter failure used to print its whole graph (hundreds of lines) before a sentence cut mid-word."""
    from smptrain.export.onnx import first_sentence

    long = RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that are not factor of "
                        "input size. " + "Please feel free to request support or submit a pull request. " * 8)
    text = first_sentence(long)
    assert len(text) <= 304 and text.endswith(" ...") and text[:-4] == text[:-4].rstrip()
    assert long.args[0].startswith(text[:-4])
    words = text[:-4].split()
    assert all(word in long.args[0].split() for word in words[:-1])


def test_predict_file_is_the_command_as_one_python_call(tmp_path):
    """`smptrain.export.predict.predict_file`: what smptrain-predict computes, as a function: the probabilities of
    `predict_in_patches` on the normalised tile, or the mask above the threshold, written whole to `out`."""
    from smptrain.export.predict import load_converted, normalise, predict_file, predict_in_patches

    converted = converted_file(tmp_path, "Unet", "resnet18")
    raw = np.random.default_rng(0).uniform(0, 3000, (3, 80, 100)).astype(np.float32)
    np.save(tmp_path / "tile.npy", raw)
    done = predict_file(converted, tmp_path / "tile.npy", tmp_path / "probs", patch_size=64, overlap=8)
    model, config = load_converted(converted)
    expected = predict_in_patches(model, normalise(raw, config["bands"])[None], 64, 8)[0].numpy()
    assert done.path == tmp_path / "probs" and done.shape == (80, 100) and not done.binarized
    np.testing.assert_array_equal(np.load(tmp_path / "probs"), expected)  # no ".npy" added to the name given
    mask = predict_file(converted, tmp_path / "tile.npy", tmp_path / "mask.npy", patch_size=64, overlap=8,
                        binarize=True, threshold=0.4)
    assert mask.threshold == 0.4 and np.load(tmp_path / "mask.npy").dtype == np.uint8
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), (expected > 0.4).astype(np.uint8))
    assert mask.positive_share == pytest.approx(float((expected > 0.4).mean()))
    assert not list(tmp_path.glob(".*.tmp"))
