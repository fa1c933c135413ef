"""Every loss against an independent computation on a small hand-made batch with ignored pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smptrain.model.losses import LOSSES, Loss, LossParams

# Two 3x4 samples: 0 background, 1 positive, 2 ignored (the second sample has a fully ignored row).
Y = torch.tensor([[[0, 1, 1, 2], [0, 0, 1, 2], [0, 0, 0, 0]],
                  [[2, 2, 2, 2], [1, 1, 0, 0], [0, 1, 0, 2]]], dtype=torch.uint8)
LOGITS = torch.tensor([[[-1.0, 0.5, 2.0, 9.0], [-2.0, 0.3, 1.0, -7.0], [0.2, -0.4, -3.0, 1.5]],
                       [[5.0, -5.0, 3.0, 0.0], [0.8, -0.2, 0.1, -1.2], [-0.6, 2.5, 0.4, 4.0]]])
PARAMS = LossParams(focal_alpha=0.25, focal_gamma=2.0, tversky_alpha=0.3, tversky_beta=0.7)


def valid_pixels(y=Y, logits=LOGITS):
    keep = (y != 2).numpy().ravel()
    return logits.numpy().ravel()[keep].astype(np.float64), (y.numpy().ravel()[keep] == 1).astype(np.float64)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def reference(name: str, y=Y, logits=LOGITS) -> float:
    """Textbook formulas on the valid pixels only (numpy, float64)."""
    z, t = valid_pixels(y, logits)
    p = sigmoid(z)
    if name == "bce":
        return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
    if name == "focal":
        pt = np.where(t == 1, p, 1 - p)
        alpha = np.where(t == 1, PARAMS.focal_alpha, 1 - PARAMS.focal_alpha)
        return float(np.mean(-alpha * (1 - pt) ** PARAMS.focal_gamma * np.log(pt)))
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    if name == "dice":
        return float(1 - 2 * tp / (2 * tp + fp + fn))
    if name == "jaccard":
        return float(1 - tp / (tp + fp + fn))
    if name == "tversky":
        return float(1 - tp / (tp + PARAMS.tversky_alpha * fp + PARAMS.tversky_beta * fn))
    if name == "lovasz":  # the Lovász extension of the IoU loss, by its definition (Berman et al., Alg. 1)
        errors = 1 - z * (2 * t - 1)
        order = np.argsort(-errors, kind="stable")
        gt = t[order]
        intersection = gt.sum() - np.cumsum(gt)
        union = gt.sum() + np.cumsum(1 - gt)
        jaccard = 1 - intersection / union
        gradient = np.concatenate([jaccard[:1], np.diff(jaccard)])
        return float(np.dot(np.maximum(errors[order], 0), gradient))
    raise AssertionError(name)


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_equals_its_textbook_formula_on_valid_pixels(name):
    value = Loss(name, PARAMS)(LOGITS.unsqueeze(1), Y)
    assert value.item() == pytest.approx(reference(name), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_pixels_change_neither_value_nor_gradient(name):
    loss = Loss(name, PARAMS)
    logits = LOGITS.clone().requires_grad_(True)
    value = loss(logits, Y)
    value.backward()
    assert logits.grad[Y == 2].abs().max().item() == 0.0
    assert logits.grad[Y != 2].abs().max().item() > 0.0
    changed = LOGITS.clone()
    changed[Y == 2] = torch.randn(int((Y == 2).sum()), generator=torch.Generator().manual_seed(1)) * 50
    assert loss(changed, Y).item() == value.item()


@pytest.mark.parametrize("name", LOSSES)
def test_an_all_ignored_batch_gives_zero_and_no_nan(name):
    logits = torch.randn(2, 1, 5, 5, requires_grad=True)
    value = Loss(name, PARAMS)(logits, torch.full((2, 5, 5), 2, dtype=torch.uint8))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_a_weighted_sum_is_the_sum_of_its_weighted_parts():
    combined = Loss({"focal": 1.0, "dice": 0.5}, PARAMS)(LOGITS, Y).item()
    assert combined == pytest.approx(reference("focal") + 0.5 * reference("dice"), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_per_sample_values_are_each_samples_own_loss(name):
    values, has_valid = Loss(name, PARAMS).per_sample(LOGITS, Y)
    assert has_valid.tolist() == [True, True] and values.dtype == torch.float64
    for i in range(2):
        expected = reference(name, Y[i:i + 1], LOGITS[i:i + 1])
        assert values[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    values, has_valid = Loss(name, PARAMS).per_sample(LOGITS, torch.full_like(Y, 2))
    assert has_valid.tolist() == [False, False] and values.tolist() == [0.0, 0.0]


def test_loss_config_round_trips_and_bad_losses_are_sentences():
    from smptrain.config import dump_toml, load_config
    from smptrain.core.errors import UserError

    cfg = load_config(None, ["train.loss={focal = 1.0, dice = 0.5}", "train.tversky_beta=0.8"])
    assert cfg.train.loss == {"focal": 1.0, "dice": 0.5} and "loss = {focal = 1.0, dice = 0.5}" in dump_toml(cfg)
    for bad, words in [("train.loss=dise", ["train.loss", "dice"]), ("train.loss={focal = -1.0}", ["non-negative"]),
                       ("train.loss={focal = 0.0}", ["positive weight"]), ("train.tversky_alpha=2.0", ["[0, 1]"])]:
        with pytest.raises(UserError) as error:
            load_config(None, [bad])
        assert all(w in str(error.value) for w in words), str(error.value)


def test_bce_pos_weight_weighs_the_positive_term_of_the_valid_pixels():
    z, t = valid_pixels()
    p = sigmoid(z)
    expected = float(np.mean(-(3.0 * t * np.log(p) + (1 - t) * np.log(1 - p))))
    loss = Loss("bce", LossParams(pos_weight=3.0))
    assert float(loss(LOGITS, Y)) == pytest.approx(expected, rel=1e-6)
    values, has_valid = loss.per_sample(LOGITS, Y)
    assert has_valid.all() and float(values.mean()) != pytest.approx(float(Loss("bce")(LOGITS, Y)))
    assert loss.describe() == "bce (pos_weight 3)"
