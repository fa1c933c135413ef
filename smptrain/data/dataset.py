"""Patches of a dataset (`smptrain.data.darts` describes it): its zarr readers, the value checks of every batch, and
`PatchDataset`, which a training, validation or test split reads from.

Mask contract (`smptrain.core.labels`): y is 0 (background), 1 (positive) or 2 (ignored). The model sees x as stored
(no normalisation at load time) and returns logits (N, 1, P, P).

A batch is a tuple `(x float32 [B, C, P, P], y uint8 [B, P, P], positions int64 [B])`, positions being indices into
the split (`dataset.rows[positions]` are the zarr rows); `smptrain.data.batches` decides which positions form
each batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from smptrain.core.errors import UserError
from smptrain.core.labels import IGNORE
from smptrain.data.darts import ARRAYS, DatasetInfo, open_arrays

_TENSORSTORE_PID = None  # the process that used tensorstore; its forked children must not (tensorstore aborts)


def check_values(x: np.ndarray, y: np.ndarray, rows, source: str) -> None:
    """Fail on labels outside {0, 1, 2} or non-finite inputs, naming the affected zarr rows."""
    bad_y = np.asarray(rows)[(y > IGNORE).reshape(len(y), -1).any(1)]
    if len(bad_y):
        raise UserError(label_sentence(source, np.unique(y[y > IGNORE]), bad_y))
    bad_x = np.asarray(rows)[~np.isfinite(x).reshape(len(x), -1).all(1)]
    if len(bad_x):
        raise UserError(
            f"{source}: x holds NaN or inf in {len(bad_x)} patch(es) of this batch, zarr rows {listed(bad_x)}; "
            f"DARTS data must be finite (run smptrain-inspect to count all affected patches)"
        )


def label_sentence(source, values, rows) -> str:
    """The sentence for labels outside {0, 1, 2}: the values found, where, and how to find every such patch."""
    shown = ", ".join(str(int(v)) for v in list(values)[:5]) + (" ..." if len(values) > 5 else "")
    return (f"{source}: y holds the value(s) {shown}, outside {{0 background, 1 positive, 2 ignored}}, in {len(rows)} "
            f"patch(es), zarr rows {listed(rows)}; smptrain-inspect lists every such patch of the dataset "
            f"(a mask of 0 and 255 needs 255 mapped to 1, as smptrain-import does)")


def listed(rows) -> str:
    """Zarr rows as a sentence shows them: the first ten, then "..."."""
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
            path = self.root / ARRAYS / name
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
            return UserError(f"{self.root / ARRAYS}: zarr rows {listed(rows)} cannot be read: "
                             f"{str(error).splitlines()[0][:200]}")
        (name, row), reason = next(iter(bad.items()))
        rows_named = sorted({r for _, r in bad})
        where = self.root / ARRAYS / name / ("c" if (self.root / ARRAYS / name / "zarr.json").is_file() else "")
        return UserError(f"{self.root / ARRAYS}: array {name} cannot be decoded at zarr row(s) {listed(rows_named)} "
                         f"(chunk files under {where}/{row}...): {reason}; the dataset is damaged, rewrite those "
                         f"patches or drop their metadata rows")


def open_reader(info: DatasetInfo, reader: str = "auto") -> ZarrReader:
    """A reader of `info`'s arrays for a pass over the whole dataset (the value scan, the label check); decoding
    errors become one sentence naming the rows and their chunk files."""
    return ZarrReader(info.root, reader)


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
            check_values(x, y, self.rows, str(self.root / ARRAYS))
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
        check_values(x, y, self.rows[positions], str(self.root / ARRAYS))
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
