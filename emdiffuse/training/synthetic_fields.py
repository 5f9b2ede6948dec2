"""The random fields under the synthetic EM generator: counter-based hashing, smooth
lattice fields, and the power-diagram cells with their membranes.

Every value is a pure function of ``(seed, stream, global lattice index)``: a counter-based
integer hash (murmur3's finaliser) keyed on the seed and a stream per kind of random
quantity; smooth fields interpolate hashed lattice values trilinearly with weights that
depend only on global coordinates (bit-exact between blocks). :class:`Params` converts the
physical sizes (nm) to voxels. Used by :mod:`emdiffuse.training.synthetic` (the volume) and
:mod:`emdiffuse.training.degrade` (keyed noise).
"""

from __future__ import annotations

import numpy as np

# --- physical parameters (nm) ------------------------------------------------------------
CELL_NM = 1000.0  # Voronoi lattice spacing
CELL_JITTER = 0.38  # seed jitter, fraction of the lattice spacing
CELL_WEIGHT = 0.35  # largest power-diagram weight (lattice units squared): varied sizes
WARP_SCALE_NM = 480.0  # lattice of the smooth coordinate warp
WARP_NM = 110.0  # warp amplitude
MEMBRANE_HALF_NM = 11.0  # membrane half-width (gaussian profile)
MITO_PROB = 0.75
MITO_PER_CELL = 2
VESICLES_PER_CELL = 3
MITO_RADIUS_NM = (90.0, 160.0)
MITO_HALF_LENGTH_NM = (120.0, 550.0)
CRISTA_PERIOD_NM = (38.0, 55.0)
VESICLE_RADIUS_NM = (18.0, 28.0)
VESICLE_CLUSTER_NM = 400.0
LOWFREQ_NM = 1600.0

# streams of the hash (one per kind of random quantity)
S_SEED, S_WARP, S_CELLVAL, S_MITO, S_VES, S_VESCLUSTER, S_GRAIN, S_WHITE, S_LOW = (
    1000 * i for i in range(1, 10)
)

_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)
_K = np.uint32(0xCC9E2D51)


def _fmix(h: np.ndarray) -> np.ndarray:
    """murmur3 finaliser on uint32 arrays (in place where possible)."""
    h = h ^ (h >> np.uint32(16))
    h *= _M1
    h ^= h >> np.uint32(13)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def _hash(seed: int, stream: int, *coords) -> np.ndarray:
    """uint32 hash of integer coordinates (broadcast together), keyed on seed and stream."""
    start = (int(seed) * 0x9E3779B1 + int(stream) * 0x7FEB352D + 0x165667B1) & 0xFFFFFFFF
    with np.errstate(over="ignore"):
        h = _fmix(np.asarray(np.uint32(start)))
        for c in coords:
            c = np.asarray(c, dtype=np.int64).astype(np.uint32)
            h = _fmix(h ^ (c * _K + np.uint32(0x27D4EB2F)))
    return h


