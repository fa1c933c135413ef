"""Your own imagery into the DARTS layout (`smptrain-import`): images with masks or polygons, cut into patches that
DARTS' own training code and every smptrain command read unmodified.

- **Images**: rasters GDAL reads (GeoTIFF, PNG, JPEG, ...), every one below a folder or those a list file names (one
  path a line, relative to the list). Their sizes may differ; an image smaller than a patch is padded to one (the
  padding ignored). They must share one CRS, or all have none (then outlines are in pixel coordinates).
- **Labels**, from mask rasters on the images' grids (matched by file stem, `mask_suffix` after it) or from polygons
  burned onto each image (reprojected to its CRS; for images without one, in pixel coordinates and assigned by an
  `image` column); `ignore_polygons` mark pixels ignored. y is 0 (background), 1 (positive) or 2 (ignored).
- **Ignored** besides: an image's nodata (GDAL's masks, NaN, `ignore_band` where non-zero), grown by `erode` pixels
  as DARTS' mask_erosion_size; with overlapping patches (`overlap`, and the last row and column, moved inward), the
  pixels an earlier patch of the image already holds, so that each pixel is scored once (`score_once`).
- **Bands and normalisation** (recorded in config.toml; the model sees clip(raw * factor + offset, 0, 1)): given per
  band, else DARTS' band table for a name it knows (not for 8-bit data), else from the data type (8-bit: 1/255).
- **Region** per image: one value, a folder level (1: its folder's name), or a table's column. A held-out list
  (`heldout`, or a table's column) is written as `heldout.txt`, which `data.split_by = ["@heldout.txt"]` reads.
- **Patches kept**: those with a labelled pixel, and as DARTS' filters say (`min_valid`, `exclude_nan`,
  `exclude_nopositive`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smptrain.core.errors import UserError
from smptrain.core.progress import progress
from smptrain.data.darts_writer import DatasetBuilder
from smptrain.data.grid import patch_origins
from smptrain.data.rasters import (RASTER_SUFFIXES, Image, burn, crs_json, read_image, read_mask, read_polygons,
                                   require_imagery)

HELDOUT = "heldout.txt"  # in the dataset: the sample ids held out, for data.split_by = ["@heldout.txt"]


@dataclass
class Imported:
    """What an import wrote."""

    root: Path
    images: int
    patches: int
    positive_patches: int
    dropped: int  # patches the filters dropped
    bands: list[str]
    factors: list[float]
    offsets: list[float]
    heldout: list[str] = field(default_factory=list)


def import_imagery(out: str | Path, images: str | Path, *, masks: str | Path | None = None, mask_suffix: str = "",
                   polygons: str | Path | None = None, ignore_polygons: str | Path | None = None,
                   positive: float | None = None, threshold: float | None = None, ignore_value: float | None = None,
                   ignore_band: str | None = None, erode: int = 0, patch_size: int = 256, overlap: int = 0,
                   score_once: bool = True, min_valid: float = 0.0, exclude_nan: bool = False,
                   exclude_nopositive: bool = False, bands: list[str] | None = None, band_normalisation: dict | None = None,
                   region: str | None = None, region_level: int | None = None, regions: str | Path | None = None,
                   heldout: str | Path | None = None, heldout_column: str | None = None, append: bool = False,
                   say=print) -> Imported:
    """Import `images` (a folder or a list file) with labels from `masks` or `polygons` into a DARTS dataset at
    `out` (new, or with `append` added to). Everything is checked before the first patch is written, and the dataset
    appears whole or not at all. See the module's description for every option."""
    require_imagery()
    check_options(masks, polygons, patch_size, overlap, min_valid, erode)
    paths = list_images(Path(images))
    table = read_table(Path(regions)) if regions else {}
    regions_of = region_per_image(paths, region, region_level, table, Path(images))
    held = held_out(paths, heldout, heldout_column, table)
    labels = read_polygons(Path(polygons)) if polygons else None
    ignored = read_polygons(Path(ignore_polygons)) if ignore_polygons else None
    first = read_image(paths[0], bands, ignore_band)
    factors, offsets = normalisation(first, band_normalisation or {})
    for warning in narrow(first, factors, offsets):
        say(f"warning: {warning}")
    check_grids(paths, first, bands, ignore_band)
    description = {"bands": first.bands, "band_factors": factors, "band_offsets": offsets, "patch_size": patch_size,
                   "overlap": overlap, "mask_erosion_size": erode, "exclude_nan": exclude_nan,
                   "exclude_nopositive": exclude_nopositive, "min_valid": min_valid, "source": "smptrain-import"}
    builder = DatasetBuilder(out, description, append=append, crs=crs_json("EPSG:4326") if first.crs else None)
    counts = {"patches": 0, "positive": 0, "dropped": 0}
    try:
        with progress(len(paths), "importing", unit="image") as bar:
            for path in paths:
                image = first if path == paths[0] else read_image(path, bands, ignore_band)
                if image.bands != first.bands:
                    raise UserError(f"{path} has the bands {image.bands}, but {paths[0]} has {first.bands}; every image "
                                    f"needs the same bands (or give them with --bands)")
                y = labels_of(image, masks, mask_suffix, labels, ignored, positive, threshold, ignore_value, erode)
                x = normalised(image, factors, offsets)
                patches = list(cut(x, y, ~image.valid, image, patch_size, overlap, score_once, regions_of[path]))
                kept = [p for p in patches if keep(p, min_valid, exclude_nan, exclude_nopositive)]
                counts["dropped"] += len(patches) - len(kept)
                if kept:
                    builder.add(np.stack([p[0] for p in kept]), np.stack([p[1] for p in kept]), [p[2] for p in kept])
                counts["patches"] += len(kept)
                counts["positive"] += sum(not p[2]["empty"] for p in kept)
                bar.update(1)
        if held:
            builder.files[HELDOUT] = heldout_text(Path(out), held, append)
        root = builder.commit()
    except BaseException:
        builder.abandon()
        raise
    return Imported(root, len(paths), counts["patches"], counts["positive"], counts["dropped"], first.bands, factors,
                    offsets, held)


