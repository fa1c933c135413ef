"""Train-time augmentations on batched tensors, on the training device, with DARTS' (albumentations 2.0) defaults.

They run after the batch reaches the device, so data workers stay pure readers, flips and rotations cost
microseconds on a GPU, and the random draws come from a generator seeded by (seed, epoch, step, rank): a resumed
run draws exactly the same augmentations. Geometric transforms move image and mask together; intensity transforms
touch the image only (all channels, as in DARTS) and keep it in [0, 1].

| name | probability | effect |
|---|---|---|
| HorizontalFlip, VerticalFlip | 0.5 | mirror left-right / up-down |
| RandomRotate90 | 0.5 | rotate by k * 90 degrees, k uniform in 0..3 (square patches) |
| D4 | 1 | one of the 8 symmetries of the square, uniformly |
| Blur | 0.5 | box blur with an odd kernel in {3, 5, 7}, reflected borders |
| RandomBrightnessContrast | 0.5 | x * (1 + U(-0.2, 0.2)) + U(-0.2, 0.2), clipped to [0, 1] |
| MultiplicativeNoise | 0.5 | x * U(0.9, 1.1) per pixel and channel, clipped to [0, 1] |
| Posterize | 1 | DARTS' 6-bit posterise: floor(x * 255) with the two low bits cleared, / 255 (always applied) |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smptrain.core.choices import AUGMENTATIONS


def augment_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch's augmentations: a pure function of where it is in training."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, epoch, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def augment(x: torch.Tensor, y: torch.Tensor, names, generator: torch.Generator):
    """Apply `names` in order. x: (B, C, H, W) float in [0, 1]; y: (B, H, W). Returns new (x, y)."""
    for name in names:
        x, y = _TRANSFORMS[name](x, y, generator)
    return x, y


def _chance(x: torch.Tensor, generator, p: float = 0.5) -> torch.Tensor:
    return torch.rand(x.shape[0], device=x.device, generator=generator) < p


def _where(selected: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(selected.view(-1, *([1] * (old.dim() - 1))), new, old)


def _flip(dim: int):
    def transform(x, y, generator):
        selected = _chance(x, generator)
        return _where(selected, x.flip(dim), x), _where(selected, y.flip(dim), y)

    return transform


def _rotate(x, y, k: torch.Tensor):
    """Rotate sample i by k[i] quarter turns. Every rotation of the whole batch is computed and selected per sample,
    which costs a few copies but no host sync (selecting a subset would need its size on the host)."""
    for turns in (1, 2, 3):
        selected = k == turns
        x = _where(selected, torch.rot90(x, turns, dims=(-2, -1)), x)
        y = _where(selected, torch.rot90(y, turns, dims=(-2, -1)), y)
    return x, y


def _rotate90(x, y, generator):
    k = torch.randint(0, 4, (x.shape[0],), device=x.device, generator=generator)
    return _rotate(x, y, torch.where(_chance(x, generator), k, torch.zeros_like(k)))


def _d4(x, y, generator):
    k = torch.randint(0, 4, (x.shape[0],), device=x.device, generator=generator)
    x, y = _rotate(x, y, k)
    selected = _chance(x, generator)
    return _where(selected, x.flip(-1), x), _where(selected, y.flip(-1), y)


def _blur(x, y, generator):
    selected = _chance(x, generator)
    size = 3 + 2 * torch.randint(0, 3, (x.shape[0],), device=x.device, generator=generator)
    out = x
    for k in (3, 5, 7):  # the whole batch at each size, selected per sample (no host sync, as in _rotate)
        blurred = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="reflect"), k, stride=1)
        out = _where(selected & (size == k), blurred, out)
    return out, y


def _brightness_contrast(x, y, generator):
    selected = _chance(x, generator)
    shape = (x.shape[0], 1, 1, 1)
    alpha = 1 + (torch.rand(shape, device=x.device, generator=generator) * 0.4 - 0.2)
    beta = torch.rand(shape, device=x.device, generator=generator) * 0.4 - 0.2
    return _where(selected, (x * alpha + beta).clamp(0, 1), x), y


def _multiplicative_noise(x, y, generator):
    selected = _chance(x, generator)
    noise = 0.9 + 0.2 * torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return _where(selected, (x * noise).clamp(0, 1), x), y


def _posterize(x, y, generator):
    # DARTS (HEAD): float -> uint8 by truncation (albumentations' from_float), keep the top 6 bits, back to float.
    levels = torch.floor(x.clamp(0, 1) * 255)
    return (levels - torch.remainder(levels, 4)) / 255, y


_TRANSFORMS = {  # the names train.augment accepts (AUGMENTATIONS, below)
    "HorizontalFlip": _flip(-1),
    "VerticalFlip": _flip(-2),
    "RandomRotate90": _rotate90,
    "D4": _d4,
    "Blur": _blur,
    "RandomBrightnessContrast": _brightness_contrast,
    "MultiplicativeNoise": _multiplicative_noise,
    "Posterize": _posterize,
}
assert tuple(_TRANSFORMS) == AUGMENTATIONS, "smptrain.core.choices.AUGMENTATIONS lists what is implemented here"
