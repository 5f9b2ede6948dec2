"""Degradations that turn a clean volume into each task's input.

Pure functions over numpy arrays (axis order zyx, or yx for 2D), plus dask wrappers that keep
chunk-wise evaluation and give the same values whatever the chunking.

Physics and conventions
-----------------------
**Shot and read noise** (:func:`add_poisson_gaussian_noise`, task *denoise*). A scanning EM
detector counts electrons: a voxel of clean brightness ``c`` in [0, 1] receives on average
``dose * c`` signal electrons (``dose`` = electrons per voxel at full brightness), the count is
Poisson distributed, and the read-out adds Gaussian noise of ``read_noise`` electrons rms.
The result is divided by ``dose``, so it is on the clean image's [0, 1] scale with the same
mean; its variance is ``c / dose + (read_noise / dose) ** 2``. Lower dose = noisier. The
output is not clipped (a writer to an integer dtype clips). Each voxel's random numbers come
from a hash of ``(seed, global z, y, x)`` (counter-based), never from a shared stream, so a
block gives the same noise as the same region of a larger block. The Poisson count is drawn
by exact inversion of its CDF where the expected count is below ``EXACT_POISSON_BELOW``; above
that it uses the Cornish-Fisher normal quantile (mean, variance and skewness of the Poisson
law; the difference from exact sampling is far below the noise itself).

**Blur and downsampling in xy** (:func:`blur_downsample_xy`, task *super-resolve*). Imaging
at a k-times coarser pixel: the probe is modelled as a Gaussian with a full width at half
maximum of k input voxels (``sigma = k / 2.3548``), then each output pixel is the mean of a
k x k block of input pixels. Output pixel ``(i, j)`` covers input pixels
``[i*k, (i+1)*k) x [j*k, (j+1)*k)``, so its centre sits at input position
``i*k + (k-1)/2``: in physical units the output voxel size is ``k * v`` and its translation
``(k-1)/2 * v`` nm relative to the input's origin. Trailing rows/columns that do not fill a
block are dropped. The blur uses mirror ("reflect") boundaries at the image edges.

**z-subsampling by slab averaging** (:func:`subsample_z`, task *isotropic*). A thick section
(or a coarse milling step) integrates signal over its thickness: slice ``j`` of the output is
the mean of input slices ``j*k .. j*k + k - 1``, i.e. **slice j of the output represents z in
[j*k, (j+1)*k)** (input voxels); its centre is ``j*k + (k-1)/2``, so the output's z voxel size
is ``k * v_z`` and its z translation ``(k-1)/2 * v_z`` nm. Trailing slices that do not fill a
slab are dropped.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from scipy import ndimage, special

from emdiffuse.training.synthetic_fields import coordinate_hash

EXACT_POISSON_BELOW = 12.0
_STREAM_POISSON = 101
_STREAM_READ = 102
TASKS = ("denoise", "super-resolve", "isotropic")


def _open_uniform(seed: int, stream: int, origin, shape) -> np.ndarray:
    """Uniform float64 in (0, 1) per voxel, keyed on (seed, stream, global coordinates)."""
    axes = []
    nd = len(shape)
    for a, (o, n) in enumerate(zip(origin, shape, strict=True)):
        view = [1] * nd
        view[a] = n
        axes.append(np.arange(o, o + n, dtype=np.int64).reshape(view))
    h = coordinate_hash(seed, stream, *axes)
    return ((h >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0**-24


def _poisson_from_uniform(lam: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Poisson(lam) counts as float64 from uniforms ``u`` (one per voxel, same shape)."""
    lam = np.maximum(lam, 0.0)
    z = special.ndtri(u)
    # Cornish-Fisher quantile: mean lam, variance lam, skewness 1/sqrt(lam); continuity 0.5
    k = np.floor(lam + np.sqrt(lam) * z + (z * z - 1.0) / 6.0 + 0.5)
    np.maximum(k, 0.0, out=k)
    small = np.flatnonzero(lam < EXACT_POISSON_BELOW)
    if small.size:
        lam_s = lam.ravel()[small]
        u_s = u.ravel()[small]
        p = np.exp(-lam_s)
        cdf = p.copy()
        count = np.zeros(small.size)
        active = np.flatnonzero(u_s > cdf)
        n = 0
        limit = int(EXACT_POISSON_BELOW * 4 + 60)
        while active.size and n < limit:
            n += 1
            p[active] *= lam_s[active] / n
            cdf[active] += p[active]
            count[active] += 1
            active = active[u_s[active] > cdf[active]]
        k.ravel()[small] = count
    return k