def check_options(masks, polygons, patch_size: int, overlap: int, min_valid: float, erode: int) -> None:
    if (masks is None) == (polygons is None):
        raise UserError("give the labels either as mask rasters (--masks DIR) or as polygons (--labels FILE), one of "
                        "the two")
    if patch_size < 8 or not 0 <= overlap < patch_size:
        raise UserError(f"--patch-size must be at least 8 and --overlap between 0 and --patch-size - 1, got "
                        f"{patch_size} and {overlap}")
    if not 0 <= min_valid <= 1 or erode < 0:
        raise UserError(f"--min-valid must be in [0, 1] and --erode not negative, got {min_valid} and {erode}")


def list_images(source: Path) -> list[Path]:
    """The images of a folder (every raster below it, sorted) or of a list file (a path a line, `#` comments)."""
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
    elif source.is_file():
        lines = [line.split("#")[0].strip() for line in source.read_text().splitlines()]
        found = [p if p.is_absolute() else source.parent / p for p in map(Path, filter(None, lines))]
        absent = [str(p) for p in found if not p.is_file()]
        if absent:
            raise UserError(f"{source} lists {len(absent)} image(s) that do not exist, e.g. {absent[0]}")
    else:
        raise UserError(f"--images {source} is neither a folder of rasters nor a list file")
    if not found:
        raise UserError(f"--images {source} holds no raster ({', '.join(RASTER_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems:
            raise UserError(f"{stems[path.stem]} and {path} have the same name {path.stem!r}, which is each image's "
                            f"sample_id; rename one")
        stems[path.stem] = path
    return found


def check_grids(paths: list[Path], first: Image, bands, ignore_band) -> None:
    """Every image georeferenced, or none: the metadata's outlines are in degrees (EPSG:4326) or in pixels."""
    rasterio = require_imagery()
    from smptrain.data.rasters import quiet_georeference

    guard = quiet_georeference()
    try:
        for path in paths[1:]:
            with rasterio.open(path) as source:
                if (source.crs is None) != (first.crs is None):
                    raise UserError(f"{path} is in {source.crs or 'no CRS'} but {paths[0]} is in "
                                    f"{first.crs or 'no CRS'}; georeferenced images and images without a CRS cannot "
                                    f"share a dataset (the outlines would mix degrees and pixels): import them apart")
    finally:
        guard.__exit__(None, None, None)


def read_table(path: Path) -> dict[str, dict]:
    """A CSV table with an `image` column (a file name or stem), by image."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise UserError(f"--regions {path} cannot be read: {error.strerror or error}") from None
    if not rows or "image" not in rows[0]:
        raise UserError(f"--regions {path} needs a header with an `image` column (a file name or stem)")
    return {Path(row["image"]).stem: row for row in rows}


def region_per_image(paths, region, region_level, table, images_root: Path) -> dict[Path, str]:
    if region is not None:
        return {path: region for path in paths}
    if table:
        missing = [p.name for p in paths if p.stem not in table or not table[p.stem].get("region")]
        if missing:
            raise UserError(f"the regions table names no region for {len(missing)} image(s), e.g. {missing[0]}; give "
                            f"each image a row with a region")
        return {path: table[path.stem]["region"] for path in paths}
    level = region_level or 1
    found = {}
    for path in paths:
        parents = [p.name for p in path.parents]
        if level > len(parents) or not parents[level - 1]:
            raise UserError(f"--region-level {level} is above the folders of {path}; give --region or --regions")
        found[path] = parents[level - 1]
    return found


def held_out(paths, heldout, column, table) -> list[str]:
    """The sample ids held out for testing: those a list file names, or those the table's `column` marks."""
    names = []
    if heldout is not None:
        lines = [line.split("#")[0].strip() for line in Path(heldout).read_text().splitlines()]
        names = [Path(line).stem for line in lines if line]
    elif column is not None:
        if not table:
            raise UserError("--heldout-column needs --regions, the table that has the column")
        marked = {"1", "true", "yes", "test", "heldout", "held out"}
        names = [stem for stem, row in table.items() if str(row.get(column, "")).strip().lower() in marked]
    known = {p.stem for p in paths}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"the held-out list names {len(unknown)} image(s) that are not imported, e.g. {unknown[0]}")
    return sorted(set(names))


