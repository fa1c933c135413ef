import numpy as np
import pytest
import torch
pytest.importorskip("torchmetrics", reason="the reference implementation (the dev extra): pip install torchmetrics")

from torchmetrics.classification import (  # noqa: E402
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryCohenKappa,
    BinaryF1Score,
    BinaryHammingDistance,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)

from smptrain.evaluation import metrics as M  # noqa: E402

REFERENCE = {
    "Accuracy": BinaryAccuracy, "Precision": BinaryPrecision, "Specificity": BinarySpecificity,
    "Recall": BinaryRecall, "F1Score": BinaryF1Score, "JaccardIndex": BinaryJaccardIndex,
    "CohenKappa": BinaryCohenKappa, "HammingDistance": BinaryHammingDistance,
}


def torchmetrics_values(probs, y):
    values = {name: cls(ignore_index=2)(probs, y).item() for name, cls in REFERENCE.items()}
    values["AUROC"] = BinaryAUROC(thresholds=20, ignore_index=2)(probs, y).item()
    values["AveragePrecision"] = BinaryAveragePrecision(thresholds=20, ignore_index=2)(probs, y).item()
    return values


@pytest.mark.parametrize("case", ["random", "no_positives", "on_thresholds", "perfect", "mostly_ignored"])
def test_pixel_metrics_equal_torchmetrics(case):
    g = torch.Generator().manual_seed(hash(case) % 1000)
    y = torch.randint(0, 3, (5, 24, 24), generator=g).to(torch.uint8)
    probs = torch.sigmoid(torch.randn(5, 24, 24, generator=g) * 2 + 1.5 * (y == 1))
    if case == "no_positives":
        y[y == 1] = 0
    if case == "on_thresholds":
        probs = torch.round(probs * 19) / 19  # exactly on the 20 curve thresholds and on 0.5's neighbours
        probs[0, 0, :5] = 0.5
    if case == "perfect":
        probs = (y == 1).float()
    if case == "mostly_ignored":
        y[:4] = 2
    ours = M.pixel_metrics(M.pixel_stats(probs, y).sum(0).numpy(), "val")
    for name, value in torchmetrics_values(probs, y).items():
        assert ours[f"val/{name}"] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    # The GPU's comparison-based counts equal the CPU's scatter-based ones, integer for integer.
    assert torch.equal(M.pixel_stats_compare(probs, y), M.pixel_stats_scatter(probs, y))


def test_counts_do_not_depend_on_batching():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (9, 16, 16), generator=g).to(torch.uint8)
    probs = torch.rand(9, 16, 16, generator=g)
    whole = M.pixel_stats(probs, y)
    parts = torch.cat([M.pixel_stats(probs[i:i + 2], y[i:i + 2]) for i in range(0, 9, 2)])
    assert torch.equal(whole, parts)
    assert whole[:, :4].sum() == (y != 2).sum()  # ignored pixels are never counted


def mask(shape, *boxes):
    out = np.zeros(shape, bool)
    for r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = True
    return out


def test_object_matching_on_known_objects():
    target = mask((40, 40), (0, 10, 0, 10), (20, 30, 20, 30), (32, 36, 0, 4))
    # a hit (IoU 0.64), a miss shifted too far (IoU < 0.3), a false alarm
    pred = mask((40, 40), (2, 10, 0, 10), (20, 30, 27, 35), (0, 3, 30, 40))
    tp, fp, fn = M.match_objects(pred, target)
    assert (tp, fp, fn) == (1, 2, 2)
    assert M.match_objects(np.zeros((8, 8), bool), target[:8, :8]) == (0, 0, 1)
    assert M.match_objects(target, target) == (3, 0, 0)


def test_matching_is_one_to_one():
    # One label object overlapped by two predictions, each with IoU >= 0.3: DARTS counts 2 TPs, we count 1.
    target = mask((20, 20), (0, 10, 0, 10))
    pred = mask((20, 20), (0, 10, 0, 5), (0, 10, 6, 10))
    assert M.match_objects(pred, target) == (1, 1, 0)


def test_more_than_255_objects_are_counted():
    grid = np.zeros((64, 64), bool)
    grid[::2, ::2] = True  # 1024 single-pixel objects (8-connectivity keeps them apart with a 1-pixel gap)
    assert M.match_objects(grid, grid) == (1024, 0, 0)


def test_instance_metrics_from_counts():
    target = mask((32, 32), (0, 8, 0, 8), (16, 24, 16, 24))
    prob = np.where(mask((32, 32), (0, 8, 0, 8)), 0.9, 0.1)
    y = target.astype(np.uint8)
    stats = M.instance_stats(prob, y)
    metrics = M.instance_metrics(stats, M.boundary_stats(prob, y), "test")
    assert metrics["test/InstancePrecision"] == 1.0 and metrics["test/InstanceRecall"] == 0.5
    assert metrics["test/InstanceF1Score"] == pytest.approx(2 / 3)
    assert metrics["test/InstanceAccuracy"] == 0.5


def test_boundary_iou_is_correct_on_empty_images():
    empty = np.zeros((32, 32), np.uint8)
    assert M.boundary_stats(np.zeros((32, 32)), empty).tolist() == [0, 0]  # no inflation from empty patches
    y = mask((32, 32), (8, 24, 8, 24)).astype(np.uint8)
    i, u = M.boundary_stats(y.astype(float), y)
    assert i == u > 0  # perfect prediction
    i, u = M.boundary_stats(np.zeros((32, 32)), y)
    assert i == 0 and u > 0
    assert M.boundary_width(512, 512) == 14 and M.boundary_width(64, 64) == 2
