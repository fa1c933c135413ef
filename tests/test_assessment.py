"""Per-region and per-sample breakdowns, test-time augmentation, the validation threshold and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smptrain.evaluation import calibration as C
from smptrain.evaluation import metrics as M
from smptrain.evaluation.breakdown import by_group, validation_regions
from smptrain.evaluation.evaluate import Evaluation
from smptrain.evaluation.tta import averaged, symmetries
from smptrain.export.predict import predict_in_patches


def evaluation_of(probs: torch.Tensor, y: torch.Tensor) -> Evaluation:
    pixel = M.pixel_stats(probs, y).numpy()
    rows = [np.concatenate([M.instance_stats(p, t), M.boundary_stats(p, t)]) for p, t in zip(probs.numpy(), y.numpy())]
    extra = np.stack(rows)
    whole = M.pixel_metrics(pixel.sum(0), "test")
    whole.update(M.instance_metrics(extra[:, :M.INSTANCE_STATS].sum(0), extra[:, M.INSTANCE_STATS:].sum(0), "test"))
    return Evaluation(whole, pixel, np.linspace(0.1, 0.5, len(pixel)), extra[:, :M.INSTANCE_STATS],
                      extra[:, M.INSTANCE_STATS:])


def random_set(n=12, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, size, size, generator=g)
    y = (torch.rand(n, size, size, generator=g) > 0.7).to(torch.uint8)
    y[:, :3] = 2  # ignored rows
    return probs, y


def test_regions_add_up_to_the_whole_split_and_a_region_without_positives_is_reported_not_a_crash():
    probs, y = random_set()
    y[8:] = torch.where(y[8:] == 2, 2, 0).to(torch.uint8)  # region "C" (samples 8..11) has no positive pixel
    evaluation = evaluation_of(probs, y)
    regions = np.array(["A"] * 5 + ["B"] * 3 + ["C"] * 4)
    rows = by_group(evaluation, regions, "test")
    assert [r["group"] for r in rows][0] == "C"  # worst first: IoU 0 without positives
    # the groups' counts add up to the whole split's, and metrics of the summed counts are the whole split's
    summed = sum(evaluation.pixel[regions == r["group"]].sum(0) for r in rows)
    assert (summed == evaluation.total).all()
    assert sum(r["tp"] for r in rows) == evaluation.total[3] and sum(r["patches"] for r in rows) == 12
    assert M.pixel_metrics(summed, "test") == {k: v for k, v in evaluation.metrics.items() if k in M.pixel_metrics(summed, "test")}
    no_positives = rows[0]
    assert no_positives["positive_pixels"] == 0
    # as the whole-split code reports a split without positives (torchmetrics: 0 where undefined)
    alone = M.pixel_metrics(evaluation.pixel[8:].sum(0), "test")
    assert all(no_positives[k] == v or (math.isnan(v) and math.isnan(no_positives[k])) for k, v in alone.items())
    assert no_positives["test/Recall"] == 0.0 and no_positives["test/InstanceRecall"] == 0.0
    for r in rows:  # every metric of a group is the metric of its own rows
        mask = regions == r["group"]
        assert r["test/JaccardIndex"] == M.pixel_metrics(evaluation.pixel[mask].sum(0), "test")["test/JaccardIndex"]
        assert r["test/loss"] == pytest.approx(evaluation.loss[mask].mean())
    assert validation_regions(evaluation, regions, "test") == {f"test/region/{r['group']}/JaccardIndex":
                                                               r["test/JaccardIndex"] for r in rows}
    assert validation_regions(evaluation, ["A"] * 12) == {}


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: equivariant to every symmetry of the square by construction."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        return self.conv(x)


class Lopsided(torch.nn.Module):
    """A model that is not symmetric: it sees a 3x3 neighbourhood with random weights."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def probabilities_of(model):
    return lambda batch: torch.sigmoid(model(batch)).squeeze(1)


@pytest.mark.parametrize("kind", ["flips", "d4"])
def test_tta_of_a_symmetric_model_equals_no_tta(kind):
    model = Pointwise()
    x = torch.rand(3, 3, 32, 32)
    plain = probabilities_of(model)(x)
    with torch.no_grad():
        assert torch.allclose(averaged(probabilities_of(model), x, kind), plain, atol=1e-6)
        assert torch.allclose(averaged(probabilities_of(model), x, kind, identity=plain), plain, atol=1e-6)
        tiles = torch.rand(1, 3, 70, 90)
        assert torch.allclose(predict_in_patches(model, tiles, 32, 8, tta=kind),
                              predict_in_patches(model, tiles, 32, 8), atol=1e-6)
    assert len(symmetries(kind)) == {"flips": 4, "d4": 8}[kind]


