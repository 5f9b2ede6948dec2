"""Volumes out: OME-Zarr 0.5 (zarr v3) written chunk region by chunk region.

:func:`create_image` makes the group and an empty level-0 array for region writes;
:func:`finalize_image` builds the 2x mean pyramid from the written level 0 and writes the
multiscales metadata last, so a crashed write never looks complete; :func:`write_image`
does all three for an array in hand.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from emdiffuse.errors import InputError
from emdiffuse.io.image import SPATIAL_AXES, check_dtype
from emdiffuse.io.output_safety import remove_output
from emdiffuse.io.paths import is_url, local_path
from emdiffuse.io.volume import parse_voxel_size


def _ngff_axes(axes: str) -> list[dict]:
    return [{"name": a, "type": "space", "unit": "nanometer"} for a in axes]


def create_image(
    path: str | Path,
    *,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    axes: str = "zyx",
    translation: Sequence[float] | None = None,
    overwrite: bool = False,
    name: str = "image",
    attributes: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create an OME-Zarr 0.5 group with an empty level-0 array ``0`` for region writes.

    The multiscales metadata is written by :func:`finalize_image`, so a half-written image
    is never mistaken for a finished one. Child images (``uncertainty/``) of an existing group
    are kept; ``overwrite`` replaces this path only, and only an image emdiffuse wrote.
    ``attributes`` are added to the group's ``emdiffuse`` attributes (what the image holds,
    e.g. an uncertainty map's kind), kept by :func:`finalize_image`.
    """
    path = str(path)
    local = local_path(path)
    if local.exists():
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it")
        remove_output(local, "image")  # only an image emdiffuse wrote
    parse_voxel_size(list(voxel_size), len(shape))
    group = zarr.open_group(str(local), mode="a", zarr_format=3)
    group.attrs["emdiffuse"] = {
        "name": name,
        "voxel_size_nm": [float(v) for v in voxel_size],
        "translation_nm": [float(t) for t in (translation or [0.0] * len(shape))],
        "axes": axes,
        **dict(attributes or {}),
        "complete": False,
    }
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape, strict=True))
    return group.create_array(
        "0",
        shape=tuple(int(s) for s in shape),
        dtype=np.dtype(dtype),
        chunks=chunks,
        fill_value=0,
        dimension_names=list(axes),
        overwrite=True,
    )


