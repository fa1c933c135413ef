"""Evaluation shared by validation and `smptrain-test`: `evaluate()`, and the figures made from its counts.

Each rank evaluates whole batches of the set (batch i on rank i % world_size, no padding) and writes per-sample
counts into rows of a buffer indexed by the sample's position. One all-reduce sums the buffers (each row is
non-zero on exactly one rank, so the sum is exact), and every rank reduces the same numbers in the same order:
the metrics are identical for any number of processes, to the last digit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smptrain.core.progress import progress
from smptrain.core.runtime import to_device
from smptrain.data.dataset import PatchDataset
from smptrain.evaluation import calibration as C
from smptrain.evaluation import metrics as M
from smptrain.evaluation import tta as TTA
from smptrain.model.losses import Loss
from smptrain.model.network import probabilities, segmentation_logits


@dataclass
class Evaluation:
    metrics: dict[str, float]  # prefix/Name -> value, including prefix/loss
    pixel: np.ndarray  # (N, 46) per-sample pixel counts
    loss: np.ndarray  # (N,) per-sample loss (NaN for a sample without valid pixels)
    instances: np.ndarray | None  # (N, 63) per-sample object counts (objects=True only)
    boundary: np.ndarray | None  # (N, 2) per-sample boundary intersection and union (objects=True only)
    fine: np.ndarray | None = None  # (2, FINE_BINS + 1) probability histogram of the set (calibrate=True only)
    at_threshold: np.ndarray | None = None  # (N, 4) per-sample tn, fp, fn, tp at `threshold` (when given)
    threshold: float | None = None
    tta: "Evaluation | None" = None  # the same counts of the TTA-averaged probabilities (tta != "none")

    @property
    def total(self) -> np.ndarray:
        return self.pixel.sum(0)


class Counts:
    """The per-sample rows of one kind of probabilities (plain or TTA-averaged), on the device until reduced."""

    def __init__(self, num_samples: int, device, objects: bool, threshold: float | None, calibrate: bool):
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)

        self.pixel = zeros(num_samples, M.PIXEL_STATS)
        self.extra = zeros(num_samples, M.INSTANCE_STATS + M.BOUNDARY_STATS) if objects else None
        self.at_threshold = zeros(num_samples, 4) if threshold is not None else None
        self.fine = zeros(2, C.FINE_BINS + 1) if calibrate else None
        self.threshold = threshold

    def add(self, probs: torch.Tensor, y: torch.Tensor, positions: torch.Tensor) -> None:
        self.pixel[positions] = M.pixel_stats(probs, y)
        if self.at_threshold is not None:
            self.at_threshold[positions] = C.confusion_at(probs, y, self.threshold)
        if self.fine is not None:
            self.fine += C.fine_histogram(probs, y)
        if self.extra is not None:
            probs_np, y_np = probs.cpu().numpy(), y.cpu().numpy()
            rows = [np.concatenate([M.instance_stats(p, t), M.boundary_stats(p, t)]) for p, t in zip(probs_np, y_np)]
            self.extra[positions] = torch.from_numpy(np.stack(rows)).to(self.pixel.device)

    def reduce(self, accelerator, prefix: str, per_sample_loss: np.ndarray | None) -> Evaluation:
        """Sum over ranks (every rank calls it; the same collectives in the same order) and compute the metrics."""
        pixel = accelerator.reduce(self.pixel, "sum").cpu().numpy()
        result = M.pixel_metrics(pixel.sum(0), prefix)
        if per_sample_loss is not None:
            finite = per_sample_loss[np.isfinite(per_sample_loss)]
            result[f"{prefix}/loss"] = float(finite.mean()) if len(finite) else math.nan
        instances = boundary = fine = at_threshold = None
        if self.extra is not None:
            extra = accelerator.reduce(self.extra, "sum").cpu().numpy()
            instances, boundary = extra[:, :M.INSTANCE_STATS], extra[:, M.INSTANCE_STATS:]
            result.update(M.instance_metrics(instances.sum(0), boundary.sum(0), prefix))
        if self.fine is not None:
            fine = accelerator.reduce(self.fine, "sum").cpu().numpy()
            result[f"{prefix}/ExpectedCalibrationError"] = C.reliability(fine)["ece"]
        if self.at_threshold is not None:
            at_threshold = accelerator.reduce(self.at_threshold, "sum").cpu().numpy()
            tn, fp, fn, tp = (int(v) for v in at_threshold.sum(0))
            result[f"{prefix}_at_threshold/threshold"] = self.threshold
            result.update({f"{prefix}_at_threshold/{k}": v for k, v in M.rates(tp, fp, fn, tn).items()})
        loss = per_sample_loss if per_sample_loss is not None else np.full(len(pixel), np.nan)
        return Evaluation(result, pixel, loss, instances, boundary, fine, at_threshold, self.threshold)


@dataclass(frozen=True)
class Extras:
    """What an evaluation counts beyond validation's pixel metrics (smptrain-test asks for them)."""

    objects: bool = False  # object and boundary counts
    tta: str = "none"  # also the probabilities averaged over "flips" or "d4" (`.tta`, prefix `{prefix}_tta`)
    threshold: float | None = None  # also the confusion at `prob > threshold` (`{prefix}_at_threshold/...`)
    tta_threshold: float | None = None  # the TTA probabilities' own threshold (a threshold is chosen per kind)
    calibrate: bool = False  # the fine probability histogram (`.fine`) and the expected calibration error