def normalisation(image: Image, given: dict) -> tuple[list[float], list[float]]:
    """(factors, offsets) per band: given, else (float data) DARTS' band table, whose valid ranges are of decoded
    values (reflectance, metres, degrees), else (integer data) the data type's range."""
    from smptrain.data.bands import from_table

    factors, offsets = [], []
    integer = np.issubdtype(np.dtype(image.dtype), np.integer)
    for index, name in enumerate(image.bands):
        if name in given:
            factor, offset = given[name]
        elif from_table(name) is not None and not integer:
            factor, offset = from_table(name)
        elif integer:
            info = np.iinfo(np.dtype(image.dtype))
            factor, offset = 1.0 / (info.max - info.min), -info.min / (info.max - info.min)
        else:
            band = image.values[index][image.valid]
            if band.size and (band.min() < 0 or band.max() > 1):
                raise UserError(f"band {name} of {image.path} is {image.dtype} with values from {band.min():g} to "
                                f"{band.max():g}; give its normalisation, e.g. --band-normalisation {name}=FACTOR,OFFSET "
                                f"so that raw * FACTOR + OFFSET lies in [0, 1]")
            factor, offset = 1.0, 0.0
        factors.append(float(factor))
        offsets.append(float(offset))
    return factors, offsets


def narrow(image: Image, factors, offsets) -> list[str]:
    """Bands whose model inputs, in the first image, span less than a tenth of [0, 1] (16-bit counts normalised by
    the data type's range): a sentence each, with the normalisation that would spread them."""
    found = []
    for index, name in enumerate(image.bands):
        band = image.values[index][image.valid]
        if band.size == 0:
            continue
        low, high = float(band.min()), float(band.max())
        span = (high - low) * abs(factors[index])
        if 0 < span < 0.1:
            found.append(f"band {name} of {image.path} takes model inputs in a span of {span:.3f} only (values "
                         f"{low:g} to {high:g}); spread them with --band-normalisation "
                         f"{name}={1 / (high - low):.6g},{-low / (high - low):.6g}")
    return found


def normalised(image: Image, factors, offsets) -> np.ndarray:
    x = image.values * np.asarray(factors, np.float32)[:, None, None] + np.asarray(offsets, np.float32)[:, None, None]
    x = np.clip(x, 0, 1)
    x[:, ~image.valid] = 0
    return x


