"""A scene of any size predicted as `predict_in_patches` predicts an array, in stripes: the memory it takes does not
grow with the scene.

DARTS' patch grid is laid over the whole (reflect-padded) scene, its patches taken in DARTS' order and batched as
DARTS batches them (which the NaN rule depends on), and each pixel's probability blended from the patches that cover
it in the same order, so the probabilities equal `predict_in_patches` on the whole array, bit for bit. Only the
input rows of the patch rows a batch touches are read, and a row of probabilities is handed on (`emit`) as soon as
no later patch covers it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smptrain.core.errors import UserError
from smptrain.core.storage import replacing
from smptrain.data.grid import patch_origins
from smptrain.evaluation.tta import averaged
from smptrain.export.predict import soft_margin

CACHE_MB = 128  # GDAL's block cache while a scene is read and written (its default, 5 % of the RAM, grows with it)


def reflected(indices: np.ndarray, size: int) -> np.ndarray:
    """Index of the scene pixel a padded index shows under torch's reflect padding (the edge not repeated)."""
    indices = np.abs(indices)
    return np.where(indices >= size, 2 * (size - 1) - indices, indices)


@dataclass
class Stripes:
    """The scene's input, read by padded rows and normalised (`prepare`: raw (C, h, W) -> tensor, NaN kept)."""

    read_rows: object  # (first, end) scene rows -> float32 (C, end - first, W) raw values, NaN where no data
    height: int
    width: int
    pad: int
    prepare: object

    def padded(self, top: int, rows: int) -> torch.Tensor:
        """Padded rows [top, top + rows) of the padded scene, every padded column: the rows read copied once into
        the padded stripe (a slice where no row is reflected), the reflected columns filled from it."""
        scene_rows = reflected(np.arange(top, top + rows) - self.pad, self.height)
        first, end = int(scene_rows.min()), int(scene_rows.max()) + 1
        raw = self.read_rows(first, end)
        pad, width = self.pad, self.width
        stripe = np.empty((raw.shape[0], rows, width + 2 * pad), np.float32)
        inner = stripe[:, :, pad:pad + width]
        if np.array_equal(scene_rows, np.arange(first, end)):
            inner[...] = raw
        else:
            np.take(raw, scene_rows - first, axis=1, out=inner)
        stripe[:, :, :pad] = stripe[:, :, 2 * pad:pad:-1]  # reflect: column -k shows column k
        stripe[:, :, pad + width:] = stripe[:, :, pad + width - 2:width - 2:-1]
        return self.prepare(stripe)


@torch.no_grad()
def predict_stripes(model, stripes: Stripes, patch_size: int, overlap: int, emit, batch_size: int = 8,
                    device: str | torch.device = "cpu", tta: str = "none", bar=None) -> None:
    """Probabilities of the whole scene, handed to `emit(first_scene_row, probabilities (rows, W))` top to bottom."""
    raw = getattr(model, "takes_raw", False)
    pad, height, width = stripes.pad, stripes.height + 2 * stripes.pad, stripes.width + 2 * stripes.pad
    if not (height > patch_size > overlap and width > patch_size > overlap):
        raise UserError(f"a padded scene of {height}x{width} needs height and width > patch_size ({patch_size}) > "
                        f"overlap ({overlap})")

    def probabilities_of(batch):
        out = model(batch.to(device))
        return (out if raw else torch.sigmoid(out)).squeeze(1).float().cpu()

    ys, xs = patch_origins(height, patch_size, overlap), patch_origins(width, patch_size, overlap)
    coords = [(y, x) for y in ys for x in xs]  # DARTS' order for one tile: row, column
    margin = soft_margin(patch_size, overlap)
    inputs: dict[int, torch.Tensor] = {}  # the padded rows of each patch row a batch needs
    base, prediction, weights = 0, torch.zeros(0, width), torch.zeros(0, width)
    for start in range(0, len(coords), batch_size):
        chosen = coords[start:start + batch_size]
        for y in dict.fromkeys(y for y, _ in chosen):
            if y not in inputs:
                inputs[y] = stripes.padded(y, patch_size)
        batch = torch.stack([inputs[y][:, :, x:x + patch_size] for y, x in chosen])
        if torch.isnan(batch).all(0).any():
            probs = torch.zeros(len(chosen), patch_size, patch_size)
        else:
            batch = batch if raw else torch.nan_to_num(batch, nan=0.0)
            probs = averaged(probabilities_of, batch, tta) if tta != "none" else probabilities_of(batch)
        end = max(y for y, _ in chosen) + patch_size
        if end - base > len(prediction):  # rows further down than the buffer holds
            grow = end - base - len(prediction)
            prediction, weights = torch.cat([prediction, torch.zeros(grow, width)]), torch.cat([weights, torch.zeros(grow, width)])
        for (y, x), p in zip(chosen, probs):
            prediction[y - base:y - base + patch_size, x:x + patch_size] += p * margin
            weights[y - base:y - base + patch_size, x:x + patch_size] += margin
        following = coords[start + batch_size][0] if start + batch_size < len(coords) else height
        done = following - base  # no later patch starts above `following`: the rows above it are final
        if done > 0:
            rows = prediction[:done] / torch.where(weights[:done] == 0, torch.ones_like(weights[:done]), weights[:done])
            first, last = max(base, pad), min(base + done, height - pad)
            if last > first:
                emit(first - pad, rows[first - base:last - base, pad:width - pad].numpy())
            prediction, weights, base = prediction[done:].clone(), weights[done:].clone(), following
            for y in [y for y in inputs if y < following]:
                del inputs[y]
        if bar is not None:
            bar.update(len(chosen))


