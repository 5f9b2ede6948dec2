"""Seam statistics of a tiled output: does the tile lattice show in what was written?

Pure functions over zyx arrays and one in-plane tiling (``tile``, ``overlap``, output-grid
voxels, the lattice rule of :class:`~emdiffuse.pipeline.lattice.AxisTiling`), used by the
seamless-texture tests and by ``benchmarks/tiling.py``:

- ``std_ratio``: standard deviation of a texture (an output minus its mean) in overlap zones
  (two tiles or more) over that in tile interiors (one tile); 1 when the blend keeps the
  texture, 1/sqrt(2) where two independent samples are averaged with equal weights;
- ``mid_ratio``: the same in the middle of the overlaps only (two tiles, neither weighing
  over 70 %), the worst case of a linear blend;
- ``edge_excess``: mean squared gradient across the voxel boundaries where a tile starts or
  ends inside the volume, over that across all other boundaries, minus one (the larger of y
  and x); 0 when tile edges leave no step.
"""

from __future__ import annotations

import numpy as np

from emdiffuse.pipeline.blend import window_1d
from emdiffuse.pipeline.lattice import AxisTiling


def coverage(n: int, tile: int, overlap: int) -> np.ndarray:
    """How many tiles cover each position of an axis of length ``n``."""
    axis = AxisTiling(n, tile, overlap)
    count = np.zeros(n, dtype=int)
    for i in range(len(axis)):
        a, b = axis.output_extent(i)
        count[a:b] += 1
    return count


def tile_edges(n: int, tile: int, overlap: int) -> list[int]:
    """Boundaries ``p | p+1`` (as ``p``) where a tile starts or ends inside the axis."""
    origins = AxisTiling(n, tile, overlap).origins
    edges = {int(o) - 1 for o in origins[1:]} | {int(o) + tile - 1 for o in origins[:-1]}
    return sorted(e for e in edges if 0 <= e < n - 1)


def overlap_middle(n: int, tile: int, overlap: int) -> np.ndarray:
    """Positions covered by exactly two tiles, neither weighing over 70 % of their sum."""
    axis = AxisTiling(n, tile, overlap)
    window = window_1d(tile, overlap)
    weights = np.zeros((len(axis), n))
    for i in range(len(axis)):
        a, b = axis.output_extent(i)
        weights[i, a:b] = window[: b - a]
    share = weights.max(axis=0) / weights.sum(axis=0)
    return ((weights > 0).sum(axis=0) == 2) & (share <= 0.7)


def distance_to_tile_edge(n: int, tile: int, overlap: int) -> np.ndarray:
    """Voxels from each position of an axis to the nearest tile edge inside the axis (the
    axis length where there is none)."""
    edges = np.asarray(tile_edges(n, tile, overlap), dtype=np.float64) + 0.5
    if edges.size == 0:
        return np.full(n, n, dtype=np.int64)
    centres = np.arange(n, dtype=np.float64)
    return np.floor(np.abs(centres[:, None] - edges[None, :]).min(axis=1)).astype(np.int64)


def texture_ratios(texture: np.ndarray, tile: int, overlap: int) -> dict[str, float]:
    """``std_ratio`` and ``mid_ratio`` of a zyx ``texture`` (see the module docstring)."""
    _, ny, nx = texture.shape
    cy, cx = coverage(ny, tile, overlap), coverage(nx, tile, overlap)
    interior = (cy[:, None] == 1) & (cx[None, :] == 1)
    overlaps = (cy[:, None] >= 2) | (cx[None, :] >= 2)
    mid_y, mid_x = overlap_middle(ny, tile, overlap), overlap_middle(nx, tile, overlap)
    mid = (mid_y[:, None] & (cx[None, :] == 1)) | ((cy[:, None] == 1) & mid_x[None, :])
    std_in = texture[:, interior].std()
    return {
        "std_ratio": float(texture[:, overlaps].std() / std_in),
        "mid_ratio": float(texture[:, mid].std() / std_in),
    }


def edge_excess(output: np.ndarray, tile: int, overlap: int, *, shift: int = 0) -> float:
    """``edge_excess`` of a zyx ``output`` (see the module docstring). With ``shift``, the
    boundaries ``shift`` voxels after the tile edges are read instead: half the stride puts
    them inside the tiles, where there is no seam (what the statistic reads by chance)."""
    excess = []
    for axis in (1, 2):
        n = output.shape[axis]
        energy = (np.diff(output.astype(np.float64), axis=axis) ** 2).mean(
            axis=tuple(a for a in range(3) if a != axis)
        )
        edges = np.zeros(n - 1, dtype=bool)
        at = np.asarray(tile_edges(n, tile, overlap), dtype=np.int64) + shift
        edges[at[(at >= 0) & (at < n - 1)]] = True
        if edges.any():
            excess.append(energy[edges].mean() / energy[~edges].mean() - 1.0)
    return float(max(excess)) if excess else 0.0


def seam_statistics(texture: np.ndarray, output: np.ndarray, tile: int, overlap: int) -> dict:
    """``std_ratio``, ``mid_ratio`` of ``texture`` and ``edge_excess`` of ``output``."""
    return {**texture_ratios(texture, tile, overlap), "edge_excess": edge_excess(output, tile, overlap)}
