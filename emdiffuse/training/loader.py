"""Training patches drawn straight from OME-Zarr / TIFF volumes, chunk by chunk.

:class:`PatchDataset` is a torch ``IterableDataset`` yielding dicts::

    {"cond": (C_in, h, w) float32, "target": (C_out, H, W) float32, "key": int,
     "origin": (3,) int64 footprint origin (zyx voxels), ["index": int]}

in model space [-1, 1] (``x = 2 (raw - low) / (high - low) - 1``, clipped), one of four
recipes (``k`` the scale factor, ``P = (H, W)`` the patch on the target grid):

``denoise``
    sources ``(noisy, clean)`` on one grid: the same (1, H, W) region of both.
``super-resolve``
    sources ``(low, high)`` with ``high`` k× finer in y and x; or ``(high,)`` alone, the low
    image then made by ``degrade.blur_downsample_xy`` from a region with a margin.
    cond is (1, H/k, W/k) on the low grid.
``isotropic`` (vEMDiffuse-i)
    one isotropic volume: slices z and z+k → the k-1 slices between (output channels).
``anisotropic`` (vEMDiffuse-a)
    one anisotropic volume: inside the xy planes, rows y and y+k → the k-1 rows between. The
    patch is laid out (y → channels, z → h, x → w): the network sees two bounding "slices"
    and predicts the ones between, as at inference where z is the channel axis.
    ``axis="x"`` uses columns (x → channels, z → h, y → w); ``"both"`` draws either.

Reading. Only the chunks a patch's footprint touches are read, straight from the zarr array
(not through dask), through a small per-process LRU chunk cache. Stores are opened lazily in
each process (DataLoader workers included): the dataset pickles as its source paths.

Randomness. Sample ``key`` is drawn from ``numpy.random.default_rng((seed, split, key))``:
a pure function of the key, so the stream is the same with 0 or N workers, any number of
ranks (DDP), and after a resume. Global batch ``s`` holds keys ``s*B*R .. (s+1)*B*R - 1``;
rank ``r`` takes its ``B`` consecutive keys; DataLoader worker ``w`` of ``W`` makes batches
``s ≡ w (mod W)`` so the loader returns them in order.

Validation split. The yx plane is cut into square regions (``region`` voxels, full depth in
z); a seeded draw assigns ``val_fraction`` of them to validation. A patch's whole footprint
(including the super-resolution margin) lies inside one region, so training and validation
patches never share a voxel.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emdiffuse.errors import InputError
from emdiffuse.training.augment import NONE, Augment, augment_pair

RECIPES = ("denoise", "super-resolve", "isotropic", "anisotropic")
SPLITS = {"train": 1, "val": 2}
PERCENTILES = (0.5, 99.5)


# --------------------------------------------------------------------------------------
# chunk reading
# --------------------------------------------------------------------------------------
def _zarr_array_of(volume) -> Any | None:
    """The zarr array behind an OME-Zarr :class:`Volume` (level ``volume.level``), or None."""
    for name in ("array", "zarr_array", "_array"):
        arr = getattr(volume, name, None)
        if arr is not None and hasattr(arr, "chunks") and hasattr(arr, "__getitem__"):
            if not hasattr(arr, "dask"):
                return arr
    path = str(getattr(volume, "path", "") or "")
    if not path or path.lower().endswith((".tif", ".tiff")):
        return None
    try:
        import zarr

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


def _open(source, voxel_size) -> tuple[Any, tuple[float, ...] | None, str]:
    """``source`` -> (3D sliceable array, voxel size zyx nm or None, label)."""
    if isinstance(source, (str, os.PathLike)):
        from emdiffuse.io import open_volume

        try:
            volume = open_volume(str(source), voxel_size=voxel_size)
        except InputError:
            raise
        except Exception as error:  # unreadable store: say which
            raise InputError(f"cannot open training data {source}: {error}") from None
        arr = _zarr_array_of(volume)
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


# --------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------
class PatchDataset(IterableDataset):
    """Random training patches of one recipe; see the module docstring.

    ``sources``: paths (OME-Zarr or TIFF), :class:`~emdiffuse.io.Volume` objects or
    arrays (zyx or yx): ``(noisy, clean)`` for denoise, ``(low, high)`` or ``(high,)`` for
    super-resolve, ``(volume,)`` for isotropic / anisotropic. ``patch``: target patch (H, W)
    in voxels (an int for square). ``factor``: k. ``normalization``: ``{"low", "high"}`` raw
    percentiles, or None to compute them from a seeded sample of chunks of the sources.
    """

    def __init__(
        self,
        recipe: str,
        sources: Sequence[Any],
        patch: int | Sequence[int] = 64,
        *,
        factor: int | None = None,
        split: str = "train",
        val_fraction: float = 0.1,
        region: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        normalization: dict[str, float] | None = None,
        augment: Augment | None = None,
        axis: str = "both",
        index_embedding: bool = False,
        min_std: float = 0.02,
        max_flat: float = 0.5,
        max_tries: int = 20,
        cache_bytes: int = 64 << 20,
        norm_chunks: int = 16,
        voxel_size: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if recipe not in RECIPES:
            raise InputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if split not in SPLITS:
            raise InputError(f"split must be 'train' or 'val', got {split!r}")
        if axis not in ("y", "x", "both"):
            raise InputError(f"axis must be 'y', 'x' or 'both', got {axis!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"val_fraction {val_fraction} must be in [0, 1)")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} must be in 0..{world_size - 1}")
        self.recipe = recipe
        self.sources = list(sources)
        n_expected = {"denoise": (2,), "super-resolve": (1, 2), "isotropic": (1,),
                      "anisotropic": (1,)}[recipe]  # fmt: skip
        if len(self.sources) not in n_expected:
            what = {
                "denoise": "two sources: NOISY,CLEAN",
                "super-resolve": "LOW,HIGH or HIGH alone",
                "isotropic": "one isotropic volume",
                "anisotropic": "one anisotropic volume",
            }[recipe]
            raise InputError(f"{recipe} takes {what}; got {len(self.sources)} source(s)")
        default_k = {"denoise": 1, "super-resolve": 2, "isotropic": 4, "anisotropic": 4}[recipe]
        self.k = int(default_k if factor is None else factor)
        if recipe == "denoise" and self.k != 1:
            raise InputError(f"denoise keeps the grid; factor must be 1, got {self.k}")
        if recipe != "denoise" and self.k < 2:
            raise InputError(f"{recipe} needs a factor k >= 2, got {self.k}")
        ph, pw = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(patch)
        self.patch = (int(ph), int(pw))
        if min(self.patch) < 4:
            raise InputError(f"patch {self.patch} too small; use at least 4 voxels a side")
        if recipe == "super-resolve" and (ph % self.k or pw % self.k):
            raise InputError(f"patch {self.patch} must be a multiple of the factor {self.k}")
        self.split = split
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self.axis = axis
        self.index_embedding = bool(index_embedding)
        self.min_std = float(min_std)
        self.max_flat = float(max_flat)
        self.max_tries = int(max_tries)
        self.cache_bytes = int(cache_bytes)
        self.margin = 2 * self.k if (recipe == "super-resolve" and len(self.sources) == 1) else 0
        if augment is None:
            augment = Augment(reverse_slices=recipe in ("isotropic", "anisotropic"))
        self.augment = augment
        self._voxel_size_arg = voxel_size
        self._readers: list[ChunkReader] | None = None
        self._pid: int | None = None

        readers = self._open_readers()
        self.infos = [
            SourceInfo(r.shape, r.chunks, vs, label)
            for r, (vs, label) in zip(readers, self._meta, strict=True)
        ]
        self._check_geometry()
        self.region = self._default_region() if region is None else int(region)
        if self.region < max(self._footprint_yx()):
            raise InputError(
                f"region {self.region} is smaller than a patch footprint {self._footprint_yx()}; "
                "use a larger --region or a smaller patch"
            )
        self.regions = self._make_regions()
        if normalization is None:
            normalization = self._percentiles(readers, norm_chunks)
        low, high = float(normalization["low"]), float(normalization["high"])
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise InputError(
                f"intensity percentiles low={low}, high={high}: the training data has no "
                "contrast; check the input"
            )
        self.normalization = {"low": low, "high": high}

    # ---- metadata --------------------------------------------------------------------
    @property
    def voxel_size(self) -> tuple[float, ...] | None:
        """Voxel size (zyx nm) of the target volume (the last source), if known."""
        return self.infos[-1].voxel_size

    @property
    def in_channels(self) -> int:
        return 2 if self.recipe in ("isotropic", "anisotropic") else 1

    @property
    def out_channels(self) -> int:
        if self.recipe in ("isotropic", "anisotropic"):
            return 1 if self.index_embedding else self.k - 1
        return 1

    def _open_readers(self) -> list[ChunkReader]:
        if self._readers is None or self._pid != os.getpid():
            opened = [_open(s, self._voxel_size_arg) for s in self.sources]
            share = max(self.cache_bytes // len(opened), 1)
            self._readers = [ChunkReader(a, cache_bytes=share) for a, _, _ in opened]
            self._meta = [(vs, label) for _, vs, label in opened]
            self._pid = os.getpid()
        return self._readers

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = None  # reopened lazily in each worker process
        state["_pid"] = None
        return state

    def _check_geometry(self) -> None:
        shapes = [i.shape for i in self.infos]
        labels = [i.label for i in self.infos]
        if self.recipe == "denoise" and shapes[0] != shapes[1]:
            raise InputError(
                f"denoise pairs must share one grid: {labels[0]} is {shapes[0]}, "
                f"{labels[1]} is {shapes[1]}; register them first (emdiffuse register)"
            )
        if self.recipe == "super-resolve" and len(shapes) == 2:
            (lz, ly, lx), (hz, hy, hx) = shapes
            if lz != hz or hy // self.k != ly or hx // self.k != lx:
                raise InputError(
                    f"super-resolve pair: {labels[1]} {shapes[1]} is not {self.k}x "
                    f"{labels[0]} {shapes[0]} in y and x; check --factor or the files"
                )
        z, y, x = shapes[-1]
        fz, fy, fx = self._footprint()
        if fz > z or fy > y or fx > x:
            raise InputError(
                f"{self.recipe} patch footprint (zyx) {(fz, fy, fx)} does not fit the volume "
                f"{shapes[-1]}; use a smaller --patch or --factor"
            )

    def _footprint(self) -> tuple[int, int, int]:
        """Extent (zyx) of the target-grid region one sample reads (axis 'y' for -a)."""
        ph, pw = self.patch
        k, m = self.k, self.margin
        if self.recipe == "isotropic":
            return (k + 1, ph, pw)
        if self.recipe == "anisotropic":
            if self.axis == "x":
                return (ph, pw, k + 1)
            if self.axis == "y":
                return (ph, k + 1, pw)
            return (ph, max(k + 1, pw), max(k + 1, pw))
        return (1, ph + 2 * m, pw + 2 * m)

    def _footprint_yx(self) -> tuple[int, int]:
        return self._footprint()[1:]

    def _default_region(self) -> int:
        side = max(self._footprint_yx())
        return max(2 * side, 32)

    # ---- validation split ------------------------------------------------------------
    def _make_regions(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """yx regions (y0, y1, x0, x1) per split, each big enough for a footprint."""
        _, Y, X = self.infos[-1].shape
        fy, fx = self._footprint_yx()
        r = self.region
        usable = []
        for y0 in range(0, Y, r):
            for x0 in range(0, X, r):
                y1, x1 = min(y0 + r, Y), min(x0 + r, X)
                if y1 - y0 >= fy and x1 - x0 >= fx:
                    usable.append((y0, y1, x0, x1))
        n_val = 0
        if self.val_fraction > 0:
            n_val = max(1, int(round(self.val_fraction * len(usable))))
            if len(usable) - n_val < 1:
                raise InputError(
                    f"the volume holds only {len(usable)} region(s) of {r} voxels; too few for "
                    "a train/validation split: use a smaller region or patch, or val_fraction 0"
                )
        order = np.random.default_rng([self.seed, 0x5E1]).permutation(len(usable))
        val = sorted(usable[i] for i in order[:n_val])
        train = sorted(usable[i] for i in order[n_val:])
        return {"train": train, "val": val}

    # ---- normalisation ---------------------------------------------------------------
    def _percentiles(self, readers, n_chunks: int) -> dict[str, float]:
        rng = np.random.default_rng([self.seed, 0x9E7])
        values = np.concatenate([r.sample_values(n_chunks, rng) for r in readers])
        if values.size > 2_000_000:
            values = rng.choice(values, 2_000_000, replace=False)
        low, high = np.percentile(values, PERCENTILES)
        return {"low": float(low), "high": float(high)}

    def _normalise(self, raw: np.ndarray) -> np.ndarray:
        low, high = self.normalization["low"], self.normalization["high"]
        x = (raw.astype(np.float32) - np.float32(low)) * np.float32(2.0 / (high - low)) - 1.0
        return np.clip(x, -1.0, 1.0, out=x)

    # ---- samples ---------------------------------------------------------------------
    def _draw_origin(self, rng: np.random.Generator, split: str, foot) -> tuple[int, int, int]:
        regions = self.regions[split]
        if not regions:
            raise InputError(f"no {split} regions (val_fraction is {self.val_fraction})")
        fz, fy, fx = foot
        weights = np.array([(y1 - y0 - fy + 1) * (x1 - x0 - fx + 1) for y0, y1, x0, x1 in regions])
        y0, y1, x0, x1 = regions[int(rng.choice(len(regions), p=weights / weights.sum()))]
        Z = self.infos[-1].shape[0]
        z = int(rng.integers(0, Z - fz + 1))
        step = self.k if (self.recipe == "super-resolve" and len(self.sources) == 2) else 1
        y = y0 + step * int(rng.integers(0, (y1 - y0 - fy) // step + 1))
        x = x0 + step * int(rng.integers(0, (x1 - x0 - fx) // step + 1))
        return z, y, x

    def _extract(self, origin, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw (cond, target) for a footprint at ``origin`` (zyx, target grid)."""
        readers = self._open_readers()
        k, (ph, pw), m = self.k, self.patch, self.margin
        z, y, x = origin
        if self.recipe == "denoise":
            cond = readers[0].read(origin, (1, ph, pw))
            target = readers[1].read(origin, (1, ph, pw))
        elif self.recipe == "super-resolve" and len(readers) == 2:
            cond = readers[0].read((z, y // k, x // k), (1, ph // k, pw // k))
            target = readers[1].read(origin, (1, ph, pw))
        elif self.recipe == "super-resolve":
            from emdiffuse.training.degrade import blur_downsample_xy

            region = readers[0].read(origin, (1, ph + 2 * m, pw + 2 * m)).astype(np.float32)
            low = np.asarray(blur_downsample_xy(region, k), dtype=np.float32)
            cond = low[:, m // k : m // k + ph // k, m // k : m // k + pw // k]
            target = region[:, m : m + ph, m : m + pw]
        elif self.recipe == "isotropic":
            block = readers[0].read(origin, (k + 1, ph, pw))
            cond, target = block[[0, k]], block[1:k]
        elif axis == "y":
            block = readers[0].read(origin, (ph, k + 1, pw))  # (z, rows, x)
            block = block.transpose(1, 0, 2)  # rows -> channels, z -> h, x -> w
            cond, target = block[[0, k]], block[1:k]
        else:
            block = readers[0].read(origin, (ph, pw, k + 1))  # (z, y, cols)
            block = block.transpose(2, 0, 1)  # cols -> channels, z -> h, y -> w
            cond, target = block[[0, k]], block[1:k]
        return cond, target

    def _foreground(self, target: np.ndarray) -> bool:
        if float(target.std()) < self.min_std:
            return False
        lo, hi = target.min(), target.max()
        flat = max(np.count_nonzero(target == lo), np.count_nonzero(target == hi))
        return flat <= self.max_flat * target.size

    def sample(self, key: int, split: str | None = None) -> dict[str, Any]:
        """The sample with this key (a pure function of seed, split and key)."""
        split = self.split if split is None else split
        rng = np.random.default_rng([self.seed, SPLITS[split], int(key)])
        for _ in range(self.max_tries):
            axis = self.axis
            if self.recipe == "anisotropic" and axis == "both":
                axis = "y" if rng.random() < 0.5 else "x"
            foot = self._axis_footprint(axis)
            origin = self._draw_origin(rng, split, foot)
            cond, target = self._extract(origin, axis)
            cond, target = self._normalise(cond), self._normalise(target)
            if self._foreground(target):
                break
        out: dict[str, Any] = {}
        if self.index_embedding and self.recipe in ("isotropic", "anisotropic"):
            index = int(rng.integers(0, self.k - 1))
            target = target[index : index + 1]
            out["index"] = index
        spec = self.augment if split == "train" else NONE
        cond, target = augment_pair(cond, target, rng, spec)
        out.update(
            cond=torch.from_numpy(cond),
            target=torch.from_numpy(target),
            key=int(key),
            origin=torch.tensor(origin, dtype=torch.int64),
        )
        return out

    def _axis_footprint(self, axis: str) -> tuple[int, int, int]:
        if self.recipe != "anisotropic":
            return self._footprint()
        ph, pw = self.patch
        return (ph, self.k + 1, pw) if axis == "y" else (ph, pw, self.k + 1)

    def footprint_of(self, sample: dict[str, Any], axis: str | None = None) -> tuple[slice, ...]:
        """The zyx region (target grid) a sample was read from, for checks."""
        origin = [int(v) for v in sample["origin"]]
        foot = self._axis_footprint(axis or ("y" if self.axis == "both" else self.axis))
        return tuple(slice(o, o + f) for o, f in zip(origin, foot, strict=True))

    def keys_for_step(self, step: int) -> range:
        """Sample keys this rank uses at global step ``step``."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        step = self.start_step + worker
        while True:
            for key in self.keys_for_step(step):
                yield self.sample(key)
            step += workers

    def batch(self, keys: Sequence[int], split: str | None = None) -> dict[str, Any]:
        """Collated samples of these keys (e.g. a fixed validation batch)."""
        from torch.utils.data import default_collate

        return default_collate([self.sample(k, split) for k in keys])

    @property
    def reads(self) -> int:
        """Chunks read from storage by this process so far (cache misses)."""
        return sum(r.reads for r in self._readers or [])


def make_loader(
    dataset: PatchDataset, *, workers: int = 0, prefetch: int = 2
) -> torch.utils.data.DataLoader:
    """A DataLoader returning batches of ``dataset.batch_size`` in step order."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=workers,
        **kwargs,
    )


__all__ = ["PatchDataset", "ChunkReader", "make_loader", "RECIPES"]