def pyramid_factors(
    shape: Sequence[int], voxel_size: Sequence[float], chunks: Sequence[int] | None = None
) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (relative to the previous level).

    Axes finer than the coarsest axis by about 2x or more are halved first (anisotropic
    volumes catch up); isotropic volumes halve every axis. An axis thinner than 16 voxels is
    not halved; the pyramid stops when the largest halved axis would drop below 16 voxels.
    """
    levels: list[tuple[int, ...]] = []
    shape = list(shape)
    voxel = list(voxel_size)
    while True:
        coarsest = max(voxel)
        factors = [2 if v * 2 <= coarsest * 1.5 else 1 for v in voxel]
        if all(f == 1 for f in factors):
            factors = [2 for _ in voxel]
        factors = [f if s // f >= 8 else 1 for s, f in zip(shape, factors, strict=True)]
        halved = [s // 2 for s, f in zip(shape, factors, strict=True) if f == 2]
        if not halved or max(halved) < 16:
            break
        levels.append(tuple(factors))
        shape = [s // f for s, f in zip(shape, factors, strict=True)]
        voxel = [v * f for v, f in zip(voxel, factors, strict=True)]
    return levels


def _downsample(data: da.Array, factors: Sequence[int], dtype: np.dtype) -> da.Array:
    trimmed = data[tuple(slice(0, (n // f) * f) for n, f in zip(data.shape, factors, strict=True))]
    mean = da.coarsen(np.mean, trimmed.astype(np.float32), dict(enumerate(factors)), trim_excess=True)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        mean = da.clip(da.round(mean), info.min, info.max)
    return mean.astype(dtype)


def finalize_image(
    path: str | Path,
    *,
    levels: int | None = None,
    voxel_size: Sequence[float] | None = None,
    axes: str | None = None,
    translation: Sequence[float] | None = None,
    scheduler=None,
) -> None:
    """Build levels 1..n from the written level 0, region by region, then write the metadata.

    ``levels`` caps the number of extra levels (None: until an axis drops below 32 voxels).
    Mean downsampling shifts each level's origin by half its voxel, recorded as a translation.
    """
    path = str(path)
    group = zarr.open_group(str(local_path(path)), mode="a")
    info = group.attrs.get("emdiffuse", {})
    voxel = [float(v) for v in (voxel_size or info.get("voxel_size_nm"))]
    axes = axes or info.get("axes") or SPATIAL_AXES[len(voxel)]
    offset = [float(t) for t in (translation or info.get("translation_nm") or [0.0] * len(voxel))]
    base = group["0"]
    plan = pyramid_factors(base.shape, voxel, base.chunks)
    if levels is not None:
        plan = plan[: max(0, int(levels))]
    datasets = [_dataset("0", voxel, offset)]
    previous = da.from_zarr(base)
    level_voxel = list(voxel)
    level_offset = list(offset)
    for i, factors in enumerate(plan, start=1):
        down = _downsample(previous, factors, base.dtype)
        target = group.create_array(
            str(i),
            shape=down.shape,
            dtype=base.dtype,
            chunks=tuple(min(c, s) for c, s in zip(base.chunks, down.shape, strict=True)),
            fill_value=0,
            dimension_names=list(axes),
            overwrite=True,
        )
        down = down.rechunk(target.chunks)
        da.store(down, target, lock=False, compute=True, scheduler=scheduler or "threads")
        level_offset = [o + (f - 1) * v / 2 for o, f, v in zip(level_offset, factors, level_voxel, strict=True)]
        level_voxel = [v * f for v, f in zip(level_voxel, factors, strict=True)]
        datasets.append(_dataset(str(i), level_voxel, level_offset))
        previous = da.from_zarr(target)
    multiscale = {
        "name": info.get("name", "image"),
        "axes": _ngff_axes(axes),
        "datasets": datasets,
        "type": "mean",
    }
    info = dict(info)
    info["complete"] = True
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale]}, "emdiffuse": info})


def _dataset(name: str, voxel: Sequence[float], offset: Sequence[float]) -> dict:
    transforms: list[dict] = [{"type": "scale", "scale": [float(v) for v in voxel]}]
    if any(o != 0 for o in offset):
        transforms.append({"type": "translation", "translation": [float(o) for o in offset]})
    return {"path": name, "coordinateTransformations": transforms}


def write_image(
    data: da.Array | np.ndarray,
    path: str | Path,
    *,
    voxel_size: Sequence[float],
    chunks: Sequence[int] | None = None,
    axes: str | None = None,
    translation: Sequence[float] | None = None,
    overwrite: bool = False,
    levels: int | None = None,
    name: str = "image",
    compute: bool = True,
) -> str:
    """Write a (dask) array as multiscale OME-Zarr 0.5, chunk region by chunk region."""
    data = da.asarray(data)
    check_dtype(data.dtype, str(path))
    axes = axes or SPATIAL_AXES[data.ndim]
    if chunks is None:
        chunks = tuple(min(s, c) for s, c in zip(data.shape, (64, 256, 256)[-data.ndim :], strict=True))
    target = create_image(
        path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        axes=axes,
        translation=translation,
        overwrite=overwrite,
        name=name,
    )
    try:
        da.store(data.rechunk(target.chunks), target, lock=False, compute=compute)
        finalize_image(path, levels=levels, voxel_size=voxel_size, axes=axes, translation=translation)
    except InputError:  # the data proved unreadable (a damaged chunk): remove what this made
        if not is_url(str(path)):
            shutil.rmtree(local_path(str(path)), ignore_errors=True)
        raise
    return str(path)
