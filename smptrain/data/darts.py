"""The DARTS training-data layout, the one dataset format smptrain reads (and writes: the demo data, imported
imagery): its file names, the dataset's description, and every check of the layout before a value is read.

Layout (darts-contract §2):

    DIR/config.toml       [darts] bands, band_factors, band_offsets, patch_size (+ anything else)
    DIR/data.zarr         group with x float32 [N, C, P, P] (already normalised to [0, 1]) and y uint8 [N, P, P]
    DIR/metadata.parquet  one row per patch; its *index labels* are zarr row numbers; needs sample_id, region, empty

Every other module asks this one for the names (`ARRAYS`, `METADATA`, `DESCRIPTION`) and opens a dataset with
`open_dataset`; its patches are read by `smptrain.data.dataset`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from smptrain.core.errors import UserError

ARRAYS, METADATA, DESCRIPTION = "data.zarr", "metadata.parquet", "config.toml"  # inside a dataset directory
REQUIRED_COLUMNS = ("sample_id", "region", "empty")


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a dataset directory; `metadata` is indexed by zarr row."""

    root: Path
    bands: tuple[str, ...]
    band_factors: tuple[float, ...]
    band_offsets: tuple[float, ...]
    patch_size: int
    num_rows: int
    metadata: pd.DataFrame
    convention: str = "config.toml band_factors/band_offsets"  # where the factors come from (smptrain.data.bands)

    def band_indices(self, names) -> list[int]:
        """Channel indices of a band subset, in the dataset's order (empty = all bands)."""
        if not names:
            return list(range(len(self.bands)))
        unknown = [n for n in names if n not in self.bands]
        if unknown:
            raise UserError(
                f"band(s) {unknown} are not in {self.root / DESCRIPTION}; the dataset has: {', '.join(self.bands)}"
            )
        return [i for i, name in enumerate(self.bands) if name in names]

    def indices_of(self, names, what: str = "the model uses") -> list[int]:
        """Channel indices of bands by name, in the order given (a checkpoint's own order)."""
        missing = [n for n in names if n not in self.bands]
        if missing:
            raise UserError(f"{what} band(s) {missing}, which {self.root / DESCRIPTION} lacks; it has: "
                            f"{', '.join(self.bands)}")
        return [self.bands.index(n) for n in names]

    def band_meta(self, indices) -> dict:
        """The three-list band description stored in checkpoints and converted files."""
        from smptrain.data.bands import require_known

        require_known([self.bands[i] for i in indices], [self.band_factors[i] for i in indices],
                      str(self.root / DESCRIPTION))
        return {
            "bands": [self.bands[i] for i in indices],
            "band_factors": [float(self.band_factors[i]) for i in indices],
            "band_offsets": [float(self.band_offsets[i]) for i in indices],
        }


