"""Blending of overlapping tiles: a smooth separable window, normalised per voxel.

Each tile's output is multiplied by a window that is flat (1) in its middle and falls off
with a raised-cosine ramp over the ``overlap`` voxels at each side. The ramp never reaches
zero, so a voxel at a volume border covered by one tile only is still covered. A voxel's
value is ``sum_i w_i * v_i / sum_i w_i`` over all lattice tiles that cover it; since the
lattice is global and every tile covering a voxel in a chunk intersects that chunk, the
sum is the same in every chunking.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from emdiffuse.pipeline.lattice import Box


@lru_cache(maxsize=64)
def window_1d(tile: int, overlap: int) -> np.ndarray:
    """Weights of length ``tile``: raised-cosine ramps of ``overlap`` voxels, 1 between.

    The ramp samples the half cosine at voxel centres, so the first weight is
    ``sin(pi / (4 * overlap))**2 > 0``. Read-only float64 array.
    """
    weights = np.ones(tile, dtype=np.float64)
    ramp_len = min(overlap, tile // 2)
    if ramp_len > 0:
        centres = (np.arange(ramp_len) + 0.5) / ramp_len
        ramp = np.sin(0.5 * np.pi * centres) ** 2
        weights[:ramp_len] = ramp
        weights[tile - ramp_len :] = np.minimum(weights[tile - ramp_len :], ramp[::-1])
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=16)
def window_2d(tile: int, overlap: int) -> np.ndarray:
    """Separable yx window ``window_1d ⊗ window_1d`` as float32 (read-only)."""
    w = window_1d(tile, overlap)
    out = np.outer(w, w).astype(np.float32)
    out.setflags(write=False)
    return out


class Accumulator:
    """Weighted sum of tiles over one output-grid box (zyx).

    ``add`` takes a tile's values over its own output box (any part may fall outside the
    accumulator's box: only the intersection is used). ``result`` divides by the summed
    weights; voxels no tile covered are NaN (the caller fills them, e.g. kept slices).
    """

    def __init__(self, box: Box, *, dtype=np.float64):
        self.box = box
        shape = tuple(b - a for a, b in box)
        self.total = np.zeros(shape, dtype=dtype)
        self.weight = np.zeros(shape, dtype=dtype)

    def add(self, tile_box: Box, values: np.ndarray, window: np.ndarray) -> None:
        """Add ``values`` (dz, ty, tx) on ``tile_box`` weighted by ``window`` (ty, tx).

        ``values`` may be larger than the (cropped) ``tile_box`` in y and x: the extra part
        (reflection padding) is ignored.
        """
        dst, src = [], []
        for (a, b), (ta, tb) in zip(self.box, tile_box, strict=True):
            lo, hi = max(a, ta), min(b, tb)
            if lo >= hi:
                return
            dst.append(slice(lo - a, hi - a))
            src.append(slice(lo - ta, hi - ta))
        w = window[src[1], src[2]]
        self.total[tuple(dst)] += values[tuple(src)] * w
        self.weight[tuple(dst)] += w

    def covered(self) -> np.ndarray:
        return self.weight > 0

    def result(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.weight > 0, self.total / self.weight, np.nan)
