"""A plain reference blender for the tests: tiles summed with their windows over one box,
divided by the summed windows. The pipeline blends with ``emdiffuse.pipeline.blend``
(totals per chunk, the weights of the whole lattice); tests check it against this."""

from __future__ import annotations

import numpy as np

Box = tuple[tuple[int, int], ...]


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
