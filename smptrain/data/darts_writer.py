"""A dataset written in the DARTS layout (`smptrain.data.darts`), whole or not at all: the demo data and imported
imagery are written through here, so that DARTS' own training code reads them unmodified (darts-contract §2).

    DIR/data.zarr         zarr v3 group: x float32 [N, C, P, P] normalised to [0, 1], y uint8 [N, P, P] in {0, 1, 2},
                          one chunk per sample and band (x) and per sample (y), Blosc lz4 as DARTS writes them
    DIR/metadata.parquet  GeoParquet: one row per patch, the index the zarr row; sample_id, region, empty, patch_id,
                          x, y, patch_idx_x, patch_idx_y and the patch's outline (`geometry`, WKB) when known
    DIR/config.toml       [darts] bands, band_factors, band_offsets, patch_size and what else the writer records

A dataset is assembled in a hidden directory beside its place (`.NAME.building`) and renamed into it. Appending
starts from the existing dataset: its chunk files hard-linked (never rewritten: new rows are new chunks), its
metadata copied; the existing dataset is replaced only once the new one is complete, so an import that fails, or a
kill, leaves the old one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from smptrain.core.errors import UserError
from smptrain.config.dump import toml_value
from smptrain.core.storage import writing
from smptrain.data.darts import ARRAYS, DESCRIPTION, METADATA, read_description


class DatasetBuilder:
    """Rows added patch batch by patch batch, then `commit()` puts the dataset in place (or `abandon()` leaves no
    trace). `description`: the `[darts]` table (bands, band_factors, band_offsets, patch_size and anything else);
    `crs`: the patches' outlines' CRS as PROJJSON (None: pixel coordinates, no CRS)."""

    def __init__(self, root: str | Path, description: dict, *, append: bool = False, crs: dict | None = None):
        import zarr

        self.root, self.description, self.crs = Path(root), dict(description), crs
        self.tmp = self.root.with_name(f".{self.root.name}.building")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.rows: list[dict] = []
        self.files: dict[str, str] = {}  # more text files the dataset holds (an imported held-out list)
        bands, patch = list(description["bands"]), int(description["patch_size"])
        with writing(self.tmp, cleanup=self.abandon):
            if append:
                self.rows, self.crs = self._start_from_existing(bands, patch)
                self.group = zarr.open_group(str(self.tmp / ARRAYS), mode="r+")
            else:
                if self.root.exists():
                    raise UserError(f"{self.root} already exists; add to it with --append, or choose another directory")
                self.tmp.mkdir(parents=True)
                self.group = zarr.open_group(str(self.tmp / ARRAYS), mode="w", zarr_format=3)
                from zarr.codecs import BloscCodec

                codec = BloscCodec(cname="lz4", clevel=9)
                self.group.create_array("x", shape=(0, len(bands), patch, patch), dtype="float32",
                                        chunks=(1, 1, patch, patch), compressors=codec)
                self.group.create_array("y", shape=(0, patch, patch), dtype="uint8", chunks=(1, patch, patch),
                                        compressors=codec)

    @property
    def count(self) -> int:
        return self.group["x"].shape[0]

    def add(self, x: np.ndarray, y: np.ndarray, rows: list[dict]) -> None:
        """Patches x (k, C, P, P) in [0, 1], y (k, P, P) in {0, 1, 2}, and their metadata rows (without the index)."""
        if not len(rows):
            return
        start = self.count
        with writing(self.tmp / ARRAYS, cleanup=self.abandon):
            for name, values in (("x", x), ("y", y)):
                array = self.group[name]
                array.resize((start + len(rows), *array.shape[1:]))
                array[start:start + len(rows)] = values
        self.rows.extend(rows)

    def commit(self) -> Path:
        """Metadata and description written, the dataset renamed into place (replacing the one appended to)."""
        import pandas as pd

        if not self.rows:
            self.abandon()
            raise UserError(f"no patch was left to write to {self.root}: every image was smaller than nothing or "
                            f"every patch was filtered out")
        with writing(self.tmp, cleanup=self.abandon):
            frame = pd.DataFrame(self.rows, index=pd.RangeIndex(len(self.rows)))
            write_geoparquet(frame, self.tmp / METADATA, self.crs)
            (self.tmp / DESCRIPTION).write_text(darts_table(self.description))
            for name, text in self.files.items():
                (self.tmp / name).write_text(text)
            replaced = self.root.with_name(f".{self.root.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            if self.root.exists():
                os.rename(self.root, replaced)
            os.rename(self.tmp, self.root)
            shutil.rmtree(replaced, ignore_errors=True)
        return self.root

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _start_from_existing(self, bands: list[str], patch: int) -> tuple[list[dict], dict | None]:
        """The existing dataset as the start of the new one: every earlier row kept, its settings checked."""
        import pandas as pd

        if not (self.root / ARRAYS).is_dir():
            raise UserError(f"--append needs a dataset at {self.root}, which has no {ARRAYS}")
        existing = read_description(self.root / DESCRIPTION)
        for key, ours in (("bands", bands), ("patch_size", patch), ("band_factors", self.description.get("band_factors")),
                          ("band_offsets", self.description.get("band_offsets"))):
            if existing.get(key) != ours:
                raise UserError(f"{self.root / DESCRIPTION} has {key} = {existing.get(key)!r}, but these images give "
                                f"{ours!r}; appending needs the same, or import into another directory")
        link_tree(self.root / ARRAYS, self.tmp / ARRAYS)
        for other in self.root.iterdir():  # what else the dataset holds comes along (a held-out list)
            if other.is_file() and other.name not in (METADATA, DESCRIPTION):
                shutil.copy2(other, self.tmp / other.name)
        frame = pd.read_parquet(self.root / METADATA)
        crs = geo_crs(self.root / METADATA)
        if crs != self.crs:
            raise UserError(f"{self.root / METADATA} holds outlines in another CRS than these images'; appending "
                            f"needs the same CRS, or import into another directory")
        frame = frame.sort_index()
        if list(frame.index) != list(range(len(frame))):
            raise UserError(f"{self.root / METADATA}: its rows are not the zarr rows 0..N-1, so it cannot be appended to")
        return frame.to_dict("records"), crs


def link_tree(source: Path, target: Path) -> None:
    """A copy of `source` whose chunk files are hard links (metadata files, which zarr rewrites, are copied)."""
    for path in source.rglob("*"):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.name in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
            shutil.copy2(path, destination)
            continue
        try:
            os.link(path, destination)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(path, destination)


def write_geoparquet(frame, path: Path, crs: dict | None) -> None:
    """The metadata as GeoParquet (1.0) when it has outlines (`geometry`, WKB bytes), else as plain parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame)
    if "geometry" in frame.columns:
        geo = {"version": "1.0.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)


def geo_crs(path: Path) -> dict | None:
    """The CRS (PROJJSON) of a GeoParquet file's outlines; None without one."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if b"geo" not in metadata:
        return None
    geo = json.loads(metadata[b"geo"])
    return geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {}).get("crs")


def darts_table(description: dict) -> str:
    """config.toml's `[darts]` table, as DARTS' builder writes it (strings, numbers, lists of them)."""
    return "[darts]\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in description.items() if v is not None)
