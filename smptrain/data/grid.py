"""The grid of patches DARTS cuts an image into, along each axis: steps of `patch_size - overlap` from 0, the last
patch moved inward so that it ends at the border. Importing imagery and predicting a scene cut the same way."""

from __future__ import annotations


def patch_origins(size: int, patch_size: int, overlap: int) -> list[int]:
    """Top-left coordinates along one axis of `size` pixels (one patch at 0 when the axis is not longer than one)."""
    if size <= patch_size:
        return [0]
    step = patch_size - overlap
    return [min(start, size - patch_size) for start in range(0, size - overlap, step)]
