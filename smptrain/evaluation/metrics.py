"""Binary segmentation metrics from per-sample counts: exact, and independent of batching and process count.

Every sample contributes a fixed-size row of integer counts (pixels labelled 2 excluded). Rows are summed over the
whole set once and turned into DARTS' metric names with torchmetrics' binary formulas (`ignore_index=2`,
threshold 0.5, curves with 20 evenly spaced thresholds in [0, 1]). Nothing is averaged per batch.

Pixel row (`PIXEL_STATS` = 46 integers): tn, fp, fn, tp at `prob > 0.5`; then, for the curves, a histogram of
negatives and of positives over 21 bins, bin k holding pixels with exactly k thresholds <= prob.

Instance row (test only, `INSTANCE_STATS` = 63): tp, fp, fn of objects (8-connected components) at `prob > 0.5`
and at each of the 20 curve thresholds (`prob >= t`), matched one-to-one at IoU >= 0.3. Boundary row
(`BOUNDARY_STATS` = 2): intersection and union of prediction and label boundaries, restricted to valid pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from smptrain.core.labels import BACKGROUND, IGNORE, POSITIVE

NUM_THRESHOLDS = 20
THRESHOLDS = torch.linspace(0, 1, NUM_THRESHOLDS)  # float32, exactly torchmetrics' thresholds=20
_ON_DEVICE: dict[torch.device, torch.Tensor] = {}


def on_device(table: torch.Tensor, device: torch.device, cache: dict) -> torch.Tensor:
    """A constant table's copy on `device`, made once: a `.to(device)` per batch is a blocking copy from pageable
    memory, which waits for the queued work."""
    if table.device == device:
        return table
    if device not in cache:
        cache[device] = table.to(device)
    return cache[device]


def nan_below(probs: torch.Tensor) -> torch.Tensor:
    """float32 probabilities with NaN (a diverged model) as -1: below every threshold, as `prob > t` and `prob >= t`
    treat NaN; `bucketize` would put NaN in the first bin on one device and the last on another."""
    probs = probs.float()
    return torch.where(torch.isnan(probs), torch.full_like(probs, -1.0), probs)
PIXEL_STATS = 4 + 2 * (NUM_THRESHOLDS + 1)
INSTANCE_STATS = 3 * (NUM_THRESHOLDS + 1)
BOUNDARY_STATS = 2
MATCH_IOU = 0.3
PIXEL_NAMES = ("Accuracy", "Precision", "Specificity", "Recall", "F1Score", "JaccardIndex", "CohenKappa",
               "HammingDistance", "AUROC", "AveragePrecision")


def pixel_stats(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample pixel counts. probs: (B, H, W) float in [0, 1]; y: (B, H, W) in {0, 1, 2}. Returns int64 (B, 46).

    Two implementations with identical results (tested), neither waiting for the device: on the CPU one scatter
    into per-sample counters is the fastest; on a GPU that scatter serialises every pixel on a handful of atomics,
    so there the counts come from comparisons and per-sample sums.
    """
    return (pixel_stats_scatter if probs.device.type == "cpu" else pixel_stats_compare)(probs, y)


