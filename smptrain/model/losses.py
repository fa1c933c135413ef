"""Losses on logits, with the ignore label honoured exactly, chosen by `train.loss`.

`train.loss` is a name (`"focal"`, DARTS' loss and the default) or a weighted sum (`{focal = 1.0, dice = 0.5}`).
Every loss takes logits `(B, 1, H, W)` or `(B, H, W)` and labels `(B, H, W)` in {0, 1, 2}; a pixel labelled 2
contributes nothing to the value or the gradient, and a batch whose pixels are all ignored gives 0 (no NaN).

| name | what | implementation |
|---|---|---|
| focal | binary focal loss, mean over valid pixels (`train.focal_alpha`, `train.focal_gamma`) | smp's `focal_loss_with_logits` per pixel, masked here |
| bce | binary cross-entropy, mean over valid pixels (`train.pos_weight` on the positive term) | torch per pixel, masked here (smp's SoftBCE divides by every pixel, ignored ones included) |
| dice | 1 - soft Dice over the batch's valid pixels | smp `DiceLoss` (binary, `ignore_index=2`) |
| jaccard | 1 - soft IoU over the batch's valid pixels | smp `JaccardLoss` (binary, `ignore_index=2`) |
| tversky | 1 - Tversky index (`train.tversky_alpha` on false positives, `train.tversky_beta` on false negatives) | smp `TverskyLoss` (binary, `ignore_index=2`) |
| lovasz | Lovász hinge over the batch's valid pixels | here: smp's drops ignored pixels by boolean indexing, a data-dependent shape that makes the host wait for the GPU every step; masking their errors to -inf gives the same value without it |

smp's region losses (dice, jaccard, tversky) are 0 for a batch without positive pixels, as smp defines them.

`Loss.per_sample` gives each sample's own loss (NaN-free, with a flag for samples without valid pixels); `val/loss`
and `test/loss` are their mean over samples with valid pixels, for any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smptrain.core.choices import LOSSES
from smptrain.core.labels import IGNORE, POSITIVE


@dataclass(frozen=True)
class LossParams:
    focal_alpha: float | None = None
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    pos_weight: float = 1.0


def _pixelwise(per_pixel):
    """A mean-over-valid-pixels loss from a per-pixel function: (batch value, per-sample sums, per-sample counts)."""

    def loss(logits, y, params):
        valid = y != IGNORE
        values = per_pixel(logits, (y == POSITIVE).float(), params)
        values = torch.where(valid, values, torch.zeros_like(values))
        return values.flatten(1).sum(1), valid.flatten(1).sum(1)

    return loss


def focal_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float | None, gamma: float):
    """DARTS' loss alone: (mean over the batch's valid pixels, per-sample sums (B,), per-sample valid counts (B,))."""
    logits = logits.reshape(y.shape).float()
    sums, counts = _PIXELWISE["focal"](logits, y, LossParams(alpha, gamma))
    return sums.sum() / counts.sum().clamp(min=1), sums, counts


def _focal(logits, target, params):
    from segmentation_models_pytorch.losses._functional import focal_loss_with_logits

    return focal_loss_with_logits(logits, target, gamma=params.focal_gamma, alpha=params.focal_alpha, reduction="none")


def _bce(logits, target, params):
    pos_weight = None if params.pos_weight == 1 else logits.new_tensor(params.pos_weight)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)


def _smp_region(name):
    def loss(logits, y, params):
        import segmentation_models_pytorch.losses as smp_losses

        if name == "dice":
            module = smp_losses.DiceLoss("binary", from_logits=True, ignore_index=IGNORE)
        elif name == "jaccard":
            module = smp_losses.JaccardLoss("binary", from_logits=True, ignore_index=IGNORE)
        else:
            module = smp_losses.TverskyLoss("binary", from_logits=True, ignore_index=IGNORE,
                                            alpha=params.tversky_alpha, beta=params.tversky_beta)
        return module(logits.unsqueeze(1), y)

    return loss


def lovasz_hinge(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The binary Lovász hinge over all valid pixels of the batch (smp's `per_image=False`). Ignored pixels get an
    error of -inf: they sort last, add relu(-inf) = 0 and take no gradient, and the valid pixels' sorted order and
    Lovász gradient are those of the valid pixels alone (ties contribute the same in any order)."""
    logits, y = logits.reshape(-1), y.reshape(-1)
    valid = y != IGNORE
    target = (y == POSITIVE).float()
    errors = 1.0 - logits * (2.0 * target - 1.0)
    errors = torch.where(valid, errors, torch.full_like(errors, -torch.inf))
    errors_sorted, order = torch.sort(errors, descending=True, stable=True)
    gt_sorted = target[order] * valid[order]
    positives = gt_sorted.sum()
    intersection = positives - gt_sorted.cumsum(0)
    union = positives + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    gradient = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(F.relu(errors_sorted), gradient)


_PIXELWISE = {"focal": _pixelwise(_focal), "bce": _pixelwise(_bce)}
_REGION = {"dice": _smp_region("dice"), "jaccard": _smp_region("jaccard"), "tversky": _smp_region("tversky"),
           "lovasz": lambda logits, y, params: lovasz_hinge(logits, y)}
assert (*_PIXELWISE, *_REGION) == LOSSES, "smptrain.core.choices.LOSSES lists what is implemented here"


class Loss:
    """A weighted sum of named losses, all computed in fp32 on logits (B, 1, H, W) or (B, H, W)."""

    def __init__(self, spec: str | dict, params: LossParams = LossParams()):
        self.weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
        self.params = params

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch loss that training minimises."""
        logits = logits.reshape(y.shape).float()
        total = logits.new_zeros(())
        for name, weight in self.weights.items():
            if name in _PIXELWISE:
                sums, counts = _PIXELWISE[name](logits, y, self.params)
                value = sums.sum() / counts.sum().clamp(min=1)
            else:
                value = _REGION[name](logits, y, self.params)
            total = total + weight * value
        return total

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each sample's loss in float64, whether it has valid pixels): what `val/loss` averages."""
        logits = logits.reshape(y.shape).float()
        has_valid = (y != IGNORE).flatten(1).any(1)
        total = torch.zeros(y.shape[0], dtype=torch.float64, device=logits.device)
        for name, weight in self.weights.items():
            if name in _PIXELWISE:
                sums, counts = _PIXELWISE[name](logits, y, self.params)
                value = sums.double() / counts.double().clamp(min=1)
            else:
                value = torch.stack([_REGION[name](logits[i:i + 1], y[i:i + 1], self.params)
                                     for i in range(y.shape[0])]).double()
            total = total + weight * value
        return torch.where(has_valid, total, torch.zeros_like(total)), has_valid

    def describe(self) -> str:
        def named(name):
            return f"bce (pos_weight {self.params.pos_weight:g})" if name == "bce" and self.params.pos_weight != 1 else name

        return " + ".join(f"{w:g} x {named(n)}" if w != 1 else named(n) for n, w in self.weights.items())


def loss_from_config(train_cfg) -> Loss:
    return Loss(train_cfg.loss, LossParams(train_cfg.focal_alpha, train_cfg.focal_gamma, train_cfg.tversky_alpha,
                                           train_cfg.tversky_beta, train_cfg.pos_weight))
