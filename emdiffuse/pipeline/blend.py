"""Blending of overlapping tiles: a smooth separable window, normalised per voxel.

Each tile's output is multiplied by a window that is flat (1) in its middle and falls off
with a raised-cosine ramp over the ``overlap`` voxels at each side. The ramp never reaches
zero, so a voxel at a volume border covered by one tile only is still covered.

A tile's output comes in two parts (:func:`emdiffuse.pipeline.tasks.run_tiles`): its
*mean part* ``m`` (the tile's estimate of the posterior mean, clamped to [-1, 1]) and its
*residual part* ``r`` (the tile's sample minus ``m``: the texture, zero-mean, independent
between tiles, zero for models that give no mean of their own). Per sample and voxel::

    M = sum_i w_i m_i / sum_i w_i            linear: a weighted average of the means
    R = sum_i w_i r_i / sqrt((1 - rho) sum_i w_i**2 + rho (sum_i w_i)**2)
                                             variance-aware: residuals of equal variance that
                                             correlate by rho keep that variance in overlaps
    out = clip(M + R, min(M, -1), max(M, 1))

Averaging independent textures linearly would weaken them where tiles overlap (down to
1/sqrt(2) of the standard deviation where two tiles weigh alike); dividing their weighted sum
by the root of its variance keeps the variance of a single tile. That variance is
``sum w**2`` for independent residuals (``rho = 0``) and ``(sum w)**2`` for identical ones
(``rho = 1``: the linear blend). A trained model's residuals are neither: two samples of the
same content share part of their texture (the model's calibration measures ``rho``,
:func:`emdiffuse.models.calibration.residual_correlation`; about 0.35 for the demo's
denoiser, whose overlaps came out 6-11 % too textured with ``rho = 0``). Models without that
record blend with ``rho = 0``. The clip keeps the result in [-1, 1] (what the residual adds
never takes a voxel outside it; the linear mean is left as it is, so a model without a
residual gives exactly the linear blend).

Both summed-weight maps, ``sum w`` and ``sum w**2``, are analytic over the global lattice
(:func:`chunk_weight`), and every tile covering a voxel in a chunk intersects that chunk, so
the result is the same in every chunking. The tasks add weighted tiles into a chunk's totals
(:func:`add_weighted`, the same window for both parts), and :func:`finish_chunk` divides,
adds, clips, maps back to raw units (mean and, over samples, the spread) and copies the kept
input slices of an isotropic run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from emdiffuse.models.normalization import Normalization
from emdiffuse.pipeline.lattice import Box, Lattice


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


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    box = tuple((max(p, q), min(r, s)) for (p, r), (q, s) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def add_weighted(dst: np.ndarray, dst_box: Box, tile_box: Box, values, window) -> None:
    """``dst[box ∩ tile] += values * window`` (values on the tile's box, padding ignored)."""
    inter = intersect(dst_box, tile_box)
    if inter is None:
        return
    d = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, dst_box, strict=True))
    s = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, tile_box, strict=True))
    dst[d] += values[s] * window[s[1], s[2]]


def chunk_weight(lattice: Lattice, box: Box, power: int = 1) -> np.ndarray:
    """Summed blend weights over output ``box`` (dz, dy, dx) float64: the windows of all
    lattice tiles covering each voxel (``power=2``: their squares); 0 where the model writes
    nothing (kept slices)."""
    (z0, z1), (y0, y1), (x0, x1) = box
    window = window_2d(lattice.tile, lattice.overlap)
    if power != 1:
        window = window.astype(np.float64) ** power
    plane = np.zeros((y1 - y0, x1 - x0))
    xs = [lattice.x.output_extent(i) for i in lattice.x.tiles_between(x0, x1)]
    for iy in lattice.y.tiles_between(y0, y1):
        ta, tb = lattice.y.output_extent(iy)
        ly, hy = max(y0, ta), min(y1, tb)
        for ua, ub in xs:
            lx, hx = max(x0, ua), min(x1, ub)
            plane[ly - y0 : hy - y0, lx - x0 : hx - x0] += window[
                ly - ta : hy - ta, lx - ua : hx - ua
            ]
    rows = np.zeros(z1 - z0)
    for unit in lattice.units_between(z0, z1):
        a, b = lattice.unit_output_z(unit)
        rows[max(a, z0) - z0 : min(b, z1) - z0] = 1.0
    return rows[:, None, None] * plane[None]


