"""A fine histogram of probabilities, and what it answers: the best threshold on validation, and calibration.

`fine_histogram` counts the valid pixels of a batch into `FINE_BINS` bins of the probability per label class
(integers, so sums over batches and ranks are exact in any order). Bin 0 holds p == 0 and bin k >= 1 holds
edge[k-1] < p <= edge[k] for edges k / FINE_BINS (as float32, the probabilities' type), so the number of pixels
with p > edge[k] is exactly the sum of the bins above k, which is what "binarise at threshold t" counts.

`best_threshold` picks, among the edges, the threshold that maximises the Jaccard index (IoU) of the counts. F1 =
2 IoU / (1 + IoU) rises with IoU, so the same threshold maximises F1. Ties go to the threshold nearest 0.5.

`reliability` bins the same counts into `CALIBRATION_BINS` equal-width bins: mean predicted probability (from the
fine bins' centres, at most 1 / (2 FINE_BINS) off) against the observed frequency of positives. The expected
calibration error is the pixel-weighted mean gap between the two.
"""

from __future__ import annotations

import numpy as np
import torch

from smptrain.core.labels import BACKGROUND, POSITIVE
from smptrain.evaluation import metrics as M

FINE_BINS = 1000
CALIBRATION_BINS = 10
EDGES = torch.linspace(0, 1, FINE_BINS + 1)  # float32
_EDGES_ON: dict = {}  # EDGES copied once per device


def parse_threshold(value) -> float | str:
    """`val-best`, or a probability strictly between 0 and 1 (binarise where prob > threshold)."""
    if value == "val-best":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 < number < 1:
        from smptrain.core.errors import UserError

        raise UserError(f"--threshold must be val-best or a number between 0 and 1 (exclusive), got {value!r}")
    return number


def fine_histogram(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """int64 (2, FINE_BINS + 1): counts of background (row 0) and positive (row 1) pixels per probability bin."""
    bins = FINE_BINS + 1
    # NaN as -1: bin 0, with the pixels `p > t` never counts, on every device
    level = torch.bucketize(M.nan_below(probs.flatten()), M.on_device(EDGES, probs.device, _EDGES_ON), right=False)
    y = y.flatten()
    slot = torch.where(y == POSITIVE, level + bins, torch.where(y == BACKGROUND, level, torch.full_like(level, 2 * bins)))
    counts = torch.zeros(2 * bins + 1, dtype=torch.long, device=probs.device)
    counts.index_add_(0, slot, torch.ones_like(slot))  # no host sync, unlike bincount(minlength=...) on a GPU
    return counts[:2 * bins].view(2, bins)


def counts_above(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tp, fp) with p > EDGES[k] for every k, and the totals of positive and background pixels."""
    negative, positive = histogram[0].astype(np.int64), histogram[1].astype(np.int64)
    tp = np.append(np.cumsum(positive[::-1])[::-1][1:], 0)
    fp = np.append(np.cumsum(negative[::-1])[::-1][1:], 0)
    return tp, fp, int(positive.sum()), int(negative.sum())


def best_threshold(histogram: np.ndarray) -> dict:
    """The edge whose `p > t` maximises the IoU of the counts, with the IoU and F1 there and at 0.5."""
    tp, fp, positives, _ = counts_above(histogram)
    fn = positives - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 0.0)
    edges = EDGES.numpy().astype(np.float64)  # the exact float32 values, so `prob > t` means the same everywhere
    best = iou.max()
    candidates = np.flatnonzero(iou == best)
    k = int(candidates[np.argmin(np.abs(edges[candidates] - 0.5))])
    half = FINE_BINS // 2
    return {"threshold": float(edges[k]), "JaccardIndex": float(iou[k]), "F1Score": float(2 * iou[k] / (1 + iou[k])),
            "JaccardIndex@0.5": float(iou[half]), "F1Score@0.5": float(2 * iou[half] / (1 + iou[half]))}


def reliability(histogram: np.ndarray) -> dict:
    """Per calibration bin: pixels, mean predicted probability, observed frequency; and the ECE."""
    negative, positive = histogram[0].astype(np.float64), histogram[1].astype(np.float64)
    centres = np.concatenate([[0.0], (np.arange(1, FINE_BINS + 1) - 0.5) / FINE_BINS])
    # fine bin k >= 1 lies in calibration bin (k - 1) // (FINE_BINS / CALIBRATION_BINS); p == 0 in the first
    coarse = np.concatenate([[0], (np.arange(1, FINE_BINS + 1) - 1) // (FINE_BINS // CALIBRATION_BINS)])
    pixels = np.bincount(coarse, negative + positive, CALIBRATION_BINS)
    positives = np.bincount(coarse, positive, CALIBRATION_BINS)
    weighted = np.bincount(coarse, (negative + positive) * centres, CALIBRATION_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(pixels > 0, weighted / np.maximum(pixels, 1), np.nan)
        frequency = np.where(pixels > 0, positives / np.maximum(pixels, 1), np.nan)
    total = pixels.sum()
    gaps = np.where(pixels > 0, np.abs(frequency - confidence), 0.0)
    ece = float((pixels * gaps).sum() / total) if total else float("nan")
    return {"pixels": pixels.astype(np.int64), "confidence": confidence, "frequency": frequency, "ece": ece}


def confusion_at(probs: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-sample (tn, fp, fn, tp) at `prob > threshold`, int64 (B, 4), the pixel row's layout."""
    probs, y = probs.flatten(1).float(), y.flatten(1)
    positive, negative = y == POSITIVE, y == BACKGROUND
    pred = probs > threshold
    tp, fp = (pred & positive).sum(1), (pred & negative).sum(1)
    return torch.stack([negative.sum(1) - fp, fp, positive.sum(1) - tp, tp], 1)
