"""The outlines of a predicted mask, collected stripe by stripe, as polygons with each one's area and mean
probability: a GeoPackage that QGIS, geopandas and DARTS' own tooling open.

Each stripe's 4-connected components (the connectivity of `rasterio.features.shapes`) are traced in pixel
coordinates, where the pieces of one component in two stripes share their edge exactly; components that touch
across a stripe's edge are joined (union-find), their pieces merged, and only then is each polygon put on the
scene's grid. So the polygons' union is the mask, pixel for pixel.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

FIELDS = ("area", "mean_probability", "pixels")  # area in the CRS's units squared (pixels without a CRS)


class Outlines:
    def __init__(self, transform, crs):
        self.transform, self.crs = transform, crs
        self.parent: list[int] = []  # union-find over the components of every stripe
        self.pixels: list[int] = []
        self.sums: list[float] = []
        self.pieces: dict[int, list] = {}
        self.previous = None  # the component of every pixel of the previous stripe's last row (-1: none)

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def add(self, first: int, mask: np.ndarray, probabilities: np.ndarray) -> None:
        """The stripe of rows [first, first + len(mask)): its components and their pieces."""
        import shapely
        from affine import Affine
        from rasterio.features import shapes
        from scipy.ndimage import label

        local, count = label(mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        offset = len(self.parent)
        self.parent.extend(range(offset, offset + count))
        self.pixels.extend(np.bincount(local.ravel(), minlength=count + 1)[1:].tolist())
        self.sums.extend(np.bincount(local.ravel(), weights=probabilities.ravel(), minlength=count + 1)[1:].tolist())
        ids = np.where(local > 0, local - 1 + offset, -1)
        if self.previous is not None and len(ids):
            touching = (self.previous >= 0) & (ids[0] >= 0)
            for a, b in set(zip(self.previous[touching].tolist(), ids[0][touching].tolist())):
                ra, rb = self.find(a), self.find(b)
                if ra != rb:
                    self.parent[max(ra, rb)] = min(ra, rb)
        self.previous = ids[-1] if len(ids) else self.previous
        if count:
            for geometry, value in shapes(local.astype(np.int32), mask=mask, connectivity=4,
                                          transform=Affine.translation(0, first)):
                self.pieces.setdefault(int(value) - 1 + offset, []).append(shapely.geometry.shape(geometry))

    def polygons(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(polygons on the scene's grid, their areas, mean probabilities, pixels), one per outline."""
        import shapely

        grouped: dict[int, list[int]] = {}
        for node in range(len(self.parent)):
            grouped.setdefault(self.find(node), []).append(node)
        merged, pixels, sums = [], [], []
        for members in grouped.values():
            pieces = [piece for m in members for piece in self.pieces.get(m, [])]
            merged.append(shapely.union_all(pieces) if len(pieces) > 1 else pieces[0])
            pixels.append(sum(self.pixels[m] for m in members))
            sums.append(sum(self.sums[m] for m in members))
        t = self.transform
        matrix = np.array([[t.a, t.d], [t.b, t.e]])
        placed = shapely.transform(np.array(merged, dtype=object), lambda xy: xy @ matrix + [t.c, t.f])
        pixels = np.asarray(pixels, np.int64)
        return placed, shapely.area(placed), np.asarray(sums) / np.maximum(pixels, 1), pixels

    def write(self, path) -> int:
        """The outlines as a GeoPackage (written whole); returns how many."""
        import pyogrio
        import shapely

        from smptrain.core.storage import replacing

        placed, area, mean, pixels = self.polygons()
        geometry = np.asarray(shapely.to_wkb(placed), dtype=object)
        with replacing(Path(path)) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The filename extension")  # the temporary's name; the file's is .gpkg
            kinds = set(shapely.get_type_id(placed).tolist())  # 3: Polygon, 6: MultiPolygon
            pyogrio.raw.write(str(tmp), geometry, [area, mean, pixels], fields=list(FIELDS), driver="GPKG",
                              layer="outlines", geometry_type="Polygon" if kinds <= {3} else "MultiPolygon",
                              crs=self.crs.to_wkt() if self.crs else None)
        return len(placed)
