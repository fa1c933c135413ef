"""The DARTS training-data layout, read as it is: the dataset's description, its zarr readers and its patches.

Layout (darts-contract §2):

    DIR/config.toml       [darts] bands, band_factors, band_offsets, patch_size (+ anything else)
    DIR/data.zarr         group with x float32 [N, C, P, P] (already normalised to [0, 1]) and y uint8 [N, P, P]
    DIR/metadata.parquet  one row per patch; its *index labels* are zarr row numbers; needs sample_id, region, empty

Mask contract: y is 0 (background), 1 (positive) or 2 (ignored). The model sees x as stored (no normalisation at
load time) and returns logits (N, 1, P, P).

A batch is a tuple `(x float32 [B, C, P, P], y uint8 [B, P, P], positions int64 [B])`, positions being indices into
the split (`dataset.rows[positions]` are the zarr rows); `smptrain.data.batches` decides which positions form
each batch.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from smptrain.errors import UserError
from smptrain.data.labels import IGNORE

REQUIRED_COLUMNS = ("sample_id", "region", "empty")
_TENSORSTORE_PID = None  # the process that used tensorstore; its forked children must not (tensorstore aborts)


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
                f"band(s) {unknown} are not in {self.root / 'config.toml'}; the dataset has: {', '.join(self.bands)}"
            )
        return [i for i, name in enumerate(self.bands) if name in names]

    def indices_of(self, names, what: str = "the model uses") -> list[int]:
        """Channel indices of bands by name, in the order given (a checkpoint's own order)."""
        missing = [n for n in names if n not in self.bands]
        if missing:
            raise UserError(f"{what} band(s) {missing}, which {self.root / 'config.toml'} lacks; it has: "
                            f"{', '.join(self.bands)}")
        return [self.bands.index(n) for n in names]

    def band_meta(self, indices) -> dict:
        """The three-list band description stored in checkpoints and converted files."""
        from smptrain.data.bands import require_known

        require_known([self.bands[i] for i in indices], [self.band_factors[i] for i in indices],
                      str(self.root / "config.toml"))
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
    for name in ("config.toml", "data.zarr", "metadata.parquet"):
        if not (root / name).exists():
            raise UserError(f"dataset directory {root} has no {name}; a DARTS dataset holds config.toml, data.zarr and metadata.parquet")
    darts = _read_darts_config(root / "config.toml")
    x, y = open_arrays(root)
    if x.ndim != 4 or y.ndim != 3:
        raise UserError(f"{root / 'data.zarr'}: x must be [N, C, P, P] and y [N, P, P], got shapes {x.shape} and {y.shape}")
    n, c, h, w = x.shape
    if y.shape[0] != n or tuple(y.shape[1:]) != (h, w):
        raise UserError(f"{root / 'data.zarr'}: x has shape {x.shape} but y has {y.shape}; they must have the same N and patch size")
    if h != w or h != darts["patch_size"]:
        raise UserError(f"{root / 'data.zarr'}: x patches are {h}x{w} but config.toml says patch_size = {darts['patch_size']}")
    if c != len(darts["bands"]):
        raise UserError(f"{root / 'data.zarr'}: x has {c} channels but config.toml lists {len(darts['bands'])} bands")
    if not np.issubdtype(np.dtype(str(x.dtype)), np.floating) or not np.issubdtype(np.dtype(str(y.dtype)), np.integer):
        raise UserError(f"{root / 'data.zarr'}: x must be float and y integer, got {x.dtype} and {y.dtype}")
    metadata = _read_metadata(root / "metadata.parquet", n)
    from smptrain.data.bands import normalisation

    factors, offsets, convention = normalisation(list(darts["bands"]), darts.get("band_factors"),
                                                 darts.get("band_offsets"), dict(band_normalisation or {}),
                                                 str(root / "config.toml"))
    return DatasetInfo(root, tuple(darts["bands"]), factors, offsets, int(darts["patch_size"]), n, metadata, convention)


def open_arrays(root: Path):
    """Open x and y of `root/data.zarr` read-only (zarr format v3 or v2)."""
    import zarr

    try:
        group = zarr.open_group(str(root / "data.zarr"), mode="r")
        return group["x"], group["y"]
    except KeyError as error:
        raise UserError(f"{root / 'data.zarr'} has no array {error}; it must hold arrays x and y") from None
    except Exception as error:  # zarr raises several types for a broken store
        raise UserError(f"{root / 'data.zarr'} is not a readable zarr group: {error}") from None


def _read_darts_config(path: Path) -> dict:
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


def check_values(x: np.ndarray, y: np.ndarray, rows, source: str) -> None:
    """Fail on labels outside {0, 1, 2} or non-finite inputs, naming the affected zarr rows."""
    bad_y = np.asarray(rows)[(y > IGNORE).reshape(len(y), -1).any(1)]
    if len(bad_y):
        raise UserError(f"{source}: y holds values outside {{0, 1, 2}} in {len(bad_y)} patch(es), zarr rows {_few(bad_y)}")
    bad_x = np.asarray(rows)[~np.isfinite(x).reshape(len(x), -1).all(1)]
    if len(bad_x):
        raise UserError(
            f"{source}: x holds NaN or inf in {len(bad_x)} patch(es) of this batch, zarr rows {_few(bad_x)}; "
            f"DARTS data must be finite (run smptrain-inspect to count all affected patches)"
        )


def _few(rows) -> str:
    rows = [int(r) for r in rows]
    return ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")


class ZarrReader:
    """Reads rows of `x` (all bands or a subset) and `y` from `root/data.zarr`, with the chunks decoded by
    tensorstore (C++, concurrent; 3x zarr-python per reader at 512x512x7 on DARTS' one-chunk-per-band layout) or
    zarr-python. Same bytes, same values.

    smptrain reads tensorstore in-process and forks no workers for it (`PatchDataset.reads_in_process`). tensorstore
    aborts in a process forked from one that used it, so a worker process forked anyway after such use falls back to
    zarr-python.
    """

    def __init__(self, root: Path, reader: str = "auto", threads: int | None = None):
        self.root, self.threads, self.requested = Path(root), threads, reader
        self.pid = os.getpid()
        self.kind = reader if reader != "auto" else ("tensorstore" if _tensorstore_usable() else "zarr")
        if self.kind == "tensorstore" and not _tensorstore_usable():
            raise UserError("data.reader = 'tensorstore' but tensorstore cannot be used in this process "
                            "(not installed, or forked from a process that used it); use data.reader = 'auto'")
        self.x, self.y = self._open_tensorstore() if self.kind == "tensorstore" else open_arrays(self.root)

    def _open_tensorstore(self):
        import tensorstore as ts

        global _TENSORSTORE_PID
        _TENSORSTORE_PID = os.getpid()
        context = {"data_copy_concurrency": {"limit": self.threads}} if self.threads else {}
        arrays = []
        for name in ("x", "y"):
            path = self.root / "data.zarr" / name
            driver = "zarr3" if (path / "zarr.json").is_file() else "zarr"
            try:
                arrays.append(ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path)},
                                       "context": context}, read=True).result())
            except Exception as error:  # an array tensorstore cannot open (an unusual codec): zarr-python can
                if self.requested == "tensorstore":
                    raise UserError(f"{path} cannot be opened with tensorstore: {str(error)[:200]}") from None
                self.kind = "zarr"
                return open_arrays(self.root)
        return arrays

    def read(self, rows: np.ndarray, bands: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """x float32 [len(rows), C, P, P] and y uint8 [len(rows), P, P] for zarr `rows` (any order for tensorstore,
        increasing for zarr-python)."""
        try:
            x, y = self._read(self.x, rows, bands), self._read(self.y, rows, None)
        except Exception as error:
            raise self._damage(rows, bands, error) from None
        return np.asarray(x).astype(np.float32, copy=False), np.asarray(y).astype(np.uint8, copy=False)

    def read_labels(self, rows) -> np.ndarray:
        """y uint8 [len(rows), P, P] alone (what the label checks need: no input band is decoded)."""
        try:
            return np.asarray(self._read(self.y, rows, None)).astype(np.uint8, copy=False)
        except Exception as error:
            raise self._damage(rows, None, error) from None

    def _read(self, array, rows, bands):
        selected = array.oindex[rows] if bands is None else array.oindex[rows, bands]
        return selected.read().result() if self.kind == "tensorstore" else selected

    def _damage(self, rows, bands, error) -> UserError:
        """One sentence naming the array, the rows that cannot be decoded and where their chunks are."""
        bad = {}
        for row in rows:  # only on failure: find which rows, and which array, are damaged
            for name, array, chosen in (("x", self.x, bands), ("y", self.y, None)):
                try:
                    self._read(array, np.asarray([row]), chosen)
                except Exception as row_error:
                    bad.setdefault((name, int(row)), str(row_error).splitlines()[0][:200])
        if not bad:
            return UserError(f"{self.root / 'data.zarr'}: zarr rows {_few(rows)} cannot be read: "
                             f"{str(error).splitlines()[0][:200]}")
        (name, row), reason = next(iter(bad.items()))
        rows_named = sorted({r for _, r in bad})
        where = self.root / "data.zarr" / name / ("c" if (self.root / "data.zarr" / name / "zarr.json").is_file() else "")
        return UserError(f"{self.root / 'data.zarr'}: array {name} cannot be decoded at zarr row(s) {_few(rows_named)} "
                         f"(chunk files under {where}/{row}...): {reason}; the dataset is damaged, rewrite those "
                         f"patches or drop their metadata rows")


def _tensorstore_usable() -> bool:
    if _TENSORSTORE_PID not in (None, os.getpid()):
        return False
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return False
    return True


class PatchDataset(torch.utils.data.Dataset):
    """Patches of some zarr rows, fetched a whole batch at a time (`__getitems__`).

    From zarr, each worker opens the arrays lazily and reads the batch's rows in one orthogonal selection. In
    memory, the rows are read once and a batch is an index into a tensor, which `to_device` may move to the GPU.
    """

    def __init__(self, info: DatasetInfo, rows, band_indices, in_memory: bool = False, reader: str = "auto"):
        self.root = info.root
        self.rows = np.asarray(rows, dtype=np.int64)
        self.band_indices = list(band_indices)
        self.band_names = [info.bands[i] for i in self.band_indices]  # in the order of x's channels
        self.all_bands = self.band_indices == list(range(len(info.bands)))
        self.reader_kind = reader
        self.read_threads = None  # tensorstore decoding threads (None = all cores); make_loader sets data.num_workers
        self._reader = None
        self.memory = None
        if in_memory:
            x, y = self._read(self.rows)
            check_values(x, y, self.rows, str(self.root / "data.zarr"))
            self.memory = (torch.from_numpy(x), torch.from_numpy(y))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.memory) if self.memory is not None else 0

    def to_device(self, device: torch.device) -> None:
        """Hold the in-memory patches on `device` (batches are then gathered there, with no host work)."""
        self.memory = tuple(t.to(device) for t in self.memory)

    def __getitems__(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        index = torch.from_numpy(positions)
        if self.memory is not None:
            index_on = index.to(self.memory[0].device)
            return self.memory[0][index_on].cpu(), self.memory[1][index_on].cpu(), index
        x, y = self._read(self.rows[positions])
        check_values(x, y, self.rows[positions], str(self.root / "data.zarr"))
        return torch.from_numpy(x), torch.from_numpy(y), index

    def __getitem__(self, position):
        x, y, index = self.__getitems__([position])
        return x[0], y[0], index[0]

    def reads_in_process(self) -> bool:
        """Whether batches are decoded by tensorstore in this process (its threads, no worker processes: handing a
        decoded 512x512x7 batch to the main process through shared memory costs more than decoding it)."""
        return self.memory is None and self.reader_kind in ("auto", "tensorstore") and _tensorstore_usable()

    def open_reader(self) -> None:
        """Open the zarr reader of this process if it has none (a forked worker opens its own); in memory, nothing."""
        if self.memory is None and (self._reader is None or self._reader.pid != os.getpid()):
            self._reader = ZarrReader(self.root, self.reader_kind, self.read_threads)

    def _read(self, rows: np.ndarray, block: int = 256):
        self.open_reader()
        if self._reader.kind == "tensorstore" and len(rows) <= block:  # any order: no sort, no copy back
            x, y = self._reader.read(rows, None if self.all_bands else self.band_indices)
            return np.ascontiguousarray(x), np.ascontiguousarray(y)
        order = np.argsort(rows, kind="stable")
        xs, ys = [], []
        for start in range(0, len(rows), block):
            part = rows[order[start:start + block]]
            x, y = self._reader.read(part, None if self.all_bands else self.band_indices)
            xs.append(x)
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return np.ascontiguousarray(x[inverse]), np.ascontiguousarray(y[inverse])

    def __getstate__(self):
        # Arrays are reopened in each worker instead of being pickled across the fork/spawn boundary.
        return {**self.__dict__, "_reader": None}