def add_poisson_gaussian_noise(
    clean: np.ndarray,
    *,
    dose: float,
    read_noise: float = 1.0,
    seed: int = 0,
    origin: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Shot noise at ``dose`` electrons per voxel at full brightness plus Gaussian read noise
    of ``read_noise`` electrons rms, returned as float32 on the clean image's [0, 1] scale
    (mean preserved, variance ``clean / dose + (read_noise / dose)**2``). ``origin`` is the
    block's global position (voxels), so chunk-by-chunk noise equals one-shot noise."""
    if dose <= 0:
        raise ValueError("dose must be positive (electrons per voxel)")
    if read_noise < 0:
        raise ValueError("read_noise must be >= 0 (electrons rms)")
    clean = np.asarray(clean)
    origin = (0,) * clean.ndim if origin is None else tuple(int(o) for o in origin)
    if clean.size == 0:
        return clean.astype(np.float32)
    lam = np.clip(clean.astype(np.float64), 0.0, None) * float(dose)
    counts = _poisson_from_uniform(lam, _open_uniform(seed, _STREAM_POISSON, origin, clean.shape))
    if read_noise > 0:
        counts += read_noise * special.ndtri(_open_uniform(seed, _STREAM_READ, origin, clean.shape))
    return (counts / float(dose)).astype(np.float32)


def blur_sigma(factor: int) -> float:
    """Gaussian sigma (input voxels) of the probe for a k-times coarser pixel: FWHM = k."""
    return float(factor) / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _check_factor(factor: int) -> int:
    if int(factor) != factor or factor < 1:
        raise ValueError("factor must be a positive integer")
    return int(factor)


def _blur_xy(clean: np.ndarray, factor: int) -> np.ndarray:
    sigma = [0.0] * (clean.ndim - 2) + [blur_sigma(factor)] * 2
    return ndimage.gaussian_filter(clean.astype(np.float32), sigma, mode="reflect", truncate=4.0)


def _block_mean_xy(image: np.ndarray, factor: int) -> np.ndarray:
    k = factor
    ny, nx = (image.shape[-2] // k) * k, (image.shape[-1] // k) * k
    image = image[..., :ny, :nx]
    shape = image.shape[:-2] + (ny // k, k, nx // k, k)
    return image.reshape(shape).mean(axis=(-3, -1), dtype=np.float32)


def blur_downsample_xy(clean: np.ndarray, factor: int) -> np.ndarray:
    """Gaussian blur (FWHM = ``factor`` voxels) then ``factor`` x ``factor`` block mean in
    (y, x); float32 of shape ``(..., ny // factor, nx // factor)``. See the module docstring
    for the grid convention (output pixel i covers input [i*k, (i+1)*k))."""
    k = _check_factor(factor)
    clean = np.asarray(clean)
    if k == 1:
        return clean.astype(np.float32)
    return _block_mean_xy(_blur_xy(clean, k), k)


def subsample_z(clean: np.ndarray, factor: int) -> np.ndarray:
    """Slab averaging in z: output slice ``j`` is the mean of input slices ``j*k .. j*k+k-1``
    (it represents z in [j*k, (j+1)*k)); float32 of shape ``(nz // k, ny, nx)``."""
    k = _check_factor(factor)
    clean = np.asarray(clean, dtype=np.float32)
    nz = (clean.shape[0] // k) * k
    slabs = clean[:nz].reshape((nz // k, k) + clean.shape[1:])
    return slabs.mean(axis=1, dtype=np.float32)


# --- dask wrappers -------------------------------------------------------------------------


def _multiple_chunks(chunks: tuple[int, ...], k: int) -> int:
    """A chunk size near the largest of ``chunks`` that is a multiple of ``k``."""
    return max(k, (max(chunks) // k) * k)


def noise_volume(
    clean: da.Array, *, dose: float, read_noise: float = 1.0, seed: int = 0
) -> da.Array:
    """Chunk-wise :func:`add_poisson_gaussian_noise` (each block keyed on its global origin)."""
    if dose <= 0:
        raise ValueError("dose must be positive (electrons per voxel)")

    def block(x, block_info=None):
        origin = tuple(lo for lo, _ in block_info[0]["array-location"])
        return add_poisson_gaussian_noise(
            x, dose=dose, read_noise=read_noise, seed=seed, origin=origin
        )

    return da.map_blocks(block, clean, dtype=np.float32)


def blur_downsample_volume(clean: da.Array, factor: int) -> da.Array:
    """Chunk-wise :func:`blur_downsample_xy`: same values as the numpy function on the whole
    array (halo exchange of the blur radius in y, x; chunks regrouped to multiples of k)."""
    k = _check_factor(factor)
    clean = clean.astype(np.float32)
    if k == 1:
        return clean
    ny, nx = (clean.shape[-2] // k) * k, (clean.shape[-1] // k) * k
    if ny == 0 or nx == 0:
        raise ValueError(f"the image is smaller than the factor {k} in y or x")
    radius = int(4.0 * blur_sigma(k) + 0.5)
    cy = max(_multiple_chunks(clean.chunks[-2], k), (radius // k + 1) * k)
    cx = max(_multiple_chunks(clean.chunks[-1], k), (radius // k + 1) * k)
    clean = clean.rechunk(clean.chunks[:-2] + (cy, cx))
    depth = {a: 0 for a in range(clean.ndim - 2)}
    depth.update({clean.ndim - 2: radius, clean.ndim - 1: radius})
    blurred = clean.map_overlap(_blur_xy, depth=depth, boundary="none", dtype=np.float32, factor=k)
    blurred = blurred[..., :ny, :nx]
    blurred = blurred.rechunk(blurred.chunks[:-2] + (min(cy, ny), min(cx, nx)))
    return blurred.map_blocks(
        _block_mean_xy,
        k,
        dtype=np.float32,
        chunks=blurred.chunks[:-2]
        + (tuple(c // k for c in blurred.chunks[-2]), tuple(c // k for c in blurred.chunks[-1])),
    )


def subsample_z_volume(clean: da.Array, factor: int) -> da.Array:
    """Chunk-wise :func:`subsample_z` (z chunks regrouped to multiples of k)."""
    k = _check_factor(factor)
    nz = (clean.shape[0] // k) * k
    if nz == 0:
        raise ValueError(f"the volume has fewer than {k} z-slices")
    clean = clean[:nz].astype(np.float32)
    cz = min(_multiple_chunks(clean.chunks[0], k), nz)
    clean = clean.rechunk((cz,) + clean.chunks[1:])
    return clean.map_blocks(
        subsample_z,
        k,
        dtype=np.float32,
        chunks=(tuple(c // k for c in clean.chunks[0]),) + clean.chunks[1:],
    )


def degrade_volume(
    clean: da.Array,
    task: str,
    *,
    factor: int = 4,
    dose: float = 20.0,
    read_noise: float = 1.0,
    seed: int = 0,
) -> da.Array:
    """The input of ``task`` made from the clean volume: ``denoise`` -> Poisson-Gaussian noise
    at ``dose``; ``super-resolve`` -> blur + ``factor``x downsampling in xy; ``isotropic`` ->
    z-subsampling by ``factor`` with slab averaging. Lazy, chunk-wise, chunking-invariant."""
    if task == "denoise":
        return noise_volume(clean, dose=dose, read_noise=read_noise, seed=seed)
    if task == "super-resolve":
        return blur_downsample_volume(clean, factor)
    if task == "isotropic":
        return subsample_z_volume(clean, factor)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def degraded_grid(
    task: str, voxel_size: tuple[float, ...], *, factor: int = 4
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(voxel size, translation) in nm of the degraded image relative to a clean image with
    ``voxel_size`` and translation 0, following the conventions of the module docstring."""
    v = tuple(float(s) for s in voxel_size)
    if task == "denoise":
        return v, (0.0,) * len(v)
    if task == "super-resolve":
        size = v[:-2] + (v[-2] * factor, v[-1] * factor)
        shift = (0.0,) * (len(v) - 2) + ((factor - 1) / 2 * v[-2], (factor - 1) / 2 * v[-1])
        return size, shift
    if task == "isotropic":
        return (v[0] * factor,) + v[1:], ((factor - 1) / 2 * v[0],) + (0.0,) * (len(v) - 1)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