def pixel_stats_scatter(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b = probs.shape[0]
    bins = NUM_THRESHOLDS + 1
    valid = (y != IGNORE).flatten(1)
    target = (y == POSITIVE).flatten(1).long()
    sample = torch.arange(b, device=probs.device).unsqueeze(1)
    ones = torch.ones_like(target)
    # confusion at 0.5: code t*2 + p in 0..3, invalid pixels into slot 4 (dropped)
    pred = (probs > 0.5).flatten(1).long()
    code = torch.where(valid, target * 2 + pred, torch.full_like(pred, 4)) + sample * 5
    confusion = torch.zeros(b * 5, dtype=torch.long, device=probs.device).index_add_(0, code.flatten(), ones.flatten())
    # histogram: bin = number of thresholds <= prob (so prob >= t_j  <=>  bin > j)
    level = torch.bucketize(nan_below(probs.flatten(1)), on_device(THRESHOLDS, probs.device, _ON_DEVICE), right=True)
    code = torch.where(valid, target * bins + level, torch.full_like(level, 2 * bins)) + sample * (2 * bins + 1)
    histogram = torch.zeros(b * (2 * bins + 1), dtype=torch.long, device=probs.device).index_add_(
        0, code.flatten(), ones.flatten())
    return torch.cat([confusion.view(b, 5)[:, :4], histogram.view(b, 2 * bins + 1)[:, :2 * bins]], 1)


def pixel_stats_compare(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b = probs.shape[0]
    probs, y = probs.flatten(1).float(), y.flatten(1)
    positive, negative = y == POSITIVE, y == BACKGROUND
    pred = probs > 0.5
    tp, fp = (pred & positive).sum(1), (pred & negative).sum(1)
    n_pos, n_neg = positive.sum(1), negative.sum(1)
    # Pixels with prob >= t_j for the 20 thresholds; ignored pixels get -1, below every threshold.
    scored = torch.where(positive | negative, probs, torch.full_like(probs, -1.0))
    above = scored.unsqueeze(1) >= on_device(THRESHOLDS, probs.device, _ON_DEVICE).view(1, -1, 1)  # (B, 20, H*W)
    pos_at = (above & positive.unsqueeze(1)).sum(2)
    neg_at = above.sum(2) - pos_at
    zero = torch.zeros_like(n_pos).unsqueeze(1)

    def histogram(total, at):  # bin k = pixels with exactly k thresholds <= prob = (>= t_{k-1}) - (>= t_k)
        cumulative = torch.cat([total.unsqueeze(1), at, zero], 1)
        return cumulative[:, :-1] - cumulative[:, 1:]

    confusion = torch.stack([n_neg - fp, fp, n_pos - tp, tp], 1)
    return torch.cat([confusion, histogram(n_neg, neg_at), histogram(n_pos, pos_at)], 1).view(b, PIXEL_STATS)


def _safe(num, den, zero=0.0):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, zero, num / np.where(den == 0, 1, den))


def curve_counts(total: np.ndarray):
    """(tps, fps, fns, tns) at each of the 20 thresholds from a summed pixel row."""
    bins = NUM_THRESHOLDS + 1
    negative, positive = total[4:4 + bins], total[4 + bins:4 + 2 * bins]
    # prob >= t_j  <=>  bin > j: suffix sums from bin j+1
    tps = np.cumsum(positive[::-1])[::-1][1:]
    fps = np.cumsum(negative[::-1])[::-1][1:]
    return tps, fps, positive.sum() - tps, negative.sum() - fps


def roc_curve(tps, fps, fns, tns):
    """False- and true-positive rates in increasing-threshold-reversed order, as torchmetrics' binned ROC."""
    return _safe(fps, fps + tns)[::-1], _safe(tps, tps + fns)[::-1]


def pr_curve(tps, fps, fns):
    """Precision and recall with torchmetrics' closing point (1, 0); undefined values are 0."""
    precision = np.nan_to_num(_safe(tps, tps + fps, np.nan), nan=0.0)
    recall = np.nan_to_num(_safe(tps, tps + fns, np.nan), nan=0.0)
    return np.append(precision, 1.0), np.append(recall, 0.0)


def average_precision(tps, fps, fns) -> float:
    precision, recall = pr_curve(tps, fps, fns)
    return float(-np.sum((recall[1:] - recall[:-1]) * precision[:-1]))


def rates(tp, fp, fn, tn) -> dict[str, float]:
    """The threshold metrics of one confusion matrix, as torchmetrics computes them (0 where undefined)."""
    n = tp + fp + fn + tn
    accuracy = float(_safe(tp + tn, n))
    observed = (tp + tn) / n if n else math.nan
    expected = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2 if n else math.nan
    kappa = (observed - expected) / (1 - expected) if n and expected != 1 else math.nan
    return {
        "Accuracy": accuracy,
        "Precision": float(_safe(tp, tp + fp)),
        "Specificity": float(_safe(tn, tn + fp)),
        "Recall": float(_safe(tp, tp + fn)),
        "F1Score": float(_safe(2 * tp, 2 * tp + fp + fn)),
        "JaccardIndex": float(_safe(tp, tp + fp + fn)),
        "CohenKappa": float(kappa),
        "HammingDistance": 1.0 - accuracy,
    }


def pixel_metrics(total: np.ndarray, prefix: str) -> dict[str, float]:
    """DARTS' pixel metrics from a summed pixel row (int64 (46,))."""
    tn, fp, fn, tp = (int(v) for v in total[:4])
    metrics = rates(tp, fp, fn, tn)
    tps, fps, fns, tns = curve_counts(total)
    fpr, tpr = roc_curve(tps, fps, fns, tns)
    metrics["AUROC"] = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
    metrics["AveragePrecision"] = average_precision(tps, fps, fns)
    return {f"{prefix}/{name}": metrics[name] for name in PIXEL_NAMES}


def sample_iou(stats: np.ndarray) -> np.ndarray:
    """Per-sample IoU at 0.5 from per-sample pixel rows (NaN where a sample has neither label nor prediction)."""
    tp, fp, fn = stats[:, 3].astype(float), stats[:, 1].astype(float), stats[:, 2].astype(float)
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Objects (test only; on the CPU with scipy)

_EIGHT = np.ones((3, 3), bool)


def match_objects(pred: np.ndarray, target: np.ndarray, threshold: float = MATCH_IOU) -> tuple[int, int, int]:
    """(tp, fp, fn) between the 8-connected objects of two boolean masks, one-to-one at IoU >= threshold.

    Among all one-to-one matchings it takes one with the most matches (then the highest total IoU), so a label
    object is never counted twice, unlike DARTS' pair counting. Labels are int32: any number of objects.
    """
    from scipy.ndimage import label
    from scipy.optimize import linear_sum_assignment

    target_labels, n_target = label(target, structure=_EIGHT)
    pred_labels, n_pred = label(pred, structure=_EIGHT)
    if n_target == 0 or n_pred == 0:
        return 0, n_pred, n_target
    pairs = np.bincount(target_labels.ravel().astype(np.int64) * (n_pred + 1) + pred_labels.ravel(),
                        minlength=(n_target + 1) * (n_pred + 1)).reshape(n_target + 1, n_pred + 1)
    intersection = pairs[1:, 1:]
    area_target, area_pred = pairs[1:, :].sum(1), pairs[:, 1:].sum(0)
    iou = intersection / (area_target[:, None] + area_pred[None, :] - intersection)
    ok = iou >= threshold
    rows, cols = np.flatnonzero(ok.any(1)), np.flatnonzero(ok.any(0))
    if len(rows) == 0:
        return 0, n_pred, n_target
    sub_ok, sub_iou = ok[np.ix_(rows, cols)], iou[np.ix_(rows, cols)]
    # weight > any sum of IoUs of fewer matches, so the assignment maximises the number of matches first
    weight = np.where(sub_ok, min(sub_ok.shape) + 1 + sub_iou, 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    tp = int(sub_ok[r, c].sum())
    return tp, n_pred - tp, n_target - tp


def instance_stats(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One sample's object counts: int64 (63,) = (tp, fp, fn) at 0.5, then at each curve threshold."""
    valid, target = y != IGNORE, y == POSITIVE
    rows = [match_objects((prob > 0.5) & valid, target)]
    thresholds = THRESHOLDS.numpy()
    for t in thresholds:
        rows.append(match_objects((prob >= t) & valid, target))
    return np.asarray(rows, np.int64).ravel()


def boundary_width(height: int, width: int) -> int:
    return max(1, round(0.02 * math.hypot(height, width)))


def boundary_stats(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One sample's boundary intersection and union (int64 (2,)); empty masks contribute 0 and 0."""
    from scipy.ndimage import binary_erosion

    valid, target = y != IGNORE, y == POSITIVE
    pred = (prob > 0.5) & valid
    width = boundary_width(*y.shape)

    def boundary(mask):
        if not mask.any():
            return mask
        return mask & ~binary_erosion(mask, structure=_EIGHT, iterations=width, border_value=0)

    bp, bt = boundary(pred), boundary(target)
    return np.array([(bp & bt & valid).sum(), ((bp | bt) & valid).sum()], np.int64)


def instance_metrics(total_instances: np.ndarray, total_boundary: np.ndarray, prefix: str) -> dict[str, float]:
    """DARTS' test-only metrics from summed instance and boundary rows."""
    counts = total_instances.reshape(NUM_THRESHOLDS + 1, 3)
    tp, fp, fn = (int(v) for v in counts[0])
    r = rates(tp, fp, fn, 0)
    tps, fps, fns = counts[1:, 0], counts[1:, 1], counts[1:, 2]
    return {
        f"{prefix}/InstanceAccuracy": r["Accuracy"],
        f"{prefix}/InstancePrecision": r["Precision"],
        f"{prefix}/InstanceRecall": r["Recall"],
        f"{prefix}/InstanceF1Score": r["F1Score"],
        f"{prefix}/InstanceAveragePrecision": average_precision(tps, fps, fns),
        f"{prefix}/BoundaryIoU": float(_safe(total_boundary[0], total_boundary[1])),
    }
