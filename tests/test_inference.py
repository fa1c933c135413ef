import math

import numpy as np
import pytest
import torch

from smptrain.export.predict import normalise, predict_in_patches


def reference_blend(model, tile, patch, overlap):
    """The DARTS rule written out independently: pad by 1 (reflect), grid with step patch-overlap (last patch moved
    inward), weights = outer product of a linear ramp over `overlap` pixels, weighted mean of sigmoid(logits)."""
    padded = torch.nn.functional.pad(tile, (1, 1, 1, 1), mode="reflect")[0]
    _, h, w = padded.shape
    step = patch - overlap
    ramp = np.ones(patch)
    if overlap:
        ramp[:overlap] = np.linspace(0, 1, overlap)
        ramp[-overlap:] = np.linspace(1, 0, overlap)
    weight = np.outer(ramp, ramp)
    total, norm = np.zeros((h, w)), np.zeros((h, w))
    for i in range(math.ceil((h - overlap) / step)):
        for j in range(math.ceil((w - overlap) / step)):
            y, x = min(i * step, h - patch), min(j * step, w - patch)
            with torch.no_grad():
                p = torch.sigmoid(model(padded[None, :, y:y + patch, x:x + patch]))[0, 0].double().numpy()
            total[y:y + patch, x:x + patch] += p * weight
            norm[y:y + patch, x:x + patch] += weight
    return (total / np.where(norm == 0, 1, norm))[1:-1, 1:-1]


class Smooth(torch.nn.Module):
    """A tiny deterministic 'model' whose output depends on position inside the patch (so blending matters)."""

    def forward(self, x):
        ramp = torch.linspace(-2, 2, x.shape[-1])
        return (x.mean(1, keepdim=True) * 4 - 2) + ramp.view(1, 1, 1, -1)


@pytest.mark.parametrize("size, patch, overlap, batch", [((70, 90), 32, 8, 3), ((64, 64), 32, 0, 8), ((50, 41), 32, 12, 1)])
def test_patch_blending_matches_the_darts_rule(size, patch, overlap, batch):
    tile = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    ours = predict_in_patches(Smooth(), tile, patch, overlap, batch)
    assert ours.shape == (1, *size) and ours.min() >= 0 and ours.max() <= 1
    np.testing.assert_allclose(ours[0].numpy(), reference_blend(Smooth(), tile, patch, overlap), atol=1e-6)


def test_nan_batches_are_zero_and_lone_nans_become_zero():
    tile = torch.rand(1, 2, 40, 40)
    tile[:, :, 5, 5] = math.nan
    out = predict_in_patches(Smooth(), tile, 32, 8, batch_size=100)
    assert torch.isfinite(out).all()
    tile[:, :, :, :] = math.nan
    assert (predict_in_patches(Smooth(), tile, 32, 8, batch_size=2) == 0).all()


def test_normalise_clips_like_darts():
    raw = np.array([[[3000.0, 6000.0]], [[-1.0, 0.5]]])
    x = normalise(raw, {"bands": ["red", "curv"], "band_factors": [1 / 3000, 0.1], "band_offsets": [0.0, 0.5]})
    assert x[0, 0].tolist() == [1.0, 1.0] and x[1, 0].tolist() == pytest.approx([0.4, 0.55])