def uniform(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform float32 in [0, 1) from the hash of coordinates."""
    return (_hash(seed, stream, *coords) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def coordinate_hash(seed: int, stream: int, *coords) -> np.ndarray:
    """Counter-based uint32 hash of integer coordinates (arrays broadcast together), keyed on
    ``seed`` and ``stream``: the same coordinates give the same value in every block."""
    return _hash(seed, stream, *coords)


def hashed_uniform(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform float32 in [0, 1) per integer coordinate tuple (arrays broadcast together)."""
    return uniform(seed, stream, *coords)


def _axis_weights(start: int, n: int, step: int):
    """Lattice indices (relative to the first one) and weights for linear interpolation of
    global positions start..start+n-1 from a lattice with spacing ``step``."""
    pos = np.arange(start, start + n, dtype=np.int64)
    i0 = np.floor_divide(pos, step)
    first = int(i0[0])
    w = ((pos - i0 * step).astype(np.float32)) / np.float32(step)
    return first, (i0 - first), w


def _interp_axis(values: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    a = np.take(values, idx, axis=axis)
    b = np.take(values, idx + 1, axis=axis)
    shape = [1] * values.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    return a + (b - a) * w


def _block_lattice(origin, shape, step: int):
    """The global lattice points (spacing ``step``) that a block's trilinear interpolation
    reads: per axis the first lattice index and the number of points, and each voxel's
    lower lattice index (relative to the first) and weight."""
    axes = [_axis_weights(o, n, step) for o, n in zip(origin, shape, strict=True)]
    firsts, idxs, ws = ([axis[j] for axis in axes] for j in range(3))
    counts = [int(i[-1]) + 2 for i in idxs]
    return firsts, counts, idxs, ws


def _lattice_indices(firsts, counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer lattice indices (z, y, x) of those points, broadcastable against each other."""
    return tuple(
        np.arange(f, f + c).reshape([-1 if a == axis else 1 for a in range(3)])
        for axis, (f, c) in enumerate(zip(firsts, counts, strict=True))
    )


def _interp_block(values: np.ndarray, idxs, ws) -> np.ndarray:
    """Values on the lattice points -> values at the block's voxels (trilinear)."""
    for axis in range(3):
        values = _interp_axis(values, axis, idxs[axis], ws[axis])
    return values


def smooth_field(origin, shape, step: int, lattice_fn) -> np.ndarray:
    """Trilinear interpolation over the block of ``lattice_fn(iz, iy, ix)`` (broadcast integer
    lattice indices -> float32 values) on a global lattice of spacing ``step`` voxels."""
    firsts, counts, idxs, ws = _block_lattice(origin, shape, step)
    values = lattice_fn(*_lattice_indices(firsts, counts)).astype(np.float32)
    return _interp_block(values, idxs, ws)


def value_noise_points(seed, stream, z, y, x, step: float) -> np.ndarray:
    """Value noise in [0, 1] (trilinear over hashed lattice values) at float positions."""
    pz, py, px = (np.asarray(v, dtype=np.float64) / step for v in (z, y, x))
    fz, fy, fx = np.floor(pz), np.floor(py), np.floor(px)
    tz, ty, tx = pz - fz, py - fy, px - fx
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (tz if dz else 1 - tz) * (ty if dy else 1 - ty) * (tx if dx else 1 - tx)
                out = out + w * uniform(seed, stream, fz + dz, fy + dy, fx + dx)
    return np.asarray(out, dtype=np.float32)


class Params:
    """Physical parameters converted to voxels for one voxel size."""

    def __init__(self, voxel_size: float):
        v = float(voxel_size)
        self.cell = max(8.0, CELL_NM / v)
        self.warp_step = 2 * max(2, int(round(WARP_SCALE_NM / v / 2)))
        self.warp = WARP_NM / v
        self.mem_half = max(0.9, MEMBRANE_HALF_NM / v)
        self.mito_r = tuple(max(2.0, r / v) for r in MITO_RADIUS_NM)
        self.mito_l = tuple(max(1.0, r / v) for r in MITO_HALF_LENGTH_NM)
        self.crista = tuple(max(3.0, r / v) for r in CRISTA_PERIOD_NM)
        self.ves_r = tuple(max(1.5, r / v) for r in VESICLE_RADIUS_NM)
        self.ves_cell = int(np.ceil(3 * (self.ves_r[1] + 3.0)))
        self.ves_cluster = max(4.0, VESICLE_CLUSTER_NM / v)
        self.low_step = max(4, int(round(LOWFREQ_NM / v)))


def _seed_table(seed: int, lo, hi):
    """Jittered Voronoi seeds (lattice units) and cell ids for lattice cells lo..hi (incl.)."""
    iz = np.arange(lo[0], hi[0] + 1)[:, None, None]
    iy = np.arange(lo[1], hi[1] + 1)[None, :, None]
    ix = np.arange(lo[2], hi[2] + 1)[None, None, :]
    j = CELL_JITTER
    sz = iz + 0.5 + j * (2 * uniform(seed, S_SEED + 10, iz, iy, ix) - 1)
    sy = iy + 0.5 + j * (2 * uniform(seed, S_SEED + 11, iz, iy, ix) - 1)
    sx = ix + 0.5 + j * (2 * uniform(seed, S_SEED + 12, iz, iy, ix) - 1)
    weight = CELL_WEIGHT * uniform(seed, S_SEED + 13, iz, iy, ix) ** 2
    ids = _hash(seed, S_SEED, iz, iy, ix)
    return (
        sz.astype(np.float32).ravel(),
        sy.astype(np.float32).ravel(),
        sx.astype(np.float32).ravel(),
        weight.astype(np.float32).ravel(),
        ids.ravel(),
    )


def _walls_at(seed: int, p: Params, qz, qy, qx):
    """Power diagram (Voronoi with per-cell weights, so cell sizes vary) of the jittered
    lattice seeds at warped positions ``q`` (lattice units): the distance in voxels to the
    wall between the owning cell and the runner-up, and the owning cell's id."""
    qz, qy, qx = (np.asarray(v, dtype=np.float32) for v in np.broadcast_arrays(qz, qy, qx))
    cz, cy, cx = (np.floor(v).astype(np.int64) for v in (qz, qy, qx))
    lo = [int(c.min()) - 1 for c in (cz, cy, cx)]
    hi = [int(c.max()) + 1 for c in (cz, cy, cx)]
    sz, sy, sx, sw, ids = _seed_table(seed, lo, hi)
    ny, nx = hi[1] - lo[1] + 1, hi[2] - lo[2] + 1
    base = ((cz - lo[0]) * ny + (cy - lo[1])) * nx + (cx - lo[2])
    d1 = np.full(qz.shape, np.inf, np.float32)
    d2 = np.full(qz.shape, np.inf, np.float32)
    best = np.zeros(qz.shape, np.int64)
    second = np.zeros(qz.shape, np.int64)
    for oz in (-1, 0, 1):
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                k = base + ((oz * ny + oy) * nx + ox)
                d = (qz - sz[k]) ** 2
                d += (qy - sy[k]) ** 2
                d += (qx - sx[k]) ** 2
                d -= sw[k]
                closer = d < d1
                second = np.where(closer, best, np.where(d < d2, k, second))
                np.minimum(d2, d, out=d2)
                d2 = np.where(closer, d1, d2)
                best = np.where(closer, k, best)
                np.minimum(d1, d, out=d1)
    # power distances differ linearly across the wall: (D2 - D1) / (2 |s1 - s2|) is the
    # exact distance to the wall plane of the two cells
    gap = (sz[best] - sz[second]) ** 2 + (sy[best] - sy[second]) ** 2
    gap += (sx[best] - sx[second]) ** 2
    wall = (d2 - d1) / (2 * np.sqrt(np.maximum(gap, np.float32(1e-6)))) * np.float32(p.cell)
    return wall.astype(np.float32), ids[best]


def cell_walls(seed: int, p: Params, z, y, x):
    """Wall distance and cell id at arbitrary voxel positions (point path)."""
    z, y, x = (np.asarray(v, dtype=np.float32) for v in np.broadcast_arrays(z, y, x))
    w = 2 * p.warp
    s = p.warp_step
    qz = (z + (value_noise_points(seed, S_WARP, z, y, x, s) - 0.5) * w) / p.cell
    qy = (y + (value_noise_points(seed, S_WARP + 100, z, y, x, s) - 0.5) * w) / p.cell
    qx = (x + (value_noise_points(seed, S_WARP + 200, z, y, x, s) - 0.5) * w) / p.cell
    return _walls_at(seed, p, qz, qy, qx)


def coarse_walls(seed, p: Params, origin, shape, step=2):
    """Wall distance interpolated from a global lattice of spacing ``step`` voxels, and the
    cell brightness on the nearest lattice point."""
    firsts, counts, idxs, ws = _block_lattice(origin, shape, step)
    gz, gy, gx = (i * step for i in _lattice_indices(firsts, counts))
    w = np.float32(2 * p.warp)
    wstep = p.warp_step // step

    def warp(stream):
        field = smooth_field(
            firsts, counts, wstep, lambda a, b, c: uniform(seed, stream, a, b, c)
        )
        return (field - np.float32(0.5)) * w

    inv = np.float32(1.0 / p.cell)
    qz = (gz.astype(np.float32) + warp(S_WARP)) * inv
    qy = (gy.astype(np.float32) + warp(S_WARP + 100)) * inv
    qx = (gx.astype(np.float32) + warp(S_WARP + 200)) * inv
    wall, owner = _walls_at(seed, p, qz, qy, qx)
    bright = (0.64 + 0.14 * (owner >> np.uint32(8)).astype(np.float32) * 2.0**-24).astype(
        np.float32
    )
    wall = _interp_block(wall, idxs, ws)
    # nearest lattice point for the (piecewise constant) cell brightness
    near = [(i + (w >= 0.5)).astype(np.int64) for i, w in zip(idxs, ws, strict=True)]
    bright = bright[np.ix_(*near)]
    return wall, bright
