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
between blocks): those fields are :mod:`emdiffuse.training.synthetic_fields`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from emdiffuse.training.synthetic_fields import (
    CELL_JITTER,
    MITO_PER_CELL,
    MITO_PROB,
    S_GRAIN,
    S_LOW,
    S_MITO,
    S_SEED,
    S_VES,
    S_VESCLUSTER,
    S_WHITE,
    VESICLES_PER_CELL,
    Params,
    cell_walls,
    coarse_walls,
    smooth_field,
    uniform,
    value_noise_points,
)


def _mitochondria(seed, p: Params, origin, shape, image: np.ndarray) -> None:
    """Draw the mitochondria that reach the block into ``image`` (in place): up to
    ``MITO_PER_CELL`` candidates per Voronoi cell."""
    for n in range(MITO_PER_CELL):
        _mitochondria_one(seed, p, origin, shape, image, n)


def _mitochondria_one(seed, p: Params, origin, shape, image: np.ndarray, n: int) -> None:
    """Candidate ``n`` of every Voronoi cell that can reach the block, drawn if present."""
    mito = _mito_candidates(seed, p, origin, shape, n)
    if mito is None:
        return
    end = np.asarray(origin) + np.asarray(shape)
    memw = max(0.8, 0.9 * p.mem_half)
    for k in np.flatnonzero(mito["present"]):
        one = {name: values[k] for name, values in mito.items()}
        _draw_mitochondrion(image, origin, end, one, memw)