@dataclass(frozen=True)
class PredictedScene:
    """What `predict_scene` wrote."""

    probabilities: Path
    mask: Path | None
    polygons: Path | None
    shape: tuple[int, int]
    bands: list[str]
    threshold: float
    tta: str
    patch_size: int
    outlines: int  # polygons written (0 without --polygons)
    positive_share: float  # of the pixels with data, above the threshold


def scene_bands(source, wanted: list[str], path) -> list[int]:
    """The scene's band indices (1-based) of the model's bands: by name where the scene names them all, else in
    order when the count matches."""
    names = [d or "" for d in source.descriptions]
    if all(name in names for name in wanted):
        return [names.index(name) + 1 for name in wanted]
    if source.count == len(wanted):
        return list(range(1, source.count + 1))
    named = ", ".join(n for n in names if n) or "none"
    raise UserError(f"{path} has {source.count} band(s) (named: {named}) but the model takes {len(wanted)}: "
                    f"{', '.join(wanted)}; give a scene with those bands, named or in that order")


def predict_scene(model_path, scene, out, *, onnx: bool = False, mask: str | None = None, polygons: str | None = None,
                  patch_size: int | None = None, overlap: int = 16, batch_size: int = 8, reflection: int = 0,
                  tta: str | None = None, threshold: float | None = None, stored: bool = False, say=print) -> PredictedScene:
    """Predict a GeoTIFF scene (any size, any raster GDAL reads) with a converted file (or, `onnx`, an exported
    ONNX file) and write `out`: a float32 GeoTIFF of probabilities on the scene's CRS and grid (NaN where the scene
    has no data); with `mask`, a uint8 GeoTIFF (1 above the threshold, 255 where there is no data); with
    `polygons`, a GeoPackage of the mask's outlines, each with its area and mean probability. The scene is read and
    the results written in stripes; the probabilities are those `predict_in_patches` computes on the whole array.
    Bands are matched to the model's by name where the scene names them."""
    from smptrain.core.progress import progress
    from smptrain.data.rasters import require_imagery
    from smptrain.export.outlines import Outlines
    from smptrain.export.predict import check_patches, choose_patch_size, open_model

    rasterio = require_imagery()
    model, config, device, tta, threshold = open_model(model_path, onnx, tta, threshold, stored)
    wanted = config["input_bands"] if onnx else config["bands"]["bands"]
    try:
        source = rasterio.open(scene, NUM_THREADS="ALL_CPUS")  # GDAL decodes a window's blocks in parallel
    except rasterio.errors.RasterioIOError as error:
        raise UserError(f"{scene} is not a raster GDAL can read: {str(error).splitlines()[0][:200]}") from None
    with source, rasterio.Env(GDAL_CACHEMAX=CACHE_MB):
        indices = scene_bands(source, wanted, scene)
        height, width = source.height, source.width
        patch_size = choose_patch_size(patch_size or config.get("fixed_size"), config, (height, width), overlap,
                                       reflection, str(scene), say)
        check_patches(model, config, len(wanted), patch_size, str(model_path))
        prepare = raw_tensor if onnx else normaliser(config["bands"])
        reader = SceneReader(source, indices)
        stripes = Stripes(reader.rows, height, width, 1 + reflection, prepare)
        outlines = Outlines(source.transform, source.crs) if polygons else None
        with contextlib.ExitStack() as stack:  # each file written whole under a temporary name, or not at all
            targets = [stack.enter_context(replacing(Path(out)))]
            if mask:
                targets.append(stack.enter_context(replacing(Path(mask))))
            writers = stack.enter_context(Writers(source, *targets, threshold=threshold))
            ys = patch_origins(height + 2 * stripes.pad, patch_size, overlap)
            xs = patch_origins(width + 2 * stripes.pad, patch_size, overlap)
            with progress(len(ys) * len(xs), f"predicting {Path(scene).name}", unit="patch") as bar:
                predict_stripes(model, stripes, patch_size, overlap,
                                lambda first, rows: writers.write(first, rows, reader, outlines),
                                batch_size, device, tta, bar)
        written = outlines.write(polygons) if outlines is not None else 0
    return PredictedScene(Path(out), Path(mask) if mask else None, Path(polygons) if polygons else None,
                          (height, width), list(wanted), threshold, tta, patch_size, written,
                          writers.positive / max(writers.valid, 1))


