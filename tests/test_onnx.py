"""ONNX export: raw bands in, probabilities out, checked in onnxruntime against the DARTS `SMPSegmenter`-style
computation (normalise, network, sigmoid), and smptrain-predict --onnx against smptrain-predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run

from smptrain.core.errors import UserError

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

BANDS7 = ["blue", "green", "red", "nir", "ndvi", "relative_elevation", "slope"]
FACTORS7 = [1 / 3000, 1 / 3000, 1 / 3000, 1 / 3000, 1 / 20000, 1 / 30000, 1 / 90]
OFFSETS7 = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0]


def segmenter_probabilities(network, raw: torch.Tensor, bands: dict) -> np.ndarray:
    """What DARTS' SMPSegmenter computes from raw values: normalise and clip, NaN to 0, the network, a sigmoid."""
    from smptrain.export.predict import normalise

    x = torch.stack([normalise(tile, bands) for tile in raw])
    with torch.no_grad():
        return torch.sigmoid(network(torch.nan_to_num(x, nan=0.0))).numpy()


@pytest.mark.parametrize("arch, encoder", [("Unet", "resnet18"), ("UnetPlusPlus", "efficientnet-b0"),
                                           ("DeepLabV3Plus", "resnet34")])
@pytest.mark.parametrize("count", [7, 3])
def test_the_onnx_file_computes_what_the_darts_segmenter_computes(tmp_path, arch, encoder, count):
    import onnxruntime

    from smptrain.export.onnx import export_onnx
    from smptrain.model.network import described_model

    model = {"arch": arch, "encoder_name": encoder, "in_channels": count, "classes": 1}
    torch.manual_seed(0)
    network = described_model(model, None, "test").eval()
    bands = {"bands": BANDS7[-count:], "band_factors": FACTORS7[-count:], "band_offsets": OFFSETS7[-count:]}
    target = tmp_path / "m.onnx"
    difference = export_onnx(model, bands, network.state_dict(), {"patch_size": 64, "threshold": 0.4,
                                                                    "input_bands": BANDS7, "name": "rts"}, target,
                             dynamic=True)  # onnx-dynamic: any height and width, for onnxruntime
    assert difference <= 1e-4
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["model_type"]) == "Segmentor" and json.loads(props["seg_thresh"]) == 0.4
    assert json.loads(props["tile_size"]) == json.loads(props["tiles_size"]) == 64
    generator = torch.Generator().manual_seed(1)
    for size in (64, 96):
        raw = torch.rand(2, 7, size, size, generator=generator) * 4000  # every dataset band, raw
        raw[1, 6, :3, :3] = float("nan")
        got = session.run(None, {"raw": raw.numpy()})[0]
        expected = segmenter_probabilities(network, raw[:, 7 - count:], bands)
        assert got.shape == (2, 1, size, size)
        assert np.abs(got - expected).max() <= 1e-4


def test_convert_to_onnx_and_predict_through_onnxruntime_as_through_pytorch(trained_run, tmp_path):
    converted = run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts"], check=True)
    exported = run(["smptrain-convert", str(trained_run), "--out-dir", str(tmp_path), "--name", "rts",
                    "--format", "onnx"], check=True)
    ckpt = next(tmp_path.glob("rts_*.ckpt"))
    onnx_file = next(tmp_path.glob("rts_*.onnx"))
    assert "onnxruntime self-check" in exported.stdout and converted.returncode == 0
    tile = np.random.default_rng(0).uniform(0, 3000, size=(7, 150, 170)).astype(np.float32)
    tile[:, :4, :4] = np.nan
    np.save(tmp_path / "tile.npy", tile)
    outputs = {}
    for flags in ([], ["--binarize"]):
        for kind, model in (("torch", [str(ckpt)]), ("onnx", ["--onnx", str(onnx_file)])):
            out = tmp_path / f"{kind}{len(flags)}.npy"
            run(["smptrain-predict", *model, str(tmp_path / "tile.npy"), str(out), "--patch-size", "64", *flags],
                check=True)
            outputs[kind, bool(flags)] = np.load(out)
    probabilities, onnx_probabilities = outputs["torch", False], outputs["onnx", False]
    assert probabilities.shape == onnx_probabilities.shape == (150, 170)
    assert np.abs(probabilities.astype(np.float64) - onnx_probabilities).max() <= 1e-4
    disagree = outputs["torch", True] != outputs["onnx", True]
    assert (np.abs(probabilities[disagree] - 0.5) < 1e-4).all()  # only where a probability sits on the threshold


def test_an_architecture_that_cannot_be_exported_is_one_sentence(tmp_path):
    from smptrain.export.onnx import export_onnx
    from smptrain.model.network import described_model

    model = {"arch": "PSPNet", "encoder_name": "resnet18", "in_channels": 3, "classes": 1}
    network = described_model(model, None, "test")
    bands = {"bands": BANDS7[:3], "band_factors": FACTORS7[:3], "band_offsets": OFFSETS7[:3]}
    with pytest.raises(UserError) as error:
        export_onnx(model, bands, network.state_dict(), {"patch_size": 64}, tmp_path / "p.onnx")
    assert str(error.value).startswith("model.arch = 'PSPNet' with model.encoder = 'resnet18' cannot be exported to ONNX")
    assert list(tmp_path.iterdir()) == []
