"""Synthetic EM-like volumes: an infinite, seeded, near-isotropic FIB-SEM-looking volume.

Every voxel is a pure function of ``(seed, global z, y, x, voxel_size)``: nothing depends on
a shared random stream, so any block equals the same region cut from a larger block, and a
volume of any size is generated chunk by chunk in bounded memory.

What is drawn (sizes in nm, converted to voxels with ``voxel_size``):

- **Cells**: a power diagram (Voronoi with random per-cell weights, so sizes vary) of seed
  points jittered on a global cubic lattice (~1 um), in smoothly warped coordinates so the
  walls curve. Walls are dark stained membranes ~2-3 voxels thick (intensity ~0.1); each
  cell has its own cytoplasm brightness.
- **Mitochondria**: capsules (radius 90-160 nm, up to ~1 um long), up to two per cell near
  its seed and shrunk to stay inside it; darker matrix, a double membrane, lamellar cristae.
- **Vesicles**: small spheres (radius ~20-30 nm) with a dark rim, clustered by a smooth field.
- **Texture**: granular cytoplasm (coordinate-hashed value noise at 2 voxels plus a little
  white hashed noise, dark ribosome-like specks) and a mild smooth intensity variation.

Randomness comes from a counter-based integer hash keyed on ``(seed, stream, lattice
index...)``: a lattice cell's objects are derived from its index alone, so a block needs only
the cells whose objects can reach it. Smooth fields are values on a global lattice,
interpolated trilinearly with weights that depend only on global coordinates (bit-exact
between blocks).
"""

from __future__ import annotations