class SceneReader:
    """Rows of a scene's bands as float32, NaN where there is no data, and which pixels have data in any band (kept
    for the rows not yet written). With no-data values (the usual GeoTIFF), validity comes from the values read;
    GDAL's masks (an alpha band, an internal mask) are read only where a file has them."""

    def __init__(self, source, indices: list[int]):
        from rasterio.enums import MaskFlags

        self.source, self.indices = source, indices
        flags = [source.mask_flag_enums[i - 1] for i in indices]
        self.by_value = all(set(f) <= {MaskFlags.nodata, MaskFlags.all_valid} for f in flags)
        self.nodata = [source.nodatavals[i - 1] for i in indices]
        self.valid: dict[int, np.ndarray] = {}

    def rows(self, first: int, end: int) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(0, first, self.source.width, end - first)
        values = self.source.read(self.indices, window=window, out_dtype=np.float32)
        if self.by_value:
            for band, nodata in zip(values, self.nodata):
                if nodata is not None and not np.isnan(nodata):
                    np.copyto(band, np.float32(np.nan), where=band == np.float32(nodata))
        else:
            values[self.source.read_masks(self.indices, window=window) == 0] = np.nan
        has_data = ~np.logical_and.reduce(np.isnan(values), axis=0)
        for row in range(first, end):
            self.valid[row] = has_data[row - first]
        return values

    def has_data(self, first: int, end: int) -> np.ndarray:
        """Which pixels of rows [first, end) have data (rows already read; forgotten once asked for)."""
        missing = [row for row in range(first, end) if row not in self.valid]
        if missing:
            self.rows(min(missing), max(missing) + 1)
        return np.stack([self.valid.pop(row) for row in range(first, end)])


def normaliser(bands: dict):
    """raw (C, h, w) float32 -> the model's input, in place (the stripe is the function's own): NaN stays NaN, as in
    `normalise`."""
    factors = np.asarray(bands["band_factors"], np.float32)[:, None, None]
    offsets = np.asarray(bands["band_offsets"], np.float32)[:, None, None]

    def normalise(raw: np.ndarray) -> torch.Tensor:
        np.multiply(raw, factors, out=raw)
        np.add(raw, offsets, out=raw)
        return torch.from_numpy(np.clip(raw, 0, 1, out=raw))

    return normalise


def raw_tensor(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw)  # an ONNX file normalises (and zeroes NaN) itself


class Writers:
    """The probability GeoTIFF and, with a second path, the mask GeoTIFF, written stripe by stripe on the scene's
    grid (tiled, deflate); a context manager that closes them."""

    def __init__(self, source, probabilities: Path, mask: Path | None = None, *, threshold: float):
        import rasterio

        self.threshold = threshold
        profile = {"driver": "GTiff", "width": source.width, "height": source.height, "count": 1,
                   "crs": source.crs, "transform": source.transform, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate",
                   "num_threads": "ALL_CPUS"}  # GDAL compresses blocks in threads of its own, beside the model
        self.probabilities = rasterio.open(probabilities, "w", **profile, dtype="float32", nodata=float("nan"))
        self.mask = rasterio.open(mask, "w", **profile, dtype="uint8", nodata=255) if mask is not None else None
        self.positive = self.valid = 0

    def write(self, first: int, rows: np.ndarray, reader: SceneReader, outlines) -> None:
        from rasterio.windows import Window

        window = Window(0, first, rows.shape[1], rows.shape[0])
        has_data = reader.has_data(first, first + rows.shape[0])
        self.probabilities.write(np.where(has_data, rows, np.float32(np.nan)), 1, window=window)
        above = (rows > self.threshold) & has_data
        self.positive += int(np.count_nonzero(above))
        self.valid += int(np.count_nonzero(has_data))
        if self.mask is not None:
            self.mask.write(np.where(has_data, above.view(np.uint8), np.uint8(255)), 1, window=window)
        if outlines is not None:
            outlines.add(first, above, rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in (self.probabilities, self.mask):
            if handle is not None:
                handle.close()
