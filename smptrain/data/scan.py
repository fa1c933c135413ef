"""What is checked of every patch's values before they are trusted: labels in {0, 1, 2}, finite inputs, inputs
in [0, 1], the metadata's `empty` flag agreeing with the labels, and bands that read as all zeros.

A dataset copied by halves looks whole to zarr: zarr does not write a chunk that holds only the fill value, so a
missing chunk file reads as zeros without complaint (in DARTS too). A patch the metadata calls positive whose
labels hold no positive pixel, or a band that is zero over a whole labelled patch, is how such a copy shows.
`smptrain-inspect` reports all of it; training refuses patches whose labels contradict their metadata unless
`data.accept_empty_mismatch` says so.
"""

from __future__ import annotations

import numpy as np

from smptrain.core.errors import UserError
from smptrain.core.progress import progress
from smptrain.core.labels import IGNORE, POSITIVE
from smptrain.data.darts import ARRAYS, METADATA
from smptrain.data.dataset import label_sentence, listed, open_reader

MISSING_CHUNKS = ("a chunk file missing from a copy of the dataset reads as zeros (zarr writes no chunk that holds "
                  f"only the fill value), so check that {ARRAYS} was copied whole")


def scan_values(info, block: int = 64) -> dict:
    """Count patches with bad labels (and the values found there, `bad_values`), non-finite inputs or inputs
    outside [0, 1], `empty` mismatches, and bands that are all zeros in a patch whose labels are not all ignored
    ({band name: [zarr rows]})."""
    import sys

    reader = open_reader(info)
    rows = np.sort(info.metadata.index.to_numpy())
    found = {"bad_labels": [], "non_finite": [], "out_of_range": [], "zero_bands": {}}
    bad_values: set[int] = set()
    has_positive: dict[int, bool] = {}
    sys.stdout.flush()  # what was printed before comes before the bar, and the bar is gone before what follows
    with progress(len(rows), "scanning values", unit="patch") as bar:
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            xb, yb = reader.read(part, None)
            flat_x, flat_y = xb.reshape(len(part), -1), yb.reshape(len(part), -1)
            found["bad_labels"] += part[(flat_y > IGNORE).any(1)].tolist()
            bad_values.update(np.unique(flat_y[flat_y > IGNORE]).tolist())
            finite = np.isfinite(flat_x).all(1)
            found["non_finite"] += part[~finite].tolist()
            with np.errstate(invalid="ignore"):
                found["out_of_range"] += part[finite & ((flat_x < 0).any(1) | (flat_x > 1).any(1))].tolist()
            has_positive.update(zip(part.tolist(), (flat_y == POSITIVE).any(1).tolist()))
            labelled = (flat_y != IGNORE).any(1)
            zero = (xb.reshape(len(part), xb.shape[1], -1) == 0).all(2) & labelled[:, None]
            for row, band in zip(*np.nonzero(zero)):
                found["zero_bands"].setdefault(info.bands[band], []).append(int(part[row]))
            bar.update(len(part))
    return {**found, "bad_values": sorted(bad_values), "empty_mismatch": mismatches(info, has_positive),
            "unreferenced_rows": int(info.num_rows - len(rows))}


def mismatches(info, has_positive: dict[int, bool]) -> dict[str, list[int]]:
    """Rows whose metadata `empty` flag contradicts their labels: {"positive": called positive, no positive pixel;
    "empty": called empty, with positive pixels}."""
    empty = info.metadata["empty"].astype(bool)
    rows = [int(r) for r in empty.index if int(r) in has_positive]
    return {"positive": [r for r in rows if not empty[r] and not has_positive[r]],
            "empty": [r for r in rows if empty[r] and has_positive[r]]}


def mismatch_sentence(found: dict[str, list[int]], source) -> str | None:
    """One sentence naming the rows whose labels contradict the metadata, or None."""
    parts = []
    if found["positive"]:
        parts.append(f"zarr row(s) {listed(found['positive'])} are positive in {METADATA} but their labels hold no "
                     f"positive pixel")
    if found["empty"]:
        parts.append(f"zarr row(s) {listed(found['empty'])} are empty in {METADATA} but their labels hold positive "
                     f"pixels")
    if not parts:
        return None
    return f"{source}: {'; '.join(parts)}; {MISSING_CHUNKS}"


def check_labels(info, rows, accept: bool, block: int = 256) -> dict[str, list[int]]:
    """The start of training: the labels of `rows`, read alone, before the first step: values outside {0, 1, 2}
    are a UserError naming them, and so (unless `accept`, data.accept_empty_mismatch) is a contradiction with their
    `empty` flags; returns what was found."""
    reader = open_reader(info)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    has_positive, bad_rows, bad_values = {}, [], set()
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        labels = reader.read_labels(part).reshape(len(part), -1)
        has_positive.update(zip(part.tolist(), (labels == POSITIVE).any(1).tolist()))
        outside = (labels > IGNORE).any(1)
        if outside.any():
            bad_rows += part[outside].tolist()
            bad_values.update(np.unique(labels[labels > IGNORE]).tolist())
    if bad_rows:
        raise UserError(label_sentence(info.root / ARRAYS, sorted(bad_values), bad_rows))
    found = mismatches(info, has_positive)
    text = mismatch_sentence(found, info.root / ARRAYS)
    if text and not accept:
        raise UserError(f"{text}; set data.accept_empty_mismatch = true to train on them as they are")
    return found