def test_d4_tta_is_invariant_to_the_symmetries_of_its_input_and_handles_non_square_patches():
    model = Lopsided()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tta = averaged(probabilities_of(model), x, "d4")
        plain = probabilities_of(model)(x)
        assert not torch.allclose(tta, plain, atol=1e-4)  # the model is not symmetric, so TTA changes something
        # rotating the input rotates the TTA output: the average over the whole group does not depend on the view
        rotated = averaged(probabilities_of(model), torch.rot90(x, 1, (-2, -1)), "d4")
        assert torch.allclose(torch.rot90(rotated, -1, (-2, -1)), tta, atol=1e-6)
        flipped = averaged(probabilities_of(model), x.flip(-1), "d4")
        assert torch.allclose(flipped.flip(-1), tta, atol=1e-6)
        wide = torch.rand(2, 3, 32, 64)  # transposed copies have the other shape and go in their own batch
        assert averaged(probabilities_of(model), wide, "d4").shape == (2, 32, 64)


def brute_force_iou(probs, y, threshold):
    valid = y != 2
    pred, target = (probs > threshold) & valid, (y == 1)
    tp = (pred & target).sum().item()
    fp = (pred & ~target & valid).sum().item()
    fn = (~pred & target).sum().item()
    return tp / (tp + fp + fn) if tp + fp + fn else 0.0


def test_the_best_threshold_is_exact_for_the_counted_pixels():
    probs, y = random_set(seed=3)
    probs = (probs * 0.6 + 0.4 * (y == 1)).clamp(0, 1)  # informative probabilities
    histogram = C.fine_histogram(probs[:6], y[:6]) + C.fine_histogram(probs[6:], y[6:])  # batches add up exactly
    assert (histogram == C.fine_histogram(probs, y)).all()
    assert int(histogram.sum()) == int((y != 2).sum())
    choice = C.best_threshold(histogram.numpy())
    edges = C.EDGES.numpy().astype(np.float64)
    ious = [brute_force_iou(probs, y, float(t)) for t in C.EDGES]
    assert choice["JaccardIndex"] == pytest.approx(max(ious), abs=1e-12)
    assert choice["JaccardIndex"] == pytest.approx(brute_force_iou(probs, y, choice["threshold"]), abs=1e-12)
    assert choice["threshold"] in edges
    assert choice["JaccardIndex@0.5"] == pytest.approx(brute_force_iou(probs, y, 0.5), abs=1e-12)
    assert choice["F1Score"] == pytest.approx(2 * max(ious) / (1 + max(ious)))
    # per-sample confusion at a threshold is the pixel row's layout, and at 0.5 equals it
    assert (C.confusion_at(probs, y, 0.5) == M.pixel_stats(probs, y)[:, :4]).all()
    tn, fp, fn, tp = C.confusion_at(probs, y, choice["threshold"]).sum(0).tolist()
    assert tp / (tp + fp + fn) == pytest.approx(choice["JaccardIndex"], abs=1e-12)


def test_reliability_and_expected_calibration_error():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(8, 64, 64, generator=g)
    calibrated = (torch.rand(8, 64, 64, generator=g) < probs).to(torch.uint8)  # labels drawn with the predicted odds
    table = C.reliability(C.fine_histogram(probs, calibrated).numpy())
    assert table["ece"] < 0.02 and table["pixels"].sum() == probs.numel()
    overconfident = (torch.rand(8, 64, 64, generator=g) < 0.5).to(torch.uint8)  # the truth is a coin flip
    table = C.reliability(C.fine_histogram(probs, overconfident).numpy())
    # direct computation from the raw probabilities with the same 10 bins
    p, t = probs.flatten().double().numpy(), overconfident.flatten().numpy()
    bins = np.clip(np.ceil(p * 10) - 1, 0, 9).astype(int)
    direct = sum(abs(t[bins == b].mean() - p[bins == b].mean()) * (bins == b).sum() for b in range(10)) / len(p)
    assert table["ece"] == pytest.approx(direct, abs=1 / (2 * C.FINE_BINS) + 1e-9)
    assert table["ece"] > 0.2
