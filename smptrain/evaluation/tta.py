"""Test-time augmentation: probabilities averaged over the symmetries of the square (`d4`, 8) or its flips (4).

Every element of the dihedral group D4 is "maybe transpose, then maybe flip rows, then maybe flip columns". A
batch is transformed into all of them at once, the copies that share a shape go through the model as one batch
(on a non-square patch the transposed copies have the other shape), each output is transformed back, and the
sigmoid probabilities are averaged. Probabilities, not logits, as DARTS' ensembles average them.
"""

from __future__ import annotations

from itertools import product
from typing import Callable

import torch

from smptrain.core.choices import TTA_CHOICES


def symmetries(kind: str) -> list[tuple[bool, bool, bool]]:
    """(transpose, flip rows, flip columns) for each element; the identity first."""
    if kind not in TTA_CHOICES:
        from smptrain.core.errors import UserError

        raise UserError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {kind!r}")
    if kind == "none":
        return [(False, False, False)]
    transposes = (False, True) if kind == "d4" else (False,)
    return [(t, r, c) for t, r, c in product(transposes, (False, True), (False, True))]


def apply(x: torch.Tensor, element: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, rows, columns = element
    if transpose:
        x = x.transpose(-2, -1)
    dims = [d for d, on in ((-2, rows), (-1, columns)) if on]
    return x.flip(dims) if dims else x


def undo(x: torch.Tensor, element: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, rows, columns = element
    dims = [d for d, on in ((-2, rows), (-1, columns)) if on]
    x = x.flip(dims) if dims else x
    return x.transpose(-2, -1) if transpose else x


def averaged(probabilities_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kind: str,
             identity: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the symmetries of `probabilities_of(batch) -> (B, H, W)` for `x` (B, C, H, W).

    `identity`, when given, is the already computed untransformed result (so a caller that reports both with and
    without TTA runs the plain forward pass once, and its plain numbers are exactly those of a run without TTA).
    """
    elements = symmetries(kind)
    todo = elements[1:] if identity is not None else elements
    total = identity.double() if identity is not None else torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.float64,
                                                                      device=x.device)
    by_shape: dict[tuple, list] = {}
    for element in todo:
        by_shape.setdefault(tuple(apply(x[:1], element).shape), []).append(element)
    # at most four copies per forward pass, so TTA needs at most 4x the memory of the batch itself
    groups = [same[i:i + 4] for same in by_shape.values() for i in range(0, len(same), 4)]
    for group in groups:
        out = probabilities_of(torch.cat([apply(x, e) for e in group]))
        for e, part in zip(group, out.split(x.shape[0])):
            total += undo(part, e).double()
    return (total / len(elements)).float()
