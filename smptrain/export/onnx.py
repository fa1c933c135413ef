"""ONNX export: the model with everything DARTS' pipeline does around it, for QGIS (the Deepness plugin),
onnxruntime and machines without PyTorch.

    smptrain-convert RUN --out-dir DIR --name NAME --format onnx          ->  DIR/NAME_YYYY-MM-DD.onnx
    smptrain-convert RUN --out-dir DIR --name NAME --format onnx-dynamic  ->  the same, any height and width

The graph takes the **raw band values** (N, C, H, W) in the input band order written in its metadata (the
dataset's bands when the run's dataset is reachable, else the model's), and computes what `SMPSegmenter` does:
band selection, `clip(raw * factor + offset, 0, 1)`, NaN to 0, the network, and a sigmoid: probabilities
(N, 1, H, W). `onnx` (for Deepness, which takes the tile size from the input's shape and allows only the batch to
vary) fixes height and width to the run's patch size; `onnx-dynamic` (for onnxruntime users who predict other
sizes) leaves them free within the architecture's patch multiple. After export the file is run in onnxruntime on
random raw inputs and compared with PyTorch; a difference above `TOLERANCE` removes it and fails. An architecture
that cannot be exported is refused in one sentence before anything is written (see `refusal`).

Metadata (`metadata_props`): `smptrain` (JSON: bands, factors, offsets, input bands, patch size, threshold, run id
and name, model), and the keys the Deepness plugin reads, each JSON as it parses them: `model_type` ("Segmentor"),
`class_names`, `tile_size` (and `tiles_size`, the name in its documentation), `tiles_overlap` (percent),
`seg_thresh`, `standardization_mean` and `standardization_std` (0 and 1/255 for every input band: Deepness divides
the raster's values by 255 and then standardises, which these undo, so the graph gets the raw values it expects),
and `resolution` (cm per pixel) when it is known.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from smptrain.core.errors import UserError
from smptrain.core.storage import replacing
from smptrain.model.network import described_model

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


def export_onnx(model: dict, bands: dict, state: dict, extra: dict, target: Path, dynamic: bool = False) -> float:
    """Write `target` (through a temporary beside it) and return the self-check's largest difference. Height and
    width are the patch size's, or free with `dynamic`."""
    onnx, onnxruntime = require_onnx()
    input_bands = list(extra.get("input_bands") or bands["bands"])
    module = wrapped(model, bands, state, input_bands, str(target))
    patch = int(extra.get("patch_size") or 256)
    reason = refusal(module.network, model, patch, dynamic)
    if reason:
        raise UserError(f"model.arch = {model['arch']!r} with model.encoder = {model['encoder_name']!r} cannot be "
                        f"exported to ONNX: {reason}; nothing was written")
    if not dynamic:
        fixed_pooling(module.network)
    with replacing(target) as tmp:  # whole, checked, or not at all
        export_graph(module, len(input_bands), patch, str(tmp), model, dynamic)
        graph = onnx.load(str(tmp))
        for key, value in metadata(model, bands, input_bands, extra, patch).items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        difference = self_check(module, str(tmp), len(input_bands), patch, onnxruntime, dynamic)
        if not difference <= TOLERANCE:
            raise UserError(f"self-check failed: onnxruntime's probabilities differ from PyTorch's by {difference:.3g} "
                            f"(> {TOLERANCE}); nothing was written")
    return difference