def labels_of(image: Image, masks, mask_suffix, labels, ignored, positive, threshold, ignore_value,
              erode: int) -> np.ndarray:
    """y of an image: from its mask or the polygons, ignored where the image is not valid (grown by `erode`)."""
    if masks is not None:
        candidates = [p for p in Path(masks).glob(f"{image.path.stem}{mask_suffix}.*")
                      if p.suffix.lower() in RASTER_SUFFIXES]
        if not candidates:
            raise UserError(f"no mask for {image.path} in {masks} (looked for {image.path.stem}{mask_suffix}.*)")
        y = read_mask(candidates[0], image, positive, threshold, ignore_value)
    else:
        y = np.zeros(image.shape, np.uint8)
        burn(image, labels.for_image(image), 1, y)
    if ignored is not None:
        burn(image, ignored.for_image(image), 2, y)
    invalid = ~image.valid
    if erode and invalid.any():
        from scipy.ndimage import binary_dilation

        invalid = binary_dilation(invalid, iterations=erode)
    y[invalid] = 2
    return y


def cut(x: np.ndarray, y: np.ndarray, nodata: np.ndarray, image: Image, patch: int, overlap: int, score_once: bool,
        region: str):
    """(x patch, y patch, metadata row, whether it has nodata) of every patch of the image's grid, padded (and the
    padding ignored) where the image is smaller than a patch."""
    height, width = image.shape
    if height < patch or width < patch:  # one patch, the padding ignored
        grow = ((0, max(0, patch - height)), (0, max(0, patch - width)))
        x, y, nodata = np.pad(x, ((0, 0), *grow)), np.pad(y, grow, constant_values=2), np.pad(nodata, grow)
    covered = np.zeros(y.shape, bool)
    ys, xs = patch_origins(y.shape[0], patch, overlap), patch_origins(y.shape[1], patch, overlap)
    boxes = outlines(image, [(top, left) for top in ys for left in xs], patch)
    for row, top in enumerate(ys):
        for column, left in enumerate(xs):
            labels = y[top:top + patch, left:left + patch].copy()
            if score_once:
                labels[covered[top:top + patch, left:left + patch]] = 2
                covered[top:top + patch, left:left + patch] = True
            meta = {"sample_id": image.path.stem, "region": region, "empty": not bool((labels == 1).any()),
                    "patch_id": row * len(xs) + column, "x": left, "y": top, "patch_idx_x": column, "patch_idx_y": row,
                    "image": str(image.path), "geometry": boxes[row * len(xs) + column]}
            yield (np.ascontiguousarray(x[:, top:top + patch, left:left + patch]), labels, meta,
                   bool(nodata[top:top + patch, left:left + patch].any()))


def outlines(image: Image, origins: list[tuple[int, int]], patch: int) -> list[bytes]:
    """Each patch's footprint as WKB: in EPSG:4326 as DARTS writes it (the patch's corners reprojected, so images
    of several UTM zones share one dataset), or in pixel coordinates for an image without a CRS."""
    import shapely

    corners = np.array([[(left, top), (left + patch, top), (left + patch, top + patch), (left, top + patch)]
                        for top, left in origins], dtype=np.float64).reshape(-1, 4, 2)
    if image.crs is not None:
        from rasterio.warp import transform

        t = image.transform  # written out: affine 3 deprecates `*` on points, and 2 has no `@` for them
        columns, rows = corners[..., 0].ravel(), corners[..., 1].ravel()
        lon, lat = transform(image.crs, "EPSG:4326", t.a * columns + t.b * rows + t.c, t.d * columns + t.e * rows + t.f)
        corners = np.stack([lon, lat], axis=-1).reshape(-1, 4, 2)
    return shapely.to_wkb(shapely.polygons(corners)).tolist()


def keep(patch, min_valid: float, exclude_nan: bool, exclude_nopositive: bool) -> bool:
    labels = patch[1]
    labelled = float((labels != 2).mean())
    if labelled == 0 or labelled < min_valid:
        return False
    if exclude_nan and patch[3]:  # DARTS' exclude_nan: any pixel without data
        return False
    return not (exclude_nopositive and patch[2]["empty"])


def heldout_text(out: Path, held: list[str], append: bool) -> str:
    """heldout.txt: these sample ids, and (appending) those it held before."""
    path = out / HELDOUT
    earlier = path.read_text().split() if append and path.is_file() else []
    return "".join(f"{name}\n" for name in sorted(set(earlier) | set(held)))