def open_dataset(root: str | Path, band_normalisation: dict | None = None) -> DatasetInfo:
    """Check the layout, shapes, dtypes and metadata of a DARTS training dataset; values are checked later.
    Band factors come from config.toml, else from DARTS' band table, and `band_normalisation` overrides both."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset directory {root} does not exist (set data.dir)")
    for name in (DESCRIPTION, ARRAYS, METADATA):
        if not (root / name).exists():
            raise UserError(f"dataset directory {root} has no {name}; a DARTS dataset holds {DESCRIPTION}, {ARRAYS} and {METADATA}")
    darts = read_description(root / DESCRIPTION)
    x, y = open_arrays(root)
    if x.ndim != 4 or y.ndim != 3:
        raise UserError(f"{root / ARRAYS}: x must be [N, C, P, P] and y [N, P, P], got shapes {x.shape} and {y.shape}")
    n, c, h, w = x.shape
    if y.shape[0] != n or tuple(y.shape[1:]) != (h, w):
        raise UserError(f"{root / ARRAYS}: x has shape {x.shape} but y has {y.shape}; they must have the same N and patch size")
    if h != w or h != darts["patch_size"]:
        raise UserError(f"{root / ARRAYS}: x patches are {h}x{w} but {DESCRIPTION} says patch_size = {darts['patch_size']}")
    if c != len(darts["bands"]):
        raise UserError(f"{root / ARRAYS}: x has {c} channels but {DESCRIPTION} lists {len(darts['bands'])} bands")
    if not np.issubdtype(np.dtype(str(x.dtype)), np.floating) or not np.issubdtype(np.dtype(str(y.dtype)), np.integer):
        raise UserError(f"{root / ARRAYS}: x must be float and y integer, got {x.dtype} and {y.dtype}")
    metadata = _read_metadata(root / METADATA, n)
    from smptrain.data.bands import normalisation

    factors, offsets, convention = normalisation(list(darts["bands"]), darts.get("band_factors"),
                                                 darts.get("band_offsets"), dict(band_normalisation or {}),
                                                 str(root / DESCRIPTION))
    return DatasetInfo(root, tuple(darts["bands"]), factors, offsets, int(darts["patch_size"]), n, metadata, convention)


def open_arrays(root: Path):
    """Open x and y of `root/data.zarr` read-only (zarr format v3 or v2)."""
    import zarr

    try:
        group = zarr.open_group(str(root / ARRAYS), mode="r")
        return group["x"], group["y"]
    except KeyError as error:
        raise UserError(f"{root / ARRAYS} has no array {error}; it must hold arrays x and y") from None
    except Exception as error:  # zarr raises several types for a broken store
        raise UserError(f"{root / ARRAYS} is not a readable zarr group: {error}") from None


def read_description(path: Path) -> dict:
    """The `[darts]` table of a dataset's config.toml, checked."""
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML: {error}") from None
    darts = raw.get("darts")
    if not isinstance(darts, dict):
        raise UserError(f"{path} has no [darts] table")
    for key in ("bands", "patch_size"):
        if key not in darts:
            raise UserError(f"{path} lacks [darts] {key}")
    if ("band_factors" in darts) != ("band_offsets" in darts):
        raise UserError(f"{path} has only one of [darts] band_factors and band_offsets; give both, or neither "
                        f"(today's DARTS datasets: names only, normalised with DARTS' band table)")
    bands = darts["bands"]
    if not (isinstance(bands, list) and all(isinstance(b, str) for b in bands) and bands):
        raise UserError(f"{path}: [darts] bands must be a non-empty list of names")
    stored = [(k, darts[k]) for k in ("band_factors", "band_offsets") if k in darts]
    for key, values in stored:
        if not (isinstance(values, list) and len(values) == len(bands)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise UserError(f"{path}: [darts] {key} must be a list of {len(bands)} numbers, one per band")
    if not isinstance(darts["patch_size"], int) or darts["patch_size"] < 1:
        raise UserError(f"{path}: [darts] patch_size must be a positive integer")
    return darts


def _read_metadata(path: Path, num_rows: int) -> pd.DataFrame:
    try:
        metadata = pd.read_parquet(path)
    except Exception as error:
        raise UserError(f"{path} is not a readable parquet file: {error}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {missing}; DARTS metadata needs {', '.join(REQUIRED_COLUMNS)}")
    index = metadata.index
    if not pd.api.types.is_integer_dtype(index.dtype):
        raise UserError(f"{path}: the index must be integer zarr row numbers, got {index.dtype}")
    if not index.is_unique:
        raise UserError(f"{path}: the index labels (zarr rows) must be unique; {int(index.duplicated().sum())} repeat")
    outside = index[(index < 0) | (index >= num_rows)]
    if len(outside):
        raise UserError(
            f"{path}: {len(outside)} index label(s) point outside the {num_rows} zarr rows (e.g. {int(outside[0])})"
        )
    if len(metadata) == 0:
        raise UserError(f"{path} has no rows")
    return metadata[list(REQUIRED_COLUMNS)]