def residual_norm(lattice: Lattice, box: Box, weight: np.ndarray, correlation: float) -> np.ndarray:
    """The residuals' normaliser over output ``box``: the root of the variance of the
    weighted sum of unit-variance residuals that correlate by ``correlation`` (see the module
    docstring); ``weight`` is :func:`chunk_weight` of ``box``."""
    squares = chunk_weight(lattice, box, power=2)
    if not correlation:
        return np.sqrt(squares)
    return np.sqrt((1.0 - correlation) * squares + correlation * weight**2)


def blend_parts(
    lattice: Lattice,
    box: Box,
    totals: np.ndarray,
    residuals: np.ndarray | None = None,
    correlation: float = 0.0,
) -> np.ndarray:
    """The blended samples in model space (samples, dz, dy, dx) float64 from the weighted
    totals of the mean parts and (if any) of the residual parts over output ``box``, the
    residuals of overlapping tiles correlating by ``correlation``: see the module docstring.
    Voxels no tile covers (kept slices) are 0."""
    weight = chunk_weight(lattice, box)
    covered = weight > 0
    if covered.all():  # no kept slices: the same values without the masks' passes
        blends = totals / weight
        if residuals is not None:
            texture = residuals / residual_norm(lattice, box, weight, correlation)
            blends = np.clip(blends + texture, np.minimum(blends, -1.0), np.maximum(blends, 1.0))
        return blends
    safe = np.where(covered, weight, 1.0)
    blends = np.where(covered, totals / safe, 0.0)  # uncovered voxels: 0, replaced below
    if residuals is not None:
        root = np.where(covered, residual_norm(lattice, box, weight, correlation), 1.0)
        texture = np.where(covered, residuals / root, 0.0)
        blends = np.clip(blends + texture, np.minimum(blends, -1.0), np.maximum(blends, 1.0))
    return blends


def finish_chunk(
    lattice: Lattice,
    box: Box,
    totals: np.ndarray,
    normalization: Normalization,
    kept_region: np.ndarray | None,
    kept_box: Box | None,
    *,
    residuals: np.ndarray | None = None,
    correlation: float = 0.0,
    spread: Callable[[np.ndarray], np.ndarray] | None = None,
    sigmas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted totals (samples, dz, dy, dx) in model space over output ``box`` (of the mean
    parts, and of the residual parts when given, which correlate by ``correlation``) ->
    ``(mean, spread or None)`` in raw units
    (float64; the spread only for 2 samples or more): :func:`blend_parts`, averaged over the
    samples. The spread is the standard deviation over samples, or what ``spread`` makes of
    it (model space, e.g. calibrated interval half-widths), scaled to raw units by
    ``normalization`` (the target's). ``sigmas`` (mean-only runs of a model with an error
    head): the weighted totals (1, dz, dy, dx) of the head's σ, blended linearly as the mean
    and passed through ``spread`` in the same way. The kept original slices (isotropic) are
    copied from the input ``kept_region`` over ``kept_box`` (their uncertainty is 0)."""
    samples = totals.shape[0]
    blends = blend_parts(lattice, box, totals, residuals, correlation)
    mean_model = blends[0] if samples == 1 else blends.sum(axis=0) / samples
    mean = normalization.inverse(mean_model)
    std = None
    if samples > 1:
        var = np.maximum((blends**2).sum(axis=0) / samples - mean_model**2, 0.0)
        sigma = np.sqrt(var)
        std = normalization.scale_std(sigma if spread is None else spread(sigma))
    elif sigmas is not None:
        sigma = np.maximum(blend_parts(lattice, box, sigmas)[0], 0.0)
        std = normalization.scale_std(sigma if spread is None else spread(sigma))
    (z0, z1), (y0, y1), (x0, x1) = box
    for z_out, z_in in lattice.kept_slices(z0, z1):
        rz, ry, rx = (a for a, _ in kept_box)
        mean[z_out - z0] = kept_region[z_in - rz, y0 - ry : y1 - ry, x0 - rx : x1 - rx]
        if std is not None:
            std[z_out - z0] = 0.0
    return mean, std
