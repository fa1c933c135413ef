"""Reading a user's imagery with the field's libraries (rasterio for rasters, pyogrio and shapely for vectors): an
image's bands, grid and valid pixels, a mask raster, and polygons burned onto an image's grid. The `imagery` extra
installs them (`pip install 'smptrain[imagery]'`; `tools/setup.sh` does).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smptrain.core.errors import UserError

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt", ".img")


def require_imagery():
    """rasterio, or the sentence that says how to install it."""
    try:
        import rasterio
    except ImportError:
        raise UserError("reading and writing rasters needs the imagery extra: pip install 'smptrain[imagery]' "
                        "(rasterio, pyogrio, shapely)") from None
    return rasterio


@dataclass
class Image:
    """One image as read: raw values (C, H, W) float32, where they are valid (H, W), its band names and grid."""

    path: Path
    values: np.ndarray
    valid: np.ndarray
    bands: list[str]
    dtype: str
    crs: object  # rasterio CRS or None
    transform: object  # rasterio Affine (the identity for an image without georeference)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[1], self.values.shape[2]


def quiet_georeference():
    """rasterio warns for every image without georeference (a JPEG, a PNG); such images are read in pixel
    coordinates, which smptrain says once itself."""
    import rasterio.errors

    manager = warnings.catch_warnings()
    manager.__enter__()
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    return manager


def read_image(path: Path, names: list[str] | None = None, ignore_band: str | None = None) -> Image:
    """An image's bands as float32, and where they are valid: GDAL's mask of each band (nodata, an alpha band) and
    finite values; `ignore_band` (a band name) marks as invalid where it is non-zero and is not an input."""
    rasterio = require_imagery()
    guard = quiet_georeference()
    try:
        with rasterio.open(path) as source:
            values = source.read().astype(np.float32)
            masks = source.read_masks()
            descriptions = [d or "" for d in source.descriptions]
            dtype, crs = source.dtypes[0], source.crs
            transform = source.transform
    except rasterio.errors.RasterioIOError as error:
        raise UserError(f"{path} is not a raster GDAL can read: {str(error).splitlines()[0][:200]}") from None
    finally:
        guard.__exit__(None, None, None)
    bands = names_of(path, descriptions, names)
    valid = (masks > 0).all(0) & np.isfinite(values).all(0)
    if ignore_band is not None:
        if ignore_band not in bands:
            raise UserError(f"--ignore-band {ignore_band!r} is not a band of {path}; it has: {', '.join(bands)}")
        index = bands.index(ignore_band)
        valid &= values[index] == 0
        values = np.delete(values, index, axis=0)
        bands = [b for b in bands if b != ignore_band]
    return Image(Path(path), values, valid, bands, dtype, crs, transform)


def names_of(path: Path, descriptions: list[str], given: list[str] | None) -> list[str]:
    """Band names: as given (`--bands`), else the raster's descriptions, else band_1 ... band_N."""
    if given:
        if len(given) != len(descriptions):
            raise UserError(f"--bands names {len(given)} band(s) but {path} has {len(descriptions)}")
        return list(given)
    if all(descriptions) and len(set(descriptions)) == len(descriptions):
        return list(descriptions)
    return [f"band_{i + 1}" for i in range(len(descriptions))]


def read_mask(path: Path, image: Image, positive: float | None, threshold: float | None,
              ignore_value: float | None) -> np.ndarray:
    """Labels from a mask raster on the image's grid: 1 where the mask is `positive` (or above `threshold`;
    neither given: above 127 for a mask whose values go above 1, as JPEG noise around 0 and 255 would otherwise
    count, else above 0), 2 where it is `ignore_value`, else 0."""
    rasterio = require_imagery()
    guard = quiet_georeference()
    try:
        with rasterio.open(path) as source:
            mask = source.read(1)
    except rasterio.errors.RasterioIOError as error:
        raise UserError(f"mask {path} is not a raster GDAL can read: {str(error).splitlines()[0][:200]}") from None
    finally:
        guard.__exit__(None, None, None)
    if mask.shape != image.shape:
        raise UserError(f"mask {path} is {mask.shape[1]} x {mask.shape[0]} pixels but its image {image.path} is "
                        f"{image.shape[1]} x {image.shape[0]}; a mask must be on its image's grid")
    if positive is not None:
        labels = (mask == positive).astype(np.uint8)
    else:
        cut = threshold if threshold is not None else (127 if mask.max() > 1 else 0)
        labels = (mask > cut).astype(np.uint8)
    if ignore_value is not None:
        labels[mask == ignore_value] = 2
    return labels


@dataclass
class Polygons:
    """Polygons of a vector file: shapely geometries, their CRS (None: pixel coordinates), and the image each one
    belongs to when the file names one (an `image` column, for images without georeference)."""

    path: Path
    geometries: list
    crs: str | None
    images: list[str] | None

    def for_image(self, image: Image) -> list:
        """The polygons on `image`'s grid coordinates (its CRS, or pixels)."""
        import shapely

        chosen = self.geometries
        if self.images is not None:
            keys = {image.path.name, image.path.stem}
            chosen = [g for g, name in zip(self.geometries, self.images) if name in keys or Path(name).stem in keys]
        if image.crs is None:
            if self.crs is not None and self.images is None:
                raise UserError(f"{self.path} is in {self.crs} but {image.path} has no georeference; give polygons in "
                                f"pixel coordinates with an `image` column, or georeferenced images")
            return chosen
        if self.crs is None or self.crs == image.crs:
            return chosen
        from rasterio.warp import transform_geom

        return [shapely.geometry.shape(transform_geom(self.crs, image.crs, shapely.geometry.mapping(g)))
                for g in chosen]


def read_polygons(path: Path, image_column: str = "image") -> Polygons:
    """Every polygon of a GeoPackage, GeoJSON or Shapefile (pyogrio), with its CRS and its image column if any."""
    require_imagery()
    import pyogrio
    import shapely

    try:
        meta, _, wkb, fields = pyogrio.raw.read(path)
    except Exception as error:  # pyogrio raises DataSourceError and others for a file it cannot open
        raise UserError(f"{path} is not a vector file GDAL can read: {str(error).splitlines()[0][:200]}") from None
    geometries = [g for g in shapely.from_wkb(wkb)]
    kept = [i for i, g in enumerate(geometries) if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
    if len(kept) != len(geometries):
        raise UserError(f"{path} holds {len(geometries) - len(kept)} feature(s) that are not polygons; labels must be "
                        f"polygons (or multipolygons)")
    names = list(meta["fields"])
    images = [str(v) for v in fields[names.index(image_column)]] if image_column in names else None
    return Polygons(Path(path), geometries, meta.get("crs"), images)


def burn(image: Image, polygons: list, value: int, labels: np.ndarray) -> None:
    """Set `labels` to `value` inside `polygons` (pixel centres inside, as GDAL rasterises)."""
    if not polygons:
        return
    from rasterio.features import rasterize

    inside = rasterize([(g, 1) for g in polygons], out_shape=image.shape, transform=image.transform, fill=0,
                       dtype="uint8")
    labels[inside > 0] = value


def crs_json(crs) -> dict | None:
    """A CRS (rasterio's, or anything `CRS.from_user_input` takes, e.g. "EPSG:4326") as PROJJSON (what GeoParquet
    records), None without one."""
    if crs is None:
        return None
    from rasterio.crs import CRS

    return CRS.from_user_input(crs).to_dict(projjson=True)