import dask.array as da
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
_S_SEED, _S_WARP, _S_CELLVAL, _S_MITO, _S_VES, _S_VESCLUSTER, _S_GRAIN, _S_WHITE, _S_LOW = (
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


def _uniform(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform float32 in [0, 1) from the hash of coordinates."""
    return (_hash(seed, stream, *coords) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def coordinate_hash(seed: int, stream: int, *coords) -> np.ndarray:
    """Counter-based uint32 hash of integer coordinates (arrays broadcast together), keyed on
    ``seed`` and ``stream``: the same coordinates give the same value in every block."""
    return _hash(seed, stream, *coords)


def hashed_uniform(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform float32 in [0, 1) per integer coordinate tuple (arrays broadcast together)."""
    return _uniform(seed, stream, *coords)


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


def _smooth_field(origin, shape, step: int, lattice_fn) -> np.ndarray:
    """Trilinear interpolation over the block of ``lattice_fn(iz, iy, ix)`` (broadcast integer
    lattice indices -> float32 values) on a global lattice of spacing ``step`` voxels."""
    firsts, idxs, ws = [], [], []
    for o, n in zip(origin, shape, strict=True):
        f, i, w = _axis_weights(o, n, step)
        firsts.append(f)
        idxs.append(i)
        ws.append(w)
    counts = [int(i[-1]) + 2 for i in idxs]
    iz = np.arange(firsts[0], firsts[0] + counts[0])[:, None, None]
    iy = np.arange(firsts[1], firsts[1] + counts[1])[None, :, None]
    ix = np.arange(firsts[2], firsts[2] + counts[2])[None, None, :]
    values = lattice_fn(iz, iy, ix).astype(np.float32)
    for axis in range(3):
        values = _interp_axis(values, axis, idxs[axis], ws[axis])
    return values


def _value_noise_points(seed, stream, z, y, x, step: float) -> np.ndarray:
    """Value noise in [0, 1] (trilinear over hashed lattice values) at float positions."""
    pz, py, px = (np.asarray(v, dtype=np.float64) / step for v in (z, y, x))
    fz, fy, fx = np.floor(pz), np.floor(py), np.floor(px)
    tz, ty, tx = pz - fz, py - fy, px - fx
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (tz if dz else 1 - tz) * (ty if dy else 1 - ty) * (tx if dx else 1 - tx)
                out = out + w * _uniform(seed, stream, fz + dz, fy + dy, fx + dx)
    return np.asarray(out, dtype=np.float32)


class _Params:
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
    sz = iz + 0.5 + j * (2 * _uniform(seed, _S_SEED + 10, iz, iy, ix) - 1)
    sy = iy + 0.5 + j * (2 * _uniform(seed, _S_SEED + 11, iz, iy, ix) - 1)
    sx = ix + 0.5 + j * (2 * _uniform(seed, _S_SEED + 12, iz, iy, ix) - 1)
    weight = CELL_WEIGHT * _uniform(seed, _S_SEED + 13, iz, iy, ix) ** 2
    ids = _hash(seed, _S_SEED, iz, iy, ix)
    return (
        sz.astype(np.float32).ravel(),
        sy.astype(np.float32).ravel(),
        sx.astype(np.float32).ravel(),
        weight.astype(np.float32).ravel(),
        ids.ravel(),
    )


def _walls_at(seed: int, p: _Params, qz, qy, qx):
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


def _cell_walls(seed: int, p: _Params, z, y, x):
    """Wall distance and cell id at arbitrary voxel positions (point path)."""
    z, y, x = (np.asarray(v, dtype=np.float32) for v in np.broadcast_arrays(z, y, x))
    w = 2 * p.warp
    s = p.warp_step
    qz = (z + (_value_noise_points(seed, _S_WARP, z, y, x, s) - 0.5) * w) / p.cell
    qy = (y + (_value_noise_points(seed, _S_WARP + 100, z, y, x, s) - 0.5) * w) / p.cell
    qx = (x + (_value_noise_points(seed, _S_WARP + 200, z, y, x, s) - 0.5) * w) / p.cell
    return _walls_at(seed, p, qz, qy, qx)


def _coarse_walls(seed, p: _Params, origin, shape, step=2):
    """Wall distance interpolated from a global lattice of spacing ``step`` voxels, and the
    cell brightness on the nearest lattice point."""
    firsts, idxs, ws = [], [], []
    for o, n in zip(origin, shape, strict=True):
        f, i, w = _axis_weights(o, n, step)
        firsts.append(f)
        idxs.append(i)
        ws.append(w)
    counts = [int(i[-1]) + 2 for i in idxs]
    gz = (np.arange(firsts[0], firsts[0] + counts[0]) * step)[:, None, None]
    gy = (np.arange(firsts[1], firsts[1] + counts[1]) * step)[None, :, None]
    gx = (np.arange(firsts[2], firsts[2] + counts[2]) * step)[None, None, :]
    w = np.float32(2 * p.warp)
    wstep = p.warp_step // step

    def warp(stream):
        field = _smooth_field(
            firsts, counts, wstep, lambda a, b, c: _uniform(seed, stream, a, b, c)
        )
        return (field - np.float32(0.5)) * w

    inv = np.float32(1.0 / p.cell)
    qz = (gz.astype(np.float32) + warp(_S_WARP)) * inv
    qy = (gy.astype(np.float32) + warp(_S_WARP + 100)) * inv
    qx = (gx.astype(np.float32) + warp(_S_WARP + 200)) * inv
    wall, owner = _walls_at(seed, p, qz, qy, qx)
    bright = (0.64 + 0.14 * (owner >> np.uint32(8)).astype(np.float32) * 2.0**-24).astype(
        np.float32
    )
    for axis in range(3):
        wall = _interp_axis(wall, axis, idxs[axis], ws[axis])
    # nearest lattice point for the (piecewise constant) cell brightness
    near = [(i + (w >= 0.5)).astype(np.int64) for i, w in zip(idxs, ws, strict=True)]
    bright = bright[np.ix_(*near)]
    return wall, bright


def _mitochondria(seed, p: _Params, origin, shape, image: np.ndarray) -> None:
    """Draw the mitochondria that reach the block into ``image`` (in place): up to
    ``MITO_PER_CELL`` candidates per Voronoi cell."""
    for n in range(MITO_PER_CELL):
        _mitochondria_one(seed, p, origin, shape, image, n)


def _mitochondria_one(seed, p: _Params, origin, shape, image: np.ndarray, n: int) -> None:
    c = p.cell  # one candidate per Voronoi cell, near its seed (far from the walls)
    reach = p.mito_l[1] + p.mito_r[1] + 2 + p.warp
    lo = [int(np.floor((o - reach) / c)) - 1 for o in origin]
    hi = [int(np.floor((o + n + reach) / c)) + 1 for o, n in zip(origin, shape, strict=True)]
    iz, iy, ix = np.meshgrid(
        *[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"
    )
    iz, iy, ix = iz.ravel(), iy.ravel(), ix.ravel()
    if iz.size == 0:
        return

    def u(k):
        return _uniform(seed, _S_MITO + 20 * k + 400 * n, iz, iy, ix).astype(np.float64)

    present = u(0) < MITO_PROB
    j = CELL_JITTER

    def seed_pos(i, stream, k):
        s = i + 0.5 + j * (2 * _uniform(seed, stream, iz, iy, ix).astype(np.float64) - 1)
        return (s + 0.45 * (u(k) - 0.5)) * c

    center = np.stack(
        [
            seed_pos(iz, _S_SEED + 10, 1),
            seed_pos(iy, _S_SEED + 11, 2),
            seed_pos(ix, _S_SEED + 12, 3),
        ],
        axis=1,
    )
    # axis direction: uniform on the sphere
    cos_t = 2 * u(4) - 1
    phi = 2 * np.pi * u(5)
    sin_t = np.sqrt(1 - cos_t**2)
    axis = np.stack([cos_t, sin_t * np.cos(phi), sin_t * np.sin(phi)], axis=1)
    radius = p.mito_r[0] + (p.mito_r[1] - p.mito_r[0]) * u(6)
    half = p.mito_l[0] + (p.mito_l[1] - p.mito_l[0]) * u(7)
    period = p.crista[0] + (p.crista[1] - p.crista[0]) * u(8)
    phase = u(9)
    shade = 0.40 + 0.08 * u(10)
    # keep each mitochondrion inside its cell: shrink to the wall distance at its centre
    room, _ = _cell_walls(seed, p, center[:, 0], center[:, 1], center[:, 2])
    room = room.astype(np.float64) - 1.5 * p.mem_half
    radius = np.minimum(radius, room * 0.8)
    half = np.minimum(half, 1.6 * room - radius)  # the walls are drawn over any overlap
    present &= (radius >= p.mito_r[0] * 0.5) & (half >= 0)

    end = np.asarray(origin) + np.asarray(shape)
    memw = max(0.8, 0.9 * p.mem_half)
    for k in np.flatnonzero(present):
        a, r, h = axis[k], radius[k], half[k]
        ext = np.abs(a) * h + r + 1
        b0 = np.maximum(np.floor(center[k] - ext).astype(int), origin)
        b1 = np.minimum(np.ceil(center[k] + ext).astype(int) + 1, end)
        if np.any(b1 <= b0):
            continue
        z = (np.arange(b0[0], b1[0]) - center[k, 0]).astype(np.float32)[:, None, None]
        y = (np.arange(b0[1], b1[1]) - center[k, 1]).astype(np.float32)[None, :, None]
        x = (np.arange(b0[2], b1[2]) - center[k, 2]).astype(np.float32)[None, None, :]
        t = z * np.float32(a[0]) + y * np.float32(a[1]) + x * np.float32(a[2])
        tc = np.clip(t, -h, h)
        dist2 = (z - tc * a[0]) ** 2 + (y - tc * a[1]) ** 2 + (x - tc * a[2]) ** 2
        d = np.sqrt(dist2) - np.float32(r)  # signed distance, < 0 inside
        inside = d < 0
        if not inside.any():
            continue
        sl = tuple(
            slice(int(s0 - o), int(s1 - o)) for s0, s1, o in zip(b0, b1, origin, strict=True)
        )
        region = image[sl]
        # matrix, double membrane (outer at the surface, inner ~3.5 membrane widths in)
        val = np.full(d.shape, np.float32(shade[k]), np.float32)
        val = val + 0.35 * (region - 0.7)  # keep some of the granular texture
        outer = np.exp(-(((d + memw) / memw) ** 2))
        inner = np.exp(-(((d + 3.6 * memw) / memw) ** 2))
        # lamellar cristae across the axis, starting from the inner membrane
        stripe = np.cos(2 * np.pi * (t / np.float32(period[k]) + np.float32(phase[k])))
        crista = np.clip((stripe - 0.55) / 0.45, 0, 1) * (d < -3.6 * memw)
        dark = np.maximum(np.maximum(outer, inner), 0.85 * crista)
        val = val * (1 - dark) + np.float32(0.12) * dark
        region[...] = np.where(inside, val, region)


def _vesicles(seed, p: _Params, origin, shape, image: np.ndarray) -> None:
    """Vesicles: a few candidates per small lattice cell, each drawn entirely inside its cell,
    so a block looks only at the cells it overlaps."""
    for n in range(VESICLES_PER_CELL):
        _vesicles_one(seed, p, origin, shape, image, 10 * n)


def _vesicles_one(seed, p: _Params, origin, shape, image: np.ndarray, salt: int) -> None:
    c = p.ves_cell
    # a vesicle's centre lies anywhere in its cell and its drawn box reaches < c beyond it:
    # the cells overlapping the block and their neighbours
    first = [int(np.floor_divide(o, c)) - 1 for o in origin]
    last = [int(np.floor_divide(o + n - 1, c)) + 1 for o, n in zip(origin, shape, strict=True)]
    cz = np.arange(first[0], last[0] + 1)[:, None, None]
    cy = np.arange(first[1], last[1] + 1)[None, :, None]
    cx = np.arange(first[2], last[2] + 1)[None, None, :]
    r = p.ves_r[0] + (p.ves_r[1] - p.ves_r[0]) * _uniform(seed, _S_VES + salt, cz, cy, cx)
    pz = (c * (cz + _uniform(seed, _S_VES + salt + 1, cz, cy, cx))).astype(np.float32)
    py = (c * (cy + _uniform(seed, _S_VES + salt + 2, cz, cy, cx))).astype(np.float32)
    px = (c * (cx + _uniform(seed, _S_VES + salt + 3, cz, cy, cx))).astype(np.float32)
    pz, py, px = np.broadcast_arrays(pz, py, px)
    cluster = _value_noise_points(seed, _S_VESCLUSTER, pz, py, px, p.ves_cluster)
    prob = 0.9 * np.clip((cluster - 0.45) / 0.15, 0, 1)
    present = _uniform(seed, _S_VES + salt + 4, cz, cy, cx) < prob
    r = np.broadcast_to(r, present.shape)
    if not present.any():
        return
    end = [o + n for o, n in zip(origin, shape, strict=True)]
    for k in zip(*np.nonzero(present), strict=True):
        rk = float(r[k])
        ctr = (float(pz[k]), float(py[k]), float(px[k]))
        b0 = [max(int(np.floor(c - rk - 2)), o) for c, o in zip(ctr, origin, strict=True)]
        b1 = [min(int(np.ceil(c + rk + 2)) + 1, e) for c, e in zip(ctr, end, strict=True)]
        if any(a >= b for a, b in zip(b0, b1, strict=True)):
            continue
        z = (np.arange(b0[0], b1[0], dtype=np.float32) - ctr[0])[:, None, None]
        y = (np.arange(b0[1], b1[1], dtype=np.float32) - ctr[1])[None, :, None]
        x = (np.arange(b0[2], b1[2], dtype=np.float32) - ctr[2])[None, None, :]
        dist = np.sqrt(z * z + y * y + x * x) - np.float32(rk)
        sl = tuple(slice(a - o, b - o) for a, b, o in zip(b0, b1, origin, strict=True))
        region = image[sl]
        rim = np.exp(-((dist / np.float32(0.75)) ** 2))
        val = np.where(dist < 0, np.float32(0.74) + 0.3 * (region - 0.7), region)
        region[...] = val * (1 - 0.8 * rim) + np.float32(0.15 * 0.8) * rim


def synthetic_block(
    origin: tuple[int, int, int],
    shape: tuple[int, int, int],
    *,
    seed: int = 0,
    voxel_size: float = 8.0,
) -> np.ndarray:
    """The block ``[origin, origin + shape)`` (zyx voxels) of the infinite seeded synthetic
    EM volume at isotropic ``voxel_size`` nm; float32 in [0, 1] (membranes ~0.1, cytoplasm
    ~0.6-0.8). Equal to the same region cut from any larger block."""
    origin = tuple(int(o) for o in origin)
    shape = tuple(int(n) for n in shape)
    if len(origin) != 3 or len(shape) != 3:
        raise ValueError("origin and shape must have 3 entries (zyx)")
    if any(n <= 0 for n in shape):
        return np.zeros(tuple(max(n, 0) for n in shape), np.float32)
    if voxel_size <= 0:
        raise ValueError("voxel_size must be positive (nm)")
    p = _Params(voxel_size)

    wall, base = _coarse_walls(seed, p, origin, shape)
    # granular cytoplasm: value noise on a 2-voxel lattice plus white hashed noise
    grain = _smooth_field(origin, shape, 2, lambda a, b, c: _uniform(seed, _S_GRAIN, a, b, c))
    low = _smooth_field(origin, shape, p.low_step, lambda a, b, c: _uniform(seed, _S_LOW, a, b, c))
    mid = _smooth_field(origin, shape, 5, lambda a, b, c: _uniform(seed, _S_GRAIN + 50, a, b, c))
    gz = np.arange(origin[0], origin[0] + shape[0])[:, None, None]
    gy = np.arange(origin[1], origin[1] + shape[1])[None, :, None]
    gx = np.arange(origin[2], origin[2] + shape[2])[None, None, :]
    white = _uniform(seed, _S_WHITE, gz, gy, gx)
    image = base + np.float32(0.14) * (grain - 0.5) + np.float32(0.05) * (white - 0.5)
    image += np.float32(0.12) * (mid - 0.5)
    speck = np.clip((grain + 0.6 * white - 1.02) * np.float32(1 / 0.2), 0, 1)
    image -= np.float32(0.22) * speck
    image += np.float32(0.10) * (low - 0.5)
    del grain, white, speck, low, mid

    _vesicles(seed, p, origin, shape, image)
    _mitochondria(seed, p, origin, shape, image)

    g = np.exp(-((wall / np.float32(p.mem_half)) ** 2))
    image = image * (1 - g) + np.float32(0.1) * g
    np.clip(image, 0.0, 1.0, out=image)
    return image.astype(np.float32, copy=False)


def synthetic_volume(
    shape: tuple[int, int, int],
    *,
    seed: int = 0,
    chunks: tuple[int, int, int] = (64, 256, 256),
    voxel_size: float = 8.0,
    origin: tuple[int, int, int] = (0, 0, 0),
) -> da.Array:
    """Lazy float32 dask array of the synthetic volume ``[origin, origin + shape)``, one
    independent task per chunk (each computes its block from global coordinates)."""
    shape = tuple(int(n) for n in shape)
    chunks = tuple(int(min(c, max(n, 1))) for c, n in zip(chunks, shape, strict=True))
    template = da.empty(shape, chunks=chunks, dtype=np.float32)

    def block(block_info=None):
        info = block_info[None]
        loc = info["array-location"]
        o = tuple(lo + oo for (lo, _), oo in zip(loc, origin, strict=True))
        s = tuple(hi - lo for lo, hi in loc)
        return synthetic_block(o, s, seed=seed, voxel_size=voxel_size)

    return da.map_blocks(
        block,
        dtype=np.float32,
        chunks=template.chunks,
        meta=np.empty((0, 0, 0), np.float32),
        name=f"synthetic-{seed}-{voxel_size}-{origin}-{shape}-{chunks}",
    )
