"""A small, learnable dataset in the DARTS layout: the built-in default the demo trains on.

Each patch is a smooth multi-band landscape (blue, green, red, nir, ndvi, relative_elevation, slope) whose
statistics depend on its region. Thaw-slump-like objects are irregular blobs that change several bands jointly:
brighter bare soil, lower nir and ndvi, a depression in relative elevation and a steep rim in slope. Look-alike
distractors copy part of that signature (bright bare rock without a depression, dark lakes without a rim), so a
model has to combine bands. Some patches have no object; some have cloud-like invalid areas, labelled 2 and
zeroed in x like DARTS' NaN handling. The metadata rows are stored shuffled, as nothing in the layout promises order.

Usage: `smptrain-demo-data DIR [--patches N] [--patch-size P] [--seed S]`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from smptrain.core.labels import IGNORE, POSITIVE

BANDS = ("blue", "green", "red", "nir", "ndvi", "relative_elevation", "slope")
FACTORS = (1 / 3000, 1 / 3000, 1 / 3000, 1 / 3000, 1 / 20000, 1 / 30000, 1 / 90)
OFFSETS = (0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0)
REGIONS = ("Banks Island", "Herschel Island", "Yamal", "Lena Delta")


def _blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """An irregular, slump-like boolean mask: a few overlapping smoothed ellipses."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(radius, size - radius, 2)
    field = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(2, 5)):
        oy, ox = rng.normal(0, radius * 0.45, 2)
        ry, rx = radius * rng.uniform(0.5, 1.0, 2)
        field += np.exp(-(((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2))
    field += gaussian_filter(rng.normal(0, 0.35, (size, size)).astype(np.float32), 2)
    return field > 0.8


def make_patch(rng: np.random.Generator, size: int, region: int, slump_share: float = 0.55):
    """One patch: x float32 [C, size, size] in [0, 1], y uint8 [size, size] in {0, 1, 2}, and whether it has a slump
    (drawn with probability `slump_share`)."""
    from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

    base = np.array([0.25, 0.3, 0.3, 0.5, 0.65, 0.5, 0.1], np.float32) + 0.05 * (region - 1.5) * np.array(
        [1, 1, 1, -1, -1, 0, 0], np.float32)
    x = np.stack([b + gaussian_filter(rng.normal(0, 0.12, (size, size)), 6) for b in base]).astype(np.float32)
    y = np.zeros((size, size), np.uint8)
    radius = size / 8
    has_slump = rng.random() < slump_share
    for _ in range(rng.integers(1, 3) if has_slump else 0):
        mask = _blob(rng, size, radius * rng.uniform(0.8, 1.4))
        rim = binary_dilation(mask, iterations=2) & ~binary_erosion(mask, iterations=2)
        x[0:3, mask] += 0.15
        x[3, mask] -= 0.12
        x[4, mask] -= 0.25
        x[5, mask] -= 0.18
        x[6, rim] += 0.35
        y[mask] = POSITIVE
    for _ in range(rng.integers(0, 3)):  # distractors: bare rock (bright, flat) or lakes (dark, flat)
        mask = _blob(rng, size, radius * rng.uniform(0.7, 1.3)) & (y == 0)
        if rng.random() < 0.5:
            x[0:3, mask] += 0.15
            x[4, mask] -= 0.2
        else:
            x[0:4, mask] -= 0.12
            x[4, mask] -= 0.2
    x += rng.normal(0, 0.02, x.shape).astype(np.float32)
    x = np.clip(x, 0, 1)
    if rng.random() < 0.25:  # a cloud: invalid pixels are ignored (2) and zeroed in x
        cloud = _blob(rng, size, radius * 1.5)
        y[cloud] = IGNORE
        x[:, cloud] = 0
    return x, y, bool((y == POSITIVE).any())


def make_demo(out: str | Path, patches: int = 192, patch_size: int = 64, seed: int = 0, slump_share: float = 0.55) -> Path:
    """Write the demo dataset to `out` (data.zarr, metadata.parquet, config.toml) and return its path. `slump_share`:
    the share of patches drawn with slumps (a drawn slump can still fall under a cloud)."""
    import pandas as pd
    import zarr
    from zarr.codecs import BloscCodec

    out = Path(out)
    rng = np.random.default_rng(seed)
    xs, ys, rows = [], [], []
    for i in range(patches):
        region = i * len(REGIONS) // patches
        x, y, positive = make_patch(rng, patch_size, region, slump_share)
        xs.append(x)
        ys.append(y)
        rows.append({
            "sample_id": f"{REGIONS[region].split()[0].lower()}-{(i * 12 // patches) % 3}",
            "region": REGIONS[region],
            "empty": not positive,
            "patch_id": i % 16,
            "x": (i % 4) * patch_size,
            "y": (i // 4 % 4) * patch_size,
        })
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    group = zarr.open_group(str(tmp / "data.zarr"), mode="w", zarr_format=3)
    codec = BloscCodec(cname="lz4", clevel=9)
    # DARTS chunks: one chunk per sample and band
    xa = group.create_array("x", shape=(patches, len(BANDS), patch_size, patch_size), dtype="float32",
                            chunks=(1, 1, patch_size, patch_size), compressors=codec)
    ya = group.create_array("y", shape=(patches, patch_size, patch_size), dtype="uint8",
                            chunks=(1, patch_size, patch_size), compressors=codec)
    xa[:] = np.stack(xs)
    ya[:] = np.stack(ys)
    metadata = pd.DataFrame(rows)
    metadata = metadata.iloc[rng.permutation(patches)]  # stored order != zarr order; index labels are zarr rows
    metadata.to_parquet(tmp / "metadata.parquet")
    lines = ["[darts]", f'train_data_dir = "{out}"', f"patch_size = {patch_size}", "overlap = 0",
             f"n_bands = {len(BANDS)}", "exclude_nopositive = false", "exclude_nan = true", "mask_erosion_size = 3",
             f"n_patches = {patches}", "bands = [" + ", ".join(f'"{b}"' for b in BANDS) + "]",
             "band_factors = [" + ", ".join(repr(f) for f in FACTORS) + "]",
             "band_offsets = [" + ", ".join(repr(o) for o in OFFSETS) + "]", ""]
    (tmp / "config.toml").write_text("\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_imagery(out: str | Path, scenes: int = 8, seed: int = 0) -> Path:
    """Imagery as a researcher holds it, for `smptrain-import`: GeoTIFF scenes of mixed sizes in
    `scenes/REGION/scene_NN.tif` (blue, green, red and nir as float32 surface reflectance, the band names in the
    file, UTM zone 8N at 3 m, a no-data strip along an edge of some), the slumps' outlines in `outlines.gpkg` (WGS 84, as outlines are
    often kept), the same as hand-drawn masks `masks/scene_NN.png` (0 and 255), and `heldout.txt` naming the scenes
    of the last region. Needs the imagery extra."""
    import pyogrio
    import rasterio
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import from_origin
    from rasterio.warp import transform_geom

    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    outlines, heldout = [], []
    for index in range(scenes):
        region = index * len(REGIONS) // scenes
        height, width = (int(v) for v in rng.integers(100, 180, 2))
        x, y, _ = make_patch(rng, max(height, width), region)
        x, y = x[:4, :height, :width], y[:height, :width]
        raw = (x * 0.6 - 0.1).astype(np.float32)  # reflectance in DARTS' valid range of these bands, [-0.1, 0.5]
        if index % 3 == 1:
            raw[:, :, :6] = -9999  # no data along the west edge
        transform = from_origin(500_000 + 10_000 * index, 7_600_000, 3.0, 3.0)
        folder = out / "scenes" / REGIONS[region].split()[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        name = f"scene_{index:02d}"
        with rasterio.open(folder / f"{name}.tif", "w", driver="GTiff", width=width, height=height, count=4,
                           dtype="float32", crs="EPSG:32608", transform=transform, nodata=-9999) as scene:
            scene.write(raw)
            scene.descriptions = BANDS[:4]
        positive = (y == POSITIVE).astype(np.uint8)
        with warnings.catch_warnings():  # a PNG has no georeference, as hand-drawn masks have none
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(out / "masks" / f"{name}.png", "w", driver="PNG", width=width, height=height, count=1,
                               dtype="uint8") as mask:
                mask.write(positive * 255, 1)
        for geometry, _ in shapes(positive, mask=positive > 0, transform=transform):
            outlines.append(shapely.geometry.shape(transform_geom("EPSG:32608", "EPSG:4326", geometry)))
        if region == len(REGIONS) - 1:
            heldout.append(name)
    pyogrio.raw.write(str(out / "outlines.gpkg"), np.array([shapely.to_wkb(g) for g in outlines], dtype=object), [],
                      fields=[], driver="GPKG", geometry_type="Polygon", crs="EPSG:4326")
    (out / "heldout.txt").write_text("".join(f"{name}\n" for name in heldout))
    return out