def evaluate(model, loader, accelerator, num_samples: int, loss_fn: Loss, prefix: str,
             extras: Extras = Extras()) -> Evaluation:
    """Metrics of `model` over the set behind `loader` (a feed of device batches over EvalBatches), with `loss_fn`
    (the training loss) as `prefix/loss`, and what `extras` asks for. All ranks must call it. With TTA the plain
    counts are exactly those without it.
    """
    tta, threshold, tta_threshold = extras.tta, extras.threshold, extras.tta_threshold
    device = accelerator.device
    # The unwrapped module keeps Accelerate's autocast wrapper but not DDP, whose forward may talk to other ranks:
    # ranks evaluate different numbers of batches.
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    plain = Counts(num_samples, device, extras.objects, threshold, extras.calibrate)
    averaged = Counts(num_samples, device, extras.objects, threshold if tta_threshold is None else tta_threshold,
                      extras.calibrate) if tta != "none" else None
    loss = torch.zeros(num_samples, 2, dtype=torch.float64, device=device)
    with torch.inference_mode():
        bar = progress(len(loader), prefix, unit="batch", show=accelerator.is_local_main_process)
        for x, y, positions in loader:
            logits = segmentation_logits(net, x)
            values, has_valid = loss_fn.per_sample(logits, y)
            probs = probabilities(logits)
            plain.add(probs, y, positions)
            loss[positions] = torch.stack([values, has_valid.double()], 1)
            if averaged is not None:
                averaged.add(TTA.averaged(lambda batch: probabilities(segmentation_logits(net, batch)), x, tta, probs),
                             y, positions)
            bar.update(1)
        bar.close()
    # a fixed sequence of collectives, called by every rank
    loss = accelerator.reduce(loss, "sum").cpu().numpy()
    net.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample_loss = np.where(loss[:, 1] > 0, loss[:, 0], np.nan)
    evaluation = plain.reduce(accelerator, prefix, per_sample_loss)
    if averaged is not None:
        # TTA averages probabilities, which have no logits to take the training loss of: no `_tta/loss`.
        evaluation.tta = averaged.reduce(accelerator, f"{prefix}_tta", None)
    return evaluation


def predict(net, dataset: PatchDataset, positions, device, channels_last: bool = False):
    """(xs, ys, probs) as numpy for a few samples, for figures; main process only, unwrapped model, no collectives."""
    x, y, _ = dataset.__getitems__(list(positions))
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        probs = probabilities(segmentation_logits(net, to_device((x, y, torch.zeros(0)), device, channels_last)[0]))
    net.train(was_training)
    return x.numpy(), y.numpy(), probs.cpu().numpy()


