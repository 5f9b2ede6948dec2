"""Reading training sources chunk by chunk: paths, Volumes or arrays as 3D sliceable arrays.

:func:`open_source` turns a source (a path of any input format, an
:class:`~emdiffuse.io.Volume`, a zarr / dask / numpy array, 3D or 2D) into a zyx array,
straight from the zarr store or the format's region reader where there is one (not through
dask); :class:`ChunkReader` reads regions of it whole chunk by whole chunk through a small LRU
cache, so a patch reads only the chunks its footprint touches.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from emdiffuse.errors import InputError
from emdiffuse.io import open_volume
from emdiffuse.io.paths import input_format
from emdiffuse.io.regions import backing_reader


def _zarr_array_of(volume) -> Any | None:
    """The zarr array behind an OME-Zarr :class:`Volume` (level ``volume.level``), or None."""
    for name in ("array", "zarr_array", "_array"):
        arr = getattr(volume, name, None)
        if arr is not None and hasattr(arr, "chunks") and hasattr(arr, "__getitem__"):
            if not hasattr(arr, "dask"):
                return arr
    path = str(getattr(volume, "path", "") or "")
    if not path or input_format(path) != "ome-zarr":
        return None
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
        level = int(getattr(volume, "level", 0) or 0)
        sub = ms[0]["datasets"][level]["path"]
        arr = group[sub]
    except Exception:
        return None
    if tuple(arr.shape) != tuple(volume.shape):
        return None
    return arr


def _chunk_shape(arr) -> tuple[int, ...]:
    chunks = getattr(arr, "chunks", None)
    if chunks is None:
        return tuple(arr.shape)
    if chunks and isinstance(chunks[0], tuple):  # dask: per-axis chunk lists
        return tuple(int(c[0]) for c in chunks)
    return tuple(int(c) for c in chunks)


class ChunkReader:
    """Reads zyx regions of a 3D array whole chunk by whole chunk, through an LRU cache.

    ``array`` is anything sliceable into numpy with a ``chunks`` attribute (zarr.Array, a
    dask array, a numpy array); ``reads`` counts chunk fetches from the array (cache misses).
    """

    def __init__(self, array, *, cache_bytes: int = 64 << 20) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        if len(self.shape) != 3:
            raise InputError(f"expected a 3D (zyx) array, got shape {self.shape}")
        self.direct = isinstance(array, np.ndarray)
        self.chunks = _chunk_shape(array)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cached = 0
        self.reads = 0

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            return block
        region = tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(index, self.chunks, self.shape, strict=True)
        )
        block = self.array[region]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="synchronous")
        block = np.asarray(block)
        self.reads += 1
        if block.nbytes <= self.cache_bytes:
            self._cache[index] = block
            self._cached += block.nbytes
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return block

    def read(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The region ``origin .. origin + size`` (zyx voxels, inside the array)."""
        lo = [int(o) for o in origin]
        hi = [o + int(s) for o, s in zip(lo, size, strict=True)]
        if any(a < 0 or b > s for a, b, s in zip(lo, hi, self.shape, strict=True)):
            raise ValueError(f"region {lo}..{hi} outside array {self.shape}")
        if self.direct:
            return np.asarray(self.array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
        out = None
        ranges = [
            range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, self.chunks, strict=True)
        ]
        for iz in ranges[0]:
            for iy in ranges[1]:
                for ix in ranges[2]:
                    index = (iz, iy, ix)
                    block = self._chunk(index)
                    if out is None:
                        out = np.empty([b - a for a, b in zip(lo, hi, strict=True)], block.dtype)
                    src, dst = [], []
                    for i, c, a, b in zip(index, self.chunks, lo, hi, strict=True):
                        s0, s1 = max(a, i * c), min(b, (i + 1) * c)
                        src.append(slice(s0 - i * c, s1 - i * c))
                        dst.append(slice(s0 - a, s1 - a))
                    out[tuple(dst)] = block[tuple(src)]
        return out

    def sample_values(self, n_chunks: int, rng: np.random.Generator) -> np.ndarray:
        """Values of up to ``n_chunks`` whole chunks picked by ``rng`` (for percentiles)."""
        grid = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True)]
        total = int(np.prod(grid))
        picks = rng.choice(total, size=min(n_chunks, total), replace=False)
        values = []
        for flat in sorted(int(p) for p in picks):
            index = tuple(int(i) for i in np.unravel_index(flat, grid))
            block = self.array[
                tuple(
                    slice(i * c, min((i + 1) * c, s))
                    for i, c, s in zip(index, self.chunks, self.shape, strict=True)
                )
            ]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="synchronous")
            values.append(np.asarray(block, dtype=np.float64).ravel())
        return np.concatenate(values)


class _As3D:
    """A 2D (yx) array seen as zyx with one slice."""

    def __init__(self, array) -> None:
        self.array = array
        self.shape = (1, *array.shape)
        chunks = _chunk_shape(array)
        self.chunks = (1, *chunks)
        self.dtype = array.dtype

    def __getitem__(self, region):
        return np.asarray(self.array[region[1:]])[None]


@dataclass
class SourceInfo:
    """What the dataset knows of a source without holding it open."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    voxel_size: tuple[float, ...] | None
    label: str


def open_source(source, voxel_size) -> tuple[Any, tuple[float, ...] | None, str]:
    """``source`` -> (3D sliceable array, voxel size zyx nm or None, label)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            volume = open_volume(str(source), voxel_size=voxel_size)
        except InputError:
            raise
        except Exception as error:  # unreadable store: say which
            raise InputError(f"cannot open training data {source}: {error}") from None
        arr = _zarr_array_of(volume)
        if arr is None:  # HDF5, N5, precomputed, MRC: their region reader, else dask
            arr = backing_reader(volume.data)
        if arr is None:
            arr = volume.data
        vs = tuple(float(v) for v in volume.voxel_size) if volume.voxel_size else None
        label = str(source)
    elif hasattr(source, "data") and hasattr(source, "voxel_size") and hasattr(source, "axes"):
        arr = _zarr_array_of(source)
        if arr is None:
            arr = source.data
        vs = tuple(float(v) for v in source.voxel_size) if source.voxel_size else None
        label = str(getattr(source, "path", "volume"))
    else:
        arr = source
        vs = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        label = type(source).__name__
    if not hasattr(arr, "shape") or not hasattr(arr, "__getitem__"):
        raise InputError(f"training source {label} is not an array, path or Volume")
    if np.dtype(arr.dtype).kind not in "uif":
        raise InputError(f"training source {label} has dtype {arr.dtype}; use integer or float")
    if len(arr.shape) == 2:
        arr = _As3D(arr)
        if vs is not None and len(vs) == 2:
            vs = (vs[0], *vs)
    elif len(arr.shape) != 3:
        raise InputError(f"training source {label} has shape {arr.shape}; expected zyx or yx")
    return arr, vs, label


__all__ = ["ChunkReader", "SourceInfo", "open_source"]
