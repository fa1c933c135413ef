"""ONNX export: the model with everything DARTS' pipeline does around it, for onnxruntime, QGIS (Deepness) and
machines without PyTorch.

    smptrain-convert RUN --out-dir DIR --name NAME --format onnx      ->  DIR/NAME_YYYY-MM-DD.onnx

The graph takes the **raw band values** (N, C, H, W) in the input band order written in its metadata (the
dataset's bands when the run's dataset is reachable, else the model's), and computes what `SMPSegmenter` does:
band selection, `clip(raw * factor + offset, 0, 1)`, NaN to 0, the network, and a sigmoid: probabilities
(N, 1, H, W). Batch, height and width are dynamic (within the architecture's patch multiple). After export the
file is run in onnxruntime on random raw inputs of two sizes and compared with PyTorch; a difference above
`TOLERANCE` removes it and fails.

Metadata (`metadata_props`): `smptrain` (JSON: bands, factors, offsets, input bands, patch size, threshold, run id
and name, model), and the keys the Deepness plugin reads: `model_type` = Segmentor, `class_names`, `tiles_size`,
`tiles_overlap` (percent), `seg_thresh`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from smptrain.errors import UserError
from smptrain.model import described_model
from smptrain.storage import replacing

OPSET = 17  # onnxruntime 1.16 and later run it; the TorchScript exporter's most tested opset
TOLERANCE = 1e-4
OVERLAP_PERCENT = 25  # DARTS' inference default: 256 pixels of 1024


class RawToProbabilities(torch.nn.Module):
    """Raw bands in the input order -> the model's bands, normalised and clipped, NaN as 0 -> sigmoid(network)."""

    def __init__(self, network: torch.nn.Module, select: list[int], factors: list[float], offsets: list[float]):
        super().__init__()
        self.network = network
        self.register_buffer("select", torch.tensor(select, dtype=torch.int64))
        self.register_buffer("factors", torch.tensor(factors, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = torch.index_select(raw, 1, self.select)
        x = torch.clamp(x * self.factors + self.offsets, 0.0, 1.0)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        return torch.sigmoid(self.network(x))


def require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'smptrain[onnx]'") from None
    return onnx, onnxruntime


def wrapped(model: dict, bands: dict, state: dict, input_bands: list[str], source: str) -> RawToProbabilities:
    network = described_model(model, state, source).eval()
    missing = [b for b in bands["bands"] if b not in input_bands]
    if missing:
        raise UserError(f"{source}: the model's bands {missing} are not among the input bands {input_bands}")
    select = [input_bands.index(b) for b in bands["bands"]]
    return RawToProbabilities(network, select, bands["band_factors"], bands["band_offsets"]).eval()


def export_onnx(model: dict, bands: dict, state: dict, extra: dict, target: Path) -> float:
    """Write `target` (through a temporary beside it) and return the self-check's largest difference."""
    onnx, onnxruntime = require_onnx()
    input_bands = list(extra.get("input_bands") or bands["bands"])
    module = wrapped(model, bands, state, input_bands, str(target))
    patch = int(extra.get("patch_size") or 256)
    with replacing(target) as tmp:  # whole, checked, or not at all
        export_graph(module, len(input_bands), patch, str(tmp), model)
        graph = onnx.load(str(tmp))
        for key, value in metadata(model, bands, input_bands, extra, patch).items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        difference = self_check(module, str(tmp), len(input_bands), patch, onnxruntime)
        if not difference <= TOLERANCE:
            raise UserError(f"self-check failed: onnxruntime's probabilities differ from PyTorch's by {difference:.3g} "
                            f"(> {TOLERANCE}); nothing was written")
    return difference


def export_graph(module: torch.nn.Module, channels: int, patch: int, path: str, model: dict) -> None:
    """torch.onnx's TorchScript exporter with dynamic batch, height and width (the dynamo exporter takes ten
    times as long for the same graph, measured on a 2-core AVX2 CPU)."""
    example = torch.rand(1, channels, patch, patch)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), path, input_names=["raw"], output_names=["probabilities"],
                              dynamic_axes={"raw": axes, "probabilities": axes}, opset_version=OPSET, dynamo=False)
    except Exception as error:  # an operator the exporter does not know, a shape it cannot trace
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"model.arch = {model['arch']!r} with model.encoder = {model['encoder_name']!r} cannot be "
                        f"exported to ONNX: {reason}") from None


def metadata(model: dict, bands: dict, input_bands: list[str], extra: dict, patch: int) -> dict[str, str]:
    threshold = float(extra.get("threshold", 0.5))
    description = {"model": {k: model[k] for k in ("arch", "encoder_name", "in_channels", "classes")},
                   "bands": bands["bands"], "band_factors": bands["band_factors"],
                   "band_offsets": bands["band_offsets"], "input_bands": input_bands, "patch_size": patch,
                   "threshold": threshold, "run_id": extra.get("run_id"), "run_name": extra.get("run_name"),
                   "name": extra.get("name"), "output": "probabilities (N, 1, H, W) of the positive class"}
    return {"smptrain": json.dumps(description), "model_type": "Segmentor",
            "class_names": json.dumps({0: extra.get("name") or "positive"}), "tiles_size": str(patch),
            "tiles_overlap": str(OVERLAP_PERCENT), "seg_thresh": str(threshold)}


def self_check(module: torch.nn.Module, path: str, channels: int, patch: int, onnxruntime) -> float:
    """Largest |probability difference| between PyTorch and onnxruntime on random raw inputs (with NaNs and values
    beyond the clip range) at the patch size and at one patch multiple more."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, size in ((2, patch), (1, patch // 2 if patch >= 128 else patch * 2)):
        raw = torch.rand(batch, channels, size, size, generator=generator) * 1000
        # the model's bands on their own scale, normalised to [-1, 2]: inside and beyond the clip range
        normalised = torch.rand(batch, len(module.select), size, size, generator=generator) * 3 - 1
        raw[:, module.select] = (normalised - module.offsets) / module.factors
        raw[0, int(module.select[0]), :2, :2] = float("nan")
        with torch.no_grad():
            expected = module(raw).numpy()
        got = session.run(None, {"raw": raw.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def load_onnx(path: Path):
    """(onnxruntime session, smptrain's description) of an exported file."""
    _, onnxruntime = require_onnx()
    if not Path(path).is_file():
        raise UserError(f"ONNX file {path} does not exist")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise UserError(f"{path} cannot be opened by onnxruntime: {str(error).splitlines()[0][:200]}") from None
    props = session.get_modelmeta().custom_metadata_map
    if "smptrain" not in props:
        raise UserError(f"{path} has no smptrain metadata (export it with smptrain-convert --format onnx)")
    return session, json.loads(props["smptrain"])