def sample_figure(net, dataset: PatchDataset, positions, pixel: np.ndarray, device, path: Path, heading: str,
                  channels_last: bool = False) -> Path:
    # `heading` names the run and checkpoint or step; a sample without label or prediction says so instead of "nan".
    """A grid of some samples of an evaluated set (image, label, probability, errors), titled with their zarr row
    and IoU from the evaluation's per-sample counts `pixel`; for validation previews and test figures alike."""
    from smptrain.evaluation import plots

    xs, ys, probs = predict(net, dataset, positions, device, channels_last)
    iou = M.sample_iou(pixel[list(positions)])
    titles = [f"row {dataset.rows[p]}\n" + (f"IoU {v:.3f}" if np.isfinite(v) else "no positives")
              for p, v in zip(positions, iou)]
    return plots.sample_grid(xs, ys, probs, dataset.band_names, titles, path, heading)


def write_curves(evaluation: Evaluation, out_dir: Path, prefix: str, tag: str = "", label: str = "") -> dict[str, Path]:
    """Confusion matrix, ROC and precision-recall PNGs from an evaluation; `label` (run and checkpoint or step)
    goes into every title."""
    from smptrain.evaluation import plots

    total = evaluation.total
    tn, fp, fn, tp = (int(v) for v in total[:4])
    tps, fps, fns, tns = M.curve_counts(total)
    fpr, tpr = M.roc_curve(tps, fps, fns, tns)
    precision, recall = M.pr_curve(tps, fps, fns)
    # Thresholds where nothing is predicted have no precision; torchmetrics counts them as 0 (and AP keeps that),
    # but drawn they make a false drop to (0, 0).
    drawn = (precision > 0) | (recall > 0) | (np.arange(len(precision)) == len(precision) - 1)
    precision, recall = precision[drawn], recall[drawn]
    m = evaluation.metrics
    prefix_title = f"{prefix}: {label}" if label else prefix
    operating = [(tp / max(tp + fn, 1), tp / max(tp + fp, 1), f"threshold 0.5: precision {tp / max(tp + fp, 1):.3f}, "
                  f"recall {tp / max(tp + fn, 1):.3f}")]
    chosen = f"{prefix}_at_threshold"
    if f"{chosen}/Recall" in m and f"{chosen}/Precision" in m:  # smptrain-test --threshold: that one too
        operating.append((m[f"{chosen}/Recall"], m[f"{chosen}/Precision"], f"the chosen threshold: precision "
                          f"{m[f'{chosen}/Precision']:.3f}, recall {m[f'{chosen}/Recall']:.3f}"))
    return {
        "cmx": plots.confusion_matrix(tn, fp, fn, tp, out_dir / f"confusion_matrix{tag}.png",
                                      f"{prefix_title}\nconfusion matrix (normalised by label)"),
        "roc": plots.curve(fpr, tpr, out_dir / f"roc{tag}.png", f"{prefix_title}\nROC (20 thresholds)",
                           ("false positive rate", "true positive rate"), ("AUROC", m[f"{prefix}/AUROC"]),
                           diagonal=True),
        "prc": plots.curve(recall, precision, out_dir / f"precision_recall{tag}.png",
                           f"{prefix_title}\nprecision-recall (20 thresholds)", ("recall", "precision"),
                           ("AP", m[f"{prefix}/AveragePrecision"]), marks=operating),
    }


def best_and_worst(evaluation: Evaluation, count: int = 4) -> tuple[list[int], list[int]]:
    """Positions of the best and worst samples by IoU among samples with a label or a prediction."""
    iou = M.sample_iou(evaluation.pixel)
    ranked = [int(i) for i in np.argsort(np.where(np.isnan(iou), np.inf, iou), kind="stable") if not np.isnan(iou[i])]
    worst = ranked[:count]
    best = [i for i in ranked[::-1][:count] if i not in worst]
    return best, worst


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:.6f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                     for k, v in metrics.items())