def _mito_candidates(seed, p: Params, origin, shape, n: int) -> dict[str, np.ndarray] | None:
    """Per lattice cell near the block: centre, axis, radius, half length, cristae period and
    phase, shade, and whether the candidate is drawn (it fits inside its cell)."""
    c = p.cell  # one candidate per Voronoi cell, near its seed (far from the walls)
    reach = p.mito_l[1] + p.mito_r[1] + 2 + p.warp
    lo = [int(np.floor((o - reach) / c)) - 1 for o in origin]
    hi = [int(np.floor((o + n + reach) / c)) + 1 for o, n in zip(origin, shape, strict=True)]
    iz, iy, ix = np.meshgrid(
        *[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"
    )
    iz, iy, ix = iz.ravel(), iy.ravel(), ix.ravel()
    if iz.size == 0:
        return None

    def u(k):
        return uniform(seed, S_MITO + 20 * k + 400 * n, iz, iy, ix).astype(np.float64)

    present = u(0) < MITO_PROB
    j = CELL_JITTER

    def seed_pos(i, stream, k):
        s = i + 0.5 + j * (2 * uniform(seed, stream, iz, iy, ix).astype(np.float64) - 1)
        return (s + 0.45 * (u(k) - 0.5)) * c

    center = np.stack(
        [seed_pos(iz, S_SEED + 10, 1), seed_pos(iy, S_SEED + 11, 2), seed_pos(ix, S_SEED + 12, 3)],
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
    room, _ = cell_walls(seed, p, center[:, 0], center[:, 1], center[:, 2])
    room = room.astype(np.float64) - 1.5 * p.mem_half
    radius = np.minimum(radius, room * 0.8)
    half = np.minimum(half, 1.6 * room - radius)  # the walls are drawn over any overlap
    present &= (radius >= p.mito_r[0] * 0.5) & (half >= 0)
    return {"present": present, "center": center, "axis": axis, "radius": radius,
            "half": half, "period": period, "phase": phase, "shade": shade}  # fmt: skip


def _draw_mitochondrion(image: np.ndarray, origin, end, m: dict, memw: float) -> None:
    """One capsule into ``image`` (in place): matrix, double membrane, lamellar cristae."""
    a, r, h, center = m["axis"], m["radius"], m["half"], m["center"]
    ext = np.abs(a) * h + r + 1
    b0 = np.maximum(np.floor(center - ext).astype(int), origin)
    b1 = np.minimum(np.ceil(center + ext).astype(int) + 1, end)
    if np.any(b1 <= b0):
        return
    z = (np.arange(b0[0], b1[0]) - center[0]).astype(np.float32)[:, None, None]
    y = (np.arange(b0[1], b1[1]) - center[1]).astype(np.float32)[None, :, None]
    x = (np.arange(b0[2], b1[2]) - center[2]).astype(np.float32)[None, None, :]
    t = z * np.float32(a[0]) + y * np.float32(a[1]) + x * np.float32(a[2])
    tc = np.clip(t, -h, h)
    dist2 = (z - tc * a[0]) ** 2 + (y - tc * a[1]) ** 2 + (x - tc * a[2]) ** 2
    d = np.sqrt(dist2) - np.float32(r)  # signed distance, < 0 inside
    inside = d < 0
    if not inside.any():
        return
    sl = tuple(slice(int(s0 - o), int(s1 - o)) for s0, s1, o in zip(b0, b1, origin, strict=True))
    region = image[sl]
    # matrix, double membrane (outer at the surface, inner ~3.5 membrane widths in)
    val = np.full(d.shape, np.float32(m["shade"]), np.float32)
    val = val + 0.35 * (region - 0.7)  # keep some of the granular texture
    outer = np.exp(-(((d + memw) / memw) ** 2))
    inner = np.exp(-(((d + 3.6 * memw) / memw) ** 2))
    # lamellar cristae across the axis, starting from the inner membrane
    stripe = np.cos(2 * np.pi * (t / np.float32(m["period"]) + np.float32(m["phase"])))
    crista = np.clip((stripe - 0.55) / 0.45, 0, 1) * (d < -3.6 * memw)
    dark = np.maximum(np.maximum(outer, inner), 0.85 * crista)
    val = val * (1 - dark) + np.float32(0.12) * dark
    region[...] = np.where(inside, val, region)


def _vesicles(seed, p: Params, origin, shape, image: np.ndarray) -> None:
    """Vesicles: a few candidates per small lattice cell, each drawn entirely inside its cell,
    so a block looks only at the cells it overlaps."""
    for n in range(VESICLES_PER_CELL):
        _vesicles_one(seed, p, origin, shape, image, 10 * n)


def _vesicles_one(seed, p: Params, origin, shape, image: np.ndarray, salt: int) -> None:
    c = p.ves_cell
    # a vesicle's centre lies anywhere in its cell and its drawn box reaches < c beyond it:
    # the cells overlapping the block and their neighbours
    first = [int(np.floor_divide(o, c)) - 1 for o in origin]
    last = [int(np.floor_divide(o + n - 1, c)) + 1 for o, n in zip(origin, shape, strict=True)]
    cz = np.arange(first[0], last[0] + 1)[:, None, None]
    cy = np.arange(first[1], last[1] + 1)[None, :, None]
    cx = np.arange(first[2], last[2] + 1)[None, None, :]
    r = p.ves_r[0] + (p.ves_r[1] - p.ves_r[0]) * uniform(seed, S_VES + salt, cz, cy, cx)
    pz = (c * (cz + uniform(seed, S_VES + salt + 1, cz, cy, cx))).astype(np.float32)
    py = (c * (cy + uniform(seed, S_VES + salt + 2, cz, cy, cx))).astype(np.float32)
    px = (c * (cx + uniform(seed, S_VES + salt + 3, cz, cy, cx))).astype(np.float32)
    pz, py, px = np.broadcast_arrays(pz, py, px)
    cluster = value_noise_points(seed, S_VESCLUSTER, pz, py, px, p.ves_cluster)
    prob = 0.9 * np.clip((cluster - 0.45) / 0.15, 0, 1)
    present = uniform(seed, S_VES + salt + 4, cz, cy, cx) < prob
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
    p = Params(voxel_size)

    wall, base = coarse_walls(seed, p, origin, shape)
    # granular cytoplasm: value noise on a 2-voxel lattice plus white hashed noise
    grain = smooth_field(origin, shape, 2, lambda a, b, c: uniform(seed, S_GRAIN, a, b, c))
    low = smooth_field(origin, shape, p.low_step, lambda a, b, c: uniform(seed, S_LOW, a, b, c))
    mid = smooth_field(origin, shape, 5, lambda a, b, c: uniform(seed, S_GRAIN + 50, a, b, c))
    gz = np.arange(origin[0], origin[0] + shape[0])[:, None, None]
    gy = np.arange(origin[1], origin[1] + shape[1])[None, :, None]
    gx = np.arange(origin[2], origin[2] + shape[2])[None, None, :]
    white = uniform(seed, S_WHITE, gz, gy, gx)
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