class FixedAdaptiveAvgPool(torch.nn.Module):
    """`AdaptiveAvgPool2d` written as the means of its bins, for a graph of fixed height and width: the exporter
    refuses the adaptive operator when the bins do not divide the feature map (UPerNet's pyramid pooling at most
    patch sizes). Same bins as PyTorch's (start floor(i * n / k), end ceil((i + 1) * n / k)), so the same values."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])  # constants of a fixed-size graph
        oh, ow = (size if size is not None else full for size, full in zip(self.output_size, (h, w)))
        rows = []
        for i in range(oh):
            top, bottom = i * h // oh, -(-(i + 1) * h // oh)
            rows.append(torch.cat([x[..., top:bottom, j * w // ow:-(-(j + 1) * w // ow)].mean(dim=(-2, -1), keepdim=True)
                                   for j in range(ow)], -1))
        return torch.cat(rows, -2)


def pools(network: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.AdaptiveAvgPool2d]]:
    """Every adaptive average pooling with more than one bin: (parent, attribute, module). One bin is a mean, which
    every size exports."""
    found = []
    for parent in network.modules():
        for name, child in parent.named_children():
            size = getattr(child, "output_size", None)
            if isinstance(child, torch.nn.AdaptiveAvgPool2d) and size not in (1, (1, 1)):
                found.append((parent, name, child))
    return found


def fixed_pooling(network: torch.nn.Module) -> None:
    for parent, name, child in pools(network):
        setattr(parent, name, FixedAdaptiveAvgPool(child.output_size))


def refusal(network: torch.nn.Module, model: dict, patch: int, dynamic: bool) -> str | None:
    """Why this network cannot be exported (before the exporter tries, and prints its graph), or None.

    PSPNet's pyramid pooling exports, through smp's own ONNX path, only when its 1, 2, 3 and 6 bins divide the
    feature map; with `dynamic`, any pyramid pooling (PSPNet, UPerNet) would be fixed to the example's size."""
    if dynamic and pools(network):
        return ("its pyramid pooling needs a fixed height and width; use --format onnx (the run's patch size, what "
                "Deepness takes)")
    if model["arch"].lower() == "pspnet":
        with torch.no_grad():
            side = network.encoder(torch.zeros(1, int(model["in_channels"]), patch, patch))[-1].shape[-1]
        if side % 6:
            return (f"PSPNet's pyramid pooling exports only when its bins (1, 2, 3 and 6) divide the {side} x {side} "
                    f"feature map of a {patch} px patch: train it on patches that are a multiple of "
                    f"{patch // side * 6} px")
    return None


def export_graph(module: torch.nn.Module, channels: int, patch: int, path: str, model: dict, dynamic: bool) -> None:
    """torch.onnx's TorchScript exporter (the dynamo exporter takes ten times as long for the same graph, measured
    on a 2-core AVX2 CPU), batch dynamic and, with `dynamic`, height and width too. What the exporter prints (its
    whole graph, when an operator fails) goes nowhere: a failure is one sentence."""
    example = torch.rand(1, channels, patch, patch)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    try:
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), path, input_names=["raw"], output_names=["probabilities"],
                              dynamic_axes={"raw": axes, "probabilities": axes}, opset_version=OPSET, dynamo=False)
    except Exception as error:  # an operator the exporter does not know, a shape it cannot trace
        raise UserError(f"model.arch = {model['arch']!r} with model.encoder = {model['encoder_name']!r} cannot be "
                        f"exported to ONNX: {first_sentence(error)}") from None


@contextlib.contextmanager
def quiet():
    """Standard output and error of this process (file descriptors 1 and 2, C++ included) to /dev/null."""
    saved = [os.dup(fd) for fd in (1, 2)]
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


def first_sentence(error: Exception, limit: int = 300) -> str:
    """The first line of an error, cut at a word (never inside one) when it is long."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def metadata(model: dict, bands: dict, input_bands: list[str], extra: dict, patch: int) -> dict[str, str]:
    """The file's metadata, every value JSON (Deepness parses each one with `json.loads`)."""
    threshold = float(extra.get("threshold", 0.5))
    description = {"model": {k: model[k] for k in ("arch", "encoder_name", "in_channels", "classes")},
                   "bands": bands["bands"], "band_factors": bands["band_factors"],
                   "band_offsets": bands["band_offsets"], "input_bands": input_bands, "patch_size": patch,
                   "threshold": threshold, "run_id": extra.get("run_id"), "run_name": extra.get("run_name"),
                   "name": extra.get("name"), "output": "probabilities (N, 1, H, W) of the positive class"}
    props = {"smptrain": description, "model_type": "Segmentor", "class_names": {"0": extra.get("name") or "positive"},
             "tile_size": patch, "tiles_size": patch, "tiles_overlap": OVERLAP_PERCENT, "seg_thresh": threshold,
             "standardization_mean": [0.0] * len(input_bands), "standardization_std": [1 / 255] * len(input_bands)}
    if extra.get("resolution"):
        props["resolution"] = float(extra["resolution"])
    return {key: json.dumps(value) for key, value in props.items()}


def self_check(module: torch.nn.Module, path: str, channels: int, patch: int, onnxruntime, dynamic: bool) -> float:
    """Largest |probability difference| between PyTorch and onnxruntime on random raw inputs (with NaNs and values
    beyond the clip range) at the patch size, and (dynamic) at one patch multiple more or less."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    sizes = ((2, patch), (1, patch // 2 if patch >= 128 else patch * 2)) if dynamic else ((2, patch),)
    for batch, size in sizes:
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
