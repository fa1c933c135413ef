"""Metrics per region and per sample id, from an evaluation's per-sample counts (no second pass over the data).

Each group's rows are summed and turned into metrics by the same functions as the whole set, so a group without
positives reports what the whole-set code reports there (torchmetrics' 0 where a ratio is undefined) and the
groups' counts add up to the whole set's exactly.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from smptrain.evaluation import metrics as M

COUNT_COLUMNS = ("tn", "fp", "fn", "tp")
SHOWN = {"JaccardIndex": "IoU", "F1Score": "F1", "Precision": "Precision", "Recall": "Recall",
         "InstanceF1Score": "ObjectF1"}


def by_group(evaluation, groups, prefix: str) -> list[dict]:
    """One row per distinct value of `groups` (aligned with the evaluated samples), worst IoU first: the group,
    its patches, positive pixels, the summed confusion counts at 0.5 and every metric of the evaluation."""
    groups = np.asarray([str(g) for g in groups])
    rows = []
    for name in sorted(set(groups)):
        mask = groups == name
        pixel = evaluation.pixel[mask].sum(0)
        row = {"group": name, "patches": int(mask.sum()), "positive_pixels": int(pixel[2] + pixel[3]),
               **{c: int(v) for c, v in zip(COUNT_COLUMNS, pixel[:4])}}
        row.update(M.pixel_metrics(pixel, prefix))
        losses = evaluation.loss[mask]
        finite = losses[np.isfinite(losses)]
        row[f"{prefix}/loss"] = float(finite.mean()) if len(finite) else math.nan
        if evaluation.instances is not None:
            row.update(M.instance_metrics(evaluation.instances[mask].sum(0), evaluation.boundary[mask].sum(0), prefix))
        rows.append(row)
    return sorted(rows, key=lambda r: (r[f"{prefix}/JaccardIndex"], r["group"]))


def validation_regions(evaluation, regions, prefix: str = "val") -> dict[str, float]:
    """`val/region/NAME/JaccardIndex` per region, when the set spans more than one region (else nothing)."""
    if len(set(regions)) < 2:
        return {}
    return {f"{prefix}/region/{row['group']}/JaccardIndex": row[f"{prefix}/JaccardIndex"]
            for row in by_group(evaluation, regions, prefix)}


def write_csv(rows: list[dict], path: Path, group_name: str) -> Path:
    from smptrain.core.storage import write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = list(rows[0]) if rows else ["group"]
    writer.writerow([group_name if k == "group" else k for k in keys])
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in row.values()])
    write_text(path, buffer.getvalue())
    return path


def format_rows(rows: list[dict], prefix: str, group_name: str, limit: int | None = None) -> str:
    """A terminal table, worst first: group, patches, positive pixels and the headline metrics."""
    shown = [name for name in SHOWN if rows and f"{prefix}/{name}" in rows[0]]
    head = [group_name, "patches", "positives"] + [SHOWN[name] for name in shown]
    body = [[str(r["group"]), str(r["patches"]), str(r["positive_pixels"])]
            + [f"{r[f'{prefix}/{name}']:.4f}" for name in shown] for r in rows[:limit]]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [head] + body]
    if limit is not None and len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more")
    return "\n".join(lines)
