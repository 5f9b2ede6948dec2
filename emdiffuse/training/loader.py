"""Training patches drawn straight from OME-Zarr / TIFF volumes, chunk by chunk.

:class:`PatchDataset` is a torch ``IterableDataset`` yielding dicts::

    {"cond": (C_in, h, w) float32, "target": (C_out, H, W) float32, "key": int,
     "origin": (3,) int64 footprint origin (zyx voxels), ["index": int]}

in model space [-1, 1] (:mod:`emdiffuse.models.normalization`, clipped), one of four
recipes (``k`` the scale factor, ``P = (H, W)`` the patch on the target grid).

Intensities: the condition and the target each have their own range, the robust
percentiles of their own source (:func:`~emdiffuse.training.recipes.normalization_sources`:
denoise NOISY -> condition and CLEAN -> target; super-resolve LOW -> condition and HIGH ->
target; a single-volume recipe uses that volume for both). One shared range would squeeze a
clean target into a small part of [-1, 1] next to its far wider noisy input.


``denoise``
    sources ``(noisy, clean)`` on one grid: the same (1, H, W) region of both; with
    ``z_context`` c the condition is the noisy slices ``z - c … z + c`` (1 + 2c, H, W) and
    the target the clean slice z.
``super-resolve``
    sources ``(low, high)`` with ``high`` k× finer in y and x; or ``(high,)`` alone, the low
    image then made by ``degrade.blur_downsample_xy`` from a region with a margin.
    cond is (1, H/k, W/k) on the low grid.
``isotropic`` (vEMDiffuse-i)
    one isotropic volume: slices z and z+k → the k-1 slices between (output channels); with
    ``z_context`` c also the c slices k apart beyond each of them (``z - ck … z + k + ck``,
    :mod:`emdiffuse.models.z_context`).
``anisotropic`` (vEMDiffuse-a)
    one anisotropic volume: inside the xy planes, rows y and y+k → the k-1 rows between. The
    patch is laid out (y → channels, z → h, x → w): the network sees two bounding "slices"
    and predicts the ones between, as at inference where z is the channel axis.
    ``axis="x"`` uses columns (x → channels, z → h, y → w); ``"both"`` draws either. The
    z context reads rows (columns) k apart beyond the pair, as for ``isotropic``.

Reading (:mod:`emdiffuse.training.chunks`). Only the chunks a patch's footprint touches are
read, straight from the zarr array (not through dask), through a small per-process LRU
chunk cache. Stores are opened lazily in
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

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from emdiffuse.errors import InputError
from emdiffuse.io.regions import worker_start_method
from emdiffuse.models.normalization import Normalization, as_pair, robust_range
from emdiffuse.models.z_context import (
    check_z_context,
    condition_slices,
    context_layout,
    footprint_span,
)
from emdiffuse.training.augment import NONE, Augment, augment_pair, training_augment
from emdiffuse.training.chunks import ChunkReader, SourceInfo, open_source
from emdiffuse.training.degrade import blur_downsample_xy
from emdiffuse.training.recipes import (
    RECIPES,
    SPLITS,
    check_options,
    check_pairing,
    footprint,
    normalization_sources,
    patch_shape,
    region_side,
    scale_factor,
    split_regions,
)


# --------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------
class PatchDataset(IterableDataset):
    """Random training patches of one recipe; see the module docstring.

    ``sources``: paths (OME-Zarr or TIFF), :class:`~emdiffuse.io.Volume` objects or
    arrays (zyx or yx): ``(noisy, clean)`` for denoise, ``(low, high)`` or ``(high,)`` for
    super-resolve, ``(volume,)`` for isotropic / anisotropic. ``patch``: target patch (H, W)
    in voxels (an int for square). ``factor``: k. ``normalization``: None to compute the
    condition's and the target's ranges from a seeded sample of chunks of their sources, or
    given (:func:`~emdiffuse.models.normalization.as_pair`: one ``{"low", "high"}`` for both,
    ``{"condition": …, "target": …}`` or a ``(condition, target)`` pair). The attributes
    ``normalization`` (the target's) and ``condition_normalization`` hold them as dicts.
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
        z_context: int = 0,
        min_std: float = 0.02,
        max_flat: float = 0.5,
        max_tries: int = 20,
        cache_bytes: int = 64 << 20,
        norm_chunks: int = 16,
        voxel_size: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_options(recipe, split, axis, val_fraction, rank, world_size)
        self.recipe = recipe
        self.sources = list(sources)
        self.k = scale_factor(recipe, len(self.sources), factor)
        self.patch = patch_shape(recipe, patch, self.k)
        self.split = split
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self.axis = axis
        self.index_embedding = bool(index_embedding)
        self.z_context = check_z_context(z_context, task=recipe, what=recipe)
        if self.z_context and self.index_embedding:
            raise InputError(
                "the index-embedding layout reads the two bounding slices only; "
                "use z_context 0 with it"
            )
        self.min_std = float(min_std)
        self.max_flat = float(max_flat)
        self.max_tries = int(max_tries)
        self.cache_bytes = int(cache_bytes)
        self.margin = 2 * self.k if (recipe == "super-resolve" and len(self.sources) == 1) else 0
        self.augment = training_augment(recipe) if augment is None else augment
        self._voxel_size_arg = voxel_size
        self._readers: list[ChunkReader] | None = None
        self._pid: int | None = None
        readers = self._open_readers()
        self.infos = [
            SourceInfo(r.shape, r.chunks, vs, label)
            for r, (vs, label) in zip(readers, self._meta, strict=True)
        ]
        check_pairing(
            recipe, self.k, [i.shape for i in self.infos], [i.label for i in self.infos],
            self._footprint(),
        )  # fmt: skip
        self.region = region_side(region, self._footprint_yx())
        self.regions = split_regions(
            self.infos[-1].shape[1:], self._footprint_yx(), self.region, self.val_fraction,
            self.seed,
        )  # fmt: skip
        if normalization is None:
            self._cond_norm, self._norm = self._percentiles(readers, norm_chunks)
        else:
            self._cond_norm, self._norm = _training_ranges(normalization)
        self.normalization = self._norm.to_dict()
        self.condition_normalization = self._cond_norm.to_dict()

    # ---- metadata --------------------------------------------------------------------
    @property
    def voxel_size(self) -> tuple[float, ...] | None:
        """Voxel size (zyx nm) of the target volume (the last source), if known."""
        return self.infos[-1].voxel_size

    @property
    def in_channels(self) -> int:
        isotropic = self.recipe in ("isotropic", "anisotropic")
        return condition_slices(self.z_context, isotropic=isotropic)

    @property
    def out_channels(self) -> int:
        if self.recipe in ("isotropic", "anisotropic"):
            return 1 if self.index_embedding else self.k - 1
        return 1

    def _open_readers(self) -> list[ChunkReader]:
        if self._readers is None or self._pid != os.getpid():
            opened = [open_source(s, self._voxel_size_arg) for s in self.sources]
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

    def _footprint(self) -> tuple[int, int, int]:
        """Extent (zyx) of the target-grid region one sample reads (``recipes.footprint``)."""
        return footprint(self.recipe, self.patch, self.k, self.margin, self.axis, self.z_context)

    def _footprint_yx(self) -> tuple[int, int]:
        return self._footprint()[1:]

    # ---- normalisation ---------------------------------------------------------------
    def _percentiles(self, readers, n_chunks: int) -> tuple[Normalization, Normalization]:
        """(condition, target) ranges, each from a seeded sample of its own source(s)."""
        rng = np.random.default_rng([self.seed, 0x9E7])
        samples = [r.sample_values(n_chunks, rng) for r in readers]
        ranges = []
        for which in normalization_sources(self.recipe, len(readers)):
            values = np.concatenate([samples[i] for i in which])
            if values.size > 2_000_000:
                values = rng.choice(values, 2_000_000, replace=False)
            ranges.append(values)
        try:
            return robust_range(ranges[0]), robust_range(ranges[1])
        except InputError:
            raise InputError(
                "the training data has no contrast (its 0.5 and 99.5 percentiles are equal); "
                "check the input"
            ) from None

    def _normalise(self, raw: np.ndarray) -> np.ndarray:
        """The target's raw intensities -> model space (clipped)."""
        return self._norm.forward(raw, clip=True)

    def _normalise_condition(self, raw: np.ndarray) -> np.ndarray:
        """The condition's raw intensities -> model space (clipped)."""
        return self._cond_norm.forward(raw, clip=True)

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
            c = self.z_context
            cond = readers[0].read(origin, (1 + 2 * c, ph, pw))
            target = readers[1].read((z + c, y, x), (1, ph, pw))
        elif self.recipe == "super-resolve" and len(readers) == 2:
            cond = readers[0].read((z, y // k, x // k), (1, ph // k, pw // k))
            target = readers[1].read(origin, (1, ph, pw))
        elif self.recipe == "super-resolve":
            region = readers[0].read(origin, (1, ph + 2 * m, pw + 2 * m)).astype(np.float32)
            low = np.asarray(blur_downsample_xy(region, k), dtype=np.float32)
            cond = low[:, m // k : m // k + ph // k, m // k : m // k + pw // k]
            target = region[:, m : m + ph, m : m + pw]
        else:  # isotropic recipes: slices (rows, columns) laid out by the z context
            span = footprint_span(k, self.z_context)
            picks, between = context_layout(k, self.z_context)
            if self.recipe == "isotropic":
                block = readers[0].read(origin, (span, ph, pw))
            elif axis == "y":
                block = readers[0].read(origin, (ph, span, pw))  # (z, rows, x)
                block = block.transpose(1, 0, 2)  # rows -> channels, z -> h, x -> w
            else:
                block = readers[0].read(origin, (ph, pw, span))  # (z, y, cols)
                block = block.transpose(2, 0, 1)  # cols -> channels, z -> h, y -> w
            cond, target = block[picks], block[between]
        return cond, target

    def _foreground(self, target: np.ndarray) -> bool:
        if float(target.std()) < self.min_std:
            return False
        lo, hi = target.min(), target.max()
        flat = max(np.count_nonzero(target == lo), np.count_nonzero(target == hi))
        return flat <= self.max_flat * target.size

    def sample(
        self,
        key: int,
        split: str | None = None,
        *,
        augment: bool = True,
        axis: str | None = None,
    ) -> dict[str, Any]:
        """The sample with this key (a pure function of seed, split, key and axis);
        ``augment`` False: as read, without the training split's flips, rotations and
        intensity jitter; ``axis`` (anisotropic only): ``"y"`` or ``"x"`` instead of the
        dataset's own axis."""
        split = self.split if split is None else split
        if axis is not None and (self.recipe != "anisotropic" or axis not in ("y", "x")):
            raise InputError(f"axis {axis!r}: only an anisotropic dataset reads along 'y' or 'x'")
        asked = self.axis if axis is None else axis
        rng = np.random.default_rng([self.seed, SPLITS[split], int(key)])
        for _ in range(self.max_tries):
            axis = asked
            if self.recipe == "anisotropic" and axis == "both":
                axis = "y" if rng.random() < 0.5 else "x"
            foot = self._axis_footprint(axis)
            origin = self._draw_origin(rng, split, foot)
            cond, target = self._extract(origin, axis)
            cond, target = self._normalise_condition(cond), self._normalise(target)
            if self._foreground(target):
                break
        out: dict[str, Any] = {}
        if self.index_embedding and self.recipe in ("isotropic", "anisotropic"):
            index = int(rng.integers(0, self.k - 1))
            target = target[index : index + 1]
            out["index"] = index
        spec = self.augment if split == "train" and augment else NONE
        cond, target = augment_pair(cond, target, rng, spec, (self._cond_norm, self._norm))
        out.update(
            cond=torch.from_numpy(cond),
            target=torch.from_numpy(target),
            key=int(key),
            origin=torch.tensor(origin, dtype=torch.int64),
        )
        return out

    def _axis_footprint(self, axis: str) -> tuple[int, int, int]:
        return footprint(self.recipe, self.patch, self.k, self.margin, axis, self.z_context)

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

    def batch(
        self,
        keys: Sequence[int],
        split: str | None = None,
        *,
        augment: bool = True,
        axis: str | None = None,
    ) -> dict[str, Any]:
        """Collated samples of these keys (e.g. a fixed validation batch); ``axis`` as for
        :meth:`sample`."""
        return default_collate([self.sample(k, split, augment=augment, axis=axis) for k in keys])

    @property
    def reads(self) -> int:
        """Chunks read from storage by this process so far (cache misses)."""
        return sum(r.reads for r in self._readers or [])


# --------------------------------------------------------------------------------------
def _training_ranges(normalization) -> tuple[Normalization, Normalization]:
    """The given (condition, target) ranges, refused without contrast."""
    try:
        return as_pair(normalization)
    except InputError as error:
        raise InputError(
            f"intensity range {normalization}: {error}; the training data has no contrast"
        ) from None


def make_loader(
    dataset: PatchDataset, *, workers: int = 0, prefetch: int = 2
) -> torch.utils.data.DataLoader:
    """A DataLoader returning batches of ``dataset.batch_size`` in step order."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
        start = worker_start_method()  # tensorstore (N5, precomputed) forbids fork
        if start is not None:
            kwargs["multiprocessing_context"] = start
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=workers,
        **kwargs,
    )


__all__ = ["PatchDataset", "make_loader", "RECIPES"]
